"""Cost of logging scl/flops, scl/flops_ratio and scl/params_kept, relative to a LeNet-5 training step.

One real ``Trainer`` fit per configuration with SparseConnectivityLearning, ``log_every_n_steps=1`` so every step
logs, the reporter's metrics switched on and off on alternate steps (same machine load for both). Steps are timed
from ``on_train_batch_start`` to ``on_train_batch_end``; the callback's logging call is timed with and without the
metrics, and the difference of medians is what they add
(``SCLReporter.step_metrics``, timed on its own too, plus three more keys through Lightning's ``log_dict``). The
one-off fvcore trace (and, with channel masks, the link probe) runs on the first batch, excluded with the warm-up
steps and reported on its own.

The requirement is that logging the metrics costs under 2% of a training step; the table shows the share per
logging step (the worst case: ``log_every_n_steps=1``) and amortized over Lightning's default of 50.

Usage::

    python benchmarks/accounting_overhead.py            # LeNet-5, batch 64 and 128, weight and channel masks
    python benchmarks/accounting_overhead.py --smoke    # CI: a few steps, writes nothing
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import platform
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import lightning.pytorch as L
import torch
from torch.utils.data import DataLoader, TensorDataset

from lightning_scl.callbacks.scl import SparseConnectivityLearning
from lightning_scl.models import ImageClassifier

RESULTS = Path(__file__).parent / "results"


class TimedSCL(SparseConnectivityLearning):
    """SparseConnectivityLearning with stopwatches: whole steps, its logging call, the reporter's accounting."""

    def __init__(self, *args: Any, skip: int = 5, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.skip = skip
        self.step_times: list[float] = []
        self.log_times: list[float] = []
        self.base_log_times: list[float] = []
        self.metrics_times: list[float] = []
        self.first_batch_s = 0.0
        self._start = 0.0

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_fit_start(trainer, pl_module)
        if self._reporter is not None:
            reporter, step_metrics = self._reporter, self._reporter.step_metrics

            def timed(*args: Any, **kwargs: Any) -> dict[str, float]:
                start = time.perf_counter()
                out = step_metrics(*args, **kwargs)
                if trainer.global_step >= self.skip:
                    self.metrics_times.append(time.perf_counter() - start)
                return out

            reporter.step_metrics = timed  # type: ignore[method-assign]

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, idx: int) -> None:
        self._start = time.perf_counter()
        super().on_train_batch_start(trainer, pl_module, batch, idx)
        if idx == 0:
            self.first_batch_s = time.perf_counter() - self._start

    def _log_step(self, *args: Any, **kwargs: Any) -> None:
        start = time.perf_counter()
        super()._log_step(*args, **kwargs)
        if self.trainer_step >= self.skip:
            (self.log_times if self.report else self.base_log_times).append(time.perf_counter() - start)

    def on_before_optimizer_step(self, trainer: L.Trainer, *args: Any) -> None:
        self.trainer_step = trainer.global_step
        # Interleaved: with and without the three metrics on alternate steps, under the same machine load.
        self.report = trainer.global_step < self.skip or trainer.global_step % 2 == 0
        super().on_before_optimizer_step(trainer, *args)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.report = True

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        super().on_train_batch_end(trainer, pl_module, *args)
        if trainer.global_step > self.skip:
            self.step_times.append(time.perf_counter() - self._start)


def one_fit(granularity: str, batch_size: int, steps: int, skip: int) -> TimedSCL:
    torch.manual_seed(0)
    n = batch_size * (steps + skip)
    data = TensorDataset(torch.randn(n, 1, 28, 28), torch.randint(0, 10, (n,)))
    model = ImageClassifier("lenet5", lr=0.05)
    scl = TimedSCL(lam=0.05, granularity=granularity, skip=skip, report=True)
    trainer = L.Trainer(
        max_steps=steps + skip,
        callbacks=[scl],
        logger=False,
        log_every_n_steps=1,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
    )
    with contextlib.redirect_stdout(io.StringIO()):  # the end-of-fit table
        trainer.fit(model, DataLoader(data, batch_size=batch_size))
    return scl


def run(granularity: str, batch_size: int, steps: int, skip: int) -> dict[str, Any]:
    fit = one_fit(granularity, batch_size, steps, skip)
    step = statistics.median(fit.step_times)
    # What the three metrics add to the callback's logging call: accounting + three more keys through log_dict.
    added = statistics.median(fit.log_times) - statistics.median(fit.base_log_times)
    accounting = statistics.median(fit.metrics_times)
    return {
        "granularity": granularity,
        "batch_size": batch_size,
        "steps_timed": len(fit.step_times),
        "step_ms": step * 1e3,
        "added_log_us": added * 1e6,
        "step_metrics_us": accounting * 1e6,
        "share_per_logged_step": added / step,
        "share_accounting_per_logged_step": accounting / step,
        "share_every_50_steps": added / step / 50,
        "first_batch_s": fit.first_batch_s,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--smoke", action="store_true")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    steps, skip = (4, 2) if args.smoke else (args.steps, 5)
    # One thread: on a shared 2-core machine OpenMP oversubscription makes multi-threaded step times swing 10x.
    torch.set_num_threads(args.threads)
    rows = [run(g, b, steps, skip) for g in ("weight", "channel") for b in ((64,) if args.smoke else (64, 128))]
    lines = [
        "| masks | batch | step (ms) | added to the log call (us) | of which accounting (us) | share per logged step "
        "| accounting alone | share at log_every_n_steps=50 | first batch (s) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['granularity']} | {r['batch_size']} | {r['step_ms']:.1f} | {r['added_log_us']:.0f} | "
            f"{r['step_metrics_us']:.0f} | {r['share_per_logged_step']:.2%} | "
            f"{r['share_accounting_per_logged_step']:.2%} | {r['share_every_50_steps']:.3%} | "
            f"{r['first_batch_s']:.2f} |"
        )
    print("\n".join(lines))
    if args.smoke:
        return
    RESULTS.mkdir(exist_ok=True)
    meta = {"python": sys.version.split()[0], "torch": torch.__version__, "machine": platform.machine()}
    meta["threads"] = torch.get_num_threads()
    (RESULTS / "accounting_overhead.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    notes = (
        "\n\n`added to the log call` = `SCLReporter.step_metrics` (the accounting) + three more keys through "
        "Lightning's `log_dict`, whose per-key cost is most of it. "
        f"{torch.get_num_threads()} torch thread(s); shared machine, so timings are noisy: compare shares, not ms.\n"
    )
    (RESULTS / "accounting_overhead.md").write_text(
        "# Cost of the FLOPs/params metrics (LeNet-5, CPU)\n\n" + "\n".join(lines) + notes
    )


if __name__ == "__main__":
    main()
