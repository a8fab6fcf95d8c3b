"""Every notebook runs end to end on the embedded model (a notebook that raises fails the build)
and shows its figures and circuitsvis views; the committed notebooks are exactly what
``notebooks/_build.py`` writes; the executed copies the docs site renders (docs/tutorials/) have
the same cells and carry their pictures."""

from __future__ import annotations

import base64
import re
import shutil
from pathlib import Path

import nbformat
import pytest
from fakes import load_file
from nbclient import NotebookClient

ROOT = Path(__file__).parent.parent
NOTEBOOK_DIR = ROOT / "notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("*.ipynb"))
EXECUTED_DIR = ROOT / "docs" / "tutorials"
REGENERATE = "python notebooks/_build.py --execute --out docs/tutorials"

# what each notebook shows at least: (matplotlib figures as image/png, circuitsvis views)
SHOWS = {
    "01_steering_and_ablation": (2, 1),  # steering curve, the two sides; projections per token
    "02_lora_scalars_and_probes": (2, 1),  # both probes' coefficients; scalars per token (view)
    "03_adapter_attribution": (2, 0),  # attribution bars, gradient vs ablation
    "04_narrow_vs_general": (3, 0),  # efficiency, stability, trajectory cosines
    "05_training_dynamics": (3, 0),  # B dynamics of the organism and of the control, PCA
}
MAX_BYTES = 1_600_000  # a circuitsvis view rendered offline inlines its ~1.3 MB script; one per notebook

# circuitsvis renders `<div id="circuits-vis-<id>" .../>` and a module script that renders into
# that id: `CircuitsVis.render("<id>", ...)` (inline bundle) or `render("<id>", ...)` (from unpkg)
_VIEW_DIV = re.compile(r'<div id="(circuits-vis-[0-9a-f-]+)"')


def is_view(html: str) -> bool:
    m = _VIEW_DIV.search(html)
    return bool(m) and "<script" in html and re.search(
        r'render\(\s*"' + re.escape(m.group(1)) + '"', html) is not None


def shown(nb) -> tuple[int, int]:
    """(PNG images, circuitsvis views) among the displayed outputs (printed text does not count)."""
    pngs = views = 0
    for c in nb.cells:
        for o in c.get("outputs", []) if c.cell_type == "code" else []:
            data = o.get("data", {})
            if "image/png" in data and base64.b64decode(data["image/png"]).startswith(b"\x89PNG"):
                pngs += 1
            html = data.get("text/html", "")
            views += is_view("".join(html) if isinstance(html, list) else html)
    return pngs, views


def printed(nb) -> str:
    return "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs)


def sources(nb) -> list[tuple[str, str]]:
    return [(c.cell_type, c.source) for c in nb.cells]


def test_notebooks_exist():
    assert len(NOTEBOOKS) >= 1
    assert sorted(SHOWS) == [p.stem for p in NOTEBOOKS]


def test_notebooks_are_stored_without_outputs():
    for path in NOTEBOOKS:
        nb = nbformat.read(path, as_version=4)
        assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code"), path.name


def test_notebooks_match_their_build_script(tmp_path):
    """``python notebooks/_build.py`` leaves the committed notebooks unchanged (rebuilt in a copy:
    the script reuses the ids of unchanged cells, so an unchanged notebook is byte-identical)."""
    build = load_file(NOTEBOOK_DIR / "_build.py")
    assert sorted(build.NOTEBOOKS) == [p.name for p in NOTEBOOKS]
    for path in NOTEBOOKS:
        shutil.copy(path, tmp_path / path.name)
    build.main(["--out", str(tmp_path)])
    for path in NOTEBOOKS:
        built = nbformat.read(tmp_path / path.name, as_version=4)
        committed = nbformat.read(path, as_version=4)
        assert sources(built) == sources(committed), (
            f"{path.name} differs from notebooks/_build.py; rerun: python notebooks/_build.py")
        assert (tmp_path / path.name).read_bytes() == path.read_bytes(), path.name


def test_no_notebook_hides_its_figures():
    """No Agg backend (figures would not show inline) and no view reduced to its length."""
    for path in NOTEBOOKS:
        code = "\n".join(c.source for c in nbformat.read(path, as_version=4).cells
                         if c.cell_type == "code")
        assert "Agg" not in code, path.name
        assert "characters of HTML" not in code and "len(str(view" not in code, path.name


def test_executed_copies_have_the_notebooks_cells():
    """docs/tutorials/ holds executed copies (files, not links) with the notebooks' cells."""
    assert sorted(p.name for p in EXECUTED_DIR.glob("*.ipynb")) == [p.name for p in NOTEBOOKS]
    for path in NOTEBOOKS:
        copy = EXECUTED_DIR / path.name
        assert copy.is_file() and not copy.is_symlink(), f"{copy} must be a file; {REGENERATE}"
        stripped = nbformat.read(path, as_version=4)
        executed = nbformat.read(copy, as_version=4)
        assert sources(executed) == sources(stripped), (
            f"docs/tutorials/{path.name} has other cells than notebooks/{path.name}; rerun: "
            f"{REGENERATE}")
        assert [c.get("id") for c in executed.cells] == [c.get("id") for c in stripped.cells], (
            f"docs/tutorials/{path.name}: cell ids differ; rerun: {REGENERATE}")


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_executed_copy_shows_its_figures_and_views(path):
    copy = EXECUTED_DIR / path.name
    nb = nbformat.read(copy, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(c.execution_count for c in code), f"{copy.name} is not fully executed; {REGENERATE}"
    assert not [o for c in code for o in c.outputs if o.output_type == "error"], copy.name
    pngs, views = shown(nb)
    want_pngs, want_views = SHOWS[path.stem]
    assert pngs >= want_pngs, f"{copy.name}: {pngs} figures (image/png), expected >= {want_pngs}"
    assert views >= want_views, f"{copy.name}: {views} circuitsvis views, expected >= {want_views}"
    assert "characters of HTML" not in printed(nb)
    text = copy.read_text()
    assert str(ROOT.resolve()) not in text and str(ROOT) not in text, (
        f"{copy.name} stores an absolute path of this checkout")
    assert copy.stat().st_size < MAX_BYTES, f"{copy.name}: {copy.stat().st_size} bytes"


def test_the_counts_see_displayed_outputs_only():
    """``shown`` counts displayed PNGs and views, not printed HTML or a stripped notebook."""
    view = ('<div id="circuits-vis-1234abcd-5678" style="margin: 15px 0;"/>\n<script crossorigin '
            'type="module">\nCircuitsVis.render(\n  "circuits-vis-1234abcd-5678",\n  '
            'CircuitsVis.ColoredTokensMulti, {})\n</script>')
    png = base64.b64encode(b"\x89PNG\r\n\x1a\n" + b"\0" * 16).decode()
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell("x")]
    assert shown(nb) == (0, 0)
    nb.cells[0].outputs = [nbformat.v4.new_output("stream", name="stdout", text=view)]
    assert shown(nb) == (0, 0)
    nb.cells[0].outputs = [
        nbformat.v4.new_output("display_data", data={"text/plain": "<Figure>", "image/png": png}),
        nbformat.v4.new_output("execute_result", data={"text/html": view}, execution_count=1),
        nbformat.v4.new_output("display_data", data={"text/html": view.replace("render(", "x(")}),
    ]
    assert shown(nb) == (1, 1)
    stripped = nbformat.read(NOTEBOOKS[0], as_version=4)
    assert shown(stripped) == (0, 0)


@pytest.mark.integration
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_executes(path):
    nb = nbformat.read(path, as_version=4)
    NotebookClient(nb, timeout=900, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}}).execute()
    assert printed(nb).strip(), f"{path.name} printed nothing"
    assert "characters of HTML" not in printed(nb)
    pngs, views = shown(nb)
    want_pngs, want_views = SHOWS[path.stem]
    assert pngs >= want_pngs, f"{path.name}: {pngs} figures shown (image/png), expected >= {want_pngs}"
    assert views >= want_views, f"{path.name}: {views} circuitsvis views shown, expected >= {want_views}"
