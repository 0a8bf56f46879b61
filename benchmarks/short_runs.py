"""The density controller in short runs: channel masks on a ResNet-20 in 313 optimizer steps, or LeNet-5 in 1,407.

The settings are the export latency benchmark's (``export_benchmark.trained_channel_masks``): channel SCL with
``target_density``, connection-count regularizer, the classifier excluded, SGD 0.05 with cosine decay, batch 128,
default ramp and freeze (0.7); ResNet-20 for 2 epochs on 20,000 MNIST images padded to 32x32 and repeated to 3
channels, LeNet-5-Caffe for 3 epochs on all 60,000. Every optimizer step records the density, the scheduled density
and ``lam``; the table gives, per model, target density and seed, the test accuracy, how far the density fell below
the schedule (lowest density / scheduled density) and the density range between the end of the ramp and the freeze.
The plot shows the density of every seed against the schedule.

Run it once per library version with ``--label`` (a rerun replaces the rows of the same label, model, density and
seed); the table and plot show every label in the JSON file, so a version before a change can be compared with the
one after it (run the earlier library with ``PYTHONPATH=<its checkout>``; every row records which ``lightning_scl``
it imported).

Usage::

    python benchmarks/short_runs.py --label after              # 3 seeds at 10% (about 7 minutes, 2 threads)
    python benchmarks/short_runs.py --label after --densities 0.1 0.3 --seeds 0 1 2 3 4
    python benchmarks/short_runs.py --label after --model LeNet-5-Caffe
    python benchmarks/short_runs.py --label dense --dense          # the dense network, same training
    python benchmarks/short_runs.py --no-train                  # rewrite the table and plot from the JSON
    python benchmarks/short_runs.py --smoke                     # CI: 3 steps, writes nothing
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as L
import matplotlib
import torch
from export_benchmark import trained_channel_masks
from summarize import mean_std

import lightning_scl
from lightning_scl.callbacks.scl import SparseConnectivityLearning

matplotlib.use("Agg")
import matplotlib.pyplot as plt

RESULTS = Path(__file__).resolve().parent / "results"
SETTINGS = {  # the export latency benchmark's training setups
    "ResNet-20": "2 epochs on 20,000 MNIST images padded to 32x32 (313 steps)",
    "LeNet-5-Caffe": "3 epochs on the 60,000 MNIST images (1,407 steps)",
}


class DensityTrace(L.Callback):
    """Records (step, density, scheduled density, lam) after every optimizer step until the masks freeze."""

    def __init__(self) -> None:
        self.rows: list[tuple[int, float, float, float]] = []
        self.ramp_end_step: int | None = None

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        scl = next((c for c in trainer.callbacks if isinstance(c, SparseConnectivityLearning)), None)
        if scl is None or scl.frozen:  # the dense baseline has nothing to record
            return
        progress = scl._progress(trainer)
        scheduled = scl.scheduled_density(progress)
        if self.ramp_end_step is None and progress >= scl.ramp_end:
            self.ramp_end_step = trainer.global_step
        self.rows.append((trainer.global_step, scl.density, scheduled, scl.lam))


def _library_version() -> str:
    """The commit of the ``lightning_scl`` this process imported (``+changes`` when its tree differs)."""
    folder = Path(lightning_scl.__file__).resolve().parent
    try:
        commit = subprocess.run(
            ["git", "-C", str(folder), "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(folder), "status", "--porcelain", "--", "."], capture_output=True, text=True
        )
    except (OSError, subprocess.CalledProcessError):
        return "lightning_scl " + lightning_scl.__version__
    return f"library at {commit}" + (" +changes" if dirty.stdout.strip() else "")


def run_one(model: str, density: float | None, seed: int, data_dir: str, smoke: bool) -> dict[str, Any]:
    """One training run (``density=None``: the dense network, same training) and what its trace shows."""
    trace = DensityTrace()
    start = time.perf_counter()
    _, accuracy = trained_channel_masks(model, density, data_dir, smoke=smoke, seed=seed, callbacks=[trace])
    ratios = [d / s for _, d, s, _ in trace.rows]
    after_ramp = [d for step, d, _, _ in trace.rows if trace.ramp_end_step is not None and step >= trace.ramp_end_step]
    return {
        "model": model,
        "target_density": density,
        "seed": seed,
        "test_acc": accuracy,
        "lowest_density_over_schedule": min(ratios) if ratios else math.nan,
        "density_range_after_ramp": [min(after_ramp), max(after_ramp)] if after_ramp else None,
        "steps_until_freeze": len(trace.rows),
        "trace": trace.rows,
        "seconds": time.perf_counter() - start,
    }


def _model(row: dict[str, Any]) -> str:
    return row.get("model", "ResNet-20")  # the first rows were all ResNet-20


def _groups(results: dict[str, Any]) -> list[tuple[tuple[str, float | None], str, list[dict[str, Any]]]]:
    """((model, density), label, its rows by seed) for every setting a label has rows for."""
    groups = []
    for label, runs in results["labels"].items():
        for key in {(_model(r), r["target_density"]) for r in runs["rows"]}:
            rows = [r for r in runs["rows"] if (_model(r), r["target_density"]) == key]
            groups.append((key, label, sorted(rows, key=lambda r: r["seed"])))
    labels = list(results["labels"])
    return sorted(groups, key=lambda g: (g[0][0], g[0][1] or 1.0, labels.index(g[1])))


def write_table(results: dict[str, Any], out_md: Path) -> None:
    lines = [
        "# The density controller in short channel-mask runs",
        "",
        "Channel SCL toward `target_density` (connection-count regularizer, classifier excluded), SGD 0.05 cosine, "
        "batch 128, the export latency benchmark's settings: "
        + "; ".join(f"{model}: {setting}" for model, setting in SETTINGS.items())
        + ". "
        "Lowest ratio: the lowest density / scheduled density before the freeze (1 = never below the schedule). "
        f"Machine: {results['machine']}.",
        "",
        "| model | library | target density | test acc % (mean +- std) | test acc % per seed "
        "| lowest density / schedule per seed | density after the ramp, min-max per seed |",
        "|---|---|---:|---:|---|---|---|",
    ]
    for (model, density), label, rows in _groups(results):
        accs = [100 * r["test_acc"] for r in rows]
        lowest = ", ".join(
            "-" if math.isnan(r["lowest_density_over_schedule"]) else f"{r['lowest_density_over_schedule']:.2f}"
            for r in rows
        )
        ranges = ", ".join(
            f"{100 * r['density_range_after_ramp'][0]:.1f}-{100 * r['density_range_after_ramp'][1]:.1f}%"
            if r["density_range_after_ramp"]
            else "-"
            for r in rows
        )
        seeds = ", ".join(str(r["seed"]) for r in rows)
        libraries = ", ".join(sorted({r["library"] for r in rows}))
        target = "dense" if density is None else f"{100 * density:g}%"
        lines.append(
            f"| {model} | {label} ({libraries}; seeds {seeds}) | {target} | {mean_std(accs)} | "
            f"{', '.join(f'{a:.2f}' for a in accs)} | {lowest} | {ranges} |"
        )
    out_md.write_text("\n".join(lines) + "\n")


def plot(results: dict[str, Any], out_png: Path) -> None:
    labels = list(dict.fromkeys(label for (_, density), label, _ in _groups(results) if density is not None))
    settings = sorted({key for key, *_ in _groups(results) if key[1] is not None})
    if not settings:
        return  # dense baselines only
    fig, axes = plt.subplots(len(settings), len(labels), figsize=(5 * len(labels), 3.2 * len(settings)), squeeze=False)
    for (model, density), label, rows in _groups(results):
        if density is None:
            continue  # the dense baseline has no density to plot
        ax = axes[settings.index((model, density))][labels.index(label)]
        for r in rows:
            steps = [t[0] for t in r["trace"]]
            ax.plot(steps, [t[1] for t in r["trace"]], lw=1, label=f"seed {r['seed']}")
        schedule = rows[0]["trace"]
        ax.plot([t[0] for t in schedule], [t[2] for t in schedule], "k--", lw=1.2, label="schedule")
        ax.set_yscale("log")
        ax.set_title(f"{model}, {label}: target {100 * density:g}%")
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("density")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--label", default="current", help="name of this library version in the table")
    parser.add_argument("--model", choices=sorted(SETTINGS), default="ResNet-20")
    parser.add_argument("--densities", type=float, nargs="+", default=[0.1])
    parser.add_argument("--dense", action="store_true", help="train the dense network instead (the baseline)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--data-dir", default="data")
    parser.add_argument("--out", type=Path, default=RESULTS / "short_runs.json")
    parser.add_argument("--smoke", action="store_true", help="CI: 3 steps on 256 images, writes nothing")
    parser.add_argument("--no-train", action="store_true", help="only rewrite the table and plot from the JSON")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    out = Path(tempfile.mkdtemp()) / "short_runs.json" if args.smoke else args.out
    seeds = args.seeds[:1] if args.smoke else args.seeds
    results = json.loads(out.read_text()) if out.exists() else {"labels": {}}
    if not args.no_train:
        results["machine"] = f"{torch.__version__}, {args.threads} threads"
    runs = {"rows": []} if args.no_train else results["labels"].setdefault(args.label, {"rows": []})
    library = _library_version()
    for density in [] if args.no_train else [None] if args.dense else args.densities:
        for seed in seeds:
            row = {**run_one(args.model, density, seed, args.data_dir, args.smoke), "library": library}
            key = (args.model, density, seed)
            runs["rows"] = [r for r in runs["rows"] if (_model(r), r["target_density"], r["seed"]) != key] + [row]
            print(
                f"{args.label} {args.model} {'dense' if density is None else f'density {density:g}'} seed {seed}: "
                f"test acc {100 * row['test_acc']:.2f}%, lowest density/schedule "
                f"{row['lowest_density_over_schedule']:.2f}, {row['seconds']:.0f} s",
                flush=True,
            )
            out.write_text(json.dumps(results))
    write_table(results, out.with_suffix(".md"))
    plot(results, out.with_suffix(".png"))
    print(out.with_suffix(".md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
