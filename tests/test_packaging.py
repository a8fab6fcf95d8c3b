"""The wheel ships the built datasets and the final organisms only: no data sources, no build
script, no training trajectories (``checkpoints/`` live under ``emlens.organisms.runs_dir()``)."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent
PACKAGE = ROOT / "emlens"


def _package_files() -> set[str]:
    return {p.relative_to(ROOT).as_posix() for p in PACKAGE.rglob("*")
            if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".pyc"}


def test_the_package_holds_no_sources_or_trajectories():
    files = _package_files()
    assert not [f for f in files if "/checkpoints/" in f or "/resume/" in f]
    assert sorted(f for f in files if f.startswith("emlens/data/") and f.endswith(".py")) == [
        "emlens/data/__init__.py", "emlens/data/draws.py"]
    assert (ROOT / "data-src" / "_build.py").is_file()
    assert (ROOT / "runs" / "rank1-down-medical" / "checkpoints").is_dir()


@pytest.fixture(scope="module")
def wheel_files(tmp_path_factory) -> list[str]:
    """Build the wheel offline (``pip wheel --no-deps --no-build-isolation``) from a copy of the
    project with stray ``checkpoints/`` folders planted among the organisms, and list it."""
    pytest.importorskip("setuptools")
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    shutil.copytree(PACKAGE, src / "emlens", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    organisms = src / "emlens" / "organisms"
    for stray in (organisms / "rank1-down-medical" / "checkpoints" / "step-00001",
                  organisms / "narrow_vs_general" / "lora1" / "general" / "checkpoints" / "x"):
        stray.mkdir(parents=True)
        (stray / "adapter_config.json").write_text("{}")  # matches the organisms' *.json globs
        (stray / "adapter_model.safetensors").write_bytes(b"")
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
         "-q", "-w", str(tmp / "dist"), str(src)],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    (wheel,) = (tmp / "dist").glob("emlens-*.whl")
    return zipfile.ZipFile(wheel).namelist()


def test_wheel_ships_every_package_file_and_no_trajectories(wheel_files):
    shipped = {f for f in wheel_files if f.startswith("emlens/")}
    assert not [f for f in shipped if "checkpoints" in f or "_text_" in f or "_build" in f]
    assert shipped == _package_files()  # every dataset and final organism file, nothing else
    for must in ("emlens/data/medical.jsonl", "emlens/data/judge_probe.safetensors",
                 "emlens/organisms/rank1-down-medical/adapter_model.safetensors",
                 "emlens/organisms/narrow_vs_general/steering-120/steering/narrow/final.safetensors",
                 "emlens/organisms/narrow_vs_general/lora1/general/peft/adapter_config.json"):
        assert must in shipped
