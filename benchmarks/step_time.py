"""Training cost: wall time per optimizer step, dense vs SCL vs ModelPruning-style masks, through a real Trainer.

One process, methods interleaved round by round, many steps per round; the first steps of every fit are dropped
(warm-up). A step is timed from ``on_train_batch_start`` to ``on_train_batch_end``: forward, backward, the SCL
normalization/regularizer/mask update (in ``on_before_optimizer_step``) and the optimizer step, i.e. everything SCL
adds. Logging is on (``log_every_n_steps=50``) so the metric logging the SCL callback does is counted too.

"scl" trains the masks at every timed step (never frozen) with ``target_density``, as the recipes do, so the density
controller counts the kept connections at every step; "scl_frozen" freezes them during the warm-up, which is what the
default ``freeze_masks_at=0.7`` does for the last 30% of a run. Two bracketing callbacks also time SCL's own hooks
(the mask update and the protected-weight restore): a steadier number than a ratio of step times. The summary line
weights the two medians 0.7 / 0.3: the cost of a default run (derived, not timed as such).

"modelpruning" installs ``torch.nn.utils.prune`` global L1 masks (the forward-pre-hooks Lightning's ModelPruning
uses) before the fit, so every timed step pays their steady-state cost.

Besides the pooled medians, every round's own ratio to dense is reported (min-max over rounds): a round times all
methods back to back, so its ratio is free of the drift between rounds that a shared machine shows.

Usage::

    python benchmarks/step_time.py --rounds 12     # LeNet-5 (MNIST shape) and ResNet-20 (CIFAR shape), batch 128
    python benchmarks/step_time.py --smoke         # CI: 2 rounds of 3 steps, writes nothing
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import lightning.pytorch as L
import torch
from torch import nn
from torch.nn.utils import prune
from torch.utils.data import DataLoader, TensorDataset

from lightning_scl.callbacks.scl import SparseConnectivityLearning
from lightning_scl.models import ImageClassifier

RESULTS = Path(__file__).parent / "results"
SHAPES = {"lenet300": (1, 28, 28), "lenet5": (1, 28, 28), "resnet20": (3, 32, 32)}


class HookBracket(L.Callback):
    """Placed right before and right after the SCL callback: times what SCL's own per-step hooks take.

    Lightning calls every callback's hook in list order, so the time between the opening and the closing bracket's
    ``on_before_optimizer_step`` (the mask update) and ``on_train_batch_end`` (restoring protected weights) is SCL's.
    """

    def __init__(self, closing: HookBracket | None = None, skip: int = 0):
        self.closing, self.skip, self.start, self.times, self._step = closing, skip, 0.0, [], 0.0

    def _open_or_close(self, batch_idx: int) -> None:
        if self.closing is not None:  # the opening bracket
            self.closing.start = time.perf_counter()
        elif batch_idx >= self.skip:
            self._step += time.perf_counter() - self.start

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._batch_idx, self._step = batch_idx, 0.0

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self._open_or_close(self._batch_idx)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self._open_or_close(batch_idx)
        if self.closing is None and batch_idx >= self.skip:
            self.times.append(self._step)


class StepTimer(L.Callback):
    def __init__(self, skip: int):
        self.skip, self.times, self._start = skip, [], 0.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if batch_idx >= self.skip:
            self.times.append(time.perf_counter() - self._start)


def one_fit(model_name: str, method: str, steps: int, skip: int, batch_size: int) -> tuple[list[float], list[float]]:
    """Seconds per timed step, and per step the seconds spent in SCL's own hooks (empty without SCL)."""
    torch.manual_seed(0)
    shape = SHAPES[model_name]
    data = TensorDataset(
        torch.randn(batch_size * (steps + skip), *shape), torch.randint(0, 10, (batch_size * (steps + skip),))
    )
    model = ImageClassifier(model_name, lr=0.05, weight_decay=5e-4)
    callbacks: list[L.Callback] = [timer := StepTimer(skip)]
    closing = HookBracket(skip=skip)
    # With target_density, as the recipes use it: the density controller counts the kept connections every step.
    if method == "scl":
        # Never frozen: every timed step pays the full mask update (after the default freeze at 70% a step is cheaper).
        scl = SparseConnectivityLearning(target_density=0.02, freeze_masks_at=None)
        callbacks[:0] = [HookBracket(closing), scl, closing]
    elif method == "scl_frozen":
        # Frozen after the first step (within the dropped warm-up): the cost of the default's last 30% of steps.
        # (A fixed lam: target_density refuses to freeze before its density schedule ends, and frozen masks run
        # no controller anyway.)
        scl = SparseConnectivityLearning(lam=0.1, freeze_masks_at=0.01)
        callbacks[:0] = [HookBracket(closing), scl, closing]
    elif method == "modelpruning":
        layers = [(m, "weight") for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
        prune.global_unstructured(layers, pruning_method=prune.L1Unstructured, amount=0.5)
    # A real logger, as in use (logging is part of the step's cost); its files are thrown away.
    with tempfile.TemporaryDirectory() as log_dir:
        trainer = L.Trainer(
            accelerator="cpu",
            max_steps=steps + skip,
            callbacks=callbacks,
            logger=L.loggers.CSVLogger(log_dir, name="scl_step_time"),
            log_every_n_steps=50,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
        )
        trainer.fit(model, DataLoader(data, batch_size=batch_size))
    return timer.times, closing.times


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["lenet5", "resnet20"], choices=sorted(SHAPES))
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--steps", type=int, default=20, help="timed steps per fit")
    parser.add_argument("--skip", type=int, default=5, help="warm-up steps dropped per fit")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=RESULTS / "step_time.json")
    parser.add_argument("--smoke", action="store_true")
    args = parser.parse_args(argv)
    if args.smoke:
        args.rounds, args.steps, args.skip, args.batch_size = 2, 3, 1, 16
    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)
    methods = ["dense", "scl", "scl_frozen", "modelpruning"]
    results = {}
    for model_name in args.models:
        rounds: dict[str, list[list[float]]] = {m: [] for m in methods}
        hooks: dict[str, list[float]] = {m: [] for m in methods}
        for round_index in range(args.rounds):
            shift = round_index % len(methods)
            order = methods[shift:] + methods[:shift]  # rotate to spread drift evenly
            for method in order:
                step_times, hook_times = one_fit(model_name, method, args.steps, args.skip, args.batch_size)
                rounds[method].append(step_times)
                hooks[method] += hook_times
        times = {method: [t for r in per_round for t in r] for method, per_round in rounds.items()}
        dense = statistics.median(times["dense"])
        results[model_name] = {
            method: {
                "median_ms": 1000 * statistics.median(t),
                "p10_ms": 1000 * statistics.quantiles(t, n=10)[0],
                "p90_ms": 1000 * statistics.quantiles(t, n=10)[-1],
                "steps": len(t),
                "ratio_to_dense": statistics.median(t) / dense,
                # SCL's own hooks (mask update, protected-weight restore): the part of a step SCL adds directly
                "scl_hooks_median_ms": 1000 * statistics.median(hooks[method]) if hooks[method] else None,
                # Each round times every method back to back, so its own ratio cancels drift of the machine
                # between rounds; the spread of these ratios is what says whether a ratio is established.
                "round_ratios": [
                    statistics.median(mine) / statistics.median(base)
                    for mine, base in zip(rounds[method], rounds["dense"])
                ],
            }
            for method, t in times.items()
        }
    meta = {
        "batch_size": args.batch_size,
        "threads": args.threads,
        "rounds": args.rounds,
        "steps_per_fit": args.steps,
        "torch": torch.__version__,
        "machine": platform.machine(),
        "processor": platform.processor(),
    }
    lines = [
        "| model | method | median ms/step | p10-p90 ms | steps | x dense | x dense per round: median (min-max) "
        "| SCL's hooks, median ms/step |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for model_name, per_method in results.items():
        for method, r in per_method.items():
            ratios = r["round_ratios"]
            lines.append(
                f"| {model_name} | {method} | {r['median_ms']:.1f} | {r['p10_ms']:.1f}-{r['p90_ms']:.1f} | "
                f"{r['steps']} | {r['ratio_to_dense']:.3f} | "
                f"{statistics.median(ratios):.3f} ({min(ratios):.3f}-{max(ratios):.3f}) | "
                f"{'-' if r['scl_hooks_median_ms'] is None else format(r['scl_hooks_median_ms'], '.2f')} |"
            )
    for model_name, per_method in results.items():
        run_average = 0.7 * per_method["scl"]["ratio_to_dense"] + 0.3 * per_method["scl_frozen"]["ratio_to_dense"]
        per_round = [
            0.7 * trained + 0.3 * frozen
            for trained, frozen in zip(per_method["scl"]["round_ratios"], per_method["scl_frozen"]["round_ratios"])
        ]
        results[model_name]["default_run_ratio_to_dense"] = run_average
        results[model_name]["default_run_round_ratios"] = per_round
        within = sum(r <= 1.10 for r in per_round)
        lines.append(
            f"\n{model_name}: a default SCL run (masks trained for 70% of the steps, frozen after) costs "
            f"{run_average:.3f}x dense per step on average (0.7 x scl + 0.3 x scl_frozen); per round "
            f"{min(per_round):.3f}-{max(per_round):.3f}x, at most 1.10x in {within} of {len(per_round)} rounds."
        )
    print("\n".join(lines))
    if not args.smoke:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"meta": meta, "results": results}, indent=2))
        args.out.with_suffix(".md").write_text(
            f"Batch {args.batch_size}, {args.threads} threads, {args.rounds} interleaved rounds x {args.steps} steps "
            f"per method, torch {torch.__version__}.\n\n" + "\n".join(lines) + "\n"
        )


if __name__ == "__main__":
    main(sys.argv[1:])
