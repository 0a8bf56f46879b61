"""ELUSwap: replace ReLU by ELU (Clevert et al. 2016) in an existing LightningModule, without rewriting it."""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable, Mapping, Sequence
from os import PathLike
from typing import Any

import lightning.pytorch as L
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.model_helpers import is_overridden
from torch import nn

from lightning_scl.activations import (
    CHECKPOINT_KEYS,
    SwapConfig,
    SwapReport,
    read_swap_record,
    swap_activations,
    swap_report,
)
from lightning_scl.callbacks._save_hook import register_record_writer

__all__ = ["ELUSwap"]


class _SwapAfterConfigureModel:
    """Stands in for ``pl_module.configure_model`` during a run: calls it, then swaps what it built.

    ``__wrapped__`` is the user's original method, so Lightning's ``is_overridden`` still sees the override (it
    unwraps one level, so a chain of wrappers is collapsed to the innermost original).
    """

    def __init__(self, pl_module: L.LightningModule, settings: dict[str, Any]) -> None:
        self.pl_module = pl_module
        self.previous: Callable[[], None] = pl_module.configure_model
        self.had_instance_attr = "configure_model" in pl_module.__dict__  # someone else's wrapper, say
        stale = pl_module.__dict__.get("configure_model")
        if isinstance(stale, _SwapAfterConfigureModel) and not stale.active:
            # An earlier run's wrapper that another callback's teardown put back: skip it, or runs would stack.
            self.previous, self.had_instance_attr = stale.previous, stale.had_instance_attr
        self.__wrapped__ = inspect.unwrap(self.previous)
        self.settings = settings
        self.active = True

    @property
    def __code__(self) -> Any:
        # is_overridden unwraps a single level: a wrapper put on top of this one (SparseConnectivityLearning
        # wraps configure_model too) has this object as its __wrapped__, and is then compared by __code__.
        return self.__wrapped__.__code__

    def __call__(self) -> None:
        self.previous()
        if self.active:
            swap_activations(self.pl_module, quiet=True, **self.settings)

    def remove(self) -> None:
        self.active = False  # if another wrapper sits on top of this one, this one stays as a pass-through
        if self.pl_module.__dict__.get("configure_model") is self:
            if self.had_instance_attr:
                self.pl_module.__dict__["configure_model"] = self.previous
            else:
                del self.pl_module.__dict__["configure_model"]


class _SwapRecordWriter:
    """Writes the swap record of ``module`` into a checkpoint that has none (weights-only ones); refers to the model,
    not the callback, so it stays with the model after ``fit`` and copies of the model carry their own."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module

    def __call__(self, checkpoint: dict[str, Any]) -> None:
        report = swap_report(self.module)
        section = checkpoint.setdefault(CHECKPOINT_KEYS[0], {})
        if report is not None and CHECKPOINT_KEYS[1] not in section:
            section[CHECKPOINT_KEYS[1]] = report.to_record()


class ELUSwap(L.Callback):
    """Swap a model's ReLU activations for ELU before training, validation, test and predict.

    The swap happens in ``setup`` (and after ``configure_model``), before optimizers exist, so parameters a
    learnable replacement creates are trained; it is repeatable, so ``fit`` then ``test`` does not swap twice.
    Module activations are matched by exact type; a module reused at several call sites (torchvision ResNet
    blocks) gets one ELU per call site; functional calls (``F.relu``, ``torch.relu``, ``Tensor.relu``) are
    rerouted while the model's forward runs (``functional="rewrite"``), or only reported (``"warn"``, ``"ignore"``).
    See :func:`lightning_scl.activations.swap_activations` for the mechanics.

    The settings are saved in checkpoints under ``checkpoint["lightning_scl"]["elu_swap"]``; restore the swapped
    function for inference with ``apply_elu(model, ckpt_path)`` or ``ELUSwap.from_checkpoint(ckpt_path)``.

    Args:
        alpha: ELU's ``alpha`` (> 0); the initial value for ``replacement="LearnableELU"``.
        targets: activation module types to replace, by name (``"ReLU"``, ``"ReLU6"``, ``"LeakyReLU"``, ``"GELU"``...).
        include: regular expressions on qualified module names; only the matching subtrees are swapped.
        exclude: regular expressions on qualified module names; the matching subtrees are left alone.
        functional: ``"rewrite"``, ``"warn"`` or ``"ignore"`` functional activation calls.
        replacement: ``"ELU"``, ``"CELU"`` or ``"LearnableELU"`` (trainable ``alpha`` per call site).
        inplace: replacements of in-place modules run in place, as the originals did, except where that would
            break backward; ``False``: always out of place.
        verbose: report on rank zero what was swapped.

    Raises:
        ValueError: an argument is invalid; the message names it and lists the accepted values.

    Example:
        >>> import torch
        >>> from lightning.pytorch.demos.boring_classes import BoringModel
        >>> class Model(BoringModel):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.layer = torch.nn.Sequential(torch.nn.Linear(32, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
        >>> model = Model()
        >>> trainer = L.Trainer(callbacks=[ELUSwap(alpha=1.0, verbose=False)], max_steps=1, accelerator="cpu",
        ...                     logger=False, enable_checkpointing=False, enable_progress_bar=False,
        ...                     enable_model_summary=False)
        >>> trainer.fit(model)
        >>> model.layer[1]
        ELU(alpha=1.0)
    """

    def __init__(
        self,
        alpha: float = 1.0,
        targets: Sequence[str] = ("ReLU",),
        include: Sequence[str] | None = None,
        exclude: Sequence[str] | None = None,
        functional: str = "rewrite",
        replacement: str = "ELU",
        inplace: bool = True,
        verbose: bool = True,
    ) -> None:
        self.config = SwapConfig(
            alpha=alpha,
            targets=targets,  # type: ignore[arg-type]
            replacement=replacement,
            include=include,  # type: ignore[arg-type]
            exclude=exclude,  # type: ignore[arg-type]
            functional=functional,
            inplace=inplace,
        )
        self.verbose = verbose
        self.report: SwapReport | None = None
        self._reported = False
        self._functional_reported = False
        self._wrapper: _SwapAfterConfigureModel | None = None

    @classmethod
    def from_checkpoint(
        cls, checkpoint_path_or_dict: str | PathLike[str] | Mapping[str, Any], **kwargs: Any
    ) -> ELUSwap:
        """A callback with the settings recorded in a checkpoint (``kwargs`` override them).

        Example:
            >>> ELUSwap.from_checkpoint({"lightning_scl": {"elu_swap": {"alpha": 0.5}}}).config.alpha
            0.5
        """
        record = read_swap_record(checkpoint_path_or_dict)
        return cls(**{**SwapConfig.from_dict(record).to_dict(), **kwargs})

    def _swap(self, pl_module: L.LightningModule) -> SwapReport:
        # quiet: this callback reports itself, on rank zero only
        report = swap_activations(pl_module, quiet=True, **self.config.to_dict())
        if report is not self.report:  # a first swap, or another model: report it
            self.report, self._reported, self._functional_reported = report, False, False
        return report

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        spawned = getattr(trainer.strategy, "_start_method", None) in ("spawn", "fork", "forkserver")
        if spawned and swap_report(pl_module) is None:
            # setup runs in the workers only; the launcher copies weights back with strict=False
            rank_zero_warn(
                "ELUSwap with a spawn/fork strategy (ddp_spawn, ddp_notebook): the model in the main process comes "
                "back from fit unswapped, and LearnableELU parameters are dropped. Call "
                "lightning_scl.activations.apply_elu(model, **settings) before trainer.fit, or use strategy='ddp'."
            )
        self._swap(pl_module)
        # weights-only checkpoints skip on_save_checkpoint: the record is written from the module's hook too
        register_record_writer(pl_module, CHECKPOINT_KEYS[1], _SwapRecordWriter(pl_module))
        # Modules built in configure_model appear after this hook and before the optimizers: swap them there.
        if self._wrapper is None and is_overridden("configure_model", pl_module):
            self._wrapper = _SwapAfterConfigureModel(pl_module, self.config.to_dict())
            pl_module.__dict__["configure_model"] = self._wrapper

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self._wrapper is not None:
            self._wrapper.remove()
            self._wrapper = None

    def _start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Catch modules built in LightningModule.setup (after Callback.setup, without configure_model).
        params_before = len(self.report.new_parameters) if self.report else 0
        report = self._swap(pl_module)
        late = report.new_parameters[params_before:]
        if late and trainer.optimizers:
            rank_zero_warn(
                f"ELUSwap created {len(late)} parameter(s) after the optimizers were built ({late[:3]}...): they "
                "are not trained. Build the model in __init__ or configure_model, not in LightningModule.setup."
            )
        if self._reported:
            return
        self._reported = True
        if self.verbose:
            rank_zero_info(f"ELUSwap: {report.summary()}")
        if report.num_modules == 0 and (report.functional_calls is None or self.config.functional != "rewrite"):
            self._functional_reported = True
            rank_zero_warn(self._nothing_message(report, "no functional calls are rewritten"))

    def _nothing_message(self, report: SwapReport, why: str) -> str:
        return (
            f"ELUSwap SWAPPED NOTHING: no {list(self.config.targets)} module was found in the model and {why}; "
            "the model trains with its original activations. Check `targets` (types match exactly: ReLU6, "
            "LeakyReLU, SiLU, GELU must be named) and `include`/`exclude`"
            + (f" ({len(report.skipped)} target module(s) were excluded)" if report.skipped else "")
            + "."
        )

    def _first_batch_done(self) -> None:
        # Functional calls are only seen when a forward runs: report them after the first batch of any stage.
        if self._functional_reported or self.report is None or self.report.functional_calls is None:
            return
        self._functional_reported = True
        report, calls = self.report, self.report.functional_calls
        if self.config.functional == "warn" and calls:
            rank_zero_warn(
                f"ELUSwap: {calls} functional {list(self.config.targets)} call(s) in the first batch (in modules "
                f"{report.functional_owners[:5]}) were left unchanged (functional='warn')."
            )
        elif calls == 0 and report.num_modules == 0:
            rank_zero_warn(self._nothing_message(report, "the first batch made no functional call to rewrite"))
        elif self.verbose and calls:
            rank_zero_info(
                f"ELUSwap: {calls} functional call(s) rerouted in the first batch (modules "
                f"{report.functional_owners[:5]}{'...' if len(report.functional_owners) > 5 else ''})"
            )

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._start(trainer, pl_module)

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.state.fn == "validate":  # during fit, on_fit_start has done it
            self._start(trainer, pl_module)

    def on_test_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._start(trainer, pl_module)

    def on_predict_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._start(trainer, pl_module)

    def on_train_batch_end(self, *args: Any, **kwargs: Any) -> None:
        self._first_batch_done()

    def on_validation_batch_end(self, *args: Any, **kwargs: Any) -> None:
        self._first_batch_done()

    def on_test_batch_end(self, *args: Any, **kwargs: Any) -> None:
        self._first_batch_done()

    def on_predict_batch_end(self, *args: Any, **kwargs: Any) -> None:
        self._first_batch_done()

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        record = (self.report or SwapReport(self.config)).to_record()
        section = checkpoint.setdefault(CHECKPOINT_KEYS[0], {})  # shared with other lightning_scl callbacks
        section[CHECKPOINT_KEYS[1]] = record

    def state_dict(self) -> dict[str, Any]:
        return {"config": self.config.to_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        saved = SwapConfig.from_dict(state_dict.get("config", {}))
        # inplace changes memory use, not the function: checkpoints from before its default changed stay quiet
        if dataclasses.replace(saved, inplace=self.config.inplace) != self.config:
            rank_zero_warn(
                f"ELUSwap: the checkpoint was trained with {saved}, this callback swaps with {self.config}; the "
                "model keeps this callback's swap. Use ELUSwap.from_checkpoint(path) to reproduce the checkpoint's."
            )
