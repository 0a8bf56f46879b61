"""``SCLReporter``: FLOPs/params metrics during training and the end-of-fit sparsity report, for the SCL callback.

Internal: :class:`~lightning_scl.callbacks.scl.SparseConnectivityLearning` owns one and calls it from its hooks.
All accounting lives in :mod:`lightning_scl.accounting`; this module only adapts it to Lightning.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import lightning.pytorch as L
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from lightning_scl.accounting import SparsityAccountant, plot_history, plot_layer_density

__all__ = ["REPORT_FILES", "SCLReporter"]

#: Files written into the log directory at the end of fit.
REPORT_FILES = ("scl_report.csv", "scl_report.json", "scl_layer_density.png", "scl_history.png")


def _input_from_batch(batch: Any) -> tuple[Any, str | None]:
    """The model input in a training batch (a tensor, or the first element of a tuple/list), or why there is none."""
    if isinstance(batch, torch.Tensor):
        return batch, None
    if isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], torch.Tensor):
        return batch[0], None
    if isinstance(batch, Mapping):
        return None, (
            "the training batch is a dict, so which entry the model takes is unknown; set "
            "LightningModule.example_input_array"
        )
    return None, f"no tensor found in the training batch ({type(batch).__name__}); set example_input_array"


class SCLReporter:
    """Sparsity/FLOPs metrics for the training loop and the end-of-fit report, on a :class:`SparsityAccountant`.

    Create it once the masks are injected. The example input for FLOPs is ``pl_module.example_input_array`` when
    set, otherwise the first sample of the first training batch.

    Calls, in order: :meth:`on_train_batch_start` (each batch: only the first one does work), :meth:`step_metrics`
    (at each logging step), :meth:`on_fit_end` (once, on every rank).

    Example:
        >>> import lightning.pytorch as L
        >>> from torch import nn
        >>> from lightning_scl.masking import inject_masks
        >>> class Net(L.LightningModule):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.fc = nn.Linear(4, 2)
        ...     def forward(self, x):
        ...         return self.fc(x)
        >>> net = Net()
        >>> _ = inject_masks(net)
        >>> reporter = SCLReporter(net)
        >>> reporter.on_train_batch_start((torch.randn(8, 4), torch.zeros(8)))
        >>> reporter.step_metrics(step=0)
        {'scl/params_kept': 10.0, 'scl/flops': 8.0, 'scl/flops_ratio': 1.0}
    """

    def __init__(self, pl_module: torch.nn.Module) -> None:
        self.accountant = SparsityAccountant(pl_module, getattr(pl_module, "example_input_array", None))
        #: One item per :meth:`step_metrics` call: ``step``, ``density``, ``flops_ratio`` (None without FLOPs).
        self.history: list[dict[str, Any]] = []
        self._first_batch_seen = False
        self._said_unavailable = False
        self._calls = 0

    def _say_unavailable(self) -> None:
        if self._said_unavailable:
            return
        self._said_unavailable = True
        rank_zero_warn(
            f"SparseConnectivityLearning: FLOPs unavailable ({self.accountant.flops_unavailable_reason}); logging "
            "parameter and connection counts only."
        )

    def on_train_batch_start(self, batch: Any) -> None:
        """On the first batch only: take the example input from it if none was set; count the dense FLOPs once."""
        if self._first_batch_seen:
            return
        self._first_batch_seen = True
        if self.accountant.example_input is None:  # example_input_array may have been set in setup()
            self.accountant.set_example_input(getattr(self.accountant.model, "example_input_array", None))
        if self.accountant.example_input is None:
            x, why = _input_from_batch(batch)
            if x is None:
                self.accountant.flops_unavailable_reason = f"no example input: {why}"
            elif self.accountant.set_example_input(x):
                rank_zero_info(
                    "SparseConnectivityLearning: FLOPs are counted on one sample of the first training batch "
                    f"(shape {tuple(self.accountant.example_input.shape)}); set example_input_array to choose."
                )
        if not self.accountant.has_flops:  # counts (fvcore, once) now rather than inside a logging step
            self._say_unavailable()
        self.accountant.snapshot()  # builds the bookkeeping (and channel links) here too, for the same reason

    def step_metrics(
        self, step: int | None = None, kept_by_layer: Mapping[str, torch.Tensor] | None = None
    ) -> dict[str, float]:
        """``scl/params_kept``, and ``scl/flops`` (effective MACs per sample) and ``scl/flops_ratio`` when available.

        Also records ``(step, density, flops_ratio)`` for the history plot. Cheap: no tracing, one host sync.

        Args:
            step: the global step (default: the number of earlier calls).
            kept_by_layer: kept connections per masked layer, when the caller already has them.
        """
        stats = self.accountant.snapshot(kept_by_layer)
        self.history.append(
            {
                "step": self._calls if step is None else int(step),
                "density": stats.density,
                "flops_ratio": stats.flops_ratio,
            }
        )
        self._calls += 1
        metrics = {"scl/params_kept": float(stats.params_kept)}
        if stats.effective_flops is not None:
            metrics["scl/flops"] = float(stats.effective_flops)
            if stats.flops_ratio is not None:
                metrics["scl/flops_ratio"] = float(stats.flops_ratio)
        elif self._first_batch_seen:
            self._say_unavailable()
        return metrics

    def on_fit_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, out_dir: str | Path | None = None
    ) -> list[Path]:
        """Print the report table and write CSV, JSON and PNG plots (rank zero).

        Files go to ``out_dir`` when given, else to the logger's directory; with no logger and no ``out_dir`` only
        the table is printed (a run with ``logger=False`` should not scatter files into the working directory).
        Call on every rank (the log directory is agreed on collectively). Figures also go to every attached
        TensorBoard logger. Returns the written paths (empty on other ranks).
        """
        log_dir = trainer.log_dir if trainer.loggers else None  # collective: every rank must ask
        if not trainer.is_global_zero:
            return []
        report = self.accountant.report()
        history = list(self.history)
        if not history or history[-1]["step"] != trainer.global_step:
            totals = report.totals
            history.append({"step": trainer.global_step, "density": totals.density, "flops_ratio": totals.flops_ratio})
        report.print()
        if out_dir is None and log_dir is None:
            rank_zero_info(
                "SparseConnectivityLearning: no logger, so the report files were not written; attach a logger or "
                "pass report_dir=... to keep scl_report.csv/json and the plots."
            )
            return []
        out = Path(out_dir if out_dir is not None else log_dir)
        out.mkdir(parents=True, exist_ok=True)
        csv_path, json_path, density_path, history_path = (out / name for name in REPORT_FILES)
        report.to_csv(csv_path)
        data = report.to_dict()
        data["history"] = history
        json_path.write_text(json.dumps(data, indent=2) + "\n")
        density_figure = plot_layer_density(report, density_path)
        history_figure = plot_history(history, history_path)
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                logger.experiment.add_figure("scl/layer_density", density_figure, trainer.global_step, close=False)
                logger.experiment.add_figure("scl/history", history_figure, trainer.global_step, close=False)
        return [csv_path, json_path, density_path, history_path]
