"""DDP on 2 CPU processes: every rank ends with the same masks, weights and controller; metrics are logged once."""

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).parent / "scripts" / "ddp_fit.py"


@pytest.mark.slow
def test_ddp_ranks_agree_and_log_once(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), str(tmp_path)], capture_output=True, text=True, timeout=300, cwd=tmp_path
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    rank0 = json.loads((tmp_path / "rank0.json").read_text())
    rank1 = json.loads((tmp_path / "rank1.json").read_text())
    assert rank0["steps"] == rank1["steps"] == 3 * 8  # 512 samples, 2 ranks x batch 32
    for key in ("masks", "weights", "lam", "density"):
        assert rank0[key] == rank1[key], key
    assert rank0["density"] < 0.9 and rank0["lam"] != 0.01  # masks and controller actually moved
    assert rank0["kept"] == round(0.3 * rank0["connections"])  # the exact-density step ran, identically on both
    with open(tmp_path / "logs" / "version_0" / "metrics.csv") as fh:
        steps = [row["step"] for row in csv.DictReader(fh) if row.get("scl/density")]
    assert len(steps) == len(set(steps)) == 3 * 8  # one row per step: written by rank zero only


@pytest.mark.slow
def test_ddp_gan_with_two_optimizers_ranks_agree(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), str(tmp_path), "gan"], capture_output=True, text=True, timeout=300, cwd=tmp_path
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    rank0 = json.loads((tmp_path / "rank0.json").read_text())
    rank1 = json.loads((tmp_path / "rank1.json").read_text())
    assert rank0["steps"] == rank1["steps"] == 2 * 3 * 8  # two optimizer steps per batch, 8 batches per rank
    for key in ("masks", "weights", "lam", "density", "kept"):
        assert rank0[key] == rank1[key], key
    assert rank0["lam"] != 0.01 and rank0["kept"] == round(0.3 * rank0["connections"])
