"""The documentation cannot drift: its examples run, its API reference covers the public API, its pages are wired.

- Every ```python block of ``docs/**/*.md`` runs, each in a fresh namespace and a temporary working directory. A block
  that cannot run in a test (it launches processes, say) is preceded by ``<!-- not-run: <reason> -->`` and reported as
  skipped with that reason. In ``README.md`` only the blocks preceded by ``<!-- runnable -->`` run (the others show
  code that needs your own model and data).
- Every name in ``lightning_scl.__all__`` is rendered by a ``::: <path>`` directive of ``docs/api/*.md`` and its
  docstring carries an example.
- Every page is in the nav and every nav entry exists; every snippet include and figure resolves; the figure script
  runs.
- With mkdocs installed, the site builds in strict mode (as CI does).
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import os
import re
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest

import lightning_scl

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
API = DOCS / "api"

_FENCE = re.compile(r"^(?P<indent>[ \t]*)(?P<fence>```+|~~~+)\s*(?P<lang>[\w+-]*)")
_RUNNABLE = "<!-- runnable -->"
_NOT_RUN = re.compile(r"^<!--\s*not-run:\s*(?P<reason>.+?)\s*-->$")


@dataclass
class Block:
    path: Path
    line: int  # 1-based line of the opening fence
    code: str
    marker: str  # the last non-blank line before the fence

    @property
    def id(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"


def python_blocks(path: Path) -> list[Block]:
    """The fenced ```python blocks of a Markdown file, with the line preceding each."""
    blocks, lines = [], path.read_text(encoding="utf-8").splitlines()
    i, previous = 0, ""
    while i < len(lines):
        match = _FENCE.match(lines[i])
        if match is None:
            if lines[i].strip():
                previous = lines[i].strip()
            i += 1
            continue
        indent, fence, lang = match["indent"], match["fence"], match["lang"]
        start, body = i, []
        i += 1
        while i < len(lines) and not lines[i].strip().startswith(fence):
            body.append(lines[i][len(indent) :] if lines[i].startswith(indent) else lines[i])
            i += 1
        i += 1  # the closing fence
        if lang in ("python", "py"):
            blocks.append(Block(path, start + 1, textwrap.dedent("\n".join(body)) + "\n", previous))
        previous = ""
    return blocks


def doc_pages() -> list[Path]:
    return sorted(p for p in DOCS.rglob("*.md") if "snippets" not in p.relative_to(DOCS).parts)


def _runnable_blocks() -> list:
    params = []
    for page in doc_pages():
        for block in python_blocks(page):
            not_run = _NOT_RUN.match(block.marker)
            marks = [pytest.mark.skip(reason=f"not-run: {not_run['reason']}")] if not_run else []
            params.append(pytest.param(block, id=block.id, marks=marks))
    readme = ROOT / "README.md"
    if readme.is_file():
        for block in python_blocks(readme):
            if block.marker == _RUNNABLE:
                params.append(pytest.param(block, id=block.id))
    return params


@pytest.mark.parametrize("block", _runnable_blocks())
def test_doc_example_runs(block: Block, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # examples write exports, checkpoints and reports into the working directory
    # Padding with the lines above the block makes tracebacks point at the right line of the Markdown file.
    code = compile("\n" * block.line + block.code, str(block.path), "exec")
    exec(code, {"__name__": "__docs_example__"})


def test_python_blocks_are_found() -> None:
    """The extractor sees the examples (a broken fence regex would make every example test vanish)."""
    blocks = [b for page in doc_pages() for b in python_blocks(page)]
    assert len(blocks) >= 10
    assert any("SparseConnectivityLearning" in b.code for b in blocks)


# ---------------------------------------------------------------------------------------------------- API reference


def _resolve(path: str) -> object:
    """Import ``a.b.c`` as a module, or the longest importable module prefix followed by attributes."""
    parts = path.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        for attr in parts[cut:]:
            obj = getattr(obj, attr)
        return obj
    raise ImportError(path)


def api_directives() -> dict[str, object]:
    directives = {}
    for page in sorted(API.glob("*.md")):
        for match in re.finditer(r"^:::\s*(\S+)", page.read_text(encoding="utf-8"), re.MULTILINE):
            directives[match[1]] = _resolve(match[1])
    return directives


def test_every_api_directive_resolves() -> None:
    assert api_directives()  # _resolve raises on a stale path


@pytest.mark.parametrize("name", lightning_scl.__all__)
def test_public_name_is_in_the_api_reference_with_an_example(name: str) -> None:
    obj = getattr(lightning_scl, name)
    if not (inspect.isclass(obj) or inspect.isfunction(obj)):
        text = "\n".join(p.read_text(encoding="utf-8") for p in API.glob("*.md"))
        assert name in text, f"{name} is not mentioned in docs/api/"
        return
    rendered = [path for path, target in api_directives().items() if target is obj]
    assert rendered, f"lightning_scl.{name} has no '::: ' directive in docs/api/*.md"
    doc = inspect.getdoc(obj) or ""
    assert "Example" in doc or ">>>" in doc, f"lightning_scl.{name}'s docstring has no example"


# ---------------------------------------------------------------------------------------------------- site wiring


def _nav_pages(node: object) -> list[str]:
    if isinstance(node, str):
        return [node] if node.endswith(".md") else []
    if isinstance(node, list):
        return [p for item in node for p in _nav_pages(item)]
    if isinstance(node, dict):
        return [p for value in node.values() for p in _nav_pages(value)]
    return []


def test_nav_and_pages_agree() -> None:
    yaml = pytest.importorskip("yaml")
    config = yaml.safe_load((ROOT / "mkdocs.yml").read_text(encoding="utf-8"))
    nav = _nav_pages(config["nav"])
    pages = [p.relative_to(DOCS).as_posix() for p in doc_pages()]
    assert sorted(nav) == sorted(set(nav)), "a page is listed twice in the nav"
    assert not set(nav) - set(pages), f"nav entries without a page: {sorted(set(nav) - set(pages))}"
    assert not set(pages) - set(nav), f"pages missing from the nav: {sorted(set(pages) - set(nav))}"


def test_snippet_includes_and_images_exist() -> None:
    for page in doc_pages():
        text = page.read_text(encoding="utf-8")
        for include in re.findall(r'--8<--\s+"([^"]+)"', text):
            path = re.sub(r"(:[-0-9,]*)+$", "", include)
            assert (ROOT / path).is_file(), f"{page.relative_to(ROOT)} includes missing {path}"
        for image in re.findall(r"!\[[^\]]*\]\(([^)\s]+)", text):
            target = (page.parent / image).resolve()
            if image.startswith("benchmarks/results/"):
                target = ROOT / image
            assert target.is_file(), f"{page.relative_to(ROOT)} shows missing image {image}"


def test_figure_script_runs(tmp_path: Path) -> None:
    spec = importlib.util.spec_from_file_location("make_figures", DOCS / "make_figures.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    written = module.main(tmp_path)
    assert [p.name for p in written] == list(module.FIGURES)
    for path in written:
        assert 0 < path.stat().st_size < 200_000, path
        assert (DOCS / "img" / path.name).is_file(), f"docs/img/{path.name} is not committed"


def test_griffe_extension_rewrites() -> None:
    spec = importlib.util.spec_from_file_location("griffe_docstrings", DOCS / "griffe_docstrings.py")
    module = importlib.util.module_from_spec(spec)
    pytest.importorskip("griffe")
    spec.loader.exec_module(module)
    assert (
        module.rewrite("See :func:`~a.b`.\n\nExample:\n    >>> 1\n    1") == "See `b`.\n\nExamples:\n    >>> 1\n    1"
    )
    assert module.rewrite("Args:\n    a, b: same.") == "Args:\n    a: same.\n    b: same."


def test_site_builds_strictly(tmp_path: Path) -> None:
    pytest.importorskip("mkdocs")
    pytest.importorskip("mkdocstrings")
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},  # silence Material's banner
    )
    assert result.returncode == 0, result.stderr[-4000:]
