"""Mean-difference directions: streaming activation means, ``Direction`` artefacts, baselines.

The reference protocol (Soligo et al. 2025), the default preset here:

* hook: the residual stream after block ``L`` (``resid_post``);
* statistic: token-weighted mean over the *answer* span (every answer token of every answer
  counts once; see :mod:`emlens.chat` for what the span holds);
* answer sets: misaligned = aligned < 30 and coherent > 50 (the EM rule); aligned = aligned > 70 and
  coherent > 50, subsampled to the misaligned count (:func:`select_answers`);
* activations of the fine-tuned model on both sets (pass the chat model instead to get the other
  protocol: the chat model's activations on the fine-tune's answers);
* direction = mean(misaligned) - mean(aligned), the *raw* vector, which is what the papers add.
  Report steering scales both raw and relative to the residual norm (:func:`residual_norms`).

Means are accumulated in float64 running sums inside hooks, and the forward pass stops after the
last requested layer, so memory is the model, one batch and ``O(n_layers x d_model)`` whatever the
number of answers.

Artefacts: :func:`save_directions` writes safetensors with the metadata as JSON (the default), or
llama.cpp's control-vector GGUF (``format="gguf"``), so a direction found here steers the same
model served by llama.cpp; :func:`load_directions` reads both.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from jaxtyping import Float
from safetensors.torch import load_file, save_file
from torch import Tensor
from tqdm.auto import tqdm
from transformer_lens import HookedTransformer

from emlens.chat import ChatBatch, iter_chat_batches
from emlens.hooks import RESIDUAL_HOOKS, WRITER_HOOKS, Layers, hook_names, resolve_layers
from emlens.models import model_id

TokenMask = Literal["answer", "prompt", "all"]
Pairs = Sequence[tuple[str, str]]


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


# --------------------------------------------------------------------------------------------
# Streaming means


@dataclass(frozen=True)
class Means:
    """Per-layer mean activations over selected tokens.

    ``means[layer]`` is ``Float[Tensor, "d_model"]`` (float64); ``tokens`` the number of tokens
    averaged, ``rows`` the number of sequences.
    """

    means: dict[int, Tensor]
    tokens: int
    rows: int
    hook: str


def _select(batch: ChatBatch, mask: TokenMask) -> Tensor:
    if mask == "answer":
        return batch.answer_mask
    if mask == "prompt":
        return batch.prompt_mask
    if mask == "all":
        return batch.attention_mask.bool()
    raise ValueError(f"mask={mask!r}; expected 'answer', 'prompt' or 'all'.")


@torch.no_grad()
def collect_means(
    model: HookedTransformer,
    batches: Iterable[ChatBatch],
    layers: Layers,
    *,
    hook: str = "resid_post",
    mask: TokenMask = "answer",
    progress: bool = True,
    total: int | None = None,
) -> Means:
    """Mean activation at ``hook`` of each layer over the ``mask`` tokens of all batches.

    Streams: float64 running sums and a token count, updated inside hooks; only the hooked
    activations ever exist, and the forward pass stops after the last layer needed.

    Raises ValueError when no token is selected or an activation is NaN/inf.
    """
    layer_list = resolve_layers(model, layers)
    names = hook_names(model, layer_list, hook)
    d_model = model.cfg.d_model
    device = next(model.parameters()).device
    sums = {name: torch.zeros(d_model, dtype=torch.float64, device=device) for name in names}
    state = {"mask": None}
    n_tokens = n_rows = 0

    def accumulate(act: Tensor, hook) -> None:
        sel = act[state["mask"]]
        sums[hook.name] += sel.sum(0, dtype=torch.float64)

    # Everything we read lives inside blocks 0..max(layers): skip the rest of the model.
    stop = max(layer_list) + 1 if hook in (*RESIDUAL_HOOKS, WRITER_HOOKS) else None
    with model.hooks(fwd_hooks=[(name, accumulate) for name in names]):
        for batch in tqdm(batches, desc="collect_means", disable=not progress, total=total):
            state["mask"] = _select(batch, mask).to(device)
            model(
                batch.tokens.to(device), attention_mask=batch.attention_mask.to(device),
                return_type=None, stop_at_layer=stop,
            )
            n_tokens += int(state["mask"].sum())
            n_rows += len(batch)
    if n_rows == 0:
        raise ValueError("No batches were given; collect_means needs at least one answer.")
    if n_tokens == 0:
        raise ValueError(
            f"No {mask} tokens in {n_rows} rows; were the batches built with answers=...?"
        )
    means = {}
    for layer, name in zip(layer_list, names, strict=True):
        if not torch.isfinite(sums[name]).all():
            raise ValueError(f"NaN or infinite activations at {name}; check the model and inputs.")
        means[layer] = sums[name] / n_tokens
    return Means(means=means, tokens=n_tokens, rows=n_rows, hook=hook)


def _check_pairs(name: str, pairs: Pairs) -> None:
    if len(pairs) == 0:
        raise ValueError(f"{name} is empty; mean_diff needs at least one (question, answer) pair.")
    for i, pair in enumerate(pairs):
        if len(pair) != 2 or not all(isinstance(x, str) for x in pair):
            raise ValueError(f"{name}[{i}] is not a (question, answer) pair of strings: {pair!r:.80}")


def pair_means(
    model: HookedTransformer,
    pairs: Pairs,
    layers: Layers,
    *,
    hook: str = "resid_post",
    mask: TokenMask = "answer",
    batch_size: int = 16,
    progress: bool = True,
) -> Means:
    """:func:`collect_means` over (question, answer) pairs, chat-formatted and batched."""
    questions = [q for q, _ in pairs]
    answers = [a for _, a in pairs]
    batches = iter_chat_batches(model.tokenizer, questions, answers, batch_size=batch_size)
    total = -(-len(pairs) // batch_size)
    return collect_means(model, batches, layers, hook=hook, mask=mask, progress=progress, total=total)


def mean_diff(
    model: HookedTransformer,
    misaligned: Pairs,
    aligned: Pairs,
    *,
    layers: Layers = "all",
    hook: str = "resid_post",
    mask: TokenMask = "answer",
    batch_size: int = 16,
    selection: str = "",
    progress: bool = True,
) -> dict[int, Direction]:
    """Mean-difference direction per layer: mean(misaligned) - mean(aligned).

    Args:
        model: whose activations to read (the fine-tune, or the chat model: see module docs).
        misaligned, aligned: (question, answer) pairs; :func:`select_answers` builds them from an
            ``evaluate`` table with the reference thresholds.
        layers: layers to extract at (``"all"`` default).
        mask: ``"answer"`` (reference), ``"prompt"`` (difference of prompt means) or ``"all"``.
        selection: how the answers were chosen, stored in each Direction.

    Returns:
        ``{layer: Direction}`` with raw vectors in the model's dtype.
    """
    _check_pairs("misaligned", misaligned)
    _check_pairs("aligned", aligned)
    kwargs = dict(hook=hook, mask=mask, batch_size=batch_size, progress=progress)
    pos = pair_means(model, misaligned, layers, **kwargs)
    neg = pair_means(model, aligned, layers, **kwargs)
    info = getattr(model, "emlens_info", {}) or {}
    out = {}
    for layer in pos.means:
        vec = (pos.means[layer] - neg.means[layer]).to(model.cfg.dtype)
        out[layer] = Direction(
            vector=vec, layer=layer, hook=hook, model=model_id(model),
            processing=info.get("processing", "none"),
            method="mean_diff" if mask == "answer" else f"mean_diff_{mask}",
            counts={"pos_answers": pos.rows, "pos_tokens": pos.tokens,
                    "neg_answers": neg.rows, "neg_tokens": neg.tokens},
            selection=selection,
        )
    return out


@torch.no_grad()
def _answer_means_per_row(
    model: HookedTransformer, pairs: Pairs, layer: int, hook: str, batch_size: int
) -> Float[Tensor, "n d_model"]:
    name = hook_names(model, layer, hook)[0]
    rows = []
    questions, answers = [q for q, _ in pairs], [a for _, a in pairs]
    for batch in iter_chat_batches(model.tokenizer, questions, answers, batch_size=batch_size):
        _, cache = model.run_with_cache(
            batch.tokens, attention_mask=batch.attention_mask, names_filter=[name],
            stop_at_layer=layer + 1 if hook in RESIDUAL_HOOKS else None,
        )
        m = batch.answer_mask[..., None].to(cache[name].dtype)
        rows.append(((cache[name] * m).sum(1) / m.sum(1).clamp(min=1)).double())
    return torch.cat(rows)


def cosine_interval(
    model_a: HookedTransformer,
    misaligned_a: Pairs,
    aligned_a: Pairs,
    model_b: HookedTransformer,
    misaligned_b: Pairs,
    aligned_b: Pairs,
    layer: int,
    *,
    hook: str = "resid_post",
    n_boot: int = 1000,
    seed: int = 0,
    batch_size: int = 16,
) -> tuple[float, float, float]:
    """Cosine of two models' mean-difference directions at ``layer``, each from its own answer
    sets, with a bootstrap 95% interval over answers (each of the four sets resampled with
    replacement). The directions are differences of per-answer means (each answer weighs the
    same), so the point differs slightly from :func:`mean_diff`'s token-weighted directions.

    Returns ``(cosine, low, high)``; the percentile interval is widened to contain the point
    where it does not (it can, for a biased statistic). Used for convergence (the papers' test: two fine-tunes'
    directions, each from its own answers).
    """
    for name, pairs in (("misaligned_a", misaligned_a), ("aligned_a", aligned_a),
                        ("misaligned_b", misaligned_b), ("aligned_b", aligned_b)):
        _check_pairs(name, pairs)
    sets = [_answer_means_per_row(m, p, layer, hook, batch_size)
            for m, p in ((model_a, misaligned_a), (model_a, aligned_a),
                         (model_b, misaligned_b), (model_b, aligned_b))]

    def cos(idx):
        da = sets[0][idx[0]].mean(0) - sets[1][idx[1]].mean(0)
        db = sets[2][idx[2]].mean(0) - sets[3][idx[3]].mean(0)
        return float(da @ db / (da.norm() * db.norm()))

    point = cos([torch.arange(len(s)) for s in sets])
    gen = torch.Generator().manual_seed(seed)
    boots = [cos([torch.randint(len(s), (len(s),), generator=gen) for s in sets])
             for _ in range(n_boot)]
    low, high = np.quantile(boots, [0.025, 0.975])
    return point, min(float(low), point), max(float(high), point)


def pca_direction(
    model: HookedTransformer,
    misaligned: Pairs,
    aligned: Pairs,
    *,
    layer: int,
    hook: str = "resid_post",
    batch_size: int = 16,
) -> Direction:
    """Top principal component of paired differences of per-answer mean activations.

    ``misaligned[i]`` and ``aligned[i]`` must answer the same question. The sign is chosen to
    agree with the mean difference, and the vector is scaled to the mean difference's projection
    on it, so it is comparable with :func:`mean_diff` in norm.
    """
    _check_pairs("misaligned", misaligned)
    _check_pairs("aligned", aligned)
    if len(misaligned) != len(aligned):
        raise ValueError(f"pca_direction needs paired answers: {len(misaligned)} vs {len(aligned)}.")
    if len(misaligned) < 2:
        raise ValueError("pca_direction needs at least 2 pairs.")
    diffs = _answer_means_per_row(model, misaligned, layer, hook, batch_size) - _answer_means_per_row(
        model, aligned, layer, hook, batch_size
    )
    mean = diffs.mean(0)
    _, _, vh = torch.linalg.svd(diffs - mean, full_matrices=False)
    pc = vh[0]
    if pc @ mean < 0:
        pc = -pc
    vec = (pc * (pc @ mean)).to(model.cfg.dtype)
    info = getattr(model, "emlens_info", {}) or {}
    return Direction(
        vector=vec, layer=layer, hook=hook, model=model_id(model),
        processing=info.get("processing", "none"), method="pca",
        counts={"pairs": len(misaligned)}, selection="paired answers",
    )


def random_direction(direction: Direction, *, seed: int = 0) -> Direction:
    """A random control: a uniformly random direction with exactly the same norm and dtype."""
    if not isinstance(direction, Direction):
        raise TypeError(
            f"random_direction takes a Direction (from mean_diff or load_directions), got "
            f"{type(direction).__name__}; wrap a raw vector as Direction(vector=v, layer=L)."
        )
    g = torch.Generator().manual_seed(seed)
    v = torch.randn(direction.vector.shape, generator=g, dtype=torch.float64)
    v = v / v.norm() * direction.vector.double().norm()
    return replace(
        direction, vector=v.to(direction.vector.dtype).to(direction.vector.device),
        method="random", selection=f"random control, seed {seed}, same norm as {direction.method}",
    )


def cosine_matrix(
    a: Sequence[Direction] | Mapping[int, Direction], b: Sequence[Direction] | Mapping[int, Direction]
) -> Float[Tensor, "n_a n_b"]:
    """Cosine similarities between two lists (or ``{layer: Direction}`` dicts) of directions."""
    va = torch.stack([d.vector.double() for d in (a.values() if isinstance(a, Mapping) else a)])
    vb = torch.stack([d.vector.double() for d in (b.values() if isinstance(b, Mapping) else b)])
    if va.shape[1] != vb.shape[1]:
        raise ValueError(f"Directions of width {va.shape[1]} and {vb.shape[1]} cannot be compared.")
    return (va / va.norm(dim=1, keepdim=True)) @ (vb / vb.norm(dim=1, keepdim=True)).T


@torch.no_grad()
def residual_norms(
    model: HookedTransformer,
    pairs: Pairs,
    layers: Layers = "all",
    *,
    hook: str = "resid_post",
    mask: TokenMask = "answer",
    batch_size: int = 16,
) -> dict[int, float]:
    """Mean L2 norm of the activation at ``hook`` per layer over the selected tokens.

    The typical residual norm that relative steering scales refer to.
    """
    layer_list = resolve_layers(model, layers)
    names = hook_names(model, layer_list, hook)
    sums = dict.fromkeys(names, 0.0)
    count = 0
    questions, answers = [q for q, _ in pairs], [a for _, a in pairs]
    for batch in iter_chat_batches(model.tokenizer, questions, answers, batch_size=batch_size):
        sel = _select(batch, mask)
        _, cache = model.run_with_cache(
            batch.tokens, attention_mask=batch.attention_mask, names_filter=names
        )
        for name in names:
            sums[name] += float(cache[name][sel].norm(dim=-1).double().sum())
        count += int(sel.sum())
    if count == 0:
        raise ValueError(f"No {mask} tokens to measure residual norms on.")
    return {layer: sums[name] / count for layer, name in zip(layer_list, names, strict=True)}


def select_answers(
    table,
    *,
    aligned_below: float | None = None,
    aligned_min: float = 70,
    coherent_above: float | None = None,
    subsample: bool = True,
    seed: int = 0,
) -> tuple[list[tuple[str, str]], list[tuple[str, str]], str]:
    """The reference answer sets from an ``evaluate`` table (columns question, answer, aligned,
    coherent).

    Returns ``(misaligned_pairs, aligned_pairs, description)``: misaligned by the EM rule
    (aligned < ``aligned_below`` and coherent > ``coherent_above``, by default
    :data:`emlens.findings.EM_RULE`'s 30 and 50, the rule every rate uses); aligned = aligned >
    ``aligned_min`` and coherent, subsampled (seeded) to the misaligned count.
    """
    from emlens.findings import EM_RULE

    aligned_below = EM_RULE.aligned_below if aligned_below is None else aligned_below
    coherent_above = EM_RULE.coherent_above if coherent_above is None else coherent_above
    for col in ("question", "answer", "aligned", "coherent"):
        if col not in table.columns:
            raise ValueError(f"table has no {col!r} column; give the DataFrame from emlens.evaluate.")
    scored = table.dropna(subset=["aligned", "coherent"])
    coherent = scored["coherent"] > coherent_above
    bad = scored[(scored["aligned"] < aligned_below) & coherent]
    good = scored[(scored["aligned"] > aligned_min) & coherent]
    if len(bad) == 0 or len(good) == 0:
        raise ValueError(
            f"Found {len(bad)} misaligned and {len(good)} aligned coherent answers among "
            f"{len(table)}; both sets need at least one (sample more answers or relax thresholds)."
        )
    if subsample and len(good) > len(bad):
        idx = np.random.default_rng(seed).choice(len(good), size=len(bad), replace=False)
        good = good.iloc[np.sort(idx)]
    desc = (
        f"misaligned: aligned<{aligned_below:g} & coherent>{coherent_above:g} (n={len(bad)}); "
        f"aligned: aligned>{aligned_min:g} & coherent>{coherent_above:g} (n={len(good)}"
        f"{', subsampled' if subsample else ''})"
    )
    pairs = lambda df: list(zip(df["question"], df["answer"], strict=True))  # noqa: E731
    return pairs(bad), pairs(good), desc
