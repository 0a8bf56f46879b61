"""Which layers get connectivity masks: layer types and fully-qualified-name patterns, all plain strings.

Strings (not callables) keep every choice expressible in a LightningCLI YAML file.

Patterns are shell-style globs matched against the layer's qualified name (``"features.*"``, ``"*fc*"``), or
regular expressions when prefixed with ``re:`` (``"re:^layer[12]\\."``), matched with ``re.search``.

Example:
    >>> from torch import nn
    >>> net = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8, 2))
    >>> [name for name, _ in select_layers(net)]
    ['0', '3']
    >>> [name for name, _ in select_layers(net, layer_types=("Linear",))]
    ['3']
    >>> [name for name, _ in select_layers(net, exclude=("3",))]
    ['0']
"""

from __future__ import annotations

import fnmatch
import importlib
import re
import warnings
from collections.abc import Sequence

from torch import nn
from torch.nn.utils import parametrize

__all__ = ["DEFAULT_LAYER_TYPES", "resolve_layer_types", "select_layers", "validate_patterns"]

DEFAULT_LAYER_TYPES: tuple[str, ...] = (
    "Linear",
    "Conv1d",
    "Conv2d",
    "Conv3d",
    "ConvTranspose1d",
    "ConvTranspose2d",
    "ConvTranspose3d",
)


def resolve_layer_types(names: Sequence[str]) -> tuple[type[nn.Module], ...]:
    """Turn layer type names into classes: ``"Linear"`` (from ``torch.nn``) or a dotted path ``"pkg.mod.Layer"``.

    Example:
        >>> resolve_layer_types(["Linear", "torch.nn.Conv2d"])
        (<class 'torch.nn.modules.linear.Linear'>, <class 'torch.nn.modules.conv.Conv2d'>)
    """
    if isinstance(names, str):
        names = (names,)
    classes = []
    for name in names:
        if not isinstance(name, str):
            raise ValueError(f"layer_types must be strings such as 'Linear' or 'my_pkg.MyLayer', got {name!r}")
        cls = None
        if "." in name:
            module_name, _, attr = name.rpartition(".")
            try:
                cls = getattr(importlib.import_module(module_name), attr, None)
            except ImportError:
                cls = None
        else:
            cls = getattr(nn, name, None)
        if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
            raise ValueError(
                f"layer_types: {name!r} is not a torch.nn layer class. Use a name from torch.nn "
                f"(default {list(DEFAULT_LAYER_TYPES)}) or an importable dotted path such as 'my_pkg.MyLayer'."
            )
        classes.append(cls)
    return tuple(classes)


def validate_patterns(patterns: Sequence[str] | None, argument: str) -> tuple[str, ...]:
    """Check that every pattern is a string and every ``re:`` pattern compiles; returns them as a tuple.

    Example:
        >>> validate_patterns("fc*", "include")
        ('fc*',)
        >>> validate_patterns(["re:("], "exclude")
        Traceback (most recent call last):
        ...
        ValueError: exclude: 're:(' is not a valid regular expression ...
    """
    if patterns is None:
        return ()
    if isinstance(patterns, str):
        patterns = (patterns,)
    out = []
    for pattern in patterns:
        if not isinstance(pattern, str) or not pattern:
            raise ValueError(
                f"{argument}: patterns must be non-empty strings (globs like 'features.*' or 're:<regex>'), "
                f"got {pattern!r}"
            )
        if pattern.startswith("re:"):
            try:
                re.compile(pattern[3:])
            except re.error as err:
                raise ValueError(
                    f"{argument}: {pattern!r} is not a valid regular expression ({err}). "
                    "Fix the expression, or drop the 're:' prefix to use a glob."
                ) from err
        out.append(pattern)
    return tuple(out)


def _matches(name: str, pattern: str) -> bool:
    if pattern.startswith("re:"):
        return re.search(pattern[3:], name) is not None
    return fnmatch.fnmatchcase(name, pattern)


def select_layers(
    module: nn.Module,
    layer_types: Sequence[str] = DEFAULT_LAYER_TYPES,
    include: Sequence[str] | None = None,
    exclude: Sequence[str] | None = None,
) -> list[tuple[str, nn.Module]]:
    """Layers to mask: instances of ``layer_types`` whose name matches ``include`` (if given) and no ``exclude``.

    A module reachable under several names is listed once. Layers already carrying a mask are still listed
    (injection skips them). Raises ``ValueError`` listing the candidates when the selection is empty or when an
    ``include`` pattern matches no candidate (usually a typo); warns when an ``exclude`` pattern matches none.

    Example:
        >>> net = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2))
        >>> select_layers(net, include=("re:^1$",))
        [('1', Linear(in_features=2, out_features=2, bias=True))]
    """
    classes = resolve_layer_types(layer_types)
    include = validate_patterns(include, "include")
    exclude = validate_patterns(exclude, "exclude")
    candidates = []
    for name, sub in module.named_modules():
        if isinstance(sub, classes) and _has_weight(sub):
            candidates.append((name, sub))
    names = [name for name, _ in candidates]
    for pattern in include:
        if not any(_matches(name, pattern) for name in names):
            raise ValueError(
                f"include pattern {pattern!r} matches no maskable layer. Candidates: {names or 'none'}. "
                "Patterns are globs on qualified names (e.g. 'features.*') or 're:<regex>'."
            )
    for pattern in exclude:
        if not any(_matches(name, pattern) for name in names):
            # a warning, not an error: one recipe's exclude list may serve several architectures
            warnings.warn(
                f"exclude pattern {pattern!r} matches no maskable layer, so it excludes nothing. Candidates: "
                f"{names or 'none'}. Patterns are globs on qualified names (e.g. 'classifier.*') or 're:<regex>'.",
                stacklevel=2,
            )
    selected = [
        (name, sub)
        for name, sub in candidates
        if (not include or any(_matches(name, p) for p in include)) and not any(_matches(name, p) for p in exclude)
    ]
    if not selected:
        raise ValueError(
            f"No layer selected for masking (layer_types={list(layer_types)}, include={list(include)}, "
            f"exclude={list(exclude)}). Candidates of those types: {names or 'none'}. "
            "Widen layer_types or include, or narrow exclude."
        )
    return selected


def _has_weight(module: nn.Module) -> bool:
    if parametrize.is_parametrized(module, "weight"):
        return True
    weight = getattr(module, "weight", None)
    return isinstance(weight, nn.Parameter)
