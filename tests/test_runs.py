"""Training runs live outside the package: ``emlens.organisms.runs_dir`` finds them, ``run_dir``
is the one way to read a trajectory, and training writes there by default."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

import emlens.organisms as organisms
from emlens.organisms import (
    ORGANISMS_DIR,
    organism_checkpoints,
    organism_path,
    run_dir,
    run_script,
    runs_dir,
)
from emlens.training import load_trajectory

ROOT = Path(__file__).parent.parent
NVG_RUNS = [f"narrow_vs_general/{kind}/{n}" for kind in ("steering", "lora1", "steering-120/steering")
            for n in ("general", "narrow", "continued")]


@pytest.fixture
def no_env(monkeypatch):
    for var in ("EMLENS_RUNS", "EMLENS_CACHE_DIR", "XDG_CACHE_HOME"):
        monkeypatch.delenv(var, raising=False)


def test_runs_dir_is_the_checkout_runs_folder(no_env):
    assert runs_dir() == ROOT / "runs"


def test_runs_dir_env_var_wins(no_env, monkeypatch, tmp_path):
    monkeypatch.setenv("EMLENS_RUNS", str(tmp_path))
    assert runs_dir() == tmp_path


def test_runs_dir_outside_a_checkout_is_the_user_cache(no_env, monkeypatch, tmp_path):
    monkeypatch.setattr(organisms, "_REPO_ROOT", tmp_path / "site-packages")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert runs_dir() == tmp_path / "home" / ".cache" / "emlens" / "runs"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert runs_dir() == tmp_path / "xdg" / "emlens" / "runs"
    monkeypatch.setenv("EMLENS_CACHE_DIR", str(tmp_path / "cache"))
    assert runs_dir() == tmp_path / "cache" / "runs"


def test_missing_trajectory_names_the_script_that_regenerates_it(monkeypatch, tmp_path):
    monkeypatch.setenv("EMLENS_RUNS", str(tmp_path))
    with pytest.raises(FileNotFoundError,
                       match=r"python -m emlens\.organisms\.train --name rank1-down-medical"):
        organism_checkpoints("rank1-down-medical")
    with pytest.raises(FileNotFoundError, match=r"python -m emlens\.studies\.narrow_vs_general --kinds steering "
                                                r"--steps 120 .*--out .*steering-120"):
        run_dir("narrow_vs_general/steering-120/steering/narrow")
    with pytest.raises(FileNotFoundError, match=r"python -m emlens\.studies\.narrow_vs_general \("):
        run_dir("narrow_vs_general/lora1/general")
    assert run_script("something-else") == "the script that trained it"
    assert organism_path("rank1-down-medical").parent == ORGANISMS_DIR  # finals still load


def test_shipped_trajectories_are_in_runs_not_in_the_package(no_env):
    assert not list(ORGANISMS_DIR.rglob("checkpoints"))
    for name in ("rank1-down-medical", "coder-rank1-down-medical"):
        assert len(organism_checkpoints(name)) >= 3
        assert run_dir(name) == ROOT / "runs" / name
    for run in NVG_RUNS:
        final = ORGANISMS_DIR / run / "final.safetensors"
        assert final.is_file(), final
        traj = load_trajectory(run_dir(run))
        assert len(traj.steps) >= 3


def test_shipped_organism_trajectories_read_with_the_one_reader(no_env):
    """The organisms' runs were written as checkpoints/step-XXXXX/ peft folders; load_trajectory
    (the reader of every run, whose checkpoints are now step-XXXXX.safetensors) reads them."""
    from emlens.training import TrainableAdapter, load_checkpoint

    name = "rank1-down-medical"
    traj = load_trajectory(run_dir(name))
    assert traj.steps == organism_checkpoints(name)
    assert all(isinstance(p, TrainableAdapter) for p in traj.params)
    step = traj.steps[0]
    adapter = load_checkpoint(run_dir(name), step).to_adapter()
    shipped = organisms.load_organism(name, checkpoint=step)
    assert [m.name for m in adapter.modules] == [m.name for m in shipped.modules]
    assert all(torch.equal(a.B, b.B) for a, b in zip(adapter.modules, shipped.modules, strict=True))


def test_an_organism_trained_into_runs_loads_when_not_shipped(monkeypatch, tmp_path):
    name = "rank1-down-medical"
    shipped = organism_path(name)
    monkeypatch.setattr(organisms, "ORGANISMS_DIR", tmp_path / "package")
    monkeypatch.setenv("EMLENS_RUNS", str(tmp_path / "runs"))
    with pytest.raises(FileNotFoundError, match="train it with: python -m emlens.organisms.train"):
        organism_path(name)
    trained = tmp_path / "runs" / name
    trained.mkdir(parents=True)
    for f in ("adapter_config.json", "adapter_model.safetensors", "train_log.json"):
        shutil.copy(shipped / f, trained / f)
    assert organism_path(name) == trained


def test_training_and_evaluation_default_to_runs_dir(monkeypatch, tmp_path):
    import emlens.organisms.train as train_mod

    monkeypatch.setenv("EMLENS_RUNS", str(tmp_path))
    outs, recipes = [], []

    def fake_train(recipe, out, resume=True):
        outs.append(Path(out))
        recipes.append(recipe)
        return {}

    monkeypatch.setattr(train_mod, "train_organism", fake_train)
    train_mod.main(["--name", "rank1-down-medical", "--max-steps", "1"])
    train_mod.main(["--name", "rank1-down-medical", "--out", str(tmp_path / "x")])
    recipe = train_mod.replace(train_mod.RECIPES["rank1-down-medical"], name="mine")
    (tmp_path / "mine.json").write_text(json.dumps(recipe.to_json()))
    train_mod.main(["--recipe", str(tmp_path / "mine.json"), "--lr", "0.5"])  # a recipe as data
    assert outs == [tmp_path / "rank1-down-medical", tmp_path / "x", tmp_path / "mine"]
    assert recipes[-1] == train_mod.replace(recipe, lr=0.5)
    from emlens.studies.narrow_vs_general import default_out

    assert default_out() == tmp_path / "narrow_vs_general"


def test_an_organism_retrained_in_the_run_format_lists_and_loads_its_checkpoints(monkeypatch,
                                                                                   tmp_path):
    """A run the one trainer writes (checkpoints/step-XXXXX.safetensors) is read by the organism
    registry as the shipped peft-folder checkpoints are."""
    from emlens.train_runs import load_checkpoint, save_checkpoint

    name = "rank1-down-medical"
    shipped_steps = organism_checkpoints(name)
    params = load_checkpoint(run_dir(name), shipped_steps[1])
    monkeypatch.setenv("EMLENS_RUNS", str(tmp_path))
    (tmp_path / name).mkdir()
    save_checkpoint(tmp_path / name, params, 7)
    assert organism_checkpoints(name) == [7]
    assert organism_path(name, checkpoint=7).suffix == ".safetensors"
    loaded = organisms.load_organism(name, checkpoint=7)
    want = params.to_adapter()
    assert [m.name for m in loaded.modules] == [m.name for m in want.modules]
    assert all(torch.equal(a.A, b.A) and torch.equal(a.B, b.B)
               for a, b in zip(loaded.modules, want.modules, strict=True))
    with pytest.raises(KeyError, match=r"no checkpoint at step 8; it has \[7\]"):
        organisms.load_organism(name, checkpoint=8)
