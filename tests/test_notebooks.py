"""Every notebook runs end to end on the embedded model (a notebook that raises fails the build),
and the committed notebooks are exactly what ``notebooks/_build.py`` writes."""

from __future__ import annotations

import shutil
from pathlib import Path

import nbformat
import pytest
from fakes import load_file
from nbclient import NotebookClient

NOTEBOOK_DIR = Path(__file__).parent.parent / "notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("*.ipynb"))


def test_notebooks_exist():
    assert len(NOTEBOOKS) >= 1


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
        sources = lambda nb: [(c.cell_type, c.source) for c in nb.cells]  # noqa: E731
        assert sources(built) == sources(committed), (
            f"{path.name} differs from notebooks/_build.py; rerun: python notebooks/_build.py")
        assert (tmp_path / path.name).read_bytes() == path.read_bytes(), path.name


@pytest.mark.integration
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_executes(path):
    nb = nbformat.read(path, as_version=4)
    NotebookClient(nb, timeout=900, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}}).execute()
    printed = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs)
    assert printed.strip(), f"{path.name} printed nothing"
