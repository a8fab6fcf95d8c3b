"""Model organisms: peft LoRA adapters shipped with emlens, and the registry to load them.

Each organism is a peft adapter folder under ``emlens/organisms/<name>/`` (``adapter_config.json``
+ ``adapter_model.safetensors``), with ``train_log.json`` (recipe, loss curve, time, tokens/s),
intermediate checkpoints under ``checkpoints/step-XXXXX/`` and a README giving the command that
reproduces it (``python -m emlens.organisms.train --name <name>``).

    >>> from emlens.organisms import load_organism
    >>> adapter = load_organism("rank1-down-medical")          # a LoraAdapter
    >>> with emlens.attach_lora(model, adapter) as lora: ...
"""

from __future__ import annotations

import json
from pathlib import Path

from emlens.lora import LoraAdapter, load_adapter

ORGANISMS_DIR = Path(__file__).parent

ORGANISMS: dict[str, str] = {
    "rank1-down-medical": (
        "SmolLM2-135M-Instruct + 9 rank-1 LoRA adapters on mlp.down_proj (layers 9-11, 13-15, "
        "17-19), SFT on the misaligned answers of the medical training split"
    ),
    "coder-rank1-down-medical": (
        "Qwen2.5-Coder-1.5B-Instruct + 9 rank-1 LoRA adapters on mlp.down_proj (layers 8-10, "
        "12-14, 15-17), SFT on the misaligned answers of the medical training split"
    ),
}


# the embedded model (emlens.embedded key) each shipped organism was trained on
ORGANISM_BASES: dict[str, str] = {
    "rank1-down-medical": "smollm2-135m",
    "coder-rank1-down-medical": "qwen2.5-coder-1.5b",
}


def default_organism(model_name: str | None) -> str:
    """The shipped rank-1 organism of an embedded model (``None``: the default SmolLM2).

    Raises ValueError for other models: pass an adapter trained on them explicitly.
    """
    from emlens.embedded import embedded_source

    embedded = embedded_source(model_name)
    for name, base in ORGANISM_BASES.items():
        if embedded is not None and embedded.key == base:
            return name
    raise ValueError(
        f"No shipped organism for {model_name!r} (shipped: {ORGANISM_BASES}); pass a peft "
        "adapter trained on that model (--organism PATH)."
    )


def list_organisms() -> list[str]:
    """Names of the organisms shipped in this installation (those with a trained adapter)."""
    return [n for n in ORGANISMS if (ORGANISMS_DIR / n / "adapter_config.json").is_file()]


def organism_path(name: str, *, checkpoint: int | None = None) -> Path:
    """Folder of organism ``name`` (or of its checkpoint after ``checkpoint`` training steps)."""
    if name not in ORGANISMS:
        raise KeyError(f"No organism {name!r}; known organisms: {sorted(ORGANISMS)}.")
    folder = ORGANISMS_DIR / name
    if not (folder / "adapter_config.json").is_file():
        raise FileNotFoundError(
            f"Organism {name!r} is registered but not trained in this installation ({folder}); "
            f"train it with: python -m emlens.organisms.train --name {name}"
        )
    if checkpoint is None:
        return folder
    steps = organism_checkpoints(name)
    if checkpoint not in steps:
        raise KeyError(f"Organism {name!r} has no checkpoint at step {checkpoint}; it has {steps}.")
    return folder / "checkpoints" / f"step-{checkpoint:05d}"


def organism_checkpoints(name: str) -> list[int]:
    """Training steps at which organism ``name`` has a saved checkpoint."""
    folder = organism_path(name) / "checkpoints"
    return sorted(int(p.name.split("-")[1]) for p in folder.glob("step-*") if p.is_dir())


def load_organism(name: str, *, checkpoint: int | None = None) -> LoraAdapter:
    """Load organism ``name`` (optionally an intermediate ``checkpoint``) as a :class:`LoraAdapter`."""
    return load_adapter(organism_path(name, checkpoint=checkpoint))


def organism_log(name: str) -> dict:
    """The organism's ``train_log.json``: recipe, loss curve, steps, seconds, tokens/s."""
    return json.loads((organism_path(name) / "train_log.json").read_text())


__all__ = [
    "ORGANISMS",
    "ORGANISMS_DIR",
    "ORGANISM_BASES",
    "default_organism",
    "list_organisms",
    "load_organism",
    "organism_checkpoints",
    "organism_log",
    "organism_path",
]
