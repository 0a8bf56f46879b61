"""``SparseConnectivityLearning``: the Lightning adapter around :mod:`lightning_scl.masking`."""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import Any

import lightning.pytorch as L
import torch
from lightning.pytorch.callbacks import (
    Callback,
    GradientAccumulationScheduler,
    StochasticWeightAveraging,
    WeightAveraging,
)
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.model_helpers import is_overridden
from torch import nn
from torch.autograd.graph import increment_version

from lightning_scl.accounting import _MASK_SUFFIX, _call_args
from lightning_scl.callbacks._save_hook import register_record_writer
from lightning_scl.callbacks.reporting import SCLReporter
from lightning_scl.masking import (
    GRANULARITIES,
    NORMALIZATIONS,
    STES,
    ConnectivityMask,
    _count_positive,
    _inference,
    _inverse_statistic,
    _scale_rows_and_add_,
    gate_values,
    inject_masks,
    iter_masks,
    mask_gradient_statistic,
    ste_derivative,
)
from lightning_scl.memory import retain_freed_memory as _retain_freed_memory
from lightning_scl.targets import DEFAULT_LAYER_TYPES, resolve_layer_types, select_layers, validate_patterns

__all__ = ["REGULARIZERS", "SparseConnectivityLearning", "with_mask_units"]

REGULARIZERS = ("connections", "flops")
MASK_LR_SCHEDULES = ("constant", "cosine")
NORMALIZE_SCOPES = ("unit", "layer", "network")
CHECKPOINT_KEY = "lightning_scl"
_STATE_VERSION = 1
_LAM_BOUNDS = (1e-6, 100.0)
_MAX_LOG_LAM_STEP = 0.1  # lam changes by at most ~10% per step, however short the run
_REVIVED_MASK_VALUE = 1e-3  # just above the threshold: a mask switched back on by a layer floor or the exact density


def _param_group_layout(trainer: L.Trainer) -> tuple[tuple[int, bool], ...]:
    """The user's parameter groups in a few integers: (size, decayed) per group. Groups can be added during fit
    (BackboneFinetuning's add_param_group) and a schedule can switch weight decay on."""
    return tuple(
        (len(g["params"]), bool(g.get("weight_decay", 0))) for opt in trainer.optimizers for g in opt.param_groups
    )


def _optimizers_in(obj: Any) -> list[torch.optim.Optimizer]:
    """Every optimizer in whatever structure ``configure_optimizers`` returned (optimizer, list, dict, tuple...)."""
    if isinstance(obj, torch.optim.Optimizer):
        return [obj]
    if isinstance(obj, dict):
        return [opt for value in obj.values() for opt in _optimizers_in(value)]
    if isinstance(obj, (list, tuple)):
        return [opt for value in obj for opt in _optimizers_in(value)]
    return []


def _network_statistic(layer_stats: list[torch.Tensor], counts: list[int], statistic: str) -> torch.Tensor:
    """Combine per-layer statistics into the one the concatenated gradients of all layers would have."""
    stacked = torch.cat([s.reshape(1) for s in layer_stats])
    if statistic == "max_abs":
        return stacked.max().reshape(1)
    weights = stacked.new_tensor(counts) / sum(counts)
    if statistic == "l2":  # root mean square: average the mean squares
        return (stacked.square() * weights).sum().sqrt().reshape(1)
    return (stacked * weights).sum().reshape(1)


def _is_mask_unit(module: nn.Module, recurse: bool, nonwrapped_numel: int) -> bool:
    """FSDP auto-wrap policy (the callable form): every ConnectivityMask is an FSDP unit of its own."""
    return True if recurse else isinstance(module, ConnectivityMask)


def _has_fsdp_units(module: nn.Module) -> bool:
    from torch.distributed.fsdp import FullyShardedDataParallel

    return any(isinstance(m, FullyShardedDataParallel) for m in module.modules())


def with_mask_units(policy: Any) -> Any:
    """``policy`` (an FSDP ``auto_wrap_policy``, or None) extended so that every ConnectivityMask is its own FSDP unit.

    FSDP flattens the parameters of one unit together, and its optimizer state dict then requires every parameter
    of a flat parameter to be in the optimizer it saves. The masks train in the callback's own optimizer, so a mask
    sharing a unit with its layer's weight makes every checkpoint fail ("... mask is not in the optimizer state").

    Example:
        >>> from torch.distributed.fsdp.wrap import ModuleWrapPolicy
        >>> sorted(c.__name__ for c in with_mask_units(ModuleWrapPolicy({nn.Linear}))._module_classes)
        ['ConnectivityMask', 'Linear']
    """
    from torch.distributed.fsdp.wrap import CustomPolicy, ModuleWrapPolicy, _or_policy

    if policy is None:
        return ModuleWrapPolicy({ConnectivityMask})
    if isinstance(policy, ModuleWrapPolicy):
        return ModuleWrapPolicy(set(policy._module_classes) | {ConnectivityMask})
    if isinstance(policy, CustomPolicy):
        inner = policy._lambda_fn
        return CustomPolicy(lambda module: isinstance(module, ConnectivityMask) or inner(module))
    if callable(policy):
        return functools.partial(_or_policy, policies=[policy, _is_mask_unit])
    raise TypeError(
        f"SparseConnectivityLearning cannot extend the FSDP auto_wrap_policy {policy!r}: pass a set of module "
        "classes, a ModuleWrapPolicy, a CustomPolicy or a callable policy, and include ConnectivityMask."
    )


def _materialize_lazy_layers(pl_module: L.LightningModule) -> None:
    """Give lazy layers their shapes with one forward pass on ``example_input_array``, so they can be masked."""
    if not any(isinstance(p, nn.parameter.UninitializedParameter) for p in pl_module.parameters()):
        return
    example = getattr(pl_module, "example_input_array", None)
    if example is None:
        return  # inject_masks names the layer and the fix
    args, kwargs = _call_args(example)
    with _inference(pl_module):  # eval: no batch-norm statistics from a made-up batch
        pl_module(*args, **kwargs)


def _check_fraction_or_epoch(value: float | int | None, argument: str) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{argument} must be a fraction of training in (0, 1) or an epoch number >= 1, got {value!r}")
    if isinstance(value, float) and not 0.0 < value < 1.0:
        raise ValueError(
            f"{argument} must be a float fraction of training in (0, 1) or an int epoch >= 1, got {value!r}"
        )
    if isinstance(value, int) and value < 1:
        raise ValueError(f"{argument} as an epoch number must be >= 1, got {value!r}")


class _MaskRecord:
    """Writes the ``scl`` record of the masks on ``module`` into a checkpoint that has none (weights-only ones).

    Refers to the model, not the callback: it stays with the model after ``fit``, and copies of the model carry
    their own. The callback's ``on_save_checkpoint`` writes the record of full checkpoints first.
    """

    def __init__(self, module: nn.Module, settings: dict[str, Any]) -> None:
        self.module, self.settings = module, dict(settings)

    def __call__(self, checkpoint: dict[str, Any]) -> None:
        section = checkpoint.setdefault(CHECKPOINT_KEY, {})
        masks = list(iter_masks(self.module))
        if "scl" in section or not masks:
            return
        try:
            kept = sum(mask.kept() for _, _, mask in masks)
        except RuntimeError as err:  # a wrapped or sharded mask: the record is worth less than the checkpoint
            rank_zero_warn(f"SparseConnectivityLearning: the checkpoint's density record was left out ({err}).")
            kept = None
        total = sum(mask.numel_connections for _, _, mask in masks)
        density = None if kept is None else kept / max(total, 1)
        section["scl"] = {"layers": [name for name, _, _ in masks], **self.settings, "density": density}


class SparseConnectivityLearning(Callback):
    """Learn which connections to keep: a trainable binary mask on every selected weight of any LightningModule.

    Each selected weight becomes ``W * H(m)``; the mask variables ``m`` are trained by their own SGD optimizer
    (the callback steps it, so the user's optimizer, its weight decay, its LR schedule and gradient clipping never
    touch them). At every real optimizer step (after gradient accumulation and AMP unscaling) the task gradients of
    ``m`` are normalized to statistic 1 (over all masked layers by default; per layer or per unit with
    ``normalize_over``), then the connection-count regularizer adds ``lam`` per connection (scaled by each
    connection's cost when ``regularizer="flops"``).

    Args:
        lam: pressure per connection of the regularizer ``lam * connections kept``. Default 0.1 when neither
            ``lam`` nor ``target_density`` is given.
        target_density: instead of a fixed ``lam``, the fraction of connections to keep at the end: a controller
            moves ``lam`` so the density follows a schedule from 1 down to this value.
        granularity: ``"weight"`` (a mask per connection) or ``"channel"`` (a mask per output unit/channel, which
            makes the model physically smaller once exported with ``format="shrunk"``).
        layer_types: layer class names to mask (``torch.nn`` names or dotted import paths).
        include: glob (or ``re:`` regex) patterns of layer names to mask; default all layers of ``layer_types``.
        exclude: patterns of layer names never to mask (e.g. ``["model.fc3"]`` to keep the classifier dense).
        mask_init: initial mask value ``m0 > 0`` (all connections start on; larger = slower to prune).
        ste: straight-through estimator: ``"identity"``, ``"leaky_relu"`` or ``"softplus"``.
        ste_slope: proxy slope below the threshold for ``ste="leaky_relu"`` (must be > 0).
        normalize: statistic the task gradient is divided by: ``"mean_abs"``, ``"l2"``, ``"max_abs"`` or
            ``"none"``.
        normalize_over: what shares one statistic: ``"network"`` (all masked layers: the task gradient
            ``dL/dW_eff * W`` estimates the loss change of removing a connection, comparable across layers, so every
            connection is ranked on one scale), ``"layer"`` (each masked layer), or ``"unit"`` (each output unit's
            row, the paper's per-feature normalization; weight masks only). ``None`` (default): ``"network"`` for
            ``granularity="weight"``, ``"layer"`` for ``"channel"``. On LeNet-300-100 at 1% density per unit reached
            97.44% and per network 97.82% (three seeds each; ModelPruning 97.61%); see the benchmarks page.
        regularizer: ``"connections"`` (each connection costs 1) or ``"flops"`` (each costs its multiply-accumulates
            per sample, scaled to mean 1; needs an example input). ``"flops"`` trades accuracy per connection for
            FLOPs: on LeNet-5-Caffe it matched the connection count's accuracy with about 4-7x fewer FLOPs at a higher
            density. With ``normalize_over="unit"`` or ``"layer"`` pair it with ``min_density_per_layer``: per unit
            it removed both convolutions of LeNet-5-Caffe (a warning says so).
        fan_in_exponent: the pressure on a connection is also multiplied by ``fan_in ** fan_in_exponent`` (fan-in
            of its layer; the scales keep mean 1). Per-unit normalization gives every row of task gradients mean
            magnitude 1, so the few useful inputs of a wide layer (784 pixels) look up to ``fan_in`` times more
            useful than those of a narrow one (100 hidden units) and narrow layers are over-pruned; the exponent
            compensates. ``None`` (default): 0.5 with ``normalize_over="unit"`` (on LeNet-5-Caffe at 0.9% it kept the
            first convolution at 34% instead of 4%: 98.99% against 98.55%), 0 otherwise (a layer or network
            statistic keeps the rows' relative scale, so there is nothing to compensate); see the benchmarks page.
        mask_lr: learning rate of the mask optimizer (SGD).
        mask_momentum: momentum of the mask optimizer.
        mask_lr_schedule: ``"constant"``, or ``"cosine"``: the mask learning rate decays from ``mask_lr`` to 0 at
            ``freeze_masks_at`` (or at the end of training), so masks settle gradually instead of churning.
        freeze_masks_at: stop updating masks after this point (float: fraction of the total optimizer steps;
            int: epoch number) while the weights keep training (fine-tuning). ``None`` never freezes. Default 0.7:
            the last 30% fine-tune the final connectivity and skip the mask work (never worse in the benchmarks,
            better under uniform pressure). With ``target_density`` a fractional freeze must come after ``ramp_end``.
        ramp_end: with ``target_density``: fraction of training at which the density schedule reaches the target.
        exact_density: with ``target_density`` and ``freeze_masks_at``: when the masks freeze, switch connections on
            or off so that exactly ``target_density`` of them are kept (to the nearest variable for channel masks).
            The controller only tracks the schedule to within a few percent (for example 1.96% for a 2% target);
            the snap ranks every mask variable of every layer by its value ``m``, which is what SCL learned, so it
            revives the connections that were closest to the threshold (their weights were kept by
            ``protect_pruned_weights``) or drops the weakest. ``min_density_per_layer`` is respected.
        controller_gain: with ``target_density``: how strongly ``lam`` reacts to the log-density error, per run
            (over the whole training ``lam`` may move by ``exp(controller_gain * error)``), so the same value works
            for short and long runs.
        protect_pruned_weights: keep weight decay from shrinking weights whose mask is off, so they can revive.
        min_density_per_layer: never let a layer keep fewer than this fraction of its mask variables.
        log_every_n_steps: logging period in optimizer steps (default: the Trainer's ``log_every_n_steps``). The
            logger only writes on the Trainer's logging steps, and there it writes the last values logged: use a
            multiple of ``Trainer(log_every_n_steps)`` (the rows in between repeat the last values).
        log_per_layer: also log ``scl/density/<layer>`` for every masked layer.
        report: log ``scl/flops``, ``scl/flops_ratio``, ``scl/params_kept`` and, at the end of ``fit``, print the
            per-layer table and write ``scl_report.{csv,json}`` and plots into the log directory.
        report_dir: where the end-of-fit report files go (default: the logger's directory; with no logger, only
            the table is printed).
        retain_freed_memory: when the masks train on the CPU, call :func:`lightning_scl.memory.retain_freed_memory`
            at fit start, so glibc's ``malloc`` keeps freed memory for reuse (process-wide, until the process
            ends). Depending on the order and sizes of a step's allocations, glibc returns activation memory to the
            system and faults it back in at every step; with the masks' extra tensors it did so on LeNet-5-Caffe
            (2,800 page faults, 4 ms of system time per mask-training step), and a default run cost 1.17x a dense
            one; with this on, no faults and 1.05x (``benchmarks/step_time.py``). Memory freed during training then
            stays with the process. ``False`` leaves the allocator alone.

    Example:
        >>> import lightning.pytorch as L
        >>> from lightning.pytorch.demos.boring_classes import BoringModel
        >>> scl = SparseConnectivityLearning(lam=0.5, mask_lr=0.05, report=False)
        >>> trainer = L.Trainer(max_steps=20, callbacks=[scl], logger=False, enable_checkpointing=False,
        ...                     enable_progress_bar=False, enable_model_summary=False)
        >>> trainer.fit(BoringModel())
        >>> 0.0 < scl.density < 1.0
        True
    """

    def __init__(
        self,
        lam: float | None = None,
        target_density: float | None = None,
        granularity: str = "weight",
        layer_types: Sequence[str] = DEFAULT_LAYER_TYPES,
        include: Sequence[str] | None = None,
        exclude: Sequence[str] | None = None,
        mask_init: float = 1.0,
        ste: str = "identity",
        ste_slope: float = 0.1,
        normalize: str = "mean_abs",
        normalize_over: str | None = None,
        regularizer: str = "connections",
        fan_in_exponent: float | None = None,
        mask_lr: float = 0.01,
        mask_momentum: float = 0.9,
        mask_lr_schedule: str = "constant",
        freeze_masks_at: int | float | None = 0.7,
        ramp_end: float = 0.5,
        exact_density: bool = True,
        controller_gain: float = 100.0,
        protect_pruned_weights: bool = True,
        min_density_per_layer: float = 0.0,
        log_every_n_steps: int | None = None,
        log_per_layer: bool = False,
        report: bool = True,
        report_dir: str | None = None,
        retain_freed_memory: bool = True,
    ) -> None:
        super().__init__()
        if lam is not None and target_density is not None:
            raise ValueError(
                "Give either lam (a fixed regularizer strength) or target_density (lam is then controlled), not both."
            )
        if lam is not None and (not isinstance(lam, (int, float)) or isinstance(lam, bool) or lam < 0):
            raise ValueError(f"lam must be a number >= 0 (0 disables the regularizer), got {lam!r}")
        if target_density is not None and (
            not isinstance(target_density, (int, float)) or not 0.0 < target_density <= 1.0
        ):
            raise ValueError(f"target_density must be in (0, 1] (fraction of connections kept), got {target_density!r}")
        if granularity not in GRANULARITIES:
            raise ValueError(f"granularity must be one of {list(GRANULARITIES)}, got {granularity!r}")
        if ste not in STES:
            raise ValueError(f"ste must be one of {list(STES)}, got {ste!r}")
        if not ste_slope > 0:
            raise ValueError(
                f"ste_slope must be > 0, got {ste_slope!r}: the STE proxy gradient must be positive everywhere, "
                "otherwise masks below the threshold move the wrong way or never revive."
            )
        if normalize not in NORMALIZATIONS:
            raise ValueError(f"normalize must be one of {list(NORMALIZATIONS)}, got {normalize!r}")
        if normalize_over is None:
            normalize_over = "network" if granularity == "weight" else "layer"
        if normalize_over not in NORMALIZE_SCOPES:
            raise ValueError(f"normalize_over must be one of {list(NORMALIZE_SCOPES)}, got {normalize_over!r}")
        if normalize_over == "unit" and granularity == "channel":
            raise ValueError(
                "normalize_over='unit' needs granularity='weight': a channel mask has one variable per unit, so "
                "per-unit normalization would reduce every gradient to its sign. Use normalize_over='layer'."
            )
        if regularizer not in REGULARIZERS:
            raise ValueError(f"regularizer must be one of {list(REGULARIZERS)}, got {regularizer!r}")
        if not mask_init > 0:
            raise ValueError(f"mask_init must be > 0 so that every connection starts switched on, got {mask_init!r}")
        if not mask_lr > 0:
            raise ValueError(f"mask_lr must be > 0, got {mask_lr!r}")
        if not 0 <= mask_momentum < 1:
            raise ValueError(f"mask_momentum must be in [0, 1), got {mask_momentum!r}")
        if fan_in_exponent is not None and (
            not isinstance(fan_in_exponent, (int, float)) or isinstance(fan_in_exponent, bool) or fan_in_exponent < 0
        ):
            raise ValueError(f"fan_in_exponent must be a number >= 0 (0 disables the scaling), got {fan_in_exponent!r}")
        if mask_lr_schedule not in MASK_LR_SCHEDULES:
            raise ValueError(f"mask_lr_schedule must be one of {list(MASK_LR_SCHEDULES)}, got {mask_lr_schedule!r}")
        _check_fraction_or_epoch(freeze_masks_at, "freeze_masks_at")
        if not 0.0 < ramp_end <= 1.0:
            raise ValueError(f"ramp_end must be a fraction of training in (0, 1], got {ramp_end!r}")
        if target_density is not None and isinstance(freeze_masks_at, float) and freeze_masks_at <= ramp_end:
            raise ValueError(
                f"freeze_masks_at={freeze_masks_at} would freeze the masks before the density schedule reaches "
                f"target_density at ramp_end={ramp_end}: set freeze_masks_at above ramp_end (e.g. "
                f"{min(0.95, ramp_end + 0.2):.2f}) or None."
            )
        if not controller_gain > 0:
            raise ValueError(f"controller_gain must be > 0, got {controller_gain!r}")
        if not 0.0 <= min_density_per_layer < 1.0:
            raise ValueError(f"min_density_per_layer must be in [0, 1), got {min_density_per_layer!r}")
        if log_every_n_steps is not None and (not isinstance(log_every_n_steps, int) or log_every_n_steps < 1):
            raise ValueError(f"log_every_n_steps must be a positive int or None, got {log_every_n_steps!r}")
        resolve_layer_types(layer_types)  # fail at construction on unknown names
        self.include = validate_patterns(include, "include")
        self.exclude = validate_patterns(exclude, "exclude")
        self.layer_types = (layer_types,) if isinstance(layer_types, str) else tuple(layer_types)

        self.target_density = None if target_density is None else float(target_density)
        self.lam = float(0.1 if lam is None and target_density is None else (lam or 0.0))
        if self.target_density is not None:
            self.lam = 0.01  # starting point for the controller; it grows as the schedule asks for sparsity
        self._initial_lam = self.lam
        self.granularity = granularity
        self.mask_init = float(mask_init)
        self.ste = ste
        self.ste_slope = float(ste_slope)
        self.normalize = normalize
        self.normalize_over = normalize_over
        self.regularizer = regularizer
        self.mask_lr = float(mask_lr)
        self.mask_momentum = float(mask_momentum)
        self.mask_lr_schedule = mask_lr_schedule
        if fan_in_exponent is None:
            fan_in_exponent = 0.5 if normalize_over == "unit" else 0.0
        self.fan_in_exponent = float(fan_in_exponent)
        self.freeze_masks_at = freeze_masks_at
        self.ramp_end = float(ramp_end)
        self.exact_density = bool(exact_density)
        self.controller_gain = float(controller_gain)
        self.protect_pruned_weights = protect_pruned_weights
        self.min_density_per_layer = float(min_density_per_layer)
        self.log_every_n_steps = log_every_n_steps
        self.log_per_layer = log_per_layer
        self.report = report
        self.report_dir = report_dir
        self.retain_freed_memory = bool(retain_freed_memory)
        self._retained_freed_memory = False  # whether this callback has set glibc's thresholds (see the argument)
        self._reporter: SCLReporter | None = None

        self._masks: dict[str, ConnectivityMask] = {}
        self._carried_over = 0  # masks already on the model when this callback first injected
        self._originals: dict[str, nn.Parameter] = {}
        self._mask_optimizer: torch.optim.SGD | None = None
        self._fused_mask_optimizer: bool | None = None
        self._pending_state: dict[str, Any] | None = None
        self._checkpoint_masks: dict[str, torch.Tensor] = {}  # float32 masks of the checkpoint being resumed
        self._fitting = False  # between on_fit_start and teardown: the mask optimizer is this fit's
        self._wrapped: dict[str, tuple[nn.Module, bool, Any]] = {}
        self._reg_scales: dict[str, float] | None = None
        self._frozen = False
        self._weight_snapshot: list[tuple[torch.Tensor, torch.Tensor, ConnectivityMask]] | None = None
        self._batched_step = False
        self._force_batched_step: bool | None = None  # tests: the batched mask step on the CPU too
        self._decayed_originals: list[str] | None = None
        self._decay_layout: tuple[tuple[int, bool], ...] = ()  # the param groups _decayed_originals was made from
        self._owners: dict[str, int] | None = None  # mask name -> id of the optimizer of its weight (several only)
        self._owners_layout: tuple[tuple[int, bool], ...] = ()  # the param groups _owners was made from
        self._stepped_for: tuple[int, int] | None = None  # (global_step, optimizer id) of the last mask step
        self._lambda_batch: int | None = None  # the batch lam was last updated at
        self._unowned_batch: int | None = None  # the batch the masks of weights no optimizer holds last stepped at
        self._warned: set[str] = set()
        self._last: dict[str, torch.Tensor] = {}
        self.steps_skipped_nonfinite = 0
        self._trend = 0.0  # smoothed change of log density per step (controller's derivative term)
        self._prev_log_density: float | None = None
        self._bar_epoch: int | None = None  # the epoch the progress bar last got the density in
        self._steps_cache: tuple[tuple[Any, ...], int] | None = None  # _total_optimizer_steps under a schedule

    # ------------------------------------------------------------------ public state

    @property
    def masks(self) -> dict[str, ConnectivityMask]:
        """The masks by layer name (empty before ``setup``)."""
        return dict(self._masks)

    @property
    def density(self) -> float:
        """Fraction of connections currently kept over all masked layers."""
        kept, total = self._kept_and_total()
        return float(kept) / max(total, 1)

    @property
    def frozen(self) -> bool:
        """Whether the masks have stopped updating (fine-tuning phase)."""
        return self._frozen

    def _kept_and_total(self) -> tuple[int, int]:
        kept = sum(mask.kept() for mask in self._masks.values())
        total = sum(mask.numel_connections for mask in self._masks.values())
        return kept, total

    # ------------------------------------------------------------------ injection

    def _inject(self, pl_module: L.LightningModule) -> None:
        _materialize_lazy_layers(pl_module)
        layers = select_layers(pl_module, self.layer_types, self.include, self.exclude)
        inject_masks(
            pl_module, layers, granularity=self.granularity, init=self.mask_init, ste=self.ste, slope=self.ste_slope
        )
        self._masks, self._originals = {}, {}
        for name, layer, mask in iter_masks(pl_module):
            self._masks[name] = mask
            self._originals[name] = layer.parametrizations.weight.original
        self._check_consistent_masks()

    def _check_consistent_masks(self) -> None:
        for name, mask in self._masks.items():
            if mask.granularity != self.granularity:
                raise ValueError(
                    f"Layer {name!r} already carries a {mask.granularity!r}-granularity mask but this callback uses "
                    f"granularity={self.granularity!r}. Use the granularity the model was trained with."
                )
            # the task gradient would use the mask's estimator and the regularizer this callback's
            if mask.ste != self.ste or (self.ste == "leaky_relu" and mask.slope != self.ste_slope):
                raise ValueError(
                    f"Layer {name!r} already carries a mask with ste={mask.ste!r} (slope {mask.slope:g}) but this "
                    f"callback uses ste={self.ste!r} (ste_slope {self.ste_slope:g}). Use the settings the masks were "
                    "made with, or fold them first (lightning_scl.masking.strip_masks) to start new masks."
                )

    def _wrap_method(self, pl_module: L.LightningModule, name: str, after: Any = None, before: Any = None) -> None:
        """Run ``before(*args)`` / ``after(result)`` around ``pl_module.<name>`` until teardown."""
        if name in self._wrapped:
            return
        original = getattr(pl_module, name)
        had_instance_attr = name in vars(pl_module)

        def wrapper(*args: Any, **kwargs: Any) -> Any:
            if before is not None:
                before(*args, **kwargs)
            result = original(*args, **kwargs)
            return after(result) if after is not None else result

        wrapper.__wrapped__ = original  # type: ignore[attr-defined]  # keeps is_overridden() truthful
        setattr(pl_module, name, wrapper)
        self._wrapped[name] = (pl_module, had_instance_attr, original)

    def _unwrap_methods(self) -> None:
        for name, (pl_module, had_instance_attr, original) in self._wrapped.items():
            if had_instance_attr:
                setattr(pl_module, name, original)
            elif name in vars(pl_module):
                delattr(pl_module, name)
        self._wrapped.clear()

    def _averaging_callbacks(self, trainer: L.Trainer) -> list[Callback]:
        """Lightning's weight averaging callbacks (EMA, SWA) in this run."""
        callbacks = getattr(trainer, "callbacks", None) or []
        return [cb for cb in callbacks if isinstance(cb, (WeightAveraging, StochasticWeightAveraging))]

    def _check_averaging_order(self, trainer: L.Trainer) -> None:
        callbacks = list(getattr(trainer, "callbacks", None) or [])
        mine = next((i for i, cb in enumerate(callbacks) if cb is self), len(callbacks))
        early = [type(cb).__name__ for cb in self._averaging_callbacks(trainer) if callbacks.index(cb) < mine]
        if early:
            raise ValueError(
                f"{early[0]} comes before SparseConnectivityLearning in Trainer(callbacks=[...]). It copies the "
                "model in its setup, before the masks exist, and its hooks must run after this callback's, which "
                "keep the masks out of the average. List SparseConnectivityLearning first: "
                f"callbacks=[scl, {early[0]}(...)]."
            )

    def _sync_averaged_masks(self, trainer: L.Trainer) -> None:
        """Give the averaged models of EMA/SWA callbacks the current masks: the average is of the weights, under the
        connectivity training learned (an average of mask variables is a connectivity nobody trained, at another
        density). Runs just before those callbacks swap, copy or save their average (they are listed after this)."""
        for callback in self._averaging_callbacks(trainer):
            averaged = getattr(callback, "_average_model", None)
            if isinstance(averaged, torch.optim.swa_utils.AveragedModel):  # WeightAveraging's; SWA's is the copy
                averaged = averaged.module
            if not isinstance(averaged, nn.Module):
                continue
            with torch.no_grad():
                for name, _, mask in iter_masks(averaged):
                    current = self._masks.get(name)
                    if current is not None and current.mask.shape == mask.mask.shape:
                        mask.mask.copy_(current.mask.to(mask.mask.device))

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._fitting = False  # also after an earlier fit that raised (Lightning then skips teardown)
        if stage == "fit":
            self._check_averaging_order(trainer)
            ours = {id(mask) for mask in self._masks.values()}
            self._carried_over = sum(1 for _, _, mask in iter_masks(pl_module) if id(mask) not in ours)
        try:
            self._inject(pl_module)
        except ValueError:
            # Layers created in configure_model do not exist yet: inject right after it instead.
            if not is_overridden("configure_model", pl_module):
                raise
        self._prepare_fsdp(trainer, pl_module)
        if is_overridden("configure_model", pl_module):

            def after_configure_model(result: Any) -> Any:
                self._inject(pl_module)
                return result

            self._wrap_method(pl_module, "configure_model", after=after_configure_model)
        if stage == "fit":
            self._wrap_method(pl_module, "configure_optimizers", after=self._remove_masks_from_user_optimizers)
        # LightningModule.on_load_checkpoint runs just before the strict state_dict load of `ckpt_path=`: check the
        # checkpoint's masks there, where a mismatch can still be explained instead of listed as missing keys.
        self._wrap_method(pl_module, "on_load_checkpoint", before=self._check_checkpoint_masks)
        # weights-only checkpoints skip on_save_checkpoint above: the record is written from the module's hook too
        register_record_writer(pl_module, "scl", _MaskRecord(pl_module, self._record_settings()))

    def _prepare_fsdp(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Under Lightning's FSDP strategy (which wraps the model after ``setup``): masks in FSDP units of their own."""
        from lightning.pytorch.strategies import FSDPStrategy

        strategy = trainer.strategy
        if not isinstance(strategy, FSDPStrategy) or _has_fsdp_units(pl_module):  # wrapped by an earlier fit
            return
        from torch.distributed.fsdp import ShardingStrategy

        if trainer.world_size > 1 and strategy.sharding_strategy != ShardingStrategy.NO_SHARD:
            # sharded, a rank holds a flat slice of every mask and its gradient: no whole rows for the per-unit
            # statistics, no whole mask for the gate
            raise ValueError(
                f"SparseConnectivityLearning does not support sharded FSDP across {trainer.world_size} processes "
                f"(sharding_strategy={strategy.sharding_strategy.name}). Use strategy='ddp', or "
                "FSDPStrategy(sharding_strategy='NO_SHARD')."
            )
        strategy.kwargs["auto_wrap_policy"] = with_mask_units(strategy.kwargs.get("auto_wrap_policy"))
        if self.report or self.regularizer == "flops":
            # Counting FLOPs runs the model; once wrapped, FSDP's inner units refuse to run before the root has. So
            # count now, on the unwrapped model.
            self._reporter = SCLReporter(pl_module)
            accountant = self._reporter.accountant
            if accountant.example_input is None or not self._masks:
                accountant.skip_flops(
                    "under FSDP the FLOPs are counted before the model is wrapped, which needs the masked layers and "
                    "LightningModule.example_input_array in setup"
                )
            elif accountant.has_flops:
                accountant.snapshot()  # and the channel links, which also run the model

    def _check_checkpoint_masks(self, checkpoint: dict[str, Any]) -> None:
        record = (checkpoint.get(CHECKPOINT_KEY) or {}).get("scl")
        if record is None:
            if not any(".parametrizations." in key for key in checkpoint.get("state_dict", {})):
                raise ValueError(
                    "The checkpoint has no connectivity masks: it was written without SparseConnectivityLearning. "
                    "To prune a trained model, load its weights (Model.load_from_checkpoint(...)) and call "
                    "trainer.fit(model) without ckpt_path."
                )
            return
        if list(record["layers"]) != list(self._masks) or record["granularity"] != self.granularity:
            raise ValueError(
                f"The checkpoint was written with masks on {list(record['layers'])} (granularity "
                f"{record['granularity']!r}) but this callback masks {list(self._masks)} (granularity "
                f"{self.granularity!r}): use the layer_types/include/exclude and granularity of the run that wrote "
                "it, or start a new run without ckpt_path."
            )
        # A true half-precision model rounds the masks it loads: keep the checkpoint's float32 values for fit start.
        state = checkpoint.get("state_dict", {})
        self._checkpoint_masks = {
            name: state[name + _MASK_SUFFIX] for name in self._masks if name + _MASK_SUFFIX in state
        }

    def _remove_masks_from_user_optimizers(self, result: Any) -> Any:
        mask_ids = {id(mask.mask) for mask in self._masks.values()}
        for optimizer in _optimizers_in(result):
            for group in optimizer.param_groups:
                # in place: LBFGS keeps a reference to its group's list
                group["params"][:] = [p for p in group["params"] if id(p) not in mask_ids]
        return result

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._fitting = False
        self._checkpoint_masks = {}  # a test/validate run's checkpoint: no fit start will take them
        self._unwrap_methods()
        for mask in self._masks.values():  # leave the model as trainable as it came
            mask.mask.requires_grad_(True)

    def _set_mask_gradients(self, trainer: L.Trainer) -> None:
        # Frozen masks need no gradient: backward then skips ``g * W`` for every masked layer. Under a multi-process
        # strategy the flag stays on, since DDP expects a gradient for every parameter that had one at wrap time.
        needed = not self._frozen or trainer.world_size > 1
        for mask in self._masks.values():
            mask.mask.requires_grad_(needed)

    # ------------------------------------------------------------------ fit start / resume

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self._masks:
            raise RuntimeError(
                "SparseConnectivityLearning found no masks at fit start. If the model's layers are created outside "
                "setup/configure_model, create them in LightningModule.__init__, setup or configure_model."
            )
        self._keep_masks_float32(trainer, pl_module)
        params = [mask.mask for mask in self._masks.values()]
        self._decayed_originals = None
        self._owners, self._stepped_for, self._lambda_batch, self._unowned_batch = None, None, None, None
        self._bar_epoch = None
        if self._pending_state is None and trainer.global_step == 0:
            self._reset_training_state()  # a callback used for an earlier fit starts afresh
        fsdp_reporter = self._reporter if _has_fsdp_units(pl_module) else None  # made before FSDP wrapped the model
        if self.report or self.regularizer == "flops":
            self._reporter = fsdp_reporter or SCLReporter(pl_module)
        # On CPU the fused kernel updates momentum and mask in one pass instead of three; on accelerators the default
        # (foreach) path is already fast and works with every strategy's parameter wrapping.
        self._fused_mask_optimizer = all(p.device.type == "cpu" for p in params) or None
        if self.retain_freed_memory and self._fused_mask_optimizer and not self._retained_freed_memory:
            self._retained_freed_memory = _retain_freed_memory()
        # On a GPU, batch the per-layer work of the mask step: a small model's step is bound by kernel launches
        # there, while on CPU the per-layer passes are faster. Per-unit statistics and the non-identity STEs keep
        # the per-layer path, and so do masks too large for exact float32 counts.
        on_gpu = all(p.is_cuda for p in params) if self._force_batched_step is None else self._force_batched_step
        self._batched_step = (
            on_gpu
            and self.normalize_over != "unit"
            and self.ste == "identity"
            and all(p.numel() < 2**24 for p in params)
        )
        self._mask_optimizer = torch.optim.SGD(
            params, lr=self.mask_lr, momentum=self.mask_momentum, weight_decay=0.0, fused=self._fused_mask_optimizer
        )
        self._fitting = True
        if self._pending_state is not None:
            self._load_pending_state()
        self._set_mask_gradients(trainer)  # a run resumed after the freeze starts frozen
        for optimizer in trainer.optimizers:
            held = {id(p) for group in optimizer.param_groups for p in group["params"]}
            if any(id(p) in held for p in params):
                self._remove_masks_from_user_optimizers(optimizer)
                rank_zero_warn(
                    "Mask variables were found in a user optimizer that bypassed configure_optimizers; removed them "
                    "so only the mask optimizer updates them (no weight decay)."
                )
        own, period = self.log_every_n_steps, trainer.log_every_n_steps
        if own and period and own % period:
            rank_zero_warn(
                f"SparseConnectivityLearning(log_every_n_steps={own}) is not a multiple of Trainer(log_every_n_steps="
                f"{period}): the logger only writes on the Trainer's logging steps, so the SCL metrics are logged only "
                f"every {math.lcm(own, period)} steps. Use a multiple of {period}."
            )
        freeze, epochs = self.freeze_masks_at, trainer.max_epochs
        by_epoch = self.target_density is not None and isinstance(freeze, int) and epochs and epochs > 0
        if by_epoch and freeze / epochs <= self.ramp_end:
            raise ValueError(
                f"freeze_masks_at={freeze} (epoch) of max_epochs={epochs} would freeze the masks before the "
                f"density schedule reaches target_density at ramp_end={self.ramp_end} (epoch "
                f"{self.ramp_end * epochs:g}): give a later epoch (e.g. {math.floor(self.ramp_end * epochs) + 1}"
                ") or None."
            )
        if self.target_density is not None or self.freeze_masks_at is not None:
            total = trainer.estimated_stepping_batches
            if not math.isfinite(total) and (
                self.target_density is not None or isinstance(self.freeze_masks_at, float)
            ):
                raise ValueError(
                    "target_density and a fractional freeze_masks_at (default 0.7) need a finite training length: "
                    "set Trainer(max_epochs=...) or Trainer(max_steps=...), or give freeze_masks_at as an epoch "
                    "number (or None to never freeze)."
                )
        kept, total = self._kept_and_total()
        rank_zero_info(
            f"SparseConnectivityLearning: {len(self._masks)} masked layers, {total:,} connections "
            f"({kept / max(total, 1):.2%} kept), granularity={self.granularity}, "
            + (f"target_density={self.target_density}" if self.target_density is not None else f"lam={self.lam}")
            + (", freed CPU memory retained (retain_freed_memory)" if self._retained_freed_memory else "")
            + (
                f"; {self._carried_over} of the masks were already on the model and keep their trained values "
                f"(mask_init={self.mask_init:g} applies only to new masks; strip_masks starts afresh)"
                if self._carried_over
                else ""
            )
        )

    def _keep_masks_float32(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """``precision="bf16-true"``/``"16-true"`` casts every parameter, the masks included: small mask updates would
        round away (a bfloat16 mask at 2.0 never moves with mask_lr 0.01). Put them back to float32."""
        saved, self._checkpoint_masks = self._checkpoint_masks, {}
        halved = [name for name, mask in self._masks.items() if mask.mask.dtype != torch.float32]
        if not halved:
            return
        if trainer.world_size > 1 or _has_fsdp_units(pl_module):
            raise ValueError(
                f"The precision plugin cast the masks to {self._masks[halved[0]].mask.dtype} "
                f"(precision={trainer.precision!r}); "
                "in that precision their small updates round away. With several processes they cannot be cast back "
                "after the strategy wrapped the model: use a mixed precision (e.g. 'bf16-mixed') instead."
            )
        for name in halved:
            mask = self._masks[name].mask
            value = saved.get(name)
            exact = isinstance(value, torch.Tensor) and value.dtype == torch.float32 and value.shape == mask.shape
            # a resumed run continues from the checkpoint's float32 masks, not from their half-precision rounding
            mask.data = value.to(mask.device) if exact else mask.data.float()

    def _reset_training_state(self) -> None:
        self._frozen = False
        self._trend = 0.0
        self._prev_log_density = None
        self._reg_scales = None
        self.steps_skipped_nonfinite = 0
        self.lam = self._initial_lam

    def _load_pending_state(self) -> None:
        state = self._pending_state or {}
        self._pending_state = None
        if self.target_density is not None:  # the controller's state; a fixed lam is the constructor's, as mask_lr
            self.lam = float(state.get("lam", self.lam))
        self._trend = float(state.get("trend", 0.0))
        self._prev_log_density = state.get("prev_log_density")
        self._frozen = bool(state.get("frozen", False))
        self.steps_skipped_nonfinite = int(state.get("steps_skipped_nonfinite", 0))
        opt_state = state.get("mask_optimizer")
        if opt_state is not None and self._mask_optimizer is not None:
            n_saved = len(opt_state["param_groups"][0]["params"])
            n_now = len(self._mask_optimizer.param_groups[0]["params"])
            if n_saved != n_now:
                raise ValueError(
                    f"The checkpoint's mask optimizer holds {n_saved} masks but the model has {n_now}: the callback's "
                    "layer selection (layer_types/include/exclude) differs from the run that wrote the checkpoint."
                )
            self._mask_optimizer.load_state_dict(opt_state)
            for group in self._mask_optimizer.param_groups:  # the constructor arguments win over the checkpoint's
                group["lr"] = self.mask_lr
                group["momentum"] = self.mask_momentum
                group["fused"] = self._fused_mask_optimizer

    def state_dict(self) -> dict[str, Any]:
        return {
            "version": _STATE_VERSION,
            "lam": float(self.lam),
            "trend": float(self._trend),
            "prev_log_density": self._prev_log_density,
            "frozen": bool(self._frozen),
            "steps_skipped_nonfinite": int(self.steps_skipped_nonfinite),
            "mask_optimizer": None if self._mask_optimizer is None else self._mask_optimizer.state_dict(),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._pending_state = dict(state_dict)
        # Loaded after fit start (by hand): now. Before it, also into a callback an earlier fit used (its optimizer
        # is about to be replaced): at fit start.
        if self._fitting and self._mask_optimizer is not None:
            self._load_pending_state()

    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._sync_averaged_masks(trainer)  # EMA swaps its average in for validation

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._sync_averaged_masks(trainer)  # EMA and SWA copy their average into the model
        never_froze = self.freeze_masks_at is not None and not self._frozen and not trainer.fast_dev_run
        if self.target_density is not None and never_froze and self._masks:
            by_epoch = isinstance(self.freeze_masks_at, int)
            rank_zero_warn(
                f"SparseConnectivityLearning: training ended (step {trainer.global_step}, epoch "
                f"{trainer.current_epoch}) before the masks froze at freeze_masks_at={self.freeze_masks_at!r}"
                + (" (an epoch number)" if by_epoch else "")
                + f": the density is {self.density:.2%}, not exactly target_density={self.target_density:.2%}, and "
                "the masks had no fine-tuning phase. "
                + (
                    "Give an epoch training reaches (max_steps or an early stop ended it sooner), or a fraction of "
                    "training (it follows max_steps)."
                    if by_epoch
                    else (
                        f"The fraction lies past the last of this run's {trainer.global_step} optimizer steps: lower "
                        "it, or train longer."
                    )
                    if self._progress(trainer) >= 1.0
                    else "Training stopped early (EarlyStopping, a time limit or should_stop); resume it to finish."
                )
            )

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        self._sync_averaged_masks(trainer)  # EMA saves its average as the checkpoint's state_dict
        record = checkpoint.setdefault(CHECKPOINT_KEY, {})
        record["scl"] = {"layers": list(self._masks), **self._record_settings(), "density": self.density}

    def _record_settings(self) -> dict[str, Any]:
        return {
            "granularity": self.granularity,
            "ste": self.ste,
            "ste_slope": self.ste_slope,
            "mask_init": self.mask_init,
        }

    # ------------------------------------------------------------------ schedule

    def _total_optimizer_steps(self, trainer: L.Trainer) -> float:
        """The optimizer steps of the whole fit (automatic optimization).

        Lightning's ``estimated_stepping_batches`` divides every epoch's batches by the accumulation factor in force
        now, which a ``GradientAccumulationScheduler`` changes between epochs: the density ramp and the freeze would
        jump. Sum the epochs' steps with each epoch's own factor instead.
        """
        total = trainer.estimated_stepping_batches
        scheduler = next((c for c in trainer.callbacks if isinstance(c, GradientAccumulationScheduler)), None)
        batches, epochs = trainer.num_training_batches, trainer.max_epochs
        if scheduler is None or not math.isfinite(total) or not epochs or epochs < 1 or not math.isfinite(batches):
            return total
        key = (id(scheduler), batches, epochs, trainer.max_steps)
        if self._steps_cache is None or self._steps_cache[0] != key:
            steps = sum(math.ceil(batches / scheduler.get_accumulate_grad_batches(e)) for e in range(epochs))
            self._steps_cache = (key, min(steps, trainer.max_steps) if trainer.max_steps > 0 else steps)
        return self._steps_cache[1]

    def _progress(self, trainer: L.Trainer) -> float:
        total = self._total_optimizer_steps(trainer)
        if not math.isfinite(total) or total <= 0:
            return 0.0
        if trainer.lightning_module.automatic_optimization:
            return min(1.0, trainer.global_step / total)
        # manual optimization: global_step counts every optimizer.step(), several per batch for a GAN; training ends
        # at max_steps or after the epochs' batches, whichever comes first
        fractions = []
        if trainer.max_steps > 0:
            fractions.append(trainer.global_step / trainer.max_steps)
        batches, epochs = trainer.num_training_batches, trainer.max_epochs
        if epochs and epochs > 0 and math.isfinite(batches) and batches > 0:
            fractions.append(trainer.fit_loop.epoch_loop.total_batch_idx / (batches * epochs))
        return min(1.0, max(fractions)) if fractions else 0.0

    def _logs_this_batch(self, trainer: L.Trainer) -> bool:
        """Whether to log the step metrics now: on the batches where the logger writes them.

        Lightning writes step metrics when its count of batches that stepped, this one included, is a multiple of
        ``Trainer(log_every_n_steps)``, and writes the last value logged: one logged at another batch would reach
        the logger late, or never if the epoch ends first. This callback's own ``log_every_n_steps`` thins those
        batches out.
        """
        period = trainer.log_every_n_steps
        if not period:
            return False
        stepped = getattr(trainer.fit_loop.epoch_loop, "_batches_that_stepped", trainer.global_step) + 1
        own = self.log_every_n_steps or period
        return (stepped % period == 0 and stepped % own == 0) or trainer.should_stop

    def _should_freeze(self, trainer: L.Trainer) -> bool:
        if self.freeze_masks_at is None:
            return False
        if isinstance(self.freeze_masks_at, float):
            return self._progress(trainer) >= self.freeze_masks_at
        return trainer.current_epoch >= self.freeze_masks_at

    def _mask_training_fraction(self, trainer: L.Trainer) -> float:
        """How far through the mask-training window (start to ``freeze_masks_at``, or to the end) training is."""
        progress = self._progress(trainer)
        end = self.freeze_masks_at
        if isinstance(end, int) and not isinstance(end, bool):
            end = end / trainer.max_epochs if trainer.max_epochs and trainer.max_epochs > 0 else None
        if end is None or end <= 0:
            return progress
        return min(1.0, progress / end)

    def scheduled_density(self, progress: float) -> float:
        """Density the controller aims for at ``progress`` (fraction of training): cubic decay, then flat.

        Example:
            >>> scl = SparseConnectivityLearning(target_density=0.01, ramp_end=0.5)
            >>> [round(scl.scheduled_density(p), 4) for p in (0.0, 0.25, 0.5, 1.0)]
            [1.0, 0.1338, 0.01, 0.01]
        """
        assert self.target_density is not None
        ramp = min(1.0, progress / self.ramp_end)
        # Cubic in sparsity (Zhu & Gupta 2017): prune fast while the network is redundant, slowly near the target.
        return self.target_density + (1.0 - self.target_density) * (1.0 - ramp) ** 3

    # ------------------------------------------------------------------ regularizer scales

    def _scales(self, pl_module: L.LightningModule) -> dict[str, float]:
        """Per-layer pressure multiplier: 1 per connection, or the connection's MACs per sample, times
        ``fan_in ** fan_in_exponent``; mean 1 over the mask variables."""
        if self._reg_scales is not None:
            return self._reg_scales
        costs: dict[str, float] = {}
        macs = self._layer_macs(pl_module) if self.regularizer == "flops" else None
        for name, mask in self._masks.items():
            per_connection = 1.0 if macs is None else macs.get(name, 0) / mask.numel_connections
            costs[name] = per_connection * mask.connections_per_variable
        if self.fan_in_exponent:
            for name, mask in self._masks.items():
                fan_in = mask.numel_connections / mask.weight_shape[mask.feature_dim]
                costs[name] *= fan_in**self.fan_in_exponent
        n_vars = sum(mask.mask.numel() for mask in self._masks.values())
        mean_cost = sum(costs[name] * mask.mask.numel() for name, mask in self._masks.items()) / max(n_vars, 1)
        scales = {name: cost / mean_cost if mean_cost > 0 else 1.0 for name, cost in costs.items()}
        if self.regularizer == "flops" and macs is None:
            return scales  # no example input seen yet: count connections until the MACs are known
        self._reg_scales = scales
        spread = max(scales.values()) / max(min(scales.values()), 1e-12)
        wide = self.regularizer == "flops" and spread > 20 and self.min_density_per_layer == 0
        if wide and self.normalize_over != "network":
            # Measured on LeNet-5-Caffe at 0.9%: per unit, both convolutions lost every connection (accuracy 11%);
            # with the network statistic the task gradients keep their scale across layers and the convolutions
            # kept a few weights (98.0%). Per layer, like per unit, gives every layer the same gradient scale.
            costly = max(scales, key=scales.get)
            rank_zero_warn(
                f"SparseConnectivityLearning: with regularizer='flops' a connection of {costly!r} is pushed "
                f"{spread:.0f}x harder than one of the cheapest layer, and normalize_over={self.normalize_over!r} "
                "gives every layer's task gradient the same scale: such layers can lose every connection (both "
                "convolutions of LeNet-5-Caffe did, per unit). Set min_density_per_layer (e.g. 0.05) to keep a "
                "floor, use normalize_over='network' (weight masks), or regularizer='connections'."
            )
        return self._reg_scales

    def _layer_macs(self, pl_module: L.LightningModule) -> dict[str, int] | None:
        if self._reporter is None:
            return None
        return self._reporter.accountant.dense_macs_by_layer()

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self._reporter is not None:
            self._reporter.on_train_batch_start(batch)

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._reporter is not None and self.report:
            self._reporter.on_fit_end(trainer, pl_module, self.report_dir)

    # ------------------------------------------------------------------ the step

    def _gradient_scale(self, trainer: L.Trainer) -> float:
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        if scaler is None or not scaler.is_enabled():
            return 1.0
        # Lightning unscales only the user's optimizer; the masks live outside it.
        return float(scaler.get_scale())

    def on_before_optimizer_step(
        self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        if self._mask_optimizer is None:
            return
        step = trainer.global_step
        if self._stepped_for == (step, id(optimizer)):
            # a closure optimizer (LBFGS) runs the closure, and this hook, several times per step: one mask step
            self._drop_mask_gradients(self._masks_for(trainer, optimizer))
            return
        self._stepped_for = (step, id(optimizer))
        if not self._frozen and self._should_freeze(trainer):
            self._frozen = True
            self._set_mask_gradients(trainer)
            rank_zero_info(f"SparseConnectivityLearning: masks frozen at step {trainer.global_step}.")
            if self.exact_density and self.target_density is not None:
                self._snap_to_target_density()
        log_now = self._logs_this_batch(trainer)
        # The progress bar shows the density from each epoch's first step on (Lightning clears it between epochs).
        bar_due = self._bar_epoch != trainer.current_epoch
        if self._frozen:
            self._drop_mask_gradients()
            if log_now or bar_due:  # the metrics stay on the logger's timeline after the freeze
                kept_by_layer = {name: mask.kept_tensor() for name, mask in self._masks.items()}
                self._log_counts(pl_module, step, kept_by_layer, self._scales(pl_module), to_logger=log_now)
            return
        # Several optimizers (manual optimization): this step trains the masks of the weights this optimizer steps,
        # and at the batch's first optimizer step those of weights no optimizer holds (one mask step per batch).
        # The others keep their gradients for their own optimizer, unless their weights are frozen now (e.g. by
        # toggle_optimizer), whose gradients the task does not mean for them.
        batch = trainer.global_step if pl_module.automatic_optimization else trainer.fit_loop.epoch_loop.total_batch_idx
        active = self._masks_for(trainer, optimizer, with_unowned=batch != self._unowned_batch)
        self._unowned_batch = batch
        others = {} if active is self._masks else {n: m for n, m in self._masks.items() if n not in active}
        owners = self._owners or {}
        toggled_off = {n: m for n, m in others.items() if n in owners and not self._originals[n].requires_grad}
        self._drop_mask_gradients(toggled_off)
        stashed = {name: mask.mask.grad for name, mask in others.items()}
        masks = list(active.values())
        if all(mask.mask.grad is None for mask in masks):
            return
        if self.mask_lr_schedule == "cosine":
            lr = self.mask_lr * 0.5 * (1.0 + math.cos(math.pi * self._mask_training_fraction(trainer)))
            for group in self._mask_optimizer.param_groups:
                group["lr"] = lr
        for mask in masks:
            if mask.mask.grad is None:
                mask.mask.grad = torch.zeros_like(mask.mask)
        # The gradients' statistics (per unit or per layer): a NaN/inf makes one non-finite, so the same values are
        # the non-finite check (one host sync for all layers).
        per_feature = self.normalize_over == "unit"
        statistic = self.normalize if self.normalize != "none" else "max_abs"
        count_now = self.target_density is not None or log_now or bar_due
        kept_by_layer: dict[str, torch.Tensor] = {}
        batched = self._batched_step and not others
        if batched:
            host_stats, kept_by_layer = self._batched_statistics_and_counts(masks, statistic, count_now)
            finite = all(math.isfinite(v) for v in host_stats)
        else:
            stats = [mask_gradient_statistic(m.mask.grad, m.feature_dim, statistic, per_feature) for m in masks]
            if self.normalize_over == "network":
                stats = [_network_statistic(stats, [m.mask.numel() for m in masks], statistic)] * len(masks)
            finite = bool(torch.isfinite(torch.cat(stats)).all())
        if not finite:
            self.steps_skipped_nonfinite += 1
            if "nonfinite" not in self._warned:
                self._warned.add("nonfinite")
                rank_zero_warn(
                    "SparseConnectivityLearning: non-finite mask gradients; skipped the mask update for this step "
                    "(masks and lambda unchanged). Further skips are counted in `steps_skipped_nonfinite`."
                )
            self._drop_mask_gradients(active)
            return

        # Counting kept connections is a pass over every mask: do it only when the controller or logging needs it.
        if count_now and not batched:
            kept_by_layer = {name: mask.kept_tensor() for name, mask in self._masks.items()}
        # once per batch: a GAN's two optimizers both reach this point, and the controller's gain is per batch
        if self.target_density is not None and batch != self._lambda_batch:
            self._lambda_batch = batch
            self._update_lambda(
                self._kept_and_density(kept_by_layer)[1], self._progress(trainer), self._total_optimizer_steps(trainer)
            )
        scales = self._scales(pl_module)
        # The normalization makes the task gradient scale-free, so AMP's loss scale only matters without it.
        amp_scale = self._gradient_scale(trainer) if self.normalize == "none" else 1.0
        identity_proxy = self.ste == "identity"
        if batched:
            grads = [mask.mask.grad for mask in masks]
            tiny = torch.finfo(torch.float32).tiny  # all-zero gradients stay zero, as in _inverse_statistic
            inverses = [1 / max(v, tiny) if self.normalize != "none" else 1 / amp_scale for v in host_stats]
            torch._foreach_mul_(grads, inverses)
            torch._foreach_add_(grads, [self.lam * scales[name] for name in self._masks])
        else:
            for (name, mask), stat in zip(active.items(), stats):
                grad = mask.mask.grad
                inverse = (
                    _inverse_statistic(stat) if self.normalize != "none" else stat.new_full(stat.shape, 1 / amp_scale)
                )
                pressure = self.lam * scales[name]
                # Identity STE: the regularizer's gradient is the constant pressure, added in the same pass.
                _scale_rows_and_add_(grad, inverse, mask.feature_dim, pressure if identity_proxy else 0.0, per_feature)
                if not identity_proxy and pressure > 0:
                    proxy = ste_derivative(mask.mask.detach(), self.ste, self.ste_slope)
                    grad.add_(proxy * pressure if not isinstance(proxy, float) else pressure)
        for mask in others.values():  # SGD skips a parameter without a gradient, momentum included
            mask.mask.grad = None
        self._mask_optimizer.step()
        for name, mask in others.items():
            mask.mask.grad = stashed[name]
        # The fused CPU kernel writes the masks without bumping their version counters: bump them, so autograd's
        # saved-tensor checks and the masks' cached gates (keyed on the version) see the change.
        increment_version([mask.mask for mask in masks])
        self._drop_mask_gradients(active)

        if self.min_density_per_layer > 0:
            self._apply_density_floor()
        if self.protect_pruned_weights:
            self._snapshot_pruned_weights(trainer, active)
        if log_now or bar_due:
            self._log_counts(pl_module, step, kept_by_layer, scales, to_logger=log_now)

    def _batched_statistics_and_counts(
        self, masks: list[ConnectivityMask], statistic: str, count: bool
    ) -> tuple[list[float], dict[str, torch.Tensor]]:
        """Each mask's gradient statistic (per layer, or the network's for every layer) and, with ``count``, the kept
        connections per layer: a few multi-tensor kernels and one host synchronization for all layers.

        On a GPU a step of a small model is bound by kernel launches, and the per-layer path issues about ten short
        kernels per masked layer; this path is taken there (see ``_batched_step``).
        """
        order = {"mean_abs": 1, "l2": 2, "max_abs": math.inf}[statistic]
        values = list(torch._foreach_norm([m.mask.grad for m in masks], order))
        if count:
            # the masks' cached 0/1 gates, as float32: their sums are exact below 2**24, which _batched_step checked
            gates = [m._cached_gate() for m in masks]
            gates = [
                g if g is not None and g.dtype == torch.float32 else gate_values(m.mask.detach(), torch.float32)
                for g, m in zip(gates, masks)
            ]
            values += list(torch._foreach_norm(gates, 1))
        host = torch.stack(values).tolist()
        norms, counts = host[: len(masks)], host[len(masks) :]
        sizes = [m.mask.numel() for m in masks]
        # the norms as mask_gradient_statistic's whole-layer statistics: mean |g|, root mean square, max |g|
        stats = [n / {"mean_abs": k, "l2": math.sqrt(k), "max_abs": 1}[statistic] for n, k in zip(norms, sizes)]
        if self.normalize_over == "network":
            layer_stats = [torch.tensor([v], dtype=torch.float64) for v in stats]  # on the host: no device work
            stats = [float(_network_statistic(layer_stats, sizes, statistic))] * len(masks)
        kept = {
            name: torch.tensor(round(c) * m.connections_per_variable)
            for (name, m), c in zip(self._masks.items(), counts)
        }
        return stats, kept

    def _drop_mask_gradients(self, masks: dict[str, ConnectivityMask] | None = None) -> None:
        # what the mask optimizer's zero_grad(set_to_none=True) does, without its per-call profiling overhead
        for mask in (self._masks if masks is None else masks).values():
            mask.mask.grad = None

    def _masks_for(
        self, trainer: L.Trainer, optimizer: torch.optim.Optimizer, with_unowned: bool = True
    ) -> dict[str, ConnectivityMask]:
        """The masks whose weights ``optimizer`` steps (``with_unowned``: and masks on weights no optimizer holds):
        all of them with a single optimizer."""
        if len(trainer.optimizers) < 2:
            return self._masks
        # Several optimizers (manual optimization): even when one of them holds every masked weight, the others'
        # steps must not train those masks on their own losses (a GAN masking only the discriminator).
        layout = _param_group_layout(trainer)
        if self._owners is None or layout != self._owners_layout:  # param groups added during fit change owners
            self._owners_layout = layout
            self._owners = {}
            for opt in trainer.optimizers:
                held = {id(p) for group in opt.param_groups for p in group["params"]}
                for name, original in self._originals.items():
                    if id(original) in held:
                        self._owners.setdefault(name, id(opt))
        unowned = id(optimizer) if with_unowned else None
        return {name: m for name, m in self._masks.items() if self._owners.get(name, unowned) == id(optimizer)}

    def _kept_and_density(self, kept_by_layer: dict[str, torch.Tensor]) -> tuple[float, float]:
        kept = float(torch.stack(list(kept_by_layer.values())).sum())  # one host sync for all layers
        return kept, kept / sum(mask.numel_connections for mask in self._masks.values())

    def _log_counts(
        self,
        pl_module: L.LightningModule,
        step: int,
        kept_by_layer: dict[str, torch.Tensor],
        scales: dict[str, float],
        to_logger: bool = True,
    ) -> None:
        kept, density = self._kept_and_density(kept_by_layer)
        pl_module.log("density", density, on_step=True, on_epoch=False, prog_bar=True, logger=False, batch_size=1)
        self._bar_epoch = pl_module.current_epoch
        if not to_logger:
            return
        self._warn_collapsed(kept_by_layer)
        reg_value = self.lam * sum(
            scales[name] / self._masks[name].connections_per_variable * float(k) for name, k in kept_by_layer.items()
        )
        self._log_step(pl_module, step, density, kept, reg_value, kept_by_layer)

    def _warn_collapsed(self, kept_by_layer: dict[str, torch.Tensor]) -> None:
        for name, kept in kept_by_layer.items():
            if int(kept) == 0 and f"collapse:{name}" not in self._warned:
                self._warned.add(f"collapse:{name}")
                rank_zero_warn(
                    f"SparseConnectivityLearning: layer {name!r} has no connection left (density 0): nothing flows "
                    "through it any more. If every path from input to output runs through it, the output no longer "
                    "depends on the input: lower lam / raise target_density, exclude the layer, or set "
                    "min_density_per_layer (e.g. 0.01). If a skip connection bypasses it (a residual branch), the "
                    "branch has been pruned away, which can be what you want; min_density_per_layer keeps it."
                )

    def _update_lambda(self, density: float, progress: float, total_steps: float) -> None:
        """Multiplicative control of ``lam`` on the log-density error, looking ahead along the recent trend.

        Masks start far above the threshold, so density reacts to ``lam`` with a long delay and then falls in a
        cascade; acting on the density predicted a short horizon ahead (the derivative term) stops ``lam`` from
        winding up during the delay and overshooting once the cascade starts.
        """
        log_density = math.log(max(density, 1e-12))
        horizon = max(1.0, 0.05 * total_steps)
        if self._prev_log_density is not None:
            # The trend averages over 50 steps, or over a third of the horizon when that is shorter (runs under 3,000
            # steps): a trend slower than the horizon sees a cascade only after it has happened, and lam then swings.
            smoothing = max(0.02, min(1.0, 3.0 / horizon))
            self._trend = (1.0 - smoothing) * self._trend + smoothing * (log_density - self._prev_log_density)
        self._prev_log_density = log_density
        goal = self.scheduled_density(min(1.0, progress + horizon / total_steps))
        error = log_density + horizon * self._trend - math.log(goal)
        # The gain is per run, not per step: lam may move by exp(controller_gain * error) over the whole training.
        step = max(-_MAX_LOG_LAM_STEP, min(_MAX_LOG_LAM_STEP, self.controller_gain * error / total_steps))
        lam = self.lam * math.exp(step)
        self.lam = min(max(lam, _LAM_BOUNDS[0]), _LAM_BOUNDS[1])

    def _floor_size(self, mask: ConnectivityMask) -> int:
        """How many of ``mask``'s variables ``min_density_per_layer`` keeps on (0 without a floor)."""
        return math.ceil(self.min_density_per_layer * mask.mask.numel())

    def _apply_density_floor(self) -> None:
        with torch.no_grad():
            for mask in self._masks.values():
                values = mask.mask.view(-1)
                need = self._floor_size(mask)
                if int(_count_positive(values)) >= need:
                    continue
                top = torch.topk(values, need).indices
                values[top] = values[top].clamp_min(_REVIVED_MASK_VALUE)

    def _snap_to_target_density(self) -> None:
        """Keep exactly the ``target_density`` share of connections: the mask variables with the largest values.

        A prefix of one ranking over all layers, so a variable is never kept while a larger one is dropped (layer
        floors first). Switched-on variables get a tiny positive value, switched-off ones 0: only the sign matters
        once the masks are frozen.
        """
        assert self.target_density is not None
        masks = list(self._masks.values())
        total = sum(mask.numel_connections for mask in masks)
        goal = round(self.target_density * total)
        with torch.no_grad():
            keys, costs = [], []
            floor_variables = 0
            for mask in masks:
                key = mask.mask.detach().reshape(-1).clone()
                need = self._floor_size(mask)
                if need:  # the floor's variables rank ahead of everything
                    key[torch.topk(key, need).indices] = math.inf
                    floor_variables += need
                keys.append(key)
                costs.append(torch.full_like(key, mask.connections_per_variable, dtype=torch.int64))
            order = torch.argsort(torch.cat(keys), descending=True, stable=True)
            # connections kept by each prefix of the ranking, from the empty one on
            prefix = torch.cat(costs)[order].cumsum(0)
            prefix = torch.cat([prefix.new_zeros(1), prefix])
            # the prefix nearest the goal (exact for weight masks): the last one below it or the first at or above
            above = min(int(torch.searchsorted(prefix, prefix.new_tensor([goal]))), len(order))
            below = max(above - 1, 0)
            kept_variables = below if goal - int(prefix[below]) < int(prefix[above]) - goal else above
            kept_variables = max(kept_variables, floor_variables)  # floors above the target keep more, never fewer
            keep = torch.zeros(len(order), dtype=torch.bool, device=order.device)
            keep[order[:kept_variables]] = True
            before = self.density
            offset = 0
            for mask in masks:
                values = mask.mask.view(-1)
                on = keep[offset : offset + values.numel()]
                offset += values.numel()
                values.copy_(torch.where(on, values.clamp_min(_REVIVED_MASK_VALUE), values.clamp_max(0.0)))
        after = self.density
        rank_zero_info(
            f"SparseConnectivityLearning: kept exactly the target density at the freeze: {100 * before:.3f}% -> "
            f"{100 * after:.3f}% of the connections."
        )
        if abs(math.log(max(before, 1e-12) / max(after, 1e-12))) > math.log(1.25):
            rank_zero_warn(
                f"SparseConnectivityLearning: the density was {100 * before:.2f}% when the masks froze, far from "
                f"target_density={self.target_density:g}; the exact-density step moved it to {100 * after:.2f}% by "
                "mask value in one go, which the masks did not learn. Give the controller more steps before "
                "freeze_masks_at (or raise mask_lr / controller_gain), or set exact_density=False."
            )

    def _snapshot_pruned_weights(self, trainer: L.Trainer, active: dict[str, ConnectivityMask]) -> None:
        layout = _param_group_layout(trainer)  # recount when groups are added or decay switched on
        if self._decayed_originals is None or layout != self._decay_layout:
            self._decay_layout = layout
            decayed = {
                id(p)
                for opt in trainer.optimizers
                for g in opt.param_groups
                if g.get("weight_decay", 0)
                for p in g["params"]
            }
            self._decayed_originals = [name for name, original in self._originals.items() if id(original) in decayed]
        names = self._decayed_originals
        previous = self._weight_snapshot or []
        if active is not self._masks:
            # another optimizer's weights were saved before it stepped this batch: keep those, add this one's
            taken = {id(original) for original, _, _ in previous}
            names = [n for n in names if n in active and id(self._originals[n]) not in taken]
        else:
            previous = []
        originals = [self._originals[name].detach() for name in names]
        # batched: one multi-tensor kernel copies them all (``* 1.0`` is exact, signed zeros included)
        copies = torch._foreach_mul(originals, 1.0) if self._batched_step else [o.clone() for o in originals]
        snapshot = previous + [(self._originals[name], copy, self._masks[name]) for name, copy in zip(names, copies)]
        self._weight_snapshot = snapshot or None

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self._weight_snapshot is None:
            return
        with torch.no_grad():
            # lerp with a 0/1 weight is exact (``before`` at 0, ``original`` at 1) and, unlike where() on a bool
            # gate, a fast vectorized pass on CPU; the mask keeps this gate for the next forward pass
            if self._batched_step:
                originals, befores, masks = zip(*self._weight_snapshot)
                gates = [mask.gate_values(original.dtype) for original, mask in zip(originals, masks)]
                torch._foreach_lerp_(befores, originals, gates)
                torch._foreach_copy_(originals, befores)
            else:
                for original, before, mask in self._weight_snapshot:
                    torch.lerp(before, original, mask.gate_values(original.dtype), out=original)
        self._weight_snapshot = None

    # ------------------------------------------------------------------ logging

    def _log_step(
        self,
        pl_module: L.LightningModule,
        step: int,
        density: float,
        kept: float,
        reg_value: float,
        kept_by_layer: dict[str, torch.Tensor],
    ) -> None:
        metrics = {
            "scl/density": density,
            "scl/connections": kept,
            "scl/lambda": float(self.lam),
            "scl/reg_loss": reg_value,
        }
        if self._reporter is not None and self.report:
            metrics.update(self._reporter.step_metrics(step, kept_by_layer))
        if self.log_per_layer:
            for name, k in kept_by_layer.items():
                metrics[f"scl/density/{name}"] = float(k) / self._masks[name].numel_connections
        pl_module.log_dict(metrics, on_step=True, on_epoch=False, batch_size=1)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self._masks:
            return
        self._sync_averaged_masks(trainer)  # SWA copies its average into the model at its last epoch
        self._warn_collapsed({name: mask.kept_tensor() for name, mask in self._masks.items()})
        kept, total = self._kept_and_total()
        pl_module.log_dict(
            {"scl/density_epoch": kept / max(total, 1), "scl/connections_epoch": float(kept)},
            on_step=False,
            on_epoch=True,
            batch_size=1,
        )
