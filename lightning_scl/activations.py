"""Swap the activation function of an existing model (ReLU -> ELU, Clevert et al. 2016): pure torch.

A model applies ReLU in three ways, and each needs its own mechanism:

* a module reference (``self.relu = nn.ReLU()``) is replaced by an ELU module; types match exactly, so
  ``nn.ReLU6`` and ``nn.LeakyReLU`` (not ``nn.ReLU`` subclasses) are only swapped when named in ``targets``;
* a module instance that its parent calls several times (torchvision's ``BasicBlock`` calls ``self.relu`` twice)
  becomes a :class:`PerCallSite` dispatcher with one replacement per call, so every call site owns its module
  (per-site hooks and learnable replacements stay correct);
* functional calls (``F.relu``, ``torch.relu``, ``Tensor.relu`` and their in-place forms) are invisible to a module
  swap; a ``TorchFunctionMode`` reroutes them while a forward of the swapped model runs. It needs no tracing, so it
  works on models that torch.fx cannot trace (googlenet and inception_v3 only use ``F.relu``).

The swap is recorded on the model, so repeating it is a no-op, and :func:`restore_activations` undoes it.
"""

from __future__ import annotations

import dis
import functools
import math
import pickle
import re
import threading
import types
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from os import PathLike
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn
from torch.overrides import TorchFunctionMode

__all__ = [
    "FUNCTIONAL_MODES",
    "REPLACEMENTS",
    "TARGET_TYPES",
    "LearnableELU",
    "PerCallSite",
    "SwapConfig",
    "SwapReport",
    "apply_elu",
    "read_swap_record",
    "restore_activations",
    "swap_activations",
    "swap_report",
]

#: Activation modules that ``targets`` may name. Matched by exact type: subclasses are not swapped, and neither are
#: the functional calls of their own forward (``nn.ReLU.forward`` calls ``F.relu``).
TARGET_TYPES: dict[str, type[nn.Module]] = {
    name: getattr(nn, name)
    for name in (
        "ReLU",
        "ReLU6",
        "LeakyReLU",
        "PReLU",
        "RReLU",
        "GELU",
        "SiLU",
        "Mish",
        "Hardswish",
        "Hardtanh",
        "Softplus",
        "SELU",
        "CELU",
        "ELU",
    )
}
#: What a target is replaced with. ``LearnableELU`` has a trainable ``alpha`` per call site.
REPLACEMENTS = ("ELU", "CELU", "LearnableELU")
#: What happens to functional calls: rerouted to the replacement, counted and warned about, or left alone.
FUNCTIONAL_MODES = ("rewrite", "warn", "ignore")

# Where the record of a swap lives in a Lightning checkpoint (written by the ELUSwap callback).
CHECKPOINT_KEYS = ("lightning_scl", "elu_swap")
_RECORD_ATTR = "_lightning_scl_activation_swap"
_RECORD_VERSION = 1


class _FunctionalSpec(NamedTuple):
    inplace_arg: int | None  # position of the ``inplace`` argument, when the function has one
    always_inplace: bool


def _aten(name: str) -> dict[Callable[..., Any], _FunctionalSpec]:
    """``torch.ops.aten.<name>`` and ``<name>_``, as packets and as their ``.default`` overloads.

    Graphs from ``torch.export`` and FX decompositions call these directly; the ``.out`` overloads are left alone.
    """
    specs: dict[Callable[..., Any], _FunctionalSpec] = {}
    for op_name, inplace in ((name, False), (f"{name}_", True)):
        packet = getattr(torch.ops.aten, op_name, None)
        if packet is not None:
            specs[packet] = specs[packet.default] = _FunctionalSpec(None, inplace)
    return specs


# Functional forms of each target. ``F.relu_`` is ``torch.relu_``; ``F.relu(x, inplace=True)`` reaches the mode as
# ``F.relu`` (it dispatches before choosing ``torch.relu_``), so each call is seen exactly once.
_FUNCTIONAL: dict[str, dict[Callable[..., Any], _FunctionalSpec]] = {
    "ReLU": {
        F.relu: _FunctionalSpec(1, False),
        torch.relu: _FunctionalSpec(None, False),
        torch.relu_: _FunctionalSpec(None, True),
        Tensor.relu: _FunctionalSpec(None, False),
        Tensor.relu_: _FunctionalSpec(None, True),
        **_aten("relu"),
    },
    "ReLU6": {F.relu6: _FunctionalSpec(1, False), **_aten("relu6")},
    "LeakyReLU": {
        F.leaky_relu: _FunctionalSpec(2, False),
        F.leaky_relu_: _FunctionalSpec(None, True),
        **_aten("leaky_relu"),
    },
    "GELU": {F.gelu: _FunctionalSpec(None, False), **_aten("gelu")},
    "SiLU": {F.silu: _FunctionalSpec(1, False), **_aten("silu")},
    "Mish": {F.mish: _FunctionalSpec(1, False), **_aten("mish")},
    "Hardswish": {F.hardswish: _FunctionalSpec(1, False), **_aten("hardswish")},
}


def _names(argument: str, value: str | Sequence[str] | None, allow_none: bool) -> tuple[str, ...] | None:
    if value is None:
        if allow_none:
            return None
        raise ValueError(f"{argument} must be a list of names, got None")
    items = (value,) if isinstance(value, str) else tuple(value)
    if not all(isinstance(item, str) for item in items):
        raise ValueError(f"{argument} must be strings, got {items!r}")
    return items


@dataclass(frozen=True)
class SwapConfig:
    """Validated settings of an activation swap; plain strings and numbers, so YAML and checkpoints carry it.

    Args:
        alpha: ELU's ``alpha`` (saturation value for large negative inputs), > 0; the initial value for
            ``LearnableELU``.
        targets: activation module types to replace, by name (keys of :data:`TARGET_TYPES`), matched exactly.
        replacement: ``"ELU"``, ``"CELU"`` or ``"LearnableELU"`` (trainable ``alpha`` per module call site, creates
            parameters; rerouted functional calls get ELU with the fixed ``alpha``).
        include: regular expressions; when given, only modules whose qualified name or an ancestor's fully matches
            one of them are swapped (``"layer1"`` selects the whole ``layer1`` subtree).
        exclude: regular expressions, same matching; these subtrees are left alone.
        functional: ``"rewrite"`` functional calls, ``"warn"`` about them, or ``"ignore"`` them.
        inplace: replacements of in-place modules (``nn.ReLU(inplace=True)``) run in place, as functional in-place
            calls do, so code that relies on the side effect (``self.act(h); return h``) keeps its activation and
            torchvision models keep their memory use. Where writing in place would break backward (after sigmoid,
            tanh or exp, on a leaf) the replacement runs out of place. ``False``: always out of place.

    Raises:
        ValueError: naming the argument and listing the accepted values.

    Example:
        >>> SwapConfig(targets="ReLU6").targets
        ('ReLU6',)
        >>> SwapConfig(alpha=0.0)
        Traceback (most recent call last):
        ...
        ValueError: alpha must be a finite number > 0, got 0.0
    """

    alpha: float = 1.0
    targets: tuple[str, ...] = ("ReLU",)
    replacement: str = "ELU"
    include: tuple[str, ...] | None = None
    exclude: tuple[str, ...] | None = None
    functional: str = "rewrite"
    inplace: bool = True

    def __post_init__(self) -> None:
        alpha = self.alpha
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha) or alpha <= 0:
            raise ValueError(f"alpha must be a finite number > 0, got {alpha!r}")
        object.__setattr__(self, "alpha", float(alpha))
        targets = _names("targets", self.targets, allow_none=False)
        assert targets is not None
        if not targets:
            raise ValueError(f"targets must name at least one of {sorted(TARGET_TYPES)}")
        unknown = [name for name in targets if name not in TARGET_TYPES]
        if unknown:
            raise ValueError(f"targets: unknown activation(s) {unknown}; accepted: {sorted(TARGET_TYPES)}")
        object.__setattr__(self, "targets", tuple(dict.fromkeys(targets)))
        if self.replacement not in REPLACEMENTS:
            raise ValueError(f"replacement must be one of {list(REPLACEMENTS)}, got {self.replacement!r}")
        if self.replacement in targets:
            # Would swap its own output again on every repeat of the swap.
            raise ValueError(f"targets must not contain the replacement {self.replacement!r}")
        for argument in ("include", "exclude"):
            patterns = _names(argument, getattr(self, argument), allow_none=True)
            for pattern in patterns or ():
                try:
                    re.compile(pattern)
                except re.error as err:
                    raise ValueError(
                        f"{argument}: invalid regular expression {pattern!r} ({err}); patterns are Python regular "
                        "expressions fully matched against qualified module names, e.g. 'layer1' or 'layer[34]\\.0'"
                    ) from None
            object.__setattr__(self, argument, patterns)
        if self.functional not in FUNCTIONAL_MODES:
            raise ValueError(f"functional must be one of {list(FUNCTIONAL_MODES)}, got {self.functional!r}")
        if not isinstance(self.inplace, bool):
            raise ValueError(f"inplace must be True or False, got {self.inplace!r}")

    def to_dict(self) -> dict[str, Any]:
        """Plain-type dict (lists, not tuples) for checkpoints and YAML.

        Example:
            >>> SwapConfig().to_dict()["targets"]
            ['ReLU']
        """
        out = asdict(self)
        for key in ("targets", "include", "exclude"):
            if out[key] is not None:
                out[key] = list(out[key])
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SwapConfig:
        """Build from :meth:`to_dict` output or a checkpoint record; keys that are not settings are ignored.

        Example:
            >>> SwapConfig.from_dict({"alpha": 0.5, "version": 1}).alpha
            0.5
        """
        names = {f.name for f in fields(cls)}
        return cls(**{key: value for key, value in data.items() if key in names})

    def selects(self, qualified_name: str) -> bool:
        """Whether ``include``/``exclude`` select the module (or functional call owner) with this name.

        Example:
            >>> SwapConfig(exclude=["layer4"]).selects("layer4.1.relu")
            False
        """
        parts = qualified_name.split(".") if qualified_name else []
        prefixes = [""] + [".".join(parts[: i + 1]) for i in range(len(parts))]

        def hit(patterns: tuple[str, ...]) -> bool:
            return any(re.fullmatch(p, prefix) for p in patterns for prefix in prefixes)

        if self.include is not None and not hit(self.include):
            return False
        return not (self.exclude and hit(self.exclude))


class LearnableELU(nn.Module):
    """ELU with a trainable ``alpha`` (one scalar per module), initialised to ``alpha``.

    ``inplace=True`` writes the result into the input, as ``nn.ReLU(inplace=True)`` does, so callers that ignore
    the return value still see the activation; where writing in place would break backward it returns a new tensor.

    Example:
        >>> act = LearnableELU(alpha=1.0)
        >>> act(torch.tensor([-100.0, 2.0]))
        tensor([-1.,  2.], grad_fn=<AddBackward0>)
    """

    def __init__(self, alpha: float = 1.0, inplace: bool = False) -> None:
        super().__init__()
        self.alpha = nn.Parameter(torch.tensor([float(alpha)]))
        self.inplace = inplace

    def forward(self, x: Tensor) -> Tensor:
        if self.inplace and _inplace_is_safe(x):
            # The formula saves its input for backward, so it reads a copy and the result goes back into x.
            return x.copy_(self._elu(x.clone()))
        return self._elu(x)

    def _elu(self, x: Tensor) -> Tensor:
        # clamp, not F.relu: a rerouted F.relu would turn this into ELU(ELU); expm1 of the clamped negative part
        # avoids inf * 0 = nan gradients for large positive inputs.
        return x.clamp(min=0) + self.alpha * torch.expm1(x.clamp(max=0))

    def extra_repr(self) -> str:
        return "num_parameters=1, inplace=True" if self.inplace else "num_parameters=1"


def _inplace_is_safe(x: Tensor) -> bool:
    """Whether writing the activation into ``x`` leaves autograd intact (as far as ``x`` itself can tell)."""
    if torch.compiler.is_compiling():
        # grad_fn cannot be inspected while dynamo traces: honour the in-place request as the original code made
        # it. Out of place would silently drop the activation where the caller ignores the return value; in place
        # after sigmoid/tanh fails loudly, exactly as the unswapped model does under compile.
        return True
    if not (torch.is_grad_enabled() and x.requires_grad):
        return True
    if x.is_leaf:
        return False
    for t in (x, x._base):
        node = None if t is None else t.grad_fn
        if node is None:
            continue
        # sigmoid, tanh, exp, softmax, relu... save their output for backward: writing into it breaks backward.
        for name in _saved_names(type(node), node):
            try:
                saved = getattr(node, name)
            except RuntimeError:
                return False
            if isinstance(saved, Tensor) and saved.untyped_storage().data_ptr() == t.untyped_storage().data_ptr():
                return False
    return True


_SAVED_NAMES: dict[type, tuple[str, ...]] = {}


def _saved_names(node_type: type, node: Any) -> tuple[str, ...]:
    names = _SAVED_NAMES.get(node_type)
    if names is None:
        names = _SAVED_NAMES[node_type] = tuple(n for n in dir(node) if n.startswith("_saved_"))
    return names


class _GuardedELU(nn.ELU):
    """``nn.ELU(inplace=True)`` that falls back to out of place where in place would break backward."""

    def __init__(self, alpha: float) -> None:
        super().__init__(alpha, inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        return F.elu(x, self.alpha, inplace=_inplace_is_safe(x))


class _GuardedCELU(nn.CELU):
    """``nn.CELU(inplace=True)`` that falls back to out of place where in place would break backward."""

    def __init__(self, alpha: float) -> None:
        super().__init__(alpha, inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        return F.celu(x, self.alpha, inplace=_inplace_is_safe(x))


def _graph_task_id() -> int:
    """The running autograd backward's id, -1 outside backward (where activation checkpointing recomputes).

    -1 under torch.compile, which cannot trace the query (a graph break at every call site) and recomputes
    checkpointed regions from its own graph.
    """
    current = getattr(torch._C, "_current_graph_task_id", None)
    return -1 if current is None or torch.compiler.is_compiling() else int(current())


class PerCallSite(nn.Module):
    """Stands in for one activation module that its parent calls several times: call ``k`` goes to ``sites[k]``.

    The swap counts the calls in the parent's forward with torch.fx and installs a forward pre-hook on the parent
    that resets the counter, so the ``k``-th call of each parent forward always reaches the same site, whatever
    happened before (an exception, a forward in another mode). The modulo keeps a call from outside the parent's
    forward in range. Parameter-free sites add no ``state_dict`` keys.

    Example:
        >>> disp = PerCallSite([nn.ELU(), nn.ELU()])
        >>> x = torch.tensor([-1.0])
        >>> torch.equal(disp(x), disp(x)), disp.next_site
        (True, 0)
    """

    def __init__(self, sites: Sequence[nn.Module]) -> None:
        super().__init__()
        self.sites = nn.ModuleList(sites)
        self.next_site = 0
        self.reset_in_backward = -1  # the autograd graph task of the last reset (-1: outside backward)

    def forward(self, x: Tensor) -> Tensor:
        task = _graph_task_id()
        if task != -1 and task != self.reset_in_backward:
            raise RuntimeError(
                "A reused activation module with one LearnableELU per call site (PerCallSite) ran during backward "
                "without its parent module being called: activation checkpointing recomputes part of a forward (or "
                "calls parent.forward directly, which skips the parent's hooks), and which call site this is cannot "
                "be known there (its gradient would go to another site's alpha). Checkpoint the parent through its "
                "call (checkpoint(parent, x), not checkpoint(parent.forward, x)), give each call site its own "
                "activation module, or swap with replacement='ELU'."
            )
        index = self.next_site
        self.next_site = (index + 1) % len(self.sites)
        return self.sites[index](x)


class _ResetCallSites:
    """Forward pre-hook of a parent: its :class:`PerCallSite` children restart at site 0 (a class, so picklable)."""

    def __init__(self, names: tuple[str, ...]) -> None:
        self.names = names

    def __call__(self, module: nn.Module, args: Any) -> None:
        for name in self.names:
            child = module._modules.get(name)
            if isinstance(child, PerCallSite):
                child.next_site = 0
                child.reset_in_backward = _graph_task_id()


class _LeafTracer(fx.Tracer):
    """Traces one module's own forward: every submodule call stays a ``call_module`` node."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return True


def _count_child_calls(parent: nn.Module) -> dict[str, int] | None:
    """How often ``parent.forward`` calls each direct child, or None when torch.fx cannot trace it."""
    if isinstance(parent, nn.Sequential) and type(parent).forward is nn.Sequential.forward:
        return dict.fromkeys(parent._modules, 1)
    # Tracing runs forward with proxies; undo attribute assignments a forward may make (caches of activations).
    saved = dict(parent.__dict__)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            graph = _LeafTracer().trace(parent)
    except Exception:
        return None
    finally:
        parent.__dict__.clear()
        parent.__dict__.update(saved)
    counts: dict[str, int] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            counts[node.target] = counts.get(node.target, 0) + 1
    return counts


def _make_replacement(config: SwapConfig, original: nn.Module) -> nn.Module:
    inplace = config.inplace and bool(getattr(original, "inplace", False))
    if config.replacement == "LearnableELU":
        return LearnableELU(config.alpha, inplace=inplace)
    if config.replacement == "CELU":
        return _GuardedCELU(config.alpha) if inplace else nn.CELU(config.alpha)
    return _GuardedELU(config.alpha) if inplace else nn.ELU(config.alpha)


class _RerouteMode(TorchFunctionMode):
    """Active during a forward of a swapped model; hands the targets' functional calls to the router."""

    def __init__(self, router: _FunctionalRouter) -> None:
        super().__init__()
        self.router = router

    def __torch_function__(
        self, func: Callable[..., Any], types: Any, args: tuple[Any, ...] = (), kwargs: dict[str, Any] | None = None
    ) -> Any:
        kwargs = kwargs or {}
        spec = self.router.functions.get(func)
        if spec is not None:
            out = self.router.handle(func, spec, args, kwargs)
            if out is not None:
                return out
        return func(*args, **kwargs)


class _FunctionalRouter:
    """State shared by the scope hooks and the mode: which calls to reroute, and counters for the report.

    Each hooked module pushes (module id, name, selected) when its forward starts and pops it when it ends; the mode
    is on torch's stack while this per-thread stack is non-empty, and the top entry says whether the code now
    running belongs to a module that ``include``/``exclude`` select.
    """

    def __init__(self, config: SwapConfig) -> None:
        self.mode = config.functional
        self.alpha = config.alpha
        self.celu = config.replacement == "CELU"
        self.targets = config.targets
        self.functions = self._functions(self.targets)
        self.total_calls = 0
        self.owners: set[str] = set()
        self.quiet = False  # the Lightning callback reports on rank zero itself
        self._warned = False
        # modules whose forward calls a function that dynamo does not dispatch to this mode (see _compile_blind)
        self.compile_blind: list[str] = []
        self._compile_warned = False
        self._local = threading.local()

    @staticmethod
    def _functions(targets: tuple[str, ...]) -> dict[Callable[..., Any], _FunctionalSpec]:
        functions: dict[Callable[..., Any], _FunctionalSpec] = {}
        for name in targets:
            functions.update(_FUNCTIONAL.get(name, {}))
        return functions

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        del state["_local"]  # per-thread, per-forward state: meaningless in a copy
        del state["functions"]  # torch.ops operators cannot be pickled: rebuilt from the targets
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self.functions = self._functions(self.targets)
        self._local = threading.local()

    def _stack(self) -> list[tuple[int, str, bool]]:
        local = self._local
        if not hasattr(local, "stack"):
            local.stack, local.mode = [], None
        return local.stack

    def enter(self, module: nn.Module, name: str, selected: bool) -> None:
        stack = self._stack()
        if any(entry[0] == id(module) for entry in stack):
            self._drop_stale()  # a module never re-enters itself: a KeyboardInterrupt skipped the exit hooks
            stack = self._stack()
        if not stack:
            self._local.mode = _RerouteMode(self).__enter__()
            if self.compile_blind and not self._compile_warned and torch.compiler.is_compiling():
                self._compile_warned = True
                warnings.warn(
                    f"torch.compile: the forward of {self.compile_blind[:5]} calls torch.relu_ / F.relu_ / "
                    "F.leaky_relu_, which dynamo does not dispatch to the TorchFunctionMode that reroutes functional "
                    "calls: in the compiled model they stay ReLU (eager is correct). Write F.relu(x, inplace=True) "
                    "or x.relu_() there instead.",
                    stacklevel=2,
                )
        stack.append((id(module), name, selected))

    def exit(self, module: nn.Module) -> None:
        stack = self._stack()
        ids = [entry[0] for entry in stack]
        if id(module) not in ids:
            return  # its pre-hook never ran (an earlier pre-hook raised)
        del stack[ids.index(id(module)) :]
        if not stack:
            self._local.mode.__exit__(None, None, None)
            self._local.mode = None

    def _drop_stale(self) -> None:
        mode = self._local.mode
        modes = torch.overrides._get_current_function_mode_stack()
        if mode is not None and modes and modes[-1] is mode:
            mode.__exit__(None, None, None)
        self._local.stack, self._local.mode = [], None

    def handle(
        self, func: Callable[..., Any], spec: _FunctionalSpec, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Tensor | None:
        """The replacement's output, or None to run ``func`` unchanged."""
        stack = self._stack()
        if not stack or not stack[-1][2]:
            return None
        owner = stack[-1][1]
        compiling = torch.compiler.is_compiling()
        if not compiling:  # dynamo would guard on the counters' values and recompile on every call
            self.total_calls += 1
            self.owners.add(owner)
        if self.mode == "warn":
            if not self._warned and not self.quiet and not compiling:
                self._warned = True
                warnings.warn(
                    f"functional {getattr(func, '__name__', func)} in module {owner or '<root>'!r} left unchanged "
                    "(functional='warn'); use functional='rewrite' to replace it too",
                    stacklevel=2,
                )
            return None
        x = args[0] if args else kwargs.get("input", kwargs.get("self"))
        if "inplace" in kwargs:
            inplace = bool(kwargs["inplace"])
        else:
            pos = spec.inplace_arg
            inplace = spec.always_inplace or (pos is not None and len(args) > pos and bool(args[pos]))
        # An in-place call keeps its contract (callers may ignore the return value) wherever autograd allows;
        # where the producer saved x for backward (sigmoid, tanh...) the original call could not train either,
        # and the returned out-of-place result is the one that can.
        inplace = inplace and _inplace_is_safe(x)
        if self.celu:
            return F.celu(x, self.alpha, inplace=inplace)
        return F.elu(x, self.alpha, inplace=inplace)


class _EnterScope:
    """Forward pre-hook: the module's forward begins (a class, so models stay picklable)."""

    def __init__(self, router: _FunctionalRouter, name: str, selected: bool) -> None:
        self.router, self.name, self.selected = router, name, selected

    def __call__(self, module: nn.Module, args: Any) -> None:
        self.router.enter(module, self.name, self.selected)


class _ExitScope:
    """Forward hook, registered with ``always_call=True`` so an exception in forward still closes the scope."""

    def __init__(self, router: _FunctionalRouter) -> None:
        self.router = router

    def __call__(self, module: nn.Module, args: Any, output: Any) -> None:
        self.router.exit(module)


_OWN_TYPES = (PerCallSite, LearnableELU)


def _may_call_functional(module: nn.Module) -> bool:
    """Whether the module's own forward code might call a functional activation."""
    if isinstance(module, _OWN_TYPES):
        return False
    origin = type(module).__module__
    # torch's layers never do, except the transformer layers (activation="relu" stores F.relu).
    return not origin.startswith("torch.nn.modules.") or origin.startswith("torch.nn.modules.transformer")


def _remove_hooks(root: nn.Module, hook_types: tuple[type, ...]) -> None:
    for module in root.modules():
        for hooks in (module._forward_pre_hooks, module._forward_hooks):
            for key in [k for k, hook in hooks.items() if isinstance(hook, hook_types)]:
                del hooks[key]
                module._forward_hooks_always_called.pop(key, None)


@functools.cache
def _overridable() -> frozenset[Callable[..., Any]]:
    return frozenset(f for fs in torch.overrides.get_overridable_functions().values() for f in fs)


def _code_objects(code: types.CodeType) -> list[types.CodeType]:
    nested = [c for c in code.co_consts if isinstance(c, types.CodeType)]
    return [code, *(inner for c in nested for inner in _code_objects(c))]


def _compile_blind(module_type: type, functions: Sequence[Callable[..., Any]]) -> bool:
    """Whether ``module_type.forward`` names one of ``functions`` (``torch.relu_``, ``F.relu_``, ``relu_``).

    Dynamo only dispatches functions of ``torch.overrides.get_overridable_functions()`` to a TorchFunctionMode
    entered inside a compiled region; ``torch.relu_`` and ``F.leaky_relu_`` are not among them, so under
    torch.compile they escape the reroute. Best effort: code that the forward calls indirectly is not inspected.
    """
    forward = getattr(module_type, "forward", None)
    if not isinstance(forward, types.FunctionType):
        return False
    scope = forward.__globals__
    for code in _code_objects(forward.__code__):
        previous = None
        for ins in dis.get_instructions(code):
            if ins.opname == "LOAD_GLOBAL" and any(scope.get(ins.argval) is f for f in functions):
                return True  # from torch import relu_
            if ins.opname in ("LOAD_ATTR", "LOAD_METHOD") and previous is not None and previous.opname == "LOAD_GLOBAL":
                owner = scope.get(previous.argval)
                if owner is not None and any(getattr(owner, ins.argval, None) is f for f in functions):
                    return True  # torch.relu_, F.relu_
            previous = ins
    return False


def _install_scope_hooks(root: nn.Module, config: SwapConfig, router: _FunctionalRouter) -> None:
    # Every module whose forward may hold a functional call is hooked, not only the root: Lightning's training_step
    # often calls a submodule (self.backbone(x)) without going through the root's forward.
    _remove_hooks(root, (_EnterScope, _ExitScope))
    blind_functions = [f for f in router.functions if f not in _overridable()]
    router.compile_blind = []
    target_types = tuple(TARGET_TYPES[t] for t in config.targets)
    for name, module in root.named_modules():
        # A subclass of a target type is not swapped (exact types match), so neither is the functional call its
        # inherited forward makes (nn.ReLU.forward calls F.relu): it stays the activation it reports.
        subclass = isinstance(module, target_types) and type(module) not in target_types
        selected = config.selects(name) and not subclass
        parent_selected = config.selects(name.rpartition(".")[0])
        may_call = _may_call_functional(module)
        if module is root or selected != parent_selected or may_call:
            module.register_forward_pre_hook(_EnterScope(router, name, selected), prepend=True)
            module.register_forward_hook(_ExitScope(router), always_call=True)
        if selected and may_call and router.mode == "rewrite" and _compile_blind(type(module), blind_functions):
            router.compile_blind.append(name)


@dataclass
class SwapReport:
    """What :func:`swap_activations` changed, cumulative over repeated calls on the same model.

    Attributes:
        config: the settings used.
        modules: qualified names of the swapped module references.
        call_sites: per swapped reference, how many call sites got their own replacement (> 1 for reused modules).
        untraced: references whose reuse could not be counted (their parent's forward cannot be traced by
            torch.fx); each got one replacement shared by all its calls, as the original was shared.
        skipped: target modules left alone by ``include``/``exclude``.
        new_parameters: parameters the replacements created (``LearnableELU``).

    Example:
        >>> model = nn.Sequential(nn.Linear(2, 2), nn.ReLU())
        >>> print(swap_activations(model).summary())
        swapped 1 module(s) (1 call site(s)) to ELU; functional calls rerouted so far: 0
    """

    config: SwapConfig
    modules: list[str] = field(default_factory=list)
    call_sites: dict[str, int] = field(default_factory=dict)
    untraced: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    new_parameters: list[str] = field(default_factory=list)
    _router: _FunctionalRouter | None = field(default=None, repr=False, compare=False)

    @property
    def num_modules(self) -> int:
        """Number of module references swapped."""
        return len(self.modules)

    @property
    def num_call_sites(self) -> int:
        """Number of module call sites, each with its own replacement."""
        return sum(self.call_sites.values())

    @property
    def functional_calls(self) -> int | None:
        """Functional calls seen so far in selected modules (rerouted, or warned about); None if not watched."""
        return None if self._router is None else self._router.total_calls

    @property
    def compile_blind(self) -> list[str]:
        """Modules whose forward calls ``torch.relu_``/``F.relu_``/``F.leaky_relu_``: not rerouted under
        torch.compile (a dynamo limitation; eager is correct). A warning is raised when such a model is compiled."""
        return [] if self._router is None else list(self._router.compile_blind)

    @property
    def functional_owners(self) -> list[str]:
        """Qualified names of the modules whose forward made those calls (``""`` is the root)."""
        return [] if self._router is None else sorted(self._router.owners)

    def summary(self) -> str:
        """One line for logs."""
        text = f"swapped {self.num_modules} module(s) ({self.num_call_sites} call site(s)) to {self.config.replacement}"
        if self._router is not None:
            verb = "rerouted" if self.config.functional == "rewrite" else "seen, left as is"
            text += f"; functional calls {verb} so far: {self._router.total_calls}"
        if self.compile_blind:
            text += f"; {len(self.compile_blind)} module(s) call torch.relu_/F.relu_, not rerouted under torch.compile"
        if self.untraced:
            text += f"; reuse not countable (untraceable parent) for {len(self.untraced)}"
        if self.skipped:
            text += f"; {len(self.skipped)} left alone by include/exclude"
        return text

    def to_record(self) -> dict[str, Any]:
        """The checkpoint record: the settings plus counts, plain types only.

        Example:
            >>> SwapReport(SwapConfig()).to_record()["replacement"]
            'ELU'
        """
        return {"version": _RECORD_VERSION, **self.config.to_dict(), "modules": self.num_modules}


@dataclass
class _SwapRecord:
    config: SwapConfig
    report: SwapReport
    router: _FunctionalRouter | None
    # (parent, attribute, original, replacement) for restore_activations
    swaps: list[tuple[nn.Module, str, nn.Module, nn.Module]] = field(default_factory=list)
    hooked_tree: tuple[tuple[str, int], ...] = ()  # (name, id) of the modules when scope hooks were installed


def _float_device_dtype(module: nn.Module) -> tuple[torch.device | None, torch.dtype | None]:
    for tensor in (*module.parameters(), *module.buffers()):
        if tensor.is_floating_point():
            return tensor.device, tensor.dtype
    return None, None


def _swap_modules(root: nn.Module, config: SwapConfig, record: _SwapRecord) -> None:
    report = record.report
    target_types = tuple(TARGET_TYPES[name] for name in config.targets)
    report.skipped.clear()
    device, dtype = _float_device_dtype(root)
    for parent_name, parent in list(root.named_modules()):
        refs: dict[int, list[str]] = {}
        for attr, child in parent._modules.items():
            if child is not None and type(child) in target_types:
                refs.setdefault(id(child), []).append(attr)
        if not refs:
            continue
        counts: dict[str, int] | None = None
        traced = False
        reused: list[str] = []
        for attrs in refs.values():
            for attr in attrs:
                name = f"{parent_name}.{attr}" if parent_name else attr
                if not config.selects(name):
                    report.skipped.append(name)
                    continue
                original = parent._modules[attr]
                sites = 1
                # One instance under several names of one parent (a Sequential listing it twice): one site per name.
                if len(attrs) == 1:
                    if not traced:
                        counts, traced = _count_child_calls(parent), True
                    if counts is None:
                        report.untraced.append(name)
                    else:
                        sites = max(1, counts.get(attr, 0))
                replacements = [_make_replacement(config, original) for _ in range(sites)]
                new = replacements[0] if sites == 1 else PerCallSite(replacements)
                if device is not None:
                    new.to(device=device, dtype=dtype)
                if sites > 1:
                    reused.append(attr)
                parent._modules[attr] = new
                record.swaps.append((parent, attr, original, new))
                report.modules.append(name)
                report.call_sites[name] = sites
                report.new_parameters.extend(f"{name}.{p}" for p, _ in new.named_parameters())
        if reused:
            names = tuple(reused)
            for key, hook in list(parent._forward_pre_hooks.items()):
                if isinstance(hook, _ResetCallSites):  # a repeat swap found more reused children: merge
                    names += hook.names
                    del parent._forward_pre_hooks[key]
            parent.register_forward_pre_hook(_ResetCallSites(names))


def swap_activations(
    module: nn.Module,
    *,
    alpha: float = 1.0,
    targets: str | Sequence[str] = ("ReLU",),
    replacement: str = "ELU",
    include: str | Sequence[str] | None = None,
    exclude: str | Sequence[str] | None = None,
    functional: str = "rewrite",
    inplace: bool = True,
    quiet: bool = False,
) -> SwapReport:
    """Replace the ``targets`` activations of ``module`` by ``replacement`` (ELU), in place; see :class:`SwapConfig`.

    Idempotent: a repeat call with the same settings swaps only target modules created since (a Lightning
    ``configure_model``) and returns the cumulative report; different settings raise ``ValueError`` (undo first
    with :func:`restore_activations`). Parameter-free replacements leave ``state_dict`` keys unchanged. Functional
    calls are rerouted while a forward of ``module`` or any of its submodules runs (train, eval, no_grad alike);
    calls made outside any forward (directly in a ``training_step``) are not seen.

    ``quiet=True`` silences the ``functional="warn"`` warning, for callers that report themselves.

    Returns:
        the :class:`SwapReport`; functional calls are counted as forwards run.

    Example:
        >>> class Net(nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.fc, self.act = nn.Linear(2, 2), nn.ReLU()
        ...     def forward(self, x):
        ...         return torch.relu(self.act(self.fc(x)) - 1.0)  # the module, then a functional call
        >>> net = Net()
        >>> report = swap_activations(net, alpha=1.0)
        >>> net.act, report.num_modules
        (ELU(alpha=1.0), 1)
        >>> bool((net(torch.randn(3, 2)) < 0).any()), report.functional_calls
        (True, 1)
    """
    config = SwapConfig(alpha, targets, replacement, include, exclude, functional, inplace)  # type: ignore[arg-type]
    record: _SwapRecord | None = module.__dict__.get(_RECORD_ATTR)
    if record is not None and record.config != config:
        raise ValueError(
            f"module was already swapped with {record.config}; call restore_activations(module) before swapping "
            f"with {config}"
        )
    if record is None:
        for name, sub in module.named_modules():
            if sub is not module and _RECORD_ATTR in sub.__dict__:
                raise ValueError(f"submodule {name!r} was already swapped; restore_activations it first")
        functions = any(name in _FUNCTIONAL for name in config.targets)
        router = _FunctionalRouter(config) if functional != "ignore" and functions else None
        record = _SwapRecord(config, SwapReport(config, _router=router), router)
        module.__dict__[_RECORD_ATTR] = record
    _swap_modules(module, config, record)
    if record.router is not None:
        record.router.quiet = quiet
        tree = tuple((name, id(sub)) for name, sub in module.named_modules())
        if tree != record.hooked_tree:  # repeat calls on an unchanged model leave the hooks alone
            _install_scope_hooks(module, config, record.router)
            record.hooked_tree = tree
    return record.report


def swap_report(module: nn.Module) -> SwapReport | None:
    """The report of the swap applied to ``module``, or None if it was not swapped.

    Example:
        >>> model = nn.Sequential(nn.ReLU())
        >>> swap_report(model) is None
        True
        >>> _ = swap_activations(model)
        >>> swap_report(model).num_modules
        1
    """
    record: _SwapRecord | None = module.__dict__.get(_RECORD_ATTR)
    return None if record is None else record.report


def restore_activations(module: nn.Module) -> bool:
    """Undo :func:`swap_activations`: put the original modules back and remove every hook it added.

    Returns:
        False if ``module`` was not swapped.

    Example:
        >>> model = nn.Sequential(nn.ReLU())
        >>> _ = swap_activations(model)
        >>> restore_activations(model), model[0]
        (True, ReLU())
    """
    record: _SwapRecord | None = module.__dict__.pop(_RECORD_ATTR, None)
    if record is None:
        return False
    for parent, attr, original, replacement in reversed(record.swaps):
        if parent._modules.get(attr) is replacement:  # leave references the user has changed since
            parent._modules[attr] = original
    _remove_hooks(module, (_EnterScope, _ExitScope, _ResetCallSites))
    return True


def read_swap_record(checkpoint_path_or_dict: str | PathLike[str] | Mapping[str, Any]) -> dict[str, Any]:
    """The swap record of a checkpoint file or dict (``checkpoint["lightning_scl"]["elu_swap"]``), or a record itself.

    Raises:
        ValueError: there is no record, or the file cannot be read with ``torch.load(weights_only=True)``.

    Example:
        >>> read_swap_record({"lightning_scl": {"elu_swap": {"alpha": 0.5}}})
        {'alpha': 0.5}
    """
    checkpoint = checkpoint_path_or_dict
    if not isinstance(checkpoint, Mapping):
        try:
            checkpoint = torch.load(checkpoint, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as err:
            raise ValueError(
                f"cannot read {checkpoint_path_or_dict} with weights_only=True ({err}); load it with torch.load "
                "yourself and pass the dict"
            ) from None
    section = checkpoint.get(CHECKPOINT_KEYS[0])
    if isinstance(section, Mapping) and isinstance(section.get(CHECKPOINT_KEYS[1]), Mapping):
        return dict(section[CHECKPOINT_KEYS[1]])
    if "alpha" in checkpoint and "state_dict" not in checkpoint:
        return dict(checkpoint)  # the record itself
    raise ValueError(
        "checkpoint has no activation swap record (checkpoint['lightning_scl']['elu_swap']): it was not saved with "
        "the ELUSwap callback; pass the settings as keyword arguments instead"
    )


def apply_elu(
    model: nn.Module,
    checkpoint_path_or_dict: str | PathLike[str] | Mapping[str, Any] | None = None,
    **kwargs: Any,
) -> SwapReport:
    """Swap ``model`` the way a checkpoint records (for inference after ``Model.load_from_checkpoint``).

    Args:
        model: the model, with or without weights loaded (parameter-free swaps keep ``state_dict`` keys, so
            order does not matter; with ``replacement="LearnableELU"`` swap first, then load the state dict).
        checkpoint_path_or_dict: a checkpoint file, a loaded checkpoint dict, or a record itself; None uses
            ``kwargs`` (the :func:`swap_activations` settings) alone.
        kwargs: settings that override the recorded ones.

    Raises:
        ValueError: the checkpoint holds no swap record.

    Example:
        >>> model = nn.Sequential(nn.Linear(2, 2), nn.ReLU())
        >>> checkpoint = {"state_dict": {}, "lightning_scl": {"elu_swap": {"alpha": 0.5, "targets": ["ReLU"]}}}
        >>> apply_elu(model, checkpoint).config.alpha, model[1]
        (0.5, ELU(alpha=0.5))
    """
    settings: dict[str, Any] = {}
    if checkpoint_path_or_dict is not None:
        settings = SwapConfig.from_dict(read_swap_record(checkpoint_path_or_dict)).to_dict()
    settings.update(kwargs)
    return swap_activations(model, **settings)
