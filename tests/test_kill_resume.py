"""SIGKILL a real fit mid-epoch, resume from ``last``, and end exactly where an uninterrupted run ends."""

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).parent / "scripts" / "kill_resume_fit.py"


def _run(mode: str, out: Path) -> dict:
    proc = subprocess.run([sys.executable, str(SCRIPT), mode, str(out)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads((out / f"{mode}.json").read_text())


@pytest.mark.slow
def test_sigkill_mid_epoch_then_resume_matches_uninterrupted_run(tmp_path):
    straight = _run("straight", tmp_path)
    victim = subprocess.Popen(
        [sys.executable, str(SCRIPT), "interrupted", str(tmp_path)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    progress = tmp_path / "progress_interrupted"
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and victim.poll() is None:
        if progress.exists() and int(progress.read_text()) >= 23:
            break
        time.sleep(0.02)
    assert victim.poll() is None, (
        "the run finished or crashed before it could be killed: " + victim.stderr.read()[-2000:]
    )
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    killed_at = int(progress.read_text())
    assert killed_at % 16 not in (0, 15), "the kill should land mid-epoch"

    for ckpt in (tmp_path / "ckpt").glob("*.ckpt"):  # every file on disk is complete and loads
        torch.load(ckpt, weights_only=True)
    assert not list((tmp_path / "ckpt").glob("*.tmp*"))

    resumed = _run("resume", tmp_path)
    assert 0 < resumed["resumed_from"] < 16  # really resumed mid-epoch
    assert resumed["steps"] == straight["steps"] == 48
    for key in ("masks", "weights", "lam", "last_logged_density"):
        assert resumed[key] == straight[key], key
