"""Learnable connectivity masks: the pure-torch core of Sparse Connectivity Learning (no Lightning import).

Each selected weight becomes ``W_eff = W * H(m)`` where ``H(m) = 1[m > 0]`` is the unit step of a trainable mask
variable ``m``. The step has no useful derivative, so the backward pass uses a straight-through estimator (STE)
whose proxy derivative ``dH/dm`` is positive everywhere (a negative or zero proxy would push masks the wrong way
or freeze them):

========== ======================================
``ste``    proxy derivative ``dH/dm``
========== ======================================
identity   ``1``
leaky_relu ``1`` if ``m > 0`` else ``slope``
softplus   ``sigmoid(m)``
========== ======================================

so the task gradient of a mask is ``dL/dm = dL/dW_eff * W * dH/dm``. The mask is registered with
:mod:`torch.nn.utils.parametrize`, so ``module.weight`` keeps working everywhere (functional calls, ``torch.compile``,
DDP) and the masks live in the module's ``state_dict`` next to the weights.

Example:
    >>> import torch
    >>> from torch import nn
    >>> net = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    >>> masks = inject_masks(net, init=1.0)
    >>> sorted(masks)
    ['0', '2']
    >>> with torch.no_grad():
    ...     masks["0"].mask[0, :2] = -1.0  # switch off two connections of the first unit
    >>> count_connections(net)
    (16, 18)
    >>> plain = fold_state_dict(net.state_dict())
    >>> sorted(plain)
    ['0.bias', '0.weight', '2.bias', '2.weight']
"""

from __future__ import annotations

import contextlib
import math
import re
import weakref
from collections.abc import Iterator, Mapping

import torch
from torch import nn
from torch.nn.utils import parametrize

__all__ = [
    "GRANULARITIES",
    "NORMALIZATIONS",
    "STES",
    "ConnectivityMask",
    "count_connections",
    "eager_forward",
    "fold_state_dict",
    "gate_values",
    "has_masks",
    "inject_masks",
    "iter_masks",
    "mask_gradient_statistic",
    "masked_weight",
    "normalize_mask_gradient_",
    "ste_derivative",
    "strip_masks",
]

STES = ("identity", "leaky_relu", "softplus")
NORMALIZATIONS = ("mean_abs", "l2", "max_abs", "none")
GRANULARITIES = ("weight", "channel")

# Layer kinds whose output units/channels lie along dim 1 of the weight rather than dim 0.
_TRANSPOSED = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)


def gate_values(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``H(mask)`` as 0/1 values of ``dtype``, in the mask's shape, written by the comparison itself.

    Multiplying by this gate is a plain vectorized product; ``where`` on a bool gate, which gives the same values,
    measured about 5-30x slower on CPU for the benchmark networks' layers (``benchmarks/mask_ops.py``).

    Example:
        >>> gate_values(torch.tensor([-1.0, 0.0, 2.0, float("nan")]), torch.float32)
        tensor([0., 0., 1., 0.])
    """
    return torch.gt(mask, 0, out=torch.empty(mask.shape, dtype=dtype, device=mask.device))


def _count_positive(values: torch.Tensor) -> torch.Tensor:
    """How many entries of ``values`` are > 0, as a 0-dim int64 tensor (no host synchronization).

    Summed as a 0/1 float gate (see :func:`gate_values`): on CPU that measured several times faster than counting a
    bool tensor (``benchmarks/mask_ops.py``). The sum is exact: every partial sum is an integer below 2**24 in
    float32, or the sum runs in float64 for larger tensors.

    Example:
        >>> _count_positive(torch.tensor([-1.0, 0.0, 2.0, 3.0]))
        tensor(2)
    """
    return _sum_gate(gate_values(values, torch.float32))  # 0/1 is exact in float32; _sum_gate picks the sum's dtype


def _sum_gate(gate: torch.Tensor) -> torch.Tensor:
    """The number of ones in a 0/1 gate of any float dtype, as a 0-dim int64 tensor; exact at every size."""
    # float32 holds every integer below 2**24 exactly; past that, accumulate in float64
    return gate.sum(dtype=torch.float32 if gate.numel() < 2**24 else torch.float64).to(torch.int64)


def ste_derivative(mask: torch.Tensor, ste: str, slope: float = 0.1) -> torch.Tensor | float:
    """Proxy derivative ``dH/dm`` of the unit step used by the straight-through estimator.

    Returns a Python float where the proxy is constant (identity), so callers can skip a multiplication.

    Example:
        >>> ste_derivative(torch.tensor([-2.0, 0.5]), "leaky_relu", slope=0.1)
        tensor([0.1000, 1.0000])
        >>> ste_derivative(torch.tensor([0.0]), "identity")
        1.0
    """
    if ste == "identity":
        return 1.0
    if ste == "leaky_relu":
        # lerp from slope to 1 by the 0/1 gate: exact at both ends, one pass, no bool where() (see gate_values)
        return torch.lerp(mask.new_tensor(slope), mask.new_tensor(1.0), gate_values(mask, mask.dtype))
    if ste == "softplus":
        return torch.sigmoid(mask)
    raise ValueError(f"ste must be one of {STES}, got {ste!r}")


class _MaskedWeight(torch.autograd.Function):
    """``W * H(m)`` with both gradients in one node: ``dW = g * H(m)``, ``dm = reduce(g * W) * dH/dm``.

    One fused node instead of ``W * step_ste(m)`` saves an extra autograd node and a temporary per layer, and lets
    channel masks reduce their gradient over the kernel without materializing a broadcast mask gradient first.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx, weight: torch.Tensor, mask: torch.Tensor, gate: torch.Tensor, ste: str, slope: float
    ) -> torch.Tensor:
        # ``gate`` is ``H(mask)`` as 0/1 values in the weight's dtype (see gate_values): a product with it is several
        # times faster on CPU than ``where`` on a bool gate, for 3 more bytes per weight saved for backward.
        # ``0 + W * gate`` (one fused pass) makes a switched-off negative weight +0.0 as ``where`` does, not -0.0. It
        # differs from ``where`` only where a switched-off weight is inf/NaN (NaN instead of 0), which training does
        # not produce without a non-finite loss first; exports fold with ``where`` and stay exact regardless.
        ctx.save_for_backward(weight, mask, gate)
        ctx.ste = ste
        ctx.slope = slope
        return torch.addcmul(weight.new_zeros(()), weight, gate)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):  # type: ignore[override]
        weight, mask, gate = ctx.saved_tensors
        grad_weight = grad_out * gate if ctx.needs_input_grad[0] else None
        grad_mask = None
        if ctx.needs_input_grad[1]:
            grad_mask = grad_out * weight
            if grad_mask.shape != mask.shape:  # channel granularity: one mask per output unit
                dims = [d for d in range(grad_mask.dim()) if mask.shape[d] == 1]
                grad_mask = grad_mask.sum(dim=dims, keepdim=True)
            proxy = ste_derivative(mask, ctx.ste, ctx.slope)
            if not isinstance(proxy, float):
                grad_mask = grad_mask * proxy
            grad_mask = grad_mask.to(mask.dtype)
        return grad_weight, grad_mask, None, None, None


def masked_weight(weight: torch.Tensor, mask: torch.Tensor, ste: str = "identity", slope: float = 0.1) -> torch.Tensor:
    """Functional form of the mask: ``weight * H(mask)`` with the chosen straight-through estimator.

    ``mask`` has the weight's shape (one variable per connection) or a shape broadcastable to it with size-1 dims
    (one variable per output unit).

    Example:
        >>> w = torch.tensor([[1.0, -2.0]], requires_grad=True)
        >>> m = torch.tensor([[0.5, -0.5]], requires_grad=True)
        >>> out = masked_weight(w, m)
        >>> out
        tensor([[1., 0.]], grad_fn=<_MaskedWeightBackward>)
        >>> out.sum().backward()
        >>> m.grad, w.grad  # m.grad = dL/dW_eff * W; the switched-off weight gets no gradient
        (tensor([[ 1., -2.]]), tensor([[1., 0.]]))
    """
    return _MaskedWeight.apply(weight, mask, gate_values(mask.detach(), weight.dtype), ste, slope)


class ConnectivityMask(nn.Module):
    """Parametrization ``W -> W * H(m)`` holding the mask variable ``m`` (float32 whatever the weight's dtype).

    Args:
        weight_shape: shape of the weight it masks.
        granularity: ``"weight"`` (one variable per connection) or ``"channel"`` (one per output unit/channel;
            for a transposed convolution with ``groups > 1``, whose weight holds ``out_channels / groups`` output
            channels per group, one per such channel, shared by the groups: switching it off removes that channel
            of every group).
        feature_dim: the weight dimension that indexes output units (0 for Linear/Conv, 1 for ConvTranspose).
        init: initial mask value ``m0 > 0``: every connection starts switched on.
        ste: straight-through estimator, one of :data:`STES`.
        slope: proxy slope below the threshold for ``ste="leaky_relu"``.

    The 0/1 gate ``H(m)`` is computed once per state of the mask and reused (forward passes, counts, the callback's
    weight protection) until the mask changes; it takes one tensor of the weight's size and dtype. A change is seen
    through torch's version counter, which every in-place tensor operation and ``load_state_dict`` bump, and through
    the storage address, which ``.to()`` and ``.data = ...`` change, and only for the mask tensor it was made from
    (``torch.func.functional_call`` swaps in another). Writes that bypass both
    (``mask.data.copy_(...)``, a NumPy view) must be followed by :meth:`forget_gate`.

    Example:
        >>> p = ConnectivityMask((3, 4), init=0.5)
        >>> p(torch.ones(3, 4)).sum().item(), p.kept(), p.numel_connections
        (12.0, 12, 12)
    """

    def __init__(
        self,
        weight_shape: tuple[int, ...] | torch.Size,
        granularity: str = "weight",
        feature_dim: int = 0,
        init: float = 1.0,
        ste: str = "identity",
        slope: float = 0.1,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        if granularity not in GRANULARITIES:
            raise ValueError(f"granularity must be one of {GRANULARITIES}, got {granularity!r}")
        if ste not in STES:
            raise ValueError(f"ste must be one of {STES}, got {ste!r}")
        weight_shape = tuple(weight_shape)
        self.weight_shape = weight_shape
        self.granularity = granularity
        self.feature_dim = feature_dim
        self.ste = ste
        self.slope = float(slope)
        if granularity == "weight":
            mask_shape = weight_shape
        else:
            mask_shape = tuple(n if d == feature_dim else 1 for d, n in enumerate(weight_shape))
        self.mask = nn.Parameter(torch.full(mask_shape, float(init), dtype=torch.float32, device=device))
        self._gate_cache: tuple[weakref.ref, tuple[int, int, torch.device], torch.Tensor] | None = None

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        gate = self.gate_values(weight.dtype)
        if not self.mask.requires_grad:
            # A frozen mask: the same product and weight gradient through built-in autograd, without the Python
            # autograd node, whose overhead dominates a launch-bound GPU step (benchmarks/gpu_check.py)
            return torch.addcmul(weight.new_zeros(()), weight, gate)
        return _MaskedWeight.apply(weight, self.mask, gate, self.ste, self.slope)

    def _mask_state(self) -> tuple[int, int, torch.device] | None:
        try:
            return (self.mask._version, self.mask.data_ptr(), self.mask.device)
        except RuntimeError:  # a tensor without storage of its own (functorch or distributed wrappers): no caching
            return None

    def _cached_gate(self) -> torch.Tensor | None:
        cached = self._gate_cache
        if cached is None:
            return None
        owner, state, gate = cached
        # The tensor itself must be the one the gate was made from: a tensor swapped in for one pass
        # (torch.func.functional_call) and freed could leave a new one at its address with the same version.
        return gate if owner() is self.mask and state == self._mask_state() else None

    def gate_values(self, dtype: torch.dtype) -> torch.Tensor:
        """``H(m)`` as 0/1 values of ``dtype`` (see :func:`gate_values`), computed once per state of the mask.

        Example:
            >>> p = ConnectivityMask((2,), init=1.0)
            >>> with torch.no_grad():
            ...     p.mask[0] = -1.0  # an in-place write: the next call recomputes the gate
            >>> p.gate_values(torch.float32)
            tensor([0., 1.])
            >>> p.gate_values(torch.float32) is p.gate_values(torch.float32)
            True
        """
        if torch.compiler.is_compiling():  # a traced graph computes its own gate
            return gate_values(self.mask.detach(), dtype)
        gate = self._cached_gate()
        if gate is None or gate.dtype != dtype:
            # a new tensor every time, never an in-place refresh: autograd may hold the previous one for a backward
            gate = gate_values(self.mask.detach(), dtype)
            # A gate made under inference_mode (Lightning's validate/test loops) is an inference tensor, which a
            # later forward with autograd on may not save for backward: serve it, but do not keep it.
            state = None if gate.is_inference() else self._mask_state()
            self._gate_cache = None if state is None else (weakref.ref(self.mask), state, gate)
        return gate

    def forget_gate(self) -> None:
        """Drop the cached gate; only needed after writing the mask in a way torch cannot see (see the class doc).

        Example:
            >>> p = ConnectivityMask((2,), init=1.0)
            >>> p.gate_values(torch.float32)
            tensor([1., 1.])
            >>> p.mask.data.numpy()[0] = -1.0  # invisible to torch's version counter
            >>> p.forget_gate()
            >>> p.gate_values(torch.float32)
            tensor([0., 1.])
        """
        self._gate_cache = None

    def __getstate__(self) -> dict:
        # a copy or pickle of the module recomputes its gate rather than carrying a weight-sized cache along
        return {**self.__dict__, "_gate_cache": None}

    def __setstate__(self, state: dict) -> None:
        super().__setstate__({"_gate_cache": None, **state})  # modules pickled before the cache existed

    @property
    def numel_connections(self) -> int:
        """Number of connections (weight entries) this mask governs."""
        return int(torch.Size(self.weight_shape).numel())

    @property
    def connections_per_variable(self) -> int:
        """How many connections one mask variable switches (1, or the fan-in of a unit for channel masks)."""
        return self.numel_connections // self.mask.numel()

    def gate(self) -> torch.Tensor:
        """Boolean ``H(m)`` in the mask's own shape."""
        return self.mask.detach() > 0

    def kept_tensor(self) -> torch.Tensor:
        """Number of kept connections as a 0-dim int64 tensor (no host synchronization)."""
        gate = self._cached_gate()
        count = _count_positive(self.mask.detach()) if gate is None else _sum_gate(gate)
        return count * self.connections_per_variable

    def kept(self) -> int:
        """Number of connections currently switched on."""
        return int(self.kept_tensor().item())

    def extra_repr(self) -> str:
        return f"shape={tuple(self.mask.shape)}, granularity={self.granularity}, ste={self.ste}"


def _feature_dim(module: nn.Module) -> int:
    return 1 if isinstance(module, _TRANSPOSED) else 0


def _connectivity_mask_of(module: nn.Module, tensor_name: str = "weight") -> ConnectivityMask | None:
    if not parametrize.is_parametrized(module, tensor_name):
        return None
    for p in module.parametrizations[tensor_name]:
        if isinstance(p, ConnectivityMask):
            return p
    return None


def iter_masks(module: nn.Module, unique: bool = True) -> Iterator[tuple[str, nn.Module, ConnectivityMask]]:
    """Yield ``(qualified_name, layer, mask)`` for every masked layer under ``module``.

    With ``unique`` (default) a mask shared by tied weights is yielded once, under its first name.

    Example:
        >>> net = nn.Sequential(nn.Linear(2, 2))
        >>> _ = inject_masks(net)
        >>> [(name, isinstance(layer, nn.Linear)) for name, layer, _ in iter_masks(net)]
        [('0', True)]
    """
    seen: set[int] = set()
    for name, sub in module.named_modules():
        mask = _connectivity_mask_of(sub)
        if mask is not None and not (unique and id(mask) in seen):
            seen.add(id(mask))
            yield name, sub, mask


@contextlib.contextmanager
def modes_restored(module: nn.Module) -> Iterator[nn.Module]:
    """Restore every submodule's own ``training`` flag after the block (``module.train(flag)`` would set them all
    alike, waking a batch norm the user had frozen in eval mode).

    Example:
        >>> net = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))
        >>> _ = net[1].eval()
        >>> with modes_restored(net):
        ...     _ = net.train()
        >>> net.training, net[1].training
        (True, False)
    """
    modes = [(m, m.training) for m in module.modules()]
    try:
        yield module
    finally:
        for m, training in modes:
            m.training = training


@contextlib.contextmanager
def _inference(model: nn.Module) -> Iterator[nn.Module]:
    """Eval mode (no batch-norm statistics update, no dropout), no autograd, and the eager ``forward`` of a model
    Lightning compiled (fvcore cannot trace a compiled one); every module's mode restored. Yields the eager module."""
    with modes_restored(model), torch.no_grad(), eager_forward(model) as module:
        model.eval()
        yield module


def has_parametrizations(module: nn.Module) -> bool:
    """Whether any submodule carries a parametrization: a connectivity mask, ``spectral_norm``, ``weight_norm``...

    Example:
        >>> net = nn.Sequential(nn.Linear(2, 2))
        >>> has_parametrizations(net), has_parametrizations(nn.utils.parametrizations.weight_norm(net[0]))
        (False, True)
    """
    return any(parametrize.is_parametrized(m) for m in module.modules())


@contextlib.contextmanager
def eager_forward(module: nn.Module) -> Iterator[nn.Module]:
    """The module behind ``torch.compile``, running its eager ``forward`` inside the block.

    ``torch.compile(model)`` returns a wrapper whose ``state_dict`` keys gain an ``_orig_mod.`` prefix; once
    Lightning has trained it, the module's own ``forward`` is the compiled one too. Inspecting or exporting through
    either would trace a compiled function (which fvcore and ``torch.jit`` refuse) or compile again for every new
    input shape. This yields the wrapped module with its original ``forward`` restored for the block.

    Example:
        >>> net = nn.Linear(2, 2)
        >>> with eager_forward(torch.compile(net)) as inner:
        ...     inner is net
        True
    """
    module = module._orig_mod if isinstance(module, torch._dynamo.eval_frame.OptimizedModule) else module
    original = (getattr(module, "_compiler_ctx", None) or {}).get("original_forward")  # set by Lightning's fit
    compiled = module.__dict__.get("forward") if original is not None else None
    if compiled is None:
        yield module
        return
    del module.forward
    if getattr(original, "__func__", None) is not getattr(type(module), "forward", None):
        module.forward = original  # a forward the user had set on the instance before compiling
    try:
        yield module
    finally:
        module.forward = compiled


def has_masks(module: nn.Module) -> bool:
    """True when any layer under ``module`` carries a connectivity mask.

    Example:
        >>> has_masks(nn.Linear(2, 2))
        False
    """
    return next(iter_masks(module), None) is not None


def _refuse_channel_masks_across_kinds(
    module: nn.Module, layers: list[tuple[str, nn.Module]], granularity: str
) -> None:
    """A weight tied between layers whose output units lie along different dims (a convolution and a transposed
    convolution of it) cannot have one channel mask serve both: refuse before anything is registered. A weight mask
    has the weight's own shape, which suits both."""
    if granularity != "channel":
        return
    seen: dict[int, tuple[str, int]] = {}
    for name, layer, mask in iter_masks(module, unique=False):
        seen.setdefault(id(layer.parametrizations.weight.original), (name, mask.feature_dim))
    for name, layer in layers:
        weight = getattr(layer, "weight", None)
        if _connectivity_mask_of(layer) is not None or not isinstance(weight, nn.Parameter):
            continue
        other = seen.setdefault(id(weight), (name, _feature_dim(layer)))
        if other[1] != _feature_dim(layer):
            raise ValueError(
                f"Layers {other[0]!r} and {name!r} share (tie) one weight, but their output channels lie along "
                "different dims of it (a convolution and a transposed convolution): one channel mask cannot serve "
                f"both. Use granularity='weight', or exclude both layers (exclude=[{other[0]!r}, {name!r}])."
            )


def _refuse_partly_tied(module: nn.Module, layers: list[tuple[str, nn.Module]]) -> None:
    """A weight tied to a module outside ``layers`` would be masked in one place and used whole in the other, and
    an export could keep only one of the two (the last key loaded wins): refuse before anything is registered."""
    selected = {id(layer) for _, layer in layers}
    wanted = {
        id(layer.weight): name
        for name, layer in layers
        if _connectivity_mask_of(layer) is None and isinstance(getattr(layer, "weight", None), nn.Parameter)
    }
    if not wanted:
        return
    for holder_name, holder in module.named_modules():
        if isinstance(holder, parametrize.ParametrizationList):
            continue  # a masked layer's own 'original'
        for attr, param in holder._parameters.items():
            if param is None or id(param) not in wanted or (id(holder) in selected and attr == "weight"):
                continue
            layer_name = wanted[id(param)]
            other = f"{holder_name}.{attr}" if holder_name else attr
            raise ValueError(
                f"Layer {layer_name!r} shares (ties) its weight with {other!r}, which is not being masked: "
                f"{other!r} would keep using the whole weight while {layer_name!r} uses the masked one, and exports "
                f"could not hold both. Exclude {layer_name!r} from masking (e.g. "
                f"SparseConnectivityLearning(exclude=[{layer_name!r}])), mask both layers, or untie the weights."
            )


def inject_masks(
    module: nn.Module,
    layers: list[tuple[str, nn.Module]] | None = None,
    granularity: str = "weight",
    init: float = 1.0,
    ste: str = "identity",
    slope: float = 0.1,
) -> dict[str, ConnectivityMask]:
    """Register a :class:`ConnectivityMask` on the ``weight`` of each layer; idempotent.

    Args:
        module: the root module (its names are used as keys).
        layers: ``(qualified_name, layer)`` pairs to mask; default: every ``Linear`` and ``Conv*`` layer (see
            :func:`lightning_scl.targets.select_layers` for type and name filters).
        granularity: ``"weight"`` or ``"channel"`` (see :class:`ConnectivityMask`).
        init: initial mask value ``m0 > 0``.
        ste: straight-through estimator, one of :data:`STES`.
        slope: proxy slope below the threshold for ``ste="leaky_relu"``.

    Returns:
        All masks under ``module`` by layer name, those that existed before included. Layers that share one weight
        tensor (tied weights) share one mask.

    Example:
        >>> net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.Flatten(), nn.LazyLinear(2))
        >>> sorted(inject_masks(net, layers=[("0", net[0])]))
        ['0']
    """
    if layers is None:
        from lightning_scl.targets import select_layers

        layers = select_layers(module)
    _refuse_partly_tied(module, layers)
    _refuse_channel_masks_across_kinds(module, layers, granularity)
    by_weight: dict[int, ConnectivityMask] = {}
    for _, layer, mask in iter_masks(module):
        by_weight[id(layer.parametrizations.weight.original)] = mask
    for name, layer in layers:
        if _connectivity_mask_of(layer) is not None:
            continue  # already masked: setup runs again for validate/test/predict
        weight = layer.weight
        if isinstance(weight, nn.parameter.UninitializedParameter):
            raise ValueError(
                f"Layer {name!r} has an uninitialized (lazy) weight. Run one forward pass before masks are injected "
                "(SparseConnectivityLearning runs the LightningModule's example_input_array when it is set), or "
                "exclude the layer."
            )
        if parametrize.is_parametrized(layer, "weight"):
            raise ValueError(
                f"Layer {name!r} already has another parametrization on 'weight' "
                f"({[type(p).__name__ for p in layer.parametrizations.weight]}); exclude it from masking."
            )
        shared = by_weight.get(id(weight))
        if shared is not None:
            mask_module = shared  # tied weights share one mask (of the same kind: checked above)
        else:
            mask_module = ConnectivityMask(
                weight.shape,
                granularity=granularity,
                feature_dim=_feature_dim(layer),
                init=init,
                ste=ste,
                slope=slope,
                device=weight.device,
            )
            by_weight[id(weight)] = mask_module
        parametrize.register_parametrization(layer, "weight", mask_module)
    return {name: mask for name, _, mask in iter_masks(module, unique=False)}


def strip_masks(module: nn.Module) -> nn.Module:
    """Fold ``W * H(m)`` into plain weights and remove the masks, in place; returns ``module``.

    Example:
        >>> net = nn.Sequential(nn.Linear(2, 2))
        >>> _ = inject_masks(net)
        >>> has_masks(strip_masks(net)), sorted(net.state_dict())
        (False, ['0.bias', '0.weight'])
    """
    for name, layer in list(module.named_modules()):
        if _connectivity_mask_of(layer) is None:
            continue
        if len(layer.parametrizations.weight) != 1:
            raise ValueError(f"Layer {name!r} stacks other parametrizations on its weight; remove them first.")
        # A deepcopy shares torch's generated Parametrized* class with the original, and removal deletes the weight
        # property from that class: give this layer a private copy of the class so the original stays intact.
        cls = type(layer)
        layer.__class__ = type(cls.__name__, cls.__bases__, dict(cls.__dict__))
        with torch.no_grad():
            parametrize.remove_parametrizations(layer, "weight", leave_parametrized=True)
    return module


_ORIGINAL_KEY = re.compile(r"^(?P<prefix>(?:.*\.)?)parametrizations\.(?P<tensor>[^.]+)\.original$")


def fold_state_dict(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Turn a masked model's ``state_dict`` into the plain one of the original model.

    ``<layer>.parametrizations.weight.original`` and ``<layer>.parametrizations.weight.0.mask`` become
    ``<layer>.weight = original * (mask > 0)``; every other entry is kept as it is. Works on a checkpoint's
    ``state_dict`` without building the model.

    Example:
        >>> sd = {"fc.parametrizations.weight.original": torch.tensor([[1.0, 2.0]]),
        ...       "fc.parametrizations.weight.0.mask": torch.tensor([[1.0, -1.0]]), "fc.bias": torch.zeros(1)}
        >>> fold_state_dict(sd)
        {'fc.weight': tensor([[1., 0.]]), 'fc.bias': tensor([0.])}
    """
    folded: dict[str, tuple[str, torch.Tensor]] = {}  # layer prefix -> (plain key, folded tensor)
    mask_keys: set[str] = set()
    folded_keys: set[str] = set()
    for key, value in state_dict.items():
        match = _ORIGINAL_KEY.match(key)
        if match is None:
            continue
        prefix, tensor = match["prefix"], match["tensor"]
        mask_key = f"{prefix}parametrizations.{tensor}.0.mask"
        if mask_key not in state_dict:
            continue  # another parametrization (spectral_norm, orthogonal...): the original class has it too
        mask_keys.add(mask_key)
        folded_keys.add(key)
        folded[prefix] = (f"{prefix}{tensor}", torch.where(state_dict[mask_key] > 0, value, 0.0))
    # A plain module lists its weight before its bias: emit each folded weight where its layer's keys start.
    out: dict[str, torch.Tensor] = {}
    pending = dict(folded)
    for key, value in state_dict.items():
        for prefix in [p for p in pending if key.startswith(p)]:
            plain_key, tensor = pending.pop(prefix)
            out[plain_key] = tensor
        if key not in mask_keys and key not in folded_keys:
            out[key] = value
    return out


def count_connections(module: nn.Module) -> tuple[int, int]:
    """``(kept, total)`` connections over all masked layers of ``module``.

    Example:
        >>> net = nn.Linear(3, 2)
        >>> _ = inject_masks(net, layers=[("", net)])
        >>> count_connections(net)
        (6, 6)
    """
    kept, total = 0, 0
    for _, _, mask in iter_masks(module):
        kept += mask.kept()
        total += mask.numel_connections
    return kept, total


def _feature_rows(grad: torch.Tensor, feature_dim: int) -> torch.Tensor:
    return grad.movedim(feature_dim, 0).reshape(grad.shape[feature_dim], -1)


def mask_gradient_statistic(
    grad: torch.Tensor, feature_dim: int, statistic: str = "mean_abs", per_feature: bool = True
) -> torch.Tensor:
    """Each output unit's statistic of its mask gradient (one value per unit, or one for the tensor).

    A non-finite gradient gives a non-finite statistic, so the statistics double as the NaN/inf check. The mean and
    max of ``|grad|`` take ``abs`` then a plain reduction: on CPU that measured several times faster than the one-read
    L1 and max vector norms (``benchmarks/mask_ops.py``); the L2 vector norm is fast as it is.

    Example:
        >>> mask_gradient_statistic(torch.tensor([[1.0, -3.0], [0.5, 0.5]]), feature_dim=0)
        tensor([2.0000, 0.5000])
    """
    rows = _feature_rows(grad, feature_dim) if per_feature else grad.reshape(1, -1)
    n = rows.shape[1]
    if statistic == "mean_abs":
        return rows.abs().sum(dim=1) / n
    if statistic == "l2":
        return torch.linalg.vector_norm(rows, ord=2, dim=1) / math.sqrt(n)
    if statistic == "max_abs":
        return rows.abs().amax(dim=1)
    raise ValueError(f"normalize must be one of {NORMALIZATIONS}, got {statistic!r}")


def _scale_rows_and_add_(
    grad: torch.Tensor, row_scale: torch.Tensor, feature_dim: int, add: float = 0.0, per_feature: bool = True
) -> torch.Tensor:
    """``grad = grad * row_scale + add`` in place (``row_scale`` per output unit, or one value).

    Two in-place passes: on CPU they measured faster than one ``addcmul`` with a broadcast scale
    (``benchmarks/mask_ops.py``).
    """
    if per_feature:
        shape = [1] * grad.dim()
        shape[feature_dim] = -1
        row_scale = row_scale.view(shape)
    else:
        row_scale = row_scale.reshape(())
    grad.mul_(row_scale)
    return grad.add_(add) if add else grad


def normalize_mask_gradient_(
    grad: torch.Tensor, feature_dim: int, statistic: str = "mean_abs", per_feature: bool = True
) -> torch.Tensor:
    """Divide each output unit's mask gradient by its statistic, in place, so that statistic becomes 1.

    Args:
        grad: the mask's task gradient.
        feature_dim: the dimension indexing output units.
        statistic: ``"mean_abs"``, ``"l2"`` (root mean square), ``"max_abs"`` or ``"none"``.
        per_feature: False normalizes the whole tensor by one statistic (channel masks hold one value per unit,
            so there the "feature" is the layer).

    Rows whose gradient is all zero stay zero.

    Example:
        >>> g = torch.tensor([[1.0, -3.0], [0.5, 0.5]])
        >>> normalize_mask_gradient_(g, feature_dim=0)
        tensor([[ 0.5000, -1.5000],
                [ 1.0000,  1.0000]])
    """
    if statistic == "none":
        return grad
    stat = mask_gradient_statistic(grad, feature_dim, statistic, per_feature)
    return _scale_rows_and_add_(grad, _inverse_statistic(stat), feature_dim, per_feature=per_feature)


def _inverse_statistic(stat: torch.Tensor) -> torch.Tensor:
    """``1 / stat`` with all-zero rows mapped to a finite scale (their gradient stays zero)."""
    return stat.clamp_min(torch.finfo(stat.dtype).tiny).reciprocal()
