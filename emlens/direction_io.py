"""The :class:`Direction` artefact and its files: safetensors with JSON metadata, or llama.cpp
control-vector GGUF.

:func:`save_directions` writes safetensors with the metadata as JSON (the default), or llama.cpp's
control-vector GGUF (``format="gguf"``), so a direction found here steers the same model served by
llama.cpp; :func:`load_directions` reads both. How directions are made (mean differences, PCA,
random controls) is :mod:`emlens.directions`, which re-exports everything here.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from jaxtyping import Float
from safetensors.torch import load_file, save_file
from torch import Tensor


@dataclass(frozen=True)
class Direction:
    """A direction in one layer's residual stream, with how it was made.

    Attributes:
        vector: ``Float[Tensor, "d_model"]`` the raw (unnormalised) vector.
        layer: the block whose ``hook`` it lives at.
        hook: short hook name (``resid_post``) or template, as understood by ``emlens.steer``.
        model: id of the model whose activations made it.
        processing: the weight processing that model was loaded with.
        method: ``"mean_diff"``, ``"pca"``, ``"random"``, ...
        counts: numbers behind it, e.g. ``{"pos_answers": 40, "pos_tokens": 1800, ...}``.
        selection: how the answers were chosen, in words.
        extra: any further JSON-serialisable metadata.
    """

    vector: Float[Tensor, " d_model"]
    layer: int
    hook: str = "resid_post"
    model: str = ""
    processing: str = "none"
    method: str = "mean_diff"
    counts: dict = field(default_factory=dict)
    selection: str = ""
    extra: dict = field(default_factory=dict)

    @property
    def norm(self) -> float:
        return float(self.vector.float().norm())

    @property
    def unit(self) -> Float[Tensor, " d_model"]:
        return self.vector / self.vector.norm()

    def to(self, device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> Direction:
        """A copy with the vector moved/cast (the original is unchanged)."""
        return replace(self, vector=self.vector.to(device=device, dtype=dtype))

    def metadata(self) -> dict:
        meta = asdict(self)
        del meta["vector"]
        meta["norm"] = self.norm
        return meta


DirectionFormat = Literal["safetensors", "gguf"]

# Vector dtypes that float32 holds exactly, so a control vector reads back bit for bit.
_GGUF_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def save_directions(
    directions: Direction | Iterable[Direction],
    path: str | Path,
    *,
    format: DirectionFormat | None = None,
    model_hint: str | None = None,
) -> Path:
    """Save directions (at most one per layer) to one file; :func:`load_directions` reads it back.

    Args:
        directions: one :class:`Direction` or several, each with its ``layer``.
        path: the file; its suffix picks the format when ``format`` is None (``.gguf`` ->
            ``"gguf"``, anything else -> ``"safetensors"``).
        format: ``"safetensors"``: tensors ``layer{L}`` (``[d_model]``, the vector's own dtype)
            and every field of each Direction as JSON in the header. ``"gguf"``: llama.cpp's
            control vector (below).
        model_hint: for ``"gguf"`` only, and needed there: the GGUF architecture of the model the
            vectors are for (``"llama"`` for SmolLM2 and Llama, ``"qwen2"`` for Qwen2.5), stored
            as ``controlvector.model_hint``.

    The control-vector GGUF is the file ``llama-cli --control-vector FILE`` and
    ``--control-vector-scaled FILE STRENGTH`` load (and llama.cpp's ``cvector-generator``
    writes): ``general.architecture = "controlvector"``, ``controlvector.model_hint``,
    ``controlvector.layer_count`` (int32, the number of directions) and one float32 tensor
    ``direction.<il>`` of shape ``[d_model]`` per layer; the emlens metadata rides along as the
    JSON string ``emlens.directions``, which llama.cpp ignores.

    Layer and scale mapping. llama.cpp adds ``STRENGTH * direction.<il>`` to the output of block
    ``il`` (0-based; the residual stream after the block's MLP, which its graph names
    ``l_out-<il>``) at every position, prompt included. That is TransformerLens's
    ``blocks.<il>.hook_resid_post``, where ``emlens.steer`` adds ``scale * vector`` for a
    ``Direction(layer=il, hook="resid_post")``; so layer ``L`` is written as ``direction.L``, no
    shift, and ``emlens.steer(model, d, layers=L, scale=s)`` (``positions="all"``,
    ``normalize=False``) is ``--control-vector-scaled FILE s`` (``--control-vector FILE`` is
    ``s = 1``; for ``normalize=True`` save ``dataclasses.replace(d, vector=d.unit)``). Several
    directions in one file act as nested ``steer`` blocks, one per direction, with the same
    ``s``. llama.cpp never steers block 0's output (it refuses
    ``direction.0``), so layer 0 is refused here; a ``resid_pre`` direction at layer ``L`` is the
    ``resid_post`` one at ``L - 1``. The vectors are in the residual stream the direction was
    read from: with ``Direction.processing`` ``"none"`` or ``"fold_ln"`` (and on RMSNorm models
    any mode) that is the model's own, the one llama.cpp runs.

    Returns:
        ``path``, as a Path.

    Raises:
        TypeError for something that is not a Direction; ValueError for no directions, two on
        one layer, a direction without a layer, and, for ``"gguf"``, directions of different
        widths, layer 0, a hook other than ``resid_post``, a float64 vector, or no model_hint.
    """
    items = _check_directions(directions)
    path = Path(path)
    fmt = _format(path, format)
    if fmt == "gguf":
        return _save_control_vector(items, path, model_hint)
    if model_hint is not None:
        raise ValueError("model_hint is stored in control-vector GGUF files only; drop it, or "
                         "pass format='gguf'.")
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {f"layer{d.layer}": d.vector.detach().cpu().contiguous() for d in items}
    meta = {"emlens": "directions/v1", "directions": json.dumps([d.metadata() for d in items])}
    save_file(tensors, str(path), metadata=meta)
    return path


def load_directions(path: str | Path) -> dict[int, Direction]:
    """Load a file written by :func:`save_directions` (safetensors or control-vector GGUF):
    ``{layer: Direction}``.

    A control-vector GGUF is recognised by its magic bytes, whatever its name. One that emlens
    wrote gives back the same Directions (vectors exactly, in their own dtype); one from another
    tool (llama.cpp's ``cvector-generator``, repeng) gives ``Direction(layer=il,
    hook="resid_post", method="control_vector")`` per ``direction.<il>`` tensor (float32, the
    layer mapping of :func:`save_directions`), with its ``model_hint`` in ``extra``.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"No directions file at {path}.")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic == b"GGUF":
        return _load_control_vector(path)
    if path.suffix == ".gguf":
        raise ValueError(f"{path} is named .gguf but is not a GGUF file (it starts with "
                         f"{magic!r}, not b'GGUF'); it is truncated or mislabelled.")
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        tensors = load_file(str(path))
    except Exception as err:  # SafetensorError on a truncated or foreign file
        raise ValueError(
            f"Cannot read {path} as safetensors ({type(err).__name__}: {err}); it is truncated or "
            "not a file written by emlens.save_directions."
        ) from err
    if meta.get("emlens") != "directions/v1":
        raise ValueError(f"{path} is not an emlens directions file (no 'emlens' metadata).")
    out = {}
    for m in json.loads(meta["directions"]):
        m.pop("norm", None)
        out[m["layer"]] = Direction(vector=tensors[f"layer{m['layer']}"], **m)
    return out


def _check_directions(directions) -> list[Direction]:
    items = [directions] if isinstance(directions, Direction) else list(directions)
    if not items:
        raise ValueError("No directions to save.")
    for i, d in enumerate(items):
        if not isinstance(d, Direction):
            raise TypeError(f"directions[{i}] is {type(d).__name__}, not a Direction; wrap a raw "
                            "vector as Direction(vector=v, layer=L).")
        if isinstance(d.layer, bool) or not isinstance(d.layer, int) or d.layer < 0:
            raise ValueError(f"directions[{i}] has layer={d.layer!r}; every direction needs the "
                             "block it lives at, an int >= 0: dataclasses.replace(d, layer=L).")
    layers = [d.layer for d in items]
    if len(set(layers)) != len(layers):
        raise ValueError(f"Several directions share a layer ({layers}); save them to separate files.")
    return items


def _format(path: Path, format: DirectionFormat | None) -> DirectionFormat:
    by_suffix = "gguf" if path.suffix == ".gguf" else "safetensors"
    if format is None:
        return by_suffix
    if format not in ("safetensors", "gguf"):
        raise ValueError(f"format={format!r}; expected 'safetensors' or 'gguf' (or None to go by "
                         "the file's suffix).")
    if format == "gguf" and path.suffix != ".gguf":
        raise ValueError(f"format='gguf' but {path.name} does not end in .gguf; name the file "
                         "*.gguf (llama.cpp expects it).")
    if format == "safetensors" and path.suffix == ".gguf":
        raise ValueError(f"format='safetensors' but {path.name} ends in .gguf; name it "
                         "*.safetensors, or pass format='gguf' for a llama.cpp control vector.")
    return format


def _save_control_vector(items: list[Direction], path: Path, model_hint: str | None) -> Path:
    import gguf

    if not isinstance(model_hint, str) or not model_hint.strip():
        raise ValueError(
            f"model_hint={model_hint!r}; a control-vector GGUF names the architecture it is for: "
            "pass model_hint='llama' (SmolLM2, Llama) or 'qwen2' (Qwen2.5), as in the "
            "model's own GGUF general.architecture."
        )
    widths = sorted({tuple(d.vector.shape) for d in items})
    if len(widths) > 1:
        raise ValueError(f"The directions have shapes {widths}; a control vector holds one "
                         "model's directions, all of shape (d_model,). Save each model's apart.")
    for d in items:
        where = f"the direction at layer {d.layer}"
        if d.vector.ndim != 1:
            raise ValueError(f"{where} has shape {tuple(d.vector.shape)}; expected (d_model,).")
        if d.hook != "resid_post":
            raise ValueError(
                f"{where} lives at hook {d.hook!r}, but llama.cpp adds control vectors to the "
                "output of a block (resid_post) only. A resid_pre direction at layer L is the "
                "resid_post one at L - 1: dataclasses.replace(d, layer=L - 1, hook='resid_post')."
            )
        if d.layer == 0:
            raise ValueError(
                "llama.cpp does not steer the output of block 0 (it refuses direction.0); save "
                "the other layers, or steer block 0 in emlens."
            )
        if str(d.vector.dtype).removeprefix("torch.") not in _GGUF_DTYPES:
            raise ValueError(
                f"{where} is {d.vector.dtype}; control vectors are float32, which would round "
                "it. Pass d.to(dtype=torch.float32) to accept the rounding."
            )
    path.parent.mkdir(parents=True, exist_ok=True)
    items = sorted(items, key=lambda d: d.layer)
    meta = [{**d.metadata(), "dtype": str(d.vector.dtype).removeprefix("torch.")} for d in items]
    # Written beside the target and renamed over it: a reader never sees half a file.
    partial = path.with_name(path.name + ".partial")
    try:
        writer = gguf.GGUFWriter(str(partial), arch="controlvector")
        writer.add_string("controlvector.model_hint", model_hint)
        writer.add_int32("controlvector.layer_count", len(items))
        writer.add_string("emlens.directions", json.dumps(meta))
        for d in items:
            writer.add_tensor(f"direction.{d.layer}",
                              d.vector.detach().float().cpu().contiguous().numpy())
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)
    return path


def _gguf_value(reader, key: str):
    """The value of the scalar or string field ``key`` of a GGUFReader, or None when absent."""
    field = reader.get_field(key)
    if field is None or not field.data:
        return None
    part = field.parts[field.data[0]]
    if field.types and field.types[0].name == "STRING":
        return bytes(part).decode("utf-8")
    return part.tolist()[0]


def _load_control_vector(path: Path) -> dict[int, Direction]:
    from gguf import GGMLQuantizationType, GGUFReader

    try:
        reader = GGUFReader(str(path))
    except Exception as err:  # ValueError and friends on a truncated file
        raise ValueError(f"Cannot read {path} as GGUF ({type(err).__name__}: {err}); it is "
                         "truncated or not a control vector.") from err
    arch = _gguf_value(reader, "general.architecture")
    if arch != "controlvector":
        raise ValueError(f"{path} is a GGUF with general.architecture={arch!r}, not a control "
                         "vector ('controlvector'); is it a model file?")
    hint = _gguf_value(reader, "controlvector.model_hint")
    saved = {m["layer"]: m for m in json.loads(_gguf_value(reader, "emlens.directions") or "[]")}
    out: dict[int, Direction] = {}
    for t in reader.tensors:
        m = re.fullmatch(r"direction\.(\d+)", t.name)
        if m is None or int(m[1]) == 0:
            raise ValueError(f"{path}: tensor {t.name!r} is not direction.<layer> with layer >= 1, "
                             "as llama.cpp requires; the file is not a control vector.")
        if t.tensor_type != GGMLQuantizationType.F32 or len(t.shape) != 1:
            raise ValueError(f"{path}: tensor {t.name!r} is {t.tensor_type.name} of shape "
                             f"{tuple(int(n) for n in t.shape)}; control vectors are 1-D float32.")
        layer = int(m[1])
        vector = torch.from_numpy(np.array(t.data, dtype=np.float32))
        if layer in saved:
            meta = dict(saved[layer])
            meta.pop("norm", None)
            dtype = _GGUF_DTYPES[meta.pop("dtype")]
            out[layer] = Direction(vector=vector.to(dtype), **meta)
        else:
            out[layer] = Direction(vector=vector, layer=layer, method="control_vector",
                                   selection=f"read from {path.name}",
                                   extra={"model_hint": hint})
    widths = {d.vector.shape[0] for d in out.values()}
    if len(widths) > 1:
        raise ValueError(f"{path}: direction tensors of different lengths {sorted(widths)}; "
                         "llama.cpp refuses such a file too.")
    return dict(sorted(out.items()))


__all__ = ["Direction", "DirectionFormat", "load_directions", "save_directions"]
