"""One training run's folder: checkpoints, resume state and trajectory, all safetensors + JSON.

Every run of :func:`emlens.training.train` (a steering vector, a LoRA, an organism) writes the
same layout under its ``out`` folder::

    checkpoints/step-XXXXX.safetensors   the parameters after step XXXXX (Trainable.save: the
                                         tensors, the metadata as JSON in the header); step 0 is
                                         the initial parameters; the trajectory
    resume/state.json                    while the run is unfinished: the step, the log so far
                                         and the run's identity (what must match to resume)
    resume/state-XXXXX.safetensors       the parameters and AdamW moments at that step
    final.safetensors                    the trained parameters
    adapter_config.json                  LoRA runs: the peft export of the final parameters
    adapter_model.safetensors            (so the run folder is itself a peft folder)
    train_log.json                       config, per-step losses, checkpoints, seconds

Readers (:func:`load_trainable`, :func:`load_trajectory`, :func:`checkpoint_steps`) also read
the layout the shipped organism runs were written in: ``checkpoints/step-XXXXX/`` peft folders,
read as :class:`~emlens.trainable_adapter.TrainableAdapter`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor
from transformer_lens import HookedTransformer

from emlens.fingerprint import tensor_digest
from emlens.models import model_id
from emlens.trainable import Trainable, Trajectory
from emlens.trainable import load_trainable as _load_saved
from emlens.trainable_adapter import TrainableAdapter

_STEP = re.compile(r"^step-(\d+)(\.safetensors)?$")


def checkpoint_path(out: str | Path, step: int) -> Path:
    """Where a run writes its checkpoint after ``step`` steps."""
    return Path(out, "checkpoints", f"step-{step:05d}.safetensors")


def _checkpoints(out: str | Path) -> dict[int, Path]:
    """Step -> checkpoint (a ``.safetensors`` file, or a peft folder of the shipped organisms)."""
    found: dict[int, Path] = {}
    folder = Path(out, "checkpoints")
    for entry in sorted(folder.iterdir()) if folder.is_dir() else []:
        m = _STEP.match(entry.name)
        if m is None or (m.group(2) is None) != entry.is_dir():
            continue
        step = int(m.group(1))
        if step not in found or entry.is_file():  # the run format wins over a stale peft folder
            found[step] = entry
    return dict(sorted(found.items()))


def checkpoint_steps(out: str | Path) -> list[int]:
    """The steps at which run ``out`` has a checkpoint (either layout), ascending."""
    return list(_checkpoints(out))


def load_trainable(path: str | Path) -> Trainable:
    """Rebuild trained parameters from a checkpoint or ``final.safetensors`` (any kind:
    steering vector, LoRA, adapter), or from a peft folder (as a
    :class:`~emlens.trainable_adapter.TrainableAdapter`)."""
    path = Path(path)
    if path.is_dir():
        if not (path / "adapter_config.json").is_file():
            raise FileNotFoundError(f"{path} is a folder without adapter_config.json; expected a "
                                    ".safetensors file written by Trainable.save or a peft folder.")
        return TrainableAdapter.from_adapter(path)
    if path.is_file():
        with safe_open(str(path), framework="pt") as f:
            kind = json.loads((f.metadata() or {}).get("kind", "null"))
        if kind == TrainableAdapter.kind:
            with safe_open(str(path), framework="pt") as f:
                meta = {k: json.loads(v) for k, v in f.metadata().items()}
            module = TrainableAdapter.from_metadata(meta)
            module.load_tensors(load_file(str(path)))
            return module
    return _load_saved(path)  # steering vectors, TrainableLora; names the problem otherwise


def load_checkpoint(out: str | Path, step: int) -> Trainable:
    """The parameters of run ``out`` after ``step`` steps."""
    found = _checkpoints(out)
    if step not in found:
        raise KeyError(f"Run {out} has no checkpoint at step {step}; it has {list(found)}.")
    return load_trainable(found[step])


def load_trajectory(out: str | Path) -> Trajectory:
    """Every checkpoint of run ``out`` in step order (either layout)."""
    found = _checkpoints(out)
    if not found:
        raise FileNotFoundError(
            f"No checkpoints under {Path(out, 'checkpoints')}; train with out=... and save_every > 0."
        )
    return Trajectory(steps=list(found), params=[load_trainable(p) for p in found.values()])


# --------------------------------------------------------------------------------------------
# Identity and writing


def _digest(tensors: Iterable[Tensor]) -> str:
    h = hashlib.sha256()
    for t in tensors:
        h.update(tensor_digest(t).encode())
    return h.hexdigest()[:16]


def run_identity(model: HookedTransformer, init: Trainable, data: dict[str, Any], config: Any,
                 meta: dict[str, Any]) -> dict[str, Any]:
    """What must match for a saved run to resume (JSON): the config (less its progress bar and
    name), the model, the initial parameters, the data (``{name: PreparedSet or None}``, by
    content) and the caller's ``meta`` (an organism's recipe)."""
    cfg = model.cfg
    return {
        "config": {k: v for k, v in dataclasses.asdict(config).items()
                   if k not in ("progress", "name")},
        "model": {"id": model_id(model), "n_layers": cfg.n_layers, "d_model": cfg.d_model,
                  "d_vocab": cfg.d_vocab, "dtype": str(cfg.dtype)},
        "params": init.metadata(),
        "init": _digest(init.tensors().values()),
        **{name: None if s is None else _digest(
            t for pb in s.batches
            for t in (pb.batch.tokens, pb.batch.attention_mask, pb.batch.answer_mask))
           for name, s in data.items()},
        "meta": meta,
    }


def save_checkpoint(out: str | Path, params: Trainable, step: int) -> Path:
    return params.save(checkpoint_path(out, step), step=step)


def start_fresh(out: str | Path) -> None:
    """Remove an earlier run's checkpoints and resume state, so the folder holds one run."""
    out = Path(out)
    for path in _checkpoints(out).values():
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    clear_state(out)


def clear_state(out: str | Path) -> None:
    shutil.rmtree(Path(out, "resume"), ignore_errors=True)


def save_state(out: str | Path, params: Trainable, optim: torch.optim.Optimizer, step: int,
               record: dict[str, Any]) -> None:
    """Write what resuming after ``step`` needs: parameters and optimiser state (safetensors),
    the step and ``record`` (the log so far, the run's identity; JSON).

    ``state.json`` is replaced atomically last and names its tensor file, so an interruption
    while saving leaves the previous state whole.
    """
    folder = Path(out, "resume")
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {f"param.{k}": v.detach().cpu().contiguous() for k, v in params.state_dict().items()}
    for index, state in optim.state_dict()["state"].items():
        for key, value in state.items():
            tensors[f"optim.{index}.{key}"] = torch.as_tensor(value).detach().cpu().contiguous()
    name = f"state-{step:05d}.safetensors"
    save_file(tensors, str(folder / name))
    tmp = folder / "state.json.tmp"
    tmp.write_text(json.dumps({"step": step, "tensors": name, **record}))
    tmp.replace(folder / "state.json")
    for old in folder.glob("state-*.safetensors"):
        if old.name != name:
            old.unlink()


def _flat(d: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(d, dict):
        return {prefix: d}
    out: dict[str, Any] = {}
    for k, v in d.items():
        out |= _flat(v, f"{prefix}.{k}" if prefix else str(k))
    return out


def load_state(out: str | Path, params: Trainable, optim: torch.optim.Optimizer,
               identity: dict[str, Any]) -> dict[str, Any] | None:
    """Restore an unfinished run of the same identity into ``params`` and ``optim``.

    Returns the saved JSON record (``step``, the log so far), or ``None`` when ``out`` holds no
    unfinished run. Raises ValueError, naming every difference, when the unfinished run's identity
    (config, parameters, data, recipe) differs from ``identity``.
    """
    folder = Path(out, "resume")
    if not (folder / "state.json").is_file():
        return None
    record = json.loads((folder / "state.json").read_text())
    identity = json.loads(json.dumps(identity))  # tuples as lists, as they were saved
    if record["identity"] != identity:
        there, here = _flat(record["identity"]), _flat(identity)
        diffs = [f"{k} ({there.get(k, 'absent')!r} there, {here.get(k, 'absent')!r} here)"
                 for k in sorted(set(there) | set(here)) if there.get(k) != here.get(k)]
        raise ValueError(
            f"{out} holds an unfinished run of another recipe (saved at step {record['step']}); "
            f"it differs in {', '.join(diffs)}. To resume it, pass the same settings; to start "
            f"afresh in this folder, pass resume=False (--fresh) or delete {folder}."
        )
    tensors = load_file(str(folder / record["tensors"]))
    with torch.no_grad():
        params.load_state_dict({k[len("param."):]: v for k, v in tensors.items()
                                if k.startswith("param.")})
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        if key.startswith("optim."):
            _, index, name = key.split(".", 2)
            state.setdefault(int(index), {})[name] = value
    saved = optim.state_dict()
    saved["state"] = state
    optim.load_state_dict(saved)  # moves the moments to the parameters' device and dtype
    return record


__all__ = [
    "checkpoint_path",
    "checkpoint_steps",
    "clear_state",
    "load_checkpoint",
    "load_state",
    "load_trainable",
    "load_trajectory",
    "run_identity",
    "save_checkpoint",
    "save_state",
    "start_fresh",
]
