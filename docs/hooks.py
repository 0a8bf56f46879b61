"""MkDocs hooks: publish ``benchmarks/results/`` with the site straight from the repository (no copies to drift).

- Every plot and raw result file there (PNG, SVG, JSON, CSV) becomes part of the site under ``benchmarks/results/``,
  so ``docs/benchmarks.md`` shows a plot with ``![...](benchmarks/results/<name>.png)``. Links are checked like any
  other in strict mode: referencing a plot that is not committed fails the build.
- Result tables (``.md``) are included into pages with ``pymdownx.snippets`` (``--8<-- "benchmarks/results/x.md"``).
  The scripts write each table as a document with a ``#`` title; inside a page that title must be a section, so the
  headings of every included ``benchmarks/results/*.md`` file are demoted one level (``#`` becomes ``##``).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from markdown import Extension, Markdown
from markdown.preprocessors import Preprocessor
from mkdocs.structure.files import File, Files

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
PUBLISHED = {".png", ".svg", ".json", ".jsonl", ".csv"}  # tables (.md) are included into pages by snippets

_RESULT_INCLUDE = re.compile(r'^\s*--8<--\s+"benchmarks/results/[^"]+\.md(?::[-0-9:,]*)?"\s*$')
_START, _END = "<!-- lightning-scl:demote -->", "<!-- /lightning-scl:demote -->"
_HEADING = re.compile(r"^(#{1,5})(?=\s)")
_SNIPPETS_PRIORITY = 32  # pymdownx.snippets' preprocessor


class _MarkResultIncludes(Preprocessor):
    """Before snippets run: fence every block include of a result table with markers."""

    def run(self, lines: list[str]) -> list[str]:
        out = []
        for line in lines:
            if _RESULT_INCLUDE.match(line):
                out.extend([_START, line, _END])
            else:
                out.append(line)
        return out


class _DemoteMarked(Preprocessor):
    """After snippets ran: demote the headings between the markers, drop the markers."""

    def run(self, lines: list[str]) -> list[str]:
        out, inside, in_code = [], False, False
        for line in lines:
            if line == _START:
                inside = True
                continue
            if line == _END:
                inside = False
                continue
            if inside:
                if line.lstrip().startswith(("```", "~~~")):
                    in_code = not in_code
                elif not in_code:
                    line = _HEADING.sub(r"#\1", line)
            out.append(line)
        return out


class ResultTables(Extension):
    """Demote the headings of included ``benchmarks/results/*.md`` tables (see the module docstring)."""

    def extendMarkdown(self, md: Markdown) -> None:
        md.preprocessors.register(_MarkResultIncludes(md), "lightning_scl_mark_results", _SNIPPETS_PRIORITY + 1)
        md.preprocessors.register(_DemoteMarked(md), "lightning_scl_demote_results", _SNIPPETS_PRIORITY - 1)


def on_config(config: Any, **kwargs: Any) -> Any:
    config.markdown_extensions.append(ResultTables())
    return config


def on_files(files: Files, config: Any, **kwargs: Any) -> Files:
    if not RESULTS.is_dir():
        return files
    for path in sorted(RESULTS.iterdir()):
        if path.is_file() and path.suffix in PUBLISHED:
            files.append(File.generated(config, f"benchmarks/results/{path.name}", abs_src_path=str(path)))
    return files
