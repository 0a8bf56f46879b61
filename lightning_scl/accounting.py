"""Parameters, kept connections, density and FLOPs of a (masked) model; the sparsity report and its plots.

Pure torch + fvcore (no Lightning import).

**FLOPs convention.** Every FLOPs number here is a count of *multiply-accumulates per sample*, as
:class:`fvcore.nn.FlopCountAnalysis` counts them (one multiply-add = one "flop"; biases, activations and max
pooling are free; inference batch norm costs one or two per element). Tools that count a multiply and an add
separately (such as ``torch.utils.flop_counter``, used by Lightning's model summary) report twice these numbers for
conv/linear layers.

* **Dense FLOPs** come from one fvcore trace of the model on one sample of an example input, computed once and
  cached. A layer's count is what runs inside it (its weighted children excluded); operations outside every
  weighted layer (e.g. a functional ``matmul`` or an adaptive pooling module) count in the total only.
* **Effective FLOPs** of a layer with a weight mask are its dense FLOPs times its density: every weight of a
  ``Linear``/``Conv`` layer is used equally often. With channel masks the count is exact instead: an output channel
  whose mask is off costs nothing, and neither does the input work of every layer that consumes it (through batch
  norm, activations, pooling, flatten, residual additions, concatenation...). A removed channel still outputs its
  bias; that constant can be folded into the consumer's bias (exactly for linear layers and unpadded convolutions),
  which is what a physical shrink does. The producer -> consumer links come from one probing forward pass that
  follows which layer's output channels reach which layer's input channels; where an operation mixes channels in
  a way the probe does not model, the consumer keeps those inputs (a conservative fallback: the layer's count is
  then its dense FLOPs times its own density). Layers without a mask count fully.
* **Parameters kept** are all parameters of the model minus the switched-off connections; the mask variables
  themselves are not model parameters.

Example:
    >>> import torch
    >>> from torch import nn
    >>> from lightning_scl.masking import inject_masks
    >>> net = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    >>> masks = inject_masks(net, granularity="channel")
    >>> with torch.no_grad():
    ...     masks["0"].mask[0] = -1.0  # remove the first hidden unit
    >>> stats = SparsityAccountant(net, example_input=torch.randn(8, 4)).snapshot()
    >>> stats.dense_flops, stats.effective_flops  # 4*3 + 3*2 MACs; now 4*2 + 2*2
    (18, 12)
    >>> stats.params_total, stats.params_kept, stats.connections_kept
    (23, 19, 14)
"""

from __future__ import annotations

import csv
import json
import logging
import math
import re
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten, tree_map

from lightning_scl.export import _load_checkpoint_file, _rebuild_from_checkpoint
from lightning_scl.masking import ConnectivityMask, _inference, iter_masks

__all__ = [
    "FLOPS_UNIT",
    "LayerRow",
    "SparsityAccountant",
    "SparsityReport",
    "SparsityStats",
    "dense_macs_by_layer",
    "plot_history",
    "plot_layer_density",
    "sparsity_report",
]

#: What every FLOPs number of this module counts.
FLOPS_UNIT = "multiply-accumulates per sample (fvcore convention)"

_LINK_TYPES = (nn.Linear, nn.modules.conv._ConvNd)
_TRANSPOSED = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
_BN_BUFFERS = ("running_mean", "running_var", "num_batches_tracked")
_MASK_SUFFIX = ".parametrizations.weight.0.mask"
_ORIGINAL_SUFFIX = ".parametrizations.weight.original"


# ---------------------------------------------------------------------------------------------------- inputs


def _one_sample(example: Any) -> Any:
    """Slice every tensor of an example batch to its first sample (detached)."""
    return tree_map(lambda t: t.detach()[:1] if isinstance(t, torch.Tensor) and t.dim() > 0 else t, example)


def _call_args(example: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """Positional and keyword arguments the way Lightning feeds ``example_input_array`` to ``forward``."""
    if isinstance(example, (tuple, list)):
        return tuple(example), {}
    if isinstance(example, Mapping):
        return (), dict(example)
    return (example,), {}


def _device_of(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    for b in model.buffers():
        return b.device
    return torch.device("cpu")


def _to(example: Any, device: torch.device) -> Any:
    return tree_map(lambda t: t.to(device) if isinstance(t, torch.Tensor) else t, example)


# ---------------------------------------------------------------------------------------------------- layers


def _is_weighted(module: nn.Module) -> bool:
    if parametrize.is_parametrized(module, "weight"):
        return True
    return isinstance(getattr(module, "weight", None), torch.Tensor)


def _weighted_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(name, layer)`` for every module with a ``weight`` tensor of its own (masked or not)."""
    return [(name, m) for name, m in model.named_modules() if _is_weighted(m)]


def _weight_of(module: nn.Module) -> torch.Tensor:
    if parametrize.is_parametrized(module, "weight"):
        return module.parametrizations.weight.original
    return module.weight


def _own_parameters(module: nn.Module, exclude: set[int]) -> list[torch.Tensor]:
    params = {id(p): p for p in module.parameters(recurse=False)}
    if parametrize.is_parametrized(module):
        for plist in module.parametrizations.values():
            for p in plist.parameters(recurse=False):
                params[id(p)] = p
    return [p for key, p in params.items() if key not in exclude]


def _kind(module: nn.Module) -> str:
    cls = type(module)
    if parametrize.is_parametrized(module):
        cls = cls.__bases__[0]  # parametrize swaps in a generated subclass "Parametrized<Name>"
    return cls.__name__


# ---------------------------------------------------------------------------------------------------- dense MACs


class _KeywordCall(nn.Module):
    """Adapter for models whose example input is a dict: jit tracing passes positional arguments only."""

    def __init__(self, inner: nn.Module, keys: Sequence[str]) -> None:
        super().__init__()
        self.inner = inner
        self.keys = list(keys)

    def forward(self, *values: Any) -> Any:
        return self.inner(**dict(zip(self.keys, values)))


def _own_counts(by_module: Mapping[str, int], names: Sequence[str]) -> dict[str, int]:
    """Each layer's count minus what its weighted descendants count themselves (fvcore's counts are inclusive)."""
    own: dict[str, int] = {}
    for name in names:
        prefix = f"{name}." if name else ""
        inner = [d for d in names if d != name and d.startswith(prefix)]
        direct = [d for d in inner if not any(e != d and d.startswith(f"{e}.") for e in inner)]
        own[name] = int(by_module.get(name, 0)) - sum(int(by_module.get(d, 0)) for d in direct)
    return own


def _count_dense(model: nn.Module, example_input: Any) -> tuple[dict[str, int], int]:
    """fvcore MACs per weighted layer and in total, for one sample of ``example_input``."""
    args, kwargs = _call_args(_to(_one_sample(example_input), _device_of(model)))
    target, prefix = model, ""
    if kwargs:
        target, prefix, args = _KeywordCall(model, list(kwargs)), "inner", tuple(kwargs.values())
    fvcore_logger = logging.getLogger("fvcore.nn.jit_analysis")
    level = fvcore_logger.level
    fvcore_logger.setLevel(logging.ERROR)
    fastpath = torch.backends.mha.get_fastpath_enabled()
    # under no_grad nn.MultiheadAttention takes a fused kernel fvcore counts as zero; the plain path has linears
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with _inference(model), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # tracer and deprecation warnings say nothing about the counts
            from fvcore.nn import FlopCountAnalysis  # imported here: fvcore takes seconds to import

            analysis = FlopCountAnalysis(target, args)
            analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False).tracer_warnings("none")
            analysis.set_op_handle("aten::scaled_dot_product_attention", _attention_macs)
            analysis.set_op_handle("aten::_convolution_mode", _convolution_mode_macs)  # padding="same"/"valid"
            total = int(analysis.total())
            by_module = dict(analysis.by_module())
            uncounted = {op: n for op, n in analysis.unsupported_ops().items() if _UNCOUNTED_COSTLY.search(op)}
    finally:
        fvcore_logger.setLevel(level)
        torch.backends.mha.set_fastpath_enabled(fastpath)
    if uncounted:
        warnings.warn(
            "FLOPs leave out operations fvcore cannot count: "
            + ", ".join(f"{op} (x{n})" for op, n in sorted(uncounted.items()))
            + ". Dense and effective FLOPs cover the other layers only.",
            stacklevel=2,
        )
    if prefix:
        by_module = {k[len(prefix) + 1 :] if k.startswith(f"{prefix}.") else "": v for k, v in by_module.items()}
        by_module = {k: v for k, v in by_module.items() if k} | {"": total}
    names = [name for name, _ in _weighted_layers(model)]
    return _own_counts(by_module, names), total


# matmul-heavy ops fvcore has no formula for: their MACs would be missing from the totals without a word
_UNCOUNTED_COSTLY = re.compile(r"lstm|gru|rnn|bilinear|attention|conv_tbc|baddbmm")


def _convolution_mode_macs(inputs: list[Any], outputs: list[Any]) -> int:
    """fvcore handle for ``aten::_convolution_mode``, the op of ``Conv*d(padding="same"/"valid")``, which fvcore
    does not count: the MACs of an ordinary convolution with the same input, weight and output shapes."""
    from fvcore.nn.jit_handles import conv_flop_count, get_shape

    return int(conv_flop_count(get_shape(inputs[0]), get_shape(inputs[1]), get_shape(outputs[0]), transposed=False))


def _attention_macs(inputs: list[Any], outputs: list[Any]) -> int:
    """fvcore handle for ``aten::scaled_dot_product_attention``: ``q @ k^T`` plus ``weights @ v``."""
    from fvcore.nn.jit_handles import get_shape

    q, k, v = (get_shape(x) for x in inputs[:3])
    batch = math.prod(q[:-2])
    return batch * q[-2] * k[-2] * (q[-1] + v[-1])


def dense_macs_by_layer(model: nn.Module, example_input: Any) -> dict[str, int]:
    """Multiply-accumulates per sample of every layer with a weight, counted by fvcore on ``example_input``.

    Keys are qualified names from ``model.named_modules()``; a layer's count excludes its weighted children. The
    batch is sliced to one sample; the model runs in eval mode without autograd (its modes are restored). Works on
    masked models. ``example_input`` is what ``forward`` takes, as Lightning's ``example_input_array``: a tensor,
    a tuple of positional arguments or a dict of keyword arguments.

    Example:
        >>> net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.Flatten(), nn.Linear(4 * 26 * 26, 10))
        >>> dense_macs_by_layer(net, torch.randn(32, 1, 28, 28))  # conv: 26*26 outputs x 4 channels x 9 taps
        {'0': 24336, '2': 27040}
    """
    return _count_dense(model, example_input)[0]


# ---------------------------------------------------------------------------------------------------- channel links


def _names(text: str) -> frozenset[str]:
    return frozenset(text.split())


_ALIVE = -1  # a source that is always live: the network input, an unmasked layer, an op the probe cannot follow
_NONE = -2  # padding: no source in this slot

# Ops whose output element i depends on input element i only (after broadcasting).
_ELEMENTWISE = _names(
    """relu relu_ relu6 elu elu_ selu celu leaky_relu leaky_relu_ gelu silu mish hardswish hardsigmoid hardtanh
    hardtanh_ softplus sigmoid sigmoid_ tanh tanh_ logsigmoid softsign tanhshrink threshold dropout dropout_
    dropout1d dropout2d dropout3d alpha_dropout feature_alpha_dropout clamp clamp_ clamp_min clamp_min_ clamp_max
    clip add add_ sub sub_ mul mul_ div div_ true_divide neg abs exp square pow sqrt rsqrt where maximum minimum
    __add__ __radd__ __iadd__ __sub__ __rsub__ __isub__ __mul__ __rmul__ __imul__ __truediv__ __rtruediv__
    __itruediv__ __neg__ __pow__"""
)
# Ops that only copy or change the dtype/device: the output has the first argument's sources, position by position.
_IDENTITY = _names("to float double half bfloat16 type type_as cpu cuda contiguous clone detach")
# Ops that move elements around without mixing them: replayed on the source map itself.
_STRUCTURAL = _names(
    """view view_as reshape reshape_as flatten unflatten permute transpose swapaxes swapdims t squeeze unsqueeze
    __getitem__ narrow select index_select cat concat concatenate stack chunk split tensor_split unbind movedim
    moveaxis expand expand_as flip roll repeat tile"""
)
# Ops that keep dims 0 and 1 (batch, channel) and mix positions within a channel only.
_CHANNELWISE = _names(
    """batch_norm instance_norm max_pool1d max_pool2d max_pool3d max_pool1d_with_indices max_pool2d_with_indices
    max_pool3d_with_indices avg_pool1d avg_pool2d avg_pool3d adaptive_avg_pool1d adaptive_avg_pool2d
    adaptive_avg_pool3d adaptive_max_pool1d adaptive_max_pool2d adaptive_max_pool3d adaptive_max_pool1d_with_indices
    adaptive_max_pool2d_with_indices adaptive_max_pool3d_with_indices lp_pool1d lp_pool2d lp_pool3d interpolate
    upsample upsample_nearest upsample_bilinear"""
)
_REDUCTIONS = _names("mean sum amax amin max min nanmean nansum std var logsumexp")


def _dedup_rows(table: torch.Tensor) -> torch.Tensor:
    """Per row, the distinct source ids (ALIVE absorbs the others), left-aligned, padded with NONE."""
    table, _ = table.sort(dim=1)
    repeated = torch.zeros_like(table, dtype=torch.bool)
    repeated[:, 1:] = table[:, 1:] == table[:, :-1]
    table = table.masked_fill(repeated, _NONE)
    alive = (table == _ALIVE).any(dim=1, keepdim=True)
    table = table.masked_fill(alive & (table >= 0), _NONE)  # a live source makes the others irrelevant
    table, _ = table.sort(dim=1, descending=True)
    width = max(1, int((table != _NONE).sum(dim=1).max()) if table.numel() else 1)
    return table[:, :width]


def _rows(slots: list[torch.Tensor], dim: int) -> torch.Tensor:
    """Source ids per index of dimension ``dim``: shape (size of dim, slots x other positions)."""
    size = slots[0].shape[dim]
    return torch.cat([s.movedim(dim, 0).reshape(size, -1) for s in slots], dim=1)


class _LinkProbe(TorchFunctionMode):
    """Follow which layer output channels reach which layer input channels during one forward pass.

    Every tensor that depends on the input gets a *source map*: a list of integer tensors of its shape ("slots")
    holding, per element, the global ids of the producer channels it depends on (``_ALIVE`` for sources that are
    always live, ``_NONE`` for empty slots). Tensors without a map are constants (parameters, buffers, literals).
    Linear/Conv layers reset the map of their output; every consumer records the map of its input.
    """

    def __init__(self) -> None:
        super().__init__()
        self._maps: dict[int, tuple[torch.Tensor, list[torch.Tensor]]] = {}

    def get(self, t: Any) -> list[torch.Tensor] | None:
        entry = self._maps.get(id(t)) if isinstance(t, torch.Tensor) else None
        return entry[1] if entry is not None and entry[0] is t else None

    def put(self, t: torch.Tensor, slots: list[torch.Tensor]) -> None:
        self._maps[id(t)] = (t, slots)

    def put_alive(self, t: torch.Tensor) -> None:
        self.put(t, [torch.full(tuple(t.shape), _ALIVE, dtype=torch.long, device=t.device)])

    def __torch_function__(self, func: Any, types: Any, args: Sequence[Any] = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        sources = [t for t in tree_flatten((args, kwargs))[0] if self.get(t) is not None]
        name = getattr(func, "__name__", "")
        if sources and name == "__setitem__" and isinstance(args[0], torch.Tensor):
            self.put_alive(args[0])
            return out
        outs = [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]
        if sources and outs:
            try:
                ok = self._propagate(name, args, kwargs, out, outs, sources)
            except Exception:  # any op the rules get wrong degrades to "always live", never to an error
                ok = False
            if not ok:
                for t in outs:
                    self.put_alive(t)
        return out

    def _propagate(
        self,
        name: str,
        args: Sequence[Any],
        kwargs: Mapping[str, Any],
        out: Any,
        outs: list[torch.Tensor],
        sources: list[torch.Tensor],
    ) -> bool:
        first = args[0] if args else None
        if name in _IDENTITY:
            slots = self.get(first)
            if slots is None:
                return True  # e.g. constant.type_as(data): still a constant
            if len(outs) != 1 or outs[0].shape != first.shape:
                return False
            self.put(outs[0], slots)
            return True
        if name in _ELEMENTWISE:
            if len(outs) != 1:
                return False
            self.put(outs[0], self._union(sources, tuple(outs[0].shape)))
            return True
        if name in _STRUCTURAL:
            return self._replay(name, args, kwargs, outs, sources)
        if name == "pad":
            pad = args[1] if len(args) > 1 else kwargs.get("pad")
            if isinstance(first, torch.Tensor) and first.dim() >= 2 and len(pad) // 2 <= first.dim() - 2:
                return self._channelwise(first, outs, sources)
            return False
        if name in _CHANNELWISE:
            return isinstance(first, torch.Tensor) and self._channelwise(first, outs, sources)
        if name in _REDUCTIONS and isinstance(first, torch.Tensor) and first.dim() >= 2:
            dims = kwargs.get("dim", args[1] if len(args) > 1 else None)
            if dims is None or isinstance(dims, torch.Tensor):
                return False
            dims = [dims] if isinstance(dims, int) else list(dims)
            if not dims or any(d % first.dim() < 2 for d in dims):
                return False
            return self._channelwise(first, outs, sources)
        return False

    def _union(self, sources: list[torch.Tensor], shape: tuple[int, ...]) -> list[torch.Tensor]:
        maps: list[list[torch.Tensor]] = []
        for t in sources:
            slots = self.get(t)
            if slots is not None and all(slots is not m for m in maps):
                maps.append(slots)
        expanded = [s if tuple(s.shape) == shape else s.expand(shape).contiguous() for m in maps for s in m]
        if len(maps) == 1:
            return expanded
        stacked = torch.stack(expanded).reshape(len(expanded), -1).T
        merged = _dedup_rows(stacked).T
        return [row.reshape(shape) for row in merged]

    def _replay(
        self,
        name: str,
        args: Sequence[Any],
        kwargs: Mapping[str, Any],
        outs: list[torch.Tensor],
        sources: list[torch.Tensor],
    ) -> bool:
        func = getattr(torch.Tensor, name, None) if name.startswith("__") else None
        data = list(args[0]) if isinstance(args[0], (list, tuple)) else [args[0]]
        data_ids = {id(t) for t in data}
        if any(id(t) not in data_ids for t in sources):
            return False  # e.g. a data-dependent index: positions are not known in advance
        width = max(len(self.get(t) or []) for t in data)
        results: list[list[torch.Tensor]] = []
        for k in range(width):

            def slot(t: Any, k: int = k) -> Any:
                if not isinstance(t, torch.Tensor) or id(t) not in data_ids:
                    return t
                slots = self.get(t)
                if slots is None or k >= len(slots):
                    return torch.full(tuple(t.shape), _NONE, dtype=torch.long, device=t.device)
                return slots[k]

            new_first = [slot(t) for t in args[0]] if isinstance(args[0], (list, tuple)) else slot(args[0])
            call = func if func is not None else self._resolve(name, args[0])
            result = call(new_first, *args[1:], **kwargs)
            leaves = [t for t in tree_flatten(result)[0] if isinstance(t, torch.Tensor)]
            if len(leaves) != len(outs) or any(a.shape != b.shape for a, b in zip(leaves, outs)):
                return False
            results.append(leaves)
        for i, t in enumerate(outs):
            self.put(t, [r[i] for r in results])
        return True

    @staticmethod
    def _resolve(name: str, first: Any) -> Any:
        # Replay the op as the function of the same name; a method and torch.<name> take the tensor first alike.
        if isinstance(first, torch.Tensor) and hasattr(torch.Tensor, name):
            return getattr(torch.Tensor, name)
        return getattr(torch, name)

    def _channelwise(self, first: torch.Tensor, outs: list[torch.Tensor], sources: list[torch.Tensor]) -> bool:
        slots = self.get(first)
        if slots is None or len(sources) != 1 or first.dim() < 2:
            return False
        head = tuple(first.shape[:2])
        if any(t.dim() < 2 or tuple(t.shape[:2]) != head for t in outs):
            return False
        per_channel = _dedup_rows(_rows(slots, 1)).T  # (sources per channel, channels)
        for t in outs:
            view = (1, head[1]) + (1,) * (t.dim() - 2)
            self.put(t, [ids.reshape(view).expand(tuple(t.shape)).contiguous() for ids in per_channel])
        return True


@dataclass
class _Links:
    """Input channels of one consumer layer: always live, or live when one of the listed producer channels is."""

    always: torch.Tensor  # bool (in_channels,)
    pairs: torch.Tensor  # long (n, 2): (input channel, global producer channel id)


def _channel_dim(layer: nn.Module, t: torch.Tensor) -> int:
    if isinstance(layer, nn.Linear):
        return t.dim() - 1
    return 1 if t.dim() == _weight_of(layer).dim() else 0  # unbatched conv input has no batch dim


def _trace_links(model: nn.Module, example_input: Any, producers: Mapping[str, int]) -> dict[str, _Links]:
    """Run one probing forward pass; ``producers`` maps layer name -> global id offset of its output channels."""
    probe = _LinkProbe()
    consumers = [(name, m) for name, m in model.named_modules() if isinstance(m, _LINK_TYPES)]
    records: dict[str, list[_Links]] = {}

    def pre_hook(name: str, layer: nn.Module, args: tuple[Any, ...]) -> None:
        x = args[0] if args else None
        if not isinstance(x, torch.Tensor):
            return
        dim = _channel_dim(layer, x)
        slots = probe.get(x)
        if slots is None:  # input computed from constants only: keep it (conservative)
            records.setdefault(name, []).append(_Links(torch.ones(x.shape[dim], dtype=torch.bool), _no_pairs()))
            return
        table = _dedup_rows(_rows(slots, dim)).cpu()
        always = (table == _ALIVE).any(dim=1)
        found = table >= 0
        rows = found.nonzero(as_tuple=True)[0]
        pairs = torch.stack([rows, torch.masked_select(table, found)], dim=1)  # both in row-major order
        records.setdefault(name, []).append(_Links(always, pairs))

    def post_hook(name: str, layer: nn.Module, args: tuple[Any, ...], out: Any) -> None:
        if not isinstance(out, torch.Tensor):
            return
        if name not in producers:
            probe.put_alive(out)
            return
        dim = _channel_dim(layer, out)
        ids = torch.arange(out.shape[dim], dtype=torch.long, device=out.device) + producers[name]
        view = [1] * out.dim()
        view[dim] = -1
        probe.put(out, [ids.reshape(view).expand(tuple(out.shape)).contiguous()])

    handles = []
    for name, layer in consumers:
        handles.append(layer.register_forward_pre_hook(lambda m, a, n=name: pre_hook(n, m, a)))
        handles.append(layer.register_forward_hook(lambda m, a, o, n=name: post_hook(n, m, a, o)))
    args, kwargs = _call_args(_to(_one_sample(example_input), _device_of(model)))
    try:
        with _inference(model), probe:
            for t in tree_flatten((args, kwargs))[0]:
                if isinstance(t, torch.Tensor):
                    probe.put_alive(t)
            model(*args, **kwargs)
    finally:
        for h in handles:
            h.remove()
    links: dict[str, _Links] = {}
    for name, found in records.items():
        always = found[0].always.clone()
        for extra in found[1:]:  # a layer called several times: an input is live if live in any call
            always |= extra.always
        links[name] = _Links(always, torch.cat([f.pairs for f in found]).unique(dim=0))
    return links


def _no_pairs() -> torch.Tensor:
    return torch.zeros(0, 2, dtype=torch.long)


# ---------------------------------------------------------------------------------------------------- results


@dataclass
class LayerRow:
    """One layer with a weight.

    ``params`` counts the layer's own parameters (weight and bias, not the mask); ``kept`` is ``params`` minus
    its switched-off connections; ``density`` is the fraction of its weight's connections kept (1.0 unmasked).
    FLOPs are multiply-accumulates per sample (see :data:`FLOPS_UNIT`), ``None`` without an example input.

    Example:
        >>> row = LayerRow("fc", "Linear", (3, 4), params=15, kept=9, density=0.5, dense_flops=12, effective_flops=6)
        >>> row.masked
        True
    """

    name: str
    kind: str
    shape: tuple[int, ...]
    params: int
    kept: int
    density: float
    dense_flops: int | None = None
    effective_flops: int | None = None
    masked: bool = True


@dataclass
class SparsityStats:
    """Model-wide totals.

    ``density`` is over the masked connections only (1.0 without masks). ``dense_flops`` is fvcore's total for the
    model; ``effective_flops`` what remains once switched-off connections and removed channels cost nothing;
    ``flops_ratio`` is their quotient. The three are ``None`` without an example input.

    Example:
        >>> stats = SparsityStats(params_total=10, params_kept=4, connections_total=8, connections_kept=2, density=0.25)
        >>> stats.flops_ratio is None
        True
    """

    params_total: int
    params_kept: int
    connections_total: int
    connections_kept: int
    density: float
    dense_flops: int | None = None
    effective_flops: int | None = None
    flops_ratio: float | None = None


def _human(number: float | None) -> str:
    """Short count with K/M/G/T suffixes, as in Lightning's model summary."""
    if number is None:
        return "n/a"
    number = float(number)
    for suffix, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(number) >= scale:
            return f"{number / scale:.1f} {suffix}"
    return f"{number:.0f}  "


@dataclass
class SparsityReport:
    """Per-layer rows and model totals, with table, CSV and JSON renderings.

    Example:
        >>> report = sparsity_report(nn.Sequential(nn.Linear(4, 2)), example_input=torch.randn(1, 4))
        >>> [(r.name, r.params, r.dense_flops) for r in report.rows], report.totals.flops_ratio
        ([('0', 10, 8)], 1.0)
        >>> sorted(report.to_dict())
        ['flops_note', 'flops_unit', 'other_flops', 'rows', 'totals']
    """

    rows: list[LayerRow]
    totals: SparsityStats
    #: FLOPs of operations outside every weighted layer (in the totals, in no row).
    other_flops: int | None = None
    #: Why FLOPs are unavailable, when they are.
    flops_note: str | None = None
    flops_unit: str = field(default=FLOPS_UNIT)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict."""
        rows = []
        for row in self.rows:
            item = asdict(row)
            item["shape"] = list(row.shape)
            rows.append(item)
        return {
            "flops_unit": self.flops_unit,
            "flops_note": self.flops_note,
            "other_flops": self.other_flops,
            "rows": rows,
            "totals": asdict(self.totals),
        }

    def to_json(self, path: str | Path) -> Path:
        """Write :meth:`to_dict` as JSON; returns the path."""
        path = Path(path)
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        return path

    def to_csv(self, path: str | Path) -> Path:
        """One line per layer plus a ``total`` line; shape written as ``20x1x5x5``; returns the path."""
        path = Path(path)
        columns = ["name", "kind", "shape", "params", "kept", "density", "dense_flops", "effective_flops", "masked"]
        t = self.totals
        with path.open("w", newline="") as fh:
            writer = csv.writer(fh)
            writer.writerow(columns)
            for r in self.rows:
                shape = "x".join(str(n) for n in r.shape)
                writer.writerow(
                    [r.name, r.kind, shape, r.params, r.kept, r.density, r.dense_flops, r.effective_flops, r.masked]
                )
            writer.writerow(
                ["total", "", "", t.params_total, t.params_kept, t.density, t.dense_flops, t.effective_flops, ""]
            )
        return path

    def to_rich_table(self) -> Any:
        """A :class:`rich.table.Table` in the style of Lightning's rich model summary."""
        from rich.table import Table

        table = Table(header_style="bold magenta", title="Sparse connectivity", title_justify="left")
        table.add_column(" ", style="dim")
        table.add_column("Name", justify="left", no_wrap=True)
        table.add_column("Type")
        table.add_column("Shape")
        table.add_column("Params", justify="right")
        table.add_column("Kept", justify="right")
        table.add_column("Density", justify="right")
        table.add_column("Dense FLOPs", justify="right")
        table.add_column("Eff. FLOPs", justify="right")
        for i, r in enumerate(self.rows):
            table.add_row(
                str(i),
                r.name or "(model)",
                r.kind,
                "x".join(str(n) for n in r.shape),
                _human(r.params),
                _human(r.kept),
                f"{r.density:.2%}" if r.masked else "-",
                _human(r.dense_flops),
                _human(r.effective_flops),
            )
        if self.other_flops:
            table.add_row("", "(other ops)", "", "", "", "", "", _human(self.other_flops), _human(self.other_flops))
        return table

    def summary_lines(self) -> list[str]:
        """The totals as ``label: value`` lines."""
        t = self.totals
        lines = [
            f"Params kept: {_human(t.params_kept).strip()} of {_human(t.params_total).strip()}",
            f"Connections kept: {t.connections_kept:,} of {t.connections_total:,} (density {t.density:.2%})",
        ]
        if t.dense_flops is None:
            lines.append(f"FLOPs: unavailable ({self.flops_note})")
        else:
            ratio = "" if t.flops_ratio is None else f" ({t.flops_ratio:.2%})"
            effective, dense = _human(t.effective_flops).strip(), _human(t.dense_flops).strip()
            lines.append(f"Effective FLOPs: {effective} of {dense} dense{ratio}, {self.flops_unit}")
        return lines

    def print(self, console: Any = None) -> None:
        """Print the table and the totals with rich (default: rich's console, at least 120 columns off a terminal)."""
        from rich import get_console
        from rich.console import Console
        from rich.table import Table

        if console is None:
            console = get_console()
            if not console.is_terminal:  # log files and CI: do not squeeze nine columns into 80
                console = Console(width=max(console.width, 120))
        console.print(self.to_rich_table())
        grid = Table.grid(expand=True)
        grid.add_column()
        for line in self.summary_lines():
            label, _, value = line.partition(": ")
            grid.add_row(f"[bold]{label}[/]: {value}")
        console.print(grid)


# ---------------------------------------------------------------------------------------------------- accountant


class _Plan:
    """Everything a snapshot needs, precomputed once: per-layer constants and index tensors."""

    def __init__(self) -> None:
        self.rows: list[tuple[str, nn.Module]] = []
        self.params: list[int] = []
        self.row_mask: list[int] = []  # row -> index into masks, or -1
        self.owns_weight: list[bool] = []  # False for the later layers of a tied weight (counted in the first)
        self.masks: list[tuple[str, ConnectivityMask]] = []
        self.params_total = 0
        self.connections_total = 0
        self.flops = False
        self.total_dense = 0
        self.other = 0
        self.dense: torch.Tensor | None = None  # float64 (rows,)
        self.base: torch.Tensor | None = None  # float64 (rows,): rows whose count never changes, 0 elsewhere
        self.fixed = 0.0  # base.sum() + other
        # Rows scaled by density: effective = coef * kept connections.
        self.scaled_rows: torch.Tensor | None = None
        self.scaled_masks: torch.Tensor | None = None
        self.scaled_coef: torch.Tensor | None = None
        self.mix: torch.Tensor | None = None  # float64 (masks, 2): kept connections -> [kept, density-scaled MACs]
        # Channel graph: every Linear/Conv layer without a weight-granularity mask is a node; its output channels
        # form one global id space, its input channels another, and (layer, group) pairs are segments.
        self.nodes: list[tuple[int, int]] = []  # (mask index or -1, output channels)
        self.node_groups: list[int] = []  # ConvTranspose: the channel mask repeats per group
        self.ones: dict[int, torch.Tensor] = {}
        self.out_seg: torch.Tensor | None = None
        self.in_seg: torch.Tensor | None = None
        self.always: torch.Tensor | None = None  # float64 (inputs,): 1 where an input is live whatever the masks
        self.seg_zeros: torch.Tensor | None = None
        self.pair_j: torch.Tensor | None = None
        self.pair_src: torch.Tensor | None = None
        self.seg_unit: torch.Tensor | None = None
        self.seg_row: torch.Tensor | None = None
        self.last: tuple[torch.Tensor, torch.Tensor] | None = None  # (gates, segment MACs) of the last evaluation
        self.device = torch.device("cpu")

    def to(self, device: torch.device) -> None:
        if device == self.device:
            return
        for key, value in vars(self).items():
            if isinstance(value, torch.Tensor):
                setattr(self, key, value.to(device))
        self.last = None
        self.ones = {k: v.to(device) for k, v in self.ones.items()}
        self.device = device


def _groups(layer: nn.Module) -> int:
    return int(getattr(layer, "groups", 1))


def _channel_shape(layer: nn.Module) -> tuple[int, int, int]:
    """(output channels, input channels, groups) of a Linear/Conv layer."""
    weight = _weight_of(layer)
    groups = _groups(layer)
    if isinstance(layer, _TRANSPOSED):
        return weight.shape[1] * groups, weight.shape[0], groups
    return weight.shape[0], weight.shape[1] * groups, groups


class SparsityAccountant:
    """Counts parameters, kept connections, density and FLOPs of ``model`` as its masks change.

    The dense FLOPs (one fvcore trace) and, with channel masks, the producer -> consumer channel links (one probing
    forward pass) are computed once, on first use, from one sample of the example input, then cached.
    :meth:`snapshot` then costs a few tensor operations and one host synchronization, whatever the model size.

    Create it after the masks are injected, or call :meth:`refresh` when masks are added or removed later.

    Args:
        model: the model (masked or not).
        example_input: what ``model.forward`` takes (a batch: only its first sample is used); may be set later
            with :meth:`set_example_input`. Without it only counts are available.

    Example:
        >>> from lightning_scl.masking import inject_masks
        >>> net = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
        >>> masks = inject_masks(net)
        >>> acc = SparsityAccountant(net)
        >>> acc.has_flops, acc.snapshot().flops_ratio
        (False, None)
        >>> acc.set_example_input(torch.randn(16, 4))
        True
        >>> with torch.no_grad():
        ...     masks["0"].mask[:, :2] = -1.0  # half of the first layer's connections off
        >>> stats = acc.snapshot()
        >>> stats.density, stats.effective_flops, stats.dense_flops
        (0.6666666666666666, 12, 18)
    """

    def __init__(self, model: nn.Module, example_input: Any = None) -> None:
        self.model = model
        self._example: Any = None
        self._counted = False  # fvcore ran (successfully or not)
        self._linked = False  # the channel-link probe ran (successfully or not)
        self._dense: dict[str, int] | None = None
        self._total_dense: int | None = None
        self._links: dict[str, _Links] | None = None
        self._reason: str | None = "no example input: set LightningModule.example_input_array or pass example_input"
        self._plan: _Plan | None = None
        if example_input is not None:
            self.set_example_input(example_input)

    # ------------------------------------------------------------------ example input and cached counts

    @property
    def example_input(self) -> Any:
        """The one-sample example input in use, or ``None``."""
        return self._example

    def set_example_input(self, example_input: Any) -> bool:
        """Use ``example_input`` (sliced to one sample) for FLOPs; the first call wins. Returns whether it was taken.

        Example:
            >>> acc = SparsityAccountant(nn.Linear(2, 2))
            >>> acc.set_example_input(torch.ones(5, 2)), acc.set_example_input(torch.ones(1, 2))
            (True, False)
            >>> acc.example_input.shape
            torch.Size([1, 2])
        """
        if self._example is not None or example_input is None or self._counted:
            return False
        self._example = _one_sample(example_input)
        self._reason = None
        self._plan = None
        return True

    def skip_flops(self, reason: str) -> None:
        """Count no FLOPs (the model must not be run), and say why wherever FLOPs are asked for.

        Example:
            >>> acc = SparsityAccountant(nn.Linear(2, 2))
            >>> acc.skip_flops("no forward allowed")
            >>> acc.has_flops, acc.flops_unavailable_reason
            (False, 'no forward allowed')
        """
        self._counted, self._dense, self._total_dense, self._reason = True, None, None, reason

    def _count(self) -> None:
        """Dense MACs by fvcore, once."""
        if self._counted or self._example is None:
            return
        self._counted = True
        try:
            self._dense, self._total_dense = _count_dense(self.model, self._example)
        except Exception as err:  # an untraceable model must not stop training: report counts only
            self._dense, self._total_dense = None, None
            self._reason = f"fvcore could not count the model on the example input ({type(err).__name__}: {err})"
            return
        unseen = [name for name, _, _ in iter_masks(self.model, unique=False) if not self._dense.get(name)]
        if unseen:
            warnings.warn(
                f"Masked layer(s) {unseen} run no MACs of their own on the example input: their weight is used by a "
                "parent's forward (as nn.MultiheadAttention does with out_proj) or they are not called. Their MACs "
                "count in the parent's or not at all, so effective FLOPs do not follow their masks.",
                stacklevel=2,
            )

    def _link(self) -> None:
        """Producer -> consumer channel links, once, and only when channel masks exist."""
        if self._linked or self._dense is None:
            return
        self._linked = True
        if not any(mask.granularity == "channel" for _, _, mask in iter_masks(self.model)):
            return  # weight masks: every count is dense x density, no links needed
        try:
            self._links = _trace_links(self.model, self._example, self._nodes())
        except Exception:  # no links: channel-masked layers fall back to density-scaled counts
            self._links = None

    def _nodes(self) -> dict[str, int]:
        """Layers of the channel graph (Linear/Conv without a weight-granularity mask) -> first global output id."""
        granularity = {name: mask.granularity for name, _, mask in iter_masks(self.model)}
        offsets, offset = {}, 0
        for name, layer in self.model.named_modules():
            if isinstance(layer, _LINK_TYPES) and granularity.get(name, "channel") == "channel":
                offsets[name] = offset
                offset += _channel_shape(layer)[0]
        return offsets

    @property
    def has_flops(self) -> bool:
        """Whether FLOPs are available (counts them on first use)."""
        return self.dense_macs_by_layer() is not None

    @property
    def flops_unavailable_reason(self) -> str | None:
        """Why FLOPs are unavailable, or ``None`` when they are (or have not been tried yet)."""
        return self._reason

    @flops_unavailable_reason.setter
    def flops_unavailable_reason(self, reason: str) -> None:
        if self._example is None and not self._counted:  # a caller explains why it has no input to give
            self._reason = reason

    def dense_macs_by_layer(self) -> dict[str, int] | None:
        """Dense MACs per sample of every weighted layer (see :func:`dense_macs_by_layer`), cached; ``None``
        without an example input or when the model cannot be traced.

        Example:
            >>> SparsityAccountant(nn.Linear(3, 2), torch.zeros(4, 3)).dense_macs_by_layer()
            {'': 6}
        """
        self._count()
        return None if self._dense is None else dict(self._dense)

    def refresh(self) -> None:
        """Rebuild the layer bookkeeping after masks were injected or removed (dense FLOPs stay cached).

        Example:
            >>> from lightning_scl.masking import inject_masks
            >>> net = nn.Linear(3, 2)
            >>> acc = SparsityAccountant(net)
            >>> acc.snapshot().connections_total
            0
            >>> _ = inject_masks(net, layers=[("", net)])
            >>> acc.refresh()
            >>> acc.snapshot().connections_total
            6
        """
        self._plan = None
        self._linked = False  # links depend on which layers carry channel masks
        self._links = None

    # ------------------------------------------------------------------ plan

    def _build(self) -> _Plan:
        self._count()
        self._link()
        plan = _Plan()
        masks = list(iter_masks(self.model))
        index_of = {id(mask): i for i, (_, _, mask) in enumerate(masks)}
        # every layer of a tied weight runs through the shared mask: each one's FLOPs follow it
        mask_index = {name: index_of[id(mask)] for name, _, mask in iter_masks(self.model, unique=False)}
        plan.masks = [(name, mask) for name, _, mask in masks]
        plan.connections_total = sum(mask.numel_connections for _, _, mask in masks)
        mask_ids = {id(mask.mask) for _, _, mask in masks}
        plan.params_total = sum(p.numel() for p in self.model.parameters() if id(p) not in mask_ids)
        plan.rows = _weighted_layers(self.model)
        seen: set[int] = set(mask_ids)
        for name, layer in plan.rows:
            own = _own_parameters(layer, seen)  # tied weights count once, in their first layer
            seen.update(id(p) for p in own)
            plan.params.append(sum(p.numel() for p in own))
            weight = _weight_of(layer)
            plan.owns_weight.append(any(p is weight for p in own))
            plan.row_mask.append(mask_index.get(name, -1))
        if self._dense is None or self._total_dense is None:
            return plan
        plan.flops = True
        dense = [float(self._dense.get(name, 0)) for name, _ in plan.rows]
        plan.dense = torch.tensor(dense, dtype=torch.float64)
        plan.total_dense = int(self._total_dense)
        plan.other = plan.total_dense - round(sum(dense))
        links = self._links
        nodes = self._nodes() if links is not None else {}
        base = list(dense)
        scaled_rows, scaled_masks, scaled_coef = [], [], []
        seg: dict[str, list[Any]] = {k: [] for k in ("out", "in", "always", "pj", "ps", "unit", "row")}
        n_in = 0
        for row, (name, layer) in enumerate(plan.rows):
            m = plan.row_mask[row]
            if name in nodes:  # exact: kept and live outputs x live inputs, per group
                n_out, n_inp, groups = _channel_shape(layer)
                link = links.get(name)  # type: ignore[union-attr]
                if link is None or link.always.numel() != n_inp:  # not reached by the probe: inputs all live
                    link = _Links(torch.ones(n_inp, dtype=torch.bool), _no_pairs())
                base[row] = 0.0
                first = len(seg["unit"])
                seg["unit"].extend([dense[row] / (n_out * n_inp / groups)] * groups)
                seg["row"].extend([row] * groups)
                seg["out"].extend(first + o // (n_out // groups) for o in range(n_out))
                seg["in"].extend(first + i // (n_inp // groups) for i in range(n_inp))
                seg["always"].append(link.always)
                seg["pj"].append(link.pairs[:, 0] + n_in)
                seg["ps"].append(link.pairs[:, 1])
                n_in += n_inp
                plan.nodes.append((m, n_out))
                plan.node_groups.append(groups if isinstance(layer, _TRANSPOSED) else 1)
                if m < 0:
                    plan.ones[n_out] = torch.ones(n_out)  # stands for an unmasked layer's mask values
            elif m >= 0:  # dense count x density
                base[row] = 0.0
                scaled_rows.append(row)
                scaled_masks.append(m)
                scaled_coef.append(dense[row] / masks[m][2].numel_connections)
        plan.base = torch.tensor(base, dtype=torch.float64)
        plan.fixed = float(sum(base)) + plan.other
        plan.mix = torch.zeros(len(masks), 2, dtype=torch.float64)
        plan.mix[:, 0] = 1.0
        for m, coef in zip(scaled_masks, scaled_coef):
            plan.mix[m, 1] += coef
        if scaled_rows:
            plan.scaled_rows = torch.tensor(scaled_rows, dtype=torch.long)
            plan.scaled_masks = torch.tensor(scaled_masks, dtype=torch.long)
            plan.scaled_coef = torch.tensor(scaled_coef, dtype=torch.float64)
        if plan.nodes:
            plan.out_seg = torch.tensor(seg["out"], dtype=torch.long)
            plan.in_seg = torch.tensor(seg["in"], dtype=torch.long)
            plan.always = torch.cat(seg["always"]).double()
            plan.seg_zeros = torch.zeros(len(seg["unit"]), dtype=torch.float64)
            plan.pair_j = torch.cat(seg["pj"])
            plan.pair_src = torch.cat(seg["ps"])
            plan.seg_unit = torch.tensor(seg["unit"], dtype=torch.float64)
            plan.seg_row = torch.tensor(seg["row"], dtype=torch.long)
        return plan

    def _get_plan(self) -> _Plan:
        if self._plan is None:
            self._plan = self._build()
        return self._plan

    # ------------------------------------------------------------------ evaluation

    def _kept(self, plan: _Plan, given: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Kept connections per mask (int64 tensor on the masks' device)."""
        values = []
        for name, mask in plan.masks:
            value = given.get(name)
            if value is None:
                value = mask.kept_tensor()
            values.append(torch.as_tensor(value, device=plan.device))
        return torch.stack(values).to(torch.int64)

    def _segments(self, plan: _Plan) -> torch.Tensor:
        """Effective MACs per segment (layer x group) of the channel graph."""
        parts = []
        for (m, n_out), groups in zip(plan.nodes, plan.node_groups):
            if m < 0:
                parts.append(plan.ones[n_out])
            else:
                values = plan.masks[m][1].mask.reshape(-1)
                parts.append(values.repeat(groups) if groups > 1 else values)
        gate = (torch.cat(parts) > 0).double()  # float64 throughout: fewer conversions, exact counts
        if plan.last is not None and torch.equal(gate, plan.last[0]):
            return plan.last[1]  # mask values move every step, their signs rarely: skip the graph
        live_out = gate
        # index_select, not advanced indexing: the latter is ~1000x slower on a busy CPU (thread oversubscription).
        # An output channel is computed only if its mask is on and some input of its group is live; dead inputs
        # propagate (e.g. through depthwise convolutions), so iterate to the fixed point, at most once per layer.
        for _ in range(len(plan.nodes)):
            live_in = plan.always.index_add(0, plan.pair_j, live_out.index_select(0, plan.pair_src)).clamp_max_(1.0)
            live_seg = plan.seg_zeros.index_add(0, plan.in_seg, live_in)
            new = gate * (live_seg.index_select(0, plan.out_seg) > 0)
            if torch.equal(new, live_out):
                break
            live_out = new
        result = plan.seg_unit * live_seg * plan.seg_zeros.index_add(0, plan.out_seg, live_out)
        plan.last = (gate, result)
        return result

    @torch.no_grad()
    def _per_row(self) -> tuple[_Plan, torch.Tensor | None, torch.Tensor | None]:
        """(plan, kept connections per mask, effective MACs per row) as tensors."""
        plan = self._get_plan()
        if plan.masks:
            plan.to(plan.masks[0][1].mask.device)
        kept = self._kept(plan, {}) if plan.masks else None
        if not plan.flops or plan.base is None:
            return plan, kept, None
        eff = plan.base.clone()
        if plan.scaled_rows is not None and kept is not None:
            eff.index_add_(0, plan.scaled_rows, kept.index_select(0, plan.scaled_masks).double() * plan.scaled_coef)
        if plan.nodes:
            eff.index_add_(0, plan.seg_row, self._segments(plan))
        return plan, kept, eff

    @torch.no_grad()
    def snapshot(self, kept_by_layer: Mapping[str, torch.Tensor] | None = None) -> SparsityStats:
        """Current totals; cheap enough for every logging step (no tracing, one host synchronization).

        Args:
            kept_by_layer: kept connections per masked layer name, when the caller already has them (e.g. the SCL
                callback's per-step counts); missing layers are counted here.

        Example:
            >>> from lightning_scl.masking import inject_masks
            >>> net = nn.Linear(3, 2)
            >>> _ = inject_masks(net, layers=[("", net)])
            >>> SparsityAccountant(net).snapshot(kept_by_layer={"": torch.tensor(3)}).density
            0.5
        """
        plan = self._get_plan()
        values: list[float] = [0.0, 0.0]
        if plan.masks:
            plan.to(plan.masks[0][1].mask.device)
            kept = self._kept(plan, kept_by_layer or {}).double()
            # [kept connections, density-scaled MACs] in one product; channel-graph MACs appended.
            out = kept @ plan.mix if plan.flops else kept.sum().reshape(1)
            if plan.nodes:
                out = torch.cat([out, self._segments(plan).sum().reshape(1)])
            values = out.tolist()  # the one host synchronization
        connections_kept = round(values[0])
        total = plan.connections_total
        stats = SparsityStats(
            params_total=plan.params_total,
            params_kept=plan.params_total - (total - connections_kept),
            connections_total=total,
            connections_kept=connections_kept,
            density=connections_kept / total if total else 1.0,
        )
        if plan.flops:
            stats.dense_flops = plan.total_dense
            stats.effective_flops = round(plan.fixed + sum(values[1:]))
            stats.flops_ratio = stats.effective_flops / plan.total_dense if plan.total_dense else None
        return stats

    def report(self) -> SparsityReport:
        """Per-layer rows and totals now.

        Example:
            >>> net = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))
            >>> [(r.name, r.kind, r.params) for r in SparsityAccountant(net).report().rows]
            [('0', 'Linear', 15), ('1', 'BatchNorm1d', 6)]
        """
        totals = self.snapshot()
        plan, kept, eff = self._per_row()
        kept_list = kept.tolist() if kept is not None else []
        eff_list = eff.tolist() if eff is not None else None
        dense_list = plan.dense.tolist() if plan.dense is not None else None
        rows = []
        for i, (name, layer) in enumerate(plan.rows):
            m = plan.row_mask[i]
            params = plan.params[i]
            row = LayerRow(name, _kind(layer), tuple(_weight_of(layer).shape), params, params, 1.0, masked=m >= 0)
            if m >= 0:
                total = plan.masks[m][1].numel_connections
                if plan.owns_weight[i]:
                    row.kept = params - (total - int(kept_list[m]))
                row.density = int(kept_list[m]) / total
            if eff_list is not None and dense_list is not None:
                row.dense_flops = round(dense_list[i])
                row.effective_flops = round(eff_list[i])
            rows.append(row)
        return SparsityReport(
            rows=rows,
            totals=totals,
            other_flops=plan.other if plan.flops else None,
            flops_note=None if plan.flops else self._reason,
        )


# ---------------------------------------------------------------------------------------------------- checkpoints


def _report_from_state_dict(state_dict: Mapping[str, torch.Tensor], note: str) -> SparsityReport:
    """Counts from tensors alone: layers are the prefixes that own a ``weight`` (plain or masked)."""
    rows: list[LayerRow] = []
    used: set[str] = set()
    counted: set[tuple[int, int, tuple[int, ...]]] = set()
    owners: list[LayerRow] = []  # masked rows whose weight counts (the first layer of a tied weight)
    for key, value in state_dict.items():
        if key.endswith(_ORIGINAL_SUFFIX):
            prefix = key[: -len(_ORIGINAL_SUFFIX)]
        elif key.endswith(".weight") or key == "weight":
            prefix = key[: -len(".weight")] if key != "weight" else ""
        else:
            continue
        dot = f"{prefix}." if prefix else ""
        bias = state_dict.get(f"{dot}bias")
        identity = (value.untyped_storage().data_ptr(), value.storage_offset(), tuple(value.shape))
        tied = identity in counted  # a tied weight is saved under every layer's key but counts once
        counted.add(identity)
        params = (0 if tied else value.numel()) + (bias.numel() if isinstance(bias, torch.Tensor) else 0)
        used.update({key, f"{dot}bias"})
        row = LayerRow(prefix, "?", tuple(value.shape), params=params, kept=params, density=1.0, masked=False)
        mask = state_dict.get(f"{prefix}{_MASK_SUFFIX}")
        if mask is not None:
            used.add(f"{prefix}{_MASK_SUFFIX}")
            per_variable = value.numel() // mask.numel()
            kept = int((mask > 0).sum()) * per_variable
            row.density, row.masked = kept / value.numel(), True
            if not tied:
                row.kept = params - (value.numel() - kept)
                owners.append(row)
        rows.append(row)
    other = sum(
        v.numel()
        for k, v in state_dict.items()
        if k not in used and not k.endswith(_MASK_SUFFIX) and not k.endswith(_BN_BUFFERS)
    )
    connections_total = sum(math.prod(r.shape) for r in owners)
    connections_kept = sum(round(r.density * math.prod(r.shape)) for r in owners)
    params_total = sum(r.params for r in rows) + other
    totals = SparsityStats(
        params_total=params_total,
        params_kept=params_total - (connections_total - connections_kept),
        connections_total=connections_total,
        connections_kept=connections_kept,
        density=connections_kept / connections_total if connections_total else 1.0,
    )
    return SparsityReport(rows=rows, totals=totals, flops_note=note)


def sparsity_report(
    model_or_checkpoint: nn.Module | str | Path | Mapping[str, Any],
    example_input: Any = None,
    model_class: type[nn.Module] | nn.Module | Callable[[], nn.Module] | None = None,
) -> SparsityReport:
    """Sparsity report of a model or of a Lightning checkpoint (``.ckpt``) written during SCL training.

    Args:
        model_or_checkpoint: a model (masked or not), a checkpoint path (loaded with ``weights_only=True``) or a
            loaded checkpoint dict; with or without masks (a dense baseline).
        example_input: what ``forward`` takes (a batch; its first sample is used). Default for a LightningModule:
            its ``example_input_array``. Without one the report holds counts only.
        model_class: for a checkpoint: the class to rebuild the model from (``model_class(**hyper_parameters)``,
            masks injected where the checkpoint has them, weights loaded; or a factory or an instance, as for
            :func:`~lightning_scl.export.load_masked_checkpoint`): needed for FLOPs. Without it, params,
            kept connections and density come from the tensors alone (layer types unknown: ``"?"``; a tensor
            cannot tell a parameter from a buffer, so buffers other than batch norm's statistics count as params).

    Example:
        >>> net = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.Linear(8, 2))
        >>> report = sparsity_report(net, example_input=torch.randn(1, 1, 4, 4))
        >>> report.totals.dense_flops, report.totals.params_total
        (88, 38)
    """
    if isinstance(model_or_checkpoint, nn.Module):
        model = model_or_checkpoint
    else:
        if isinstance(model_or_checkpoint, Mapping):
            checkpoint = model_or_checkpoint
        else:
            # export's loader: one place names an unreadable file, mismatched keys and their fixes
            checkpoint = _load_checkpoint_file(Path(model_or_checkpoint), accepts_model=True, accepts_dict=False)
        if not isinstance(checkpoint.get("state_dict"), Mapping):
            where = "the checkpoint" if isinstance(model_or_checkpoint, Mapping) else repr(str(model_or_checkpoint))
            raise ValueError(f"{where} has no 'state_dict': not a Lightning checkpoint")
        if model_class is None:
            return _report_from_state_dict(
                checkpoint["state_dict"], "FLOPs need the model: pass model_class (and example_input)"
            )
        model = _rebuild_from_checkpoint(checkpoint, model_class)
    if example_input is None:
        example_input = getattr(model, "example_input_array", None)
    return SparsityAccountant(model, example_input).report()


# ---------------------------------------------------------------------------------------------------- plots


def _new_figure(width: float, height: float) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    # A bare Figure on the Agg canvas: no pyplot, so no global backend switch and no window, on any machine.
    figure = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def plot_layer_density(report: SparsityReport, path: str | Path | None = None) -> Any:
    """Bar chart of each masked layer's density (and effective/dense FLOPs ratio when known); PNG at ``path``.

    Returns the matplotlib ``Figure`` (e.g. for TensorBoard's ``add_figure``).

    Example:
        >>> report = sparsity_report(nn.Sequential(nn.Linear(4, 2)))
        >>> figure = plot_layer_density(report)
        >>> figure.axes[0].get_ylabel()
        'fraction kept'
    """
    rows = [r for r in report.rows if r.masked] or report.rows
    figure = _new_figure(max(4.0, 0.5 * len(rows) + 2.0), 3.5)
    ax = figure.add_subplot()
    xs = list(range(len(rows)))
    with_flops = all(r.dense_flops for r in rows) and bool(rows)
    width = 0.4 if with_flops else 0.8
    ax.bar([x - width / 2 if with_flops else x for x in xs], [r.density for r in rows], width, label="density")
    if with_flops:
        ratios = [r.effective_flops / r.dense_flops for r in rows]  # type: ignore[operator]
        ax.bar([x + width / 2 for x in xs], ratios, width, label="effective / dense FLOPs")
    ax.set_xticks(xs, [r.name or "(model)" for r in rows], rotation=45, ha="right", fontsize=8)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("fraction kept")
    ax.set_title(f"Per-layer density (model: {report.totals.density:.2%})")
    ax.legend(fontsize=8)
    if path is not None:
        figure.savefig(path)
    return figure


def plot_history(history: Sequence[Mapping[str, Any]], path: str | Path | None = None) -> Any:
    """Density and effective-FLOPs ratio against the training step; PNG at ``path``; returns the ``Figure``.

    ``history`` items hold ``step``, ``density`` and ``flops_ratio`` (``None`` when unknown).

    Example:
        >>> figure = plot_history([{"step": 0, "density": 1.0, "flops_ratio": 1.0},
        ...                        {"step": 10, "density": 0.5, "flops_ratio": 0.4}])
        >>> [line.get_label() for line in figure.axes[0].get_lines()]
        ['density', 'effective / dense FLOPs']
    """
    figure = _new_figure(6.0, 3.5)
    ax = figure.add_subplot()
    steps = [h["step"] for h in history]
    ax.plot(steps, [h["density"] for h in history], marker=".", label="density")
    flops = [(h["step"], h["flops_ratio"]) for h in history if h.get("flops_ratio") is not None]
    if flops:
        ax.plot([s for s, _ in flops], [r for _, r in flops], marker=".", label="effective / dense FLOPs")
    ax.set_xlabel("step")
    ax.set_ylabel("fraction")
    ax.set_ylim(0, 1.05)
    ax.set_title("Sparsity during training")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    if path is not None:
        figure.savefig(path)
    return figure
