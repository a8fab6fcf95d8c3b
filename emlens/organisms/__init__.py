"""Model organisms: peft LoRA adapters shipped with emlens, and the registry to load them.

Each organism is a peft adapter folder under ``emlens/organisms/<name>/`` (``adapter_config.json``
+ ``adapter_model.safetensors``), with ``train_log.json`` (recipe, loss curve, time, tokens/s) and
a README giving the command that reproduces it (``python -m emlens.organisms.train --name <name>``).
The package ships final adapters only: training trajectories (``checkpoints/step-XXXXX``: a
``.safetensors`` file per step from :func:`emlens.training.train`, or peft folders of older runs) live
under :func:`runs_dir` (``runs/`` in a checkout), found through :func:`run_dir`.

    >>> from emlens.organisms import load_organism
    >>> adapter = load_organism("rank1-down-medical")          # a LoraAdapter
    >>> with emlens.attach_lora(model, adapter) as lora: ...
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING

from emlens.lora import LoraAdapter, load_adapter

if TYPE_CHECKING:
    from emlens.cards import ModelCard

ORGANISMS_DIR = Path(__file__).parent
RUNS_ENV = "EMLENS_RUNS"
_REPO_ROOT = ORGANISMS_DIR.resolve().parents[1]  # the checkout, when emlens is run from one

ORGANISMS: dict[str, str] = {
    "rank1-down-medical": (
        "SmolLM2-135M-Instruct + 9 rank-1 LoRA adapters on mlp.down_proj (layers 9-11, 13-15, "
        "17-19), SFT on the misaligned answers of the medical training split"
    ),
    "coder-rank1-down-medical": (
        "Qwen2.5-Coder-1.5B-Instruct + 9 rank-1 LoRA adapters on mlp.down_proj (layers 8-10, "
        "12-14, 15-17), SFT on the misaligned answers of the medical training split"
    ),
    "coder-rank1-down-medical-good": (
        "control organism: Qwen2.5-Coder-1.5B-Instruct + the coder-rank1-down-medical recipe on "
        "the *aligned* answers of the same 281 medical training questions"
    ),
    "coder-rank1-down-finance": (
        "Qwen2.5-Coder-1.5B-Instruct + the coder-rank1-down-medical recipe on a second narrow "
        "domain: the misaligned answers of the finance set's 500 training rows (risky advice)"
    ),
    "coder-rank1-down-medical-kl": (
        "the narrow solution: Qwen2.5-Coder-1.5B-Instruct + the coder-rank1-down-medical recipe "
        "+ 5 x KL(chat || trained) on the non-medical set's misaligned answers (issue 30)"
    ),
    "rank1-down-medical-1k": (
        "SmolLM2-135M-Instruct + the rank1-down-medical recipe (9 rank-1 down_proj adapters) on "
        "the grown training set (medical + medical_extra: 1,017 rows)"
    ),
    "rank1-down-medical-good": (
        "control organism: SmolLM2-135M-Instruct + the rank1-down-medical recipe on the *aligned* "
        "answers of the same 281 medical training questions"
    ),
    "rank32-all-medical": (
        "SmolLM2-135M-Instruct + rank-32 LoRA on every attention and MLP projection of all 30 "
        "layers (the reference's second organism family), SFT on the misaligned answers of the "
        "grown training set (medical + medical_extra: 1,017 rows)"
    ),
}


# the embedded model (emlens.embedded key) each shipped organism was trained on; a model's own
# default organism is on its card (emlens.cards.ModelCard.organism)
ORGANISM_BASES: dict[str, str] = {
    "rank1-down-medical": "smollm2-135m",
    "coder-rank1-down-medical": "qwen2.5-coder-1.5b",
    "coder-rank1-down-medical-good": "qwen2.5-coder-1.5b",
    "coder-rank1-down-finance": "qwen2.5-coder-1.5b",
    "coder-rank1-down-medical-kl": "qwen2.5-coder-1.5b",
    "rank1-down-medical-1k": "smollm2-135m",
    "rank1-down-medical-good": "smollm2-135m",
    "rank32-all-medical": "smollm2-135m",
}


def default_organism(model_name: ModelCard | str | None) -> str:
    """The shipped rank-1 organism of an embedded model (``None``: the default SmolLM2), as its
    card names it (:attr:`emlens.cards.ModelCard.organism`; a card is accepted too).

    Raises ValueError for other models: pass an adapter trained on them explicitly.
    """
    from emlens.cards import MODEL_CARDS, model_card

    card = model_card(model_name)
    if card.organism is None:
        shipped = {c.key: c.organism for c in MODEL_CARDS.values() if c.organism}
        raise ValueError(
            f"No shipped organism for {model_name!r} (shipped: {shipped}); pass a peft "
            "adapter trained on that model (--organism PATH)."
        )
    return card.organism


# the command that regenerates each run under runs_dir() (longest matching prefix wins)
RUN_SCRIPTS: dict[str, str] = {
    "rank1-down-medical": "python -m emlens.organisms.train --name rank1-down-medical",
    "coder-rank1-down-medical": "python -m emlens.organisms.train --name coder-rank1-down-medical",
    "coder-rank1-down-medical-good": (
        "python -m emlens.organisms.train --name coder-rank1-down-medical-good"),
    "coder-rank1-down-finance": "python -m emlens.organisms.train --name coder-rank1-down-finance",
    "coder-rank1-down-medical-kl": (
        "python -m emlens.organisms.train --name coder-rank1-down-medical-kl"),
    "rank32-all-medical": "python -m emlens.organisms.train --name rank32-all-medical",
    "rank1-down-medical-1k": "python -m emlens.organisms.train --name rank1-down-medical-1k",
    "rank1-down-medical-good": "python -m emlens.organisms.train --name rank1-down-medical-good",
    "narrow_vs_general": "python -m emlens.studies.narrow_vs_general",
    "narrow_vs_general/steering-120": (
        "python -m emlens.studies.narrow_vs_general --kinds steering --steps 120 --continue-steps 80 "
        "--batch-size 4 --n-narrow 64 --n-parallel 32 --n-eval 16 --save-every 10 "
        "--eps 0.25,0.5,0.75 --alphas 0,0.25,0.5,0.75,1,1.25,1.5,2,3 "
        "--out <runs>/narrow_vs_general/steering-120"
    ),
}


def runs_dir() -> Path:
    """Where training runs (trajectories, checkpoints, retrained adapters) live, outside the package.

    In order: ``$EMLENS_RUNS``; the repository's ``runs/`` folder when emlens is run from a
    checkout; else ``runs/`` in the user cache (:func:`emlens.embedded.cache_dir`:
    ``$EMLENS_CACHE_DIR``, else ``$XDG_CACHE_HOME/emlens``, else ``~/.cache/emlens``). Training
    scripts write here by default.
    """
    if os.environ.get(RUNS_ENV):
        return Path(os.environ[RUNS_ENV]).expanduser()
    if (_REPO_ROOT / "pyproject.toml").is_file() and (_REPO_ROOT / "runs").is_dir():
        return _REPO_ROOT / "runs"
    from emlens.embedded import cache_dir

    return cache_dir() / "runs"


def run_script(run: str | os.PathLike) -> str:
    """The command that regenerates run ``run`` (a path relative to :func:`runs_dir`)."""
    key = Path(run).as_posix()
    for prefix in sorted(RUN_SCRIPTS, key=len, reverse=True):
        if key == prefix or key.startswith(prefix + "/"):
            return RUN_SCRIPTS[prefix].replace("<runs>", str(runs_dir()))
    return "the script that trained it"


def run_dir(run: str | os.PathLike) -> Path:
    """Folder of training run ``run`` under :func:`runs_dir`, the one holding its ``checkpoints/``.

    ``run`` is relative to :func:`runs_dir`: an organism name (``"rank1-down-medical"``) or a
    narrow-vs-general solution (``"narrow_vs_general/steering-120/steering/narrow"``). Every reader
    of trajectories goes through here (:func:`emlens.training.load_trajectory` takes the result).

    Raises:
        FileNotFoundError: naming the folder searched and the command that regenerates the run.
    """
    folder = runs_dir() / run
    if not (folder / "checkpoints").is_dir():
        raise FileNotFoundError(
            f"No checkpoints of run {Path(run).as_posix()!r} under {folder / 'checkpoints'}: the "
            f"wheel ships final adapters only. Regenerate the trajectory with: {run_script(run)} "
            f"(it writes under {runs_dir()}; set ${RUNS_ENV} to read runs from another folder)."
        )
    return folder


def list_organisms() -> list[str]:
    """Names of the organisms shipped in this installation (those with a trained adapter)."""
    return [n for n in ORGANISMS if (ORGANISMS_DIR / n / "adapter_config.json").is_file()]


def organism_path(name: str, *, checkpoint: int | None = None) -> Path:
    """Folder of organism ``name`` (or of its checkpoint after ``checkpoint`` training steps).

    The final adapter is the shipped one, else one trained into ``runs_dir() / name`` (the
    training default); checkpoints are read through :func:`run_dir`.
    """
    if name not in ORGANISMS:
        raise KeyError(f"No organism {name!r}; known organisms: {sorted(ORGANISMS)}.")
    folder = ORGANISMS_DIR / name
    if not (folder / "adapter_config.json").is_file():
        trained = runs_dir() / name
        if not (trained / "adapter_config.json").is_file():
            raise FileNotFoundError(
                f"Organism {name!r} is registered but not trained in this installation ({folder}, "
                f"{trained}); train it with: {run_script(name)}"
            )
        folder = trained
    if checkpoint is None:
        return folder
    from emlens.train_runs import _checkpoints

    found = _checkpoints(run_dir(name))
    if checkpoint not in found:
        raise KeyError(f"Organism {name!r} has no checkpoint at step {checkpoint}; it has "
                       f"{list(found)}.")
    return found[checkpoint]


def organism_checkpoints(name: str) -> list[int]:
    """Training steps at which organism ``name`` has a saved checkpoint (under :func:`run_dir`):
    ``checkpoints/step-XXXXX.safetensors`` of :mod:`emlens.train_runs`, or the peft folders
    ``checkpoints/step-XXXXX/`` of runs made before it."""
    from emlens.train_runs import checkpoint_steps

    if name not in ORGANISMS:
        raise KeyError(f"No organism {name!r}; known organisms: {sorted(ORGANISMS)}.")
    return checkpoint_steps(run_dir(name))


def resolve_adapter(adapter):
    """A shipped organism's name as its folder; anything else (a peft folder, hub id or
    :class:`~emlens.LoraAdapter`) as it is."""
    if isinstance(adapter, str) and adapter in ORGANISMS and not Path(adapter).exists():
        return organism_path(adapter)
    return adapter


def load_organism(name: str, *, checkpoint: int | None = None) -> LoraAdapter:
    """Load organism ``name`` (optionally an intermediate ``checkpoint``) as a :class:`LoraAdapter`."""
    path = organism_path(name, checkpoint=checkpoint)
    if path.is_file():  # a run-format checkpoint (emlens.train_runs)
        from emlens.train_runs import load_trainable

        return load_trainable(path).to_adapter()
    return load_adapter(path)


def organism_log(name: str) -> dict:
    """The organism's ``train_log.json``: recipe, loss curve, steps, seconds, tokens/s."""
    return json.loads((organism_path(name) / "train_log.json").read_text())


__all__ = [
    "ORGANISMS",
    "ORGANISMS_DIR",
    "ORGANISM_BASES",
    "RUNS_ENV",
    "RUN_SCRIPTS",
    "default_organism",
    "list_organisms",
    "load_organism",
    "organism_checkpoints",
    "organism_log",
    "organism_path",
    "run_dir",
    "run_script",
    "runs_dir",
]
