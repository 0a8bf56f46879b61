"""Griffe extension: render the project's docstrings as mkdocstrings expects, without touching the sources.

The sources use Google style with two habits the Google parser does not know:

- an ``Example:`` section (singular): Griffe only treats ``Examples:`` as an examples section and would render
  ``Example:`` as an admonition, turning every ``>>>`` line into a nested block quote;
- Sphinx roles such as ``:class:`~pkg.Cls``` and ``:func:`name```: rendered here as inline code;
- one ``Args:`` entry for several parameters (``a, b: see X``): split into one entry per parameter, so Griffe
  still checks every documented name against the signature.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

_EXAMPLE_HEADER = re.compile(r"^(?P<indent>[ \t]*)Example:[ \t]*$", re.MULTILINE)
_SHARED_ARGS = re.compile(r"^(?P<indent>[ \t]+)(?P<names>\w+(?:, \w+)+): (?P<text>.*)$", re.MULTILINE)
_ROLE = re.compile(r":(?:class|func|meth|mod|data|attr|exc|obj|const):`(?P<tilde>~?)(?P<target>[^`]+)`")


def _role(match: re.Match[str]) -> str:
    target = match["target"].strip()
    if match["tilde"]:
        target = target.rsplit(".", 1)[-1]
    return f"`{target}`"


def _shared(match: re.Match[str]) -> str:
    return "\n".join(f"{match['indent']}{name}: {match['text']}" for name in match["names"].split(", "))


def rewrite(text: str) -> str:
    """Apply the rewrites to a docstring.

    Example:
        >>> rewrite("Use :class:`~a.b.C`.\\n\\nExample:\\n    >>> 1\\n    1")
        'Use `C`.\\n\\nExamples:\\n    >>> 1\\n    1'
        >>> print(rewrite("Args:\\n    a, b: see X."))
        Args:
            a: see X.
            b: see X.
    """
    text = _EXAMPLE_HEADER.sub(r"\g<indent>Examples:", text)
    return _SHARED_ARGS.sub(_shared, _ROLE.sub(_role, text))


class ProjectDocstrings(griffe.Extension):
    """Rewrite every docstring once its object is loaded (before it is parsed)."""

    def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = rewrite(obj.docstring.value)
