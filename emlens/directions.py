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

Artefacts: a :class:`Direction` and its files (:func:`save_directions`, :func:`load_directions`:
safetensors with JSON metadata, or llama.cpp's control-vector GGUF) live in
:mod:`emlens.direction_io` and are importable from here.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Literal

import numpy as np
import torch
from jaxtyping import Float
from torch import Tensor
from tqdm.auto import tqdm
from transformer_lens import HookedTransformer

from emlens.chat import ChatBatch, iter_chat_batches
from emlens.direction_io import Direction, DirectionFormat, load_directions, save_directions
from emlens.hooks import RESIDUAL_HOOKS, WRITER_HOOKS, Layers, hook_names, resolve_layers
from emlens.models import model_id

TokenMask = Literal["answer", "prompt", "all"]
Pairs = Sequence[tuple[str, str]]


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


def _check_pairs(**sets: Pairs) -> None:
    """Each named set is a non-empty list of (question, answer) string pairs."""
    for name, pairs in sets.items():
        if len(pairs) == 0:
            raise ValueError(f"{name} is empty; a direction needs at least one (question, answer) "
                             "pair.")
        for i, pair in enumerate(pairs):
            if len(pair) != 2 or not all(isinstance(x, str) for x in pair):
                raise ValueError(f"{name}[{i}] is not a (question, answer) pair of strings: "
                                 f"{pair!r:.80}")


def _pair_batches(model: HookedTransformer, pairs: Pairs, batch_size: int) -> Iterator[ChatBatch]:
    """Chat batches of (question, answer) pairs, the answer span marked."""
    questions, answers = [q for q, _ in pairs], [a for _, a in pairs]
    return iter_chat_batches(model.tokenizer, questions, answers, batch_size=batch_size)


def _direction(model: HookedTransformer, vector: Tensor, layer: int, hook: str, **fields) -> Direction:
    """A Direction read from ``model``, carrying its id and weight processing."""
    info = getattr(model, "emlens_info", {}) or {}
    return Direction(vector=vector.to(model.cfg.dtype), layer=layer, hook=hook,
                     model=model_id(model), processing=info.get("processing", "none"), **fields)


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
    total = -(-len(pairs) // batch_size)
    return collect_means(model, _pair_batches(model, pairs, batch_size), layers, hook=hook,
                         mask=mask, progress=progress, total=total)


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
    _check_pairs(misaligned=misaligned, aligned=aligned)
    kwargs = dict(hook=hook, mask=mask, batch_size=batch_size, progress=progress)
    pos = pair_means(model, misaligned, layers, **kwargs)
    neg = pair_means(model, aligned, layers, **kwargs)
    counts = {"pos_answers": pos.rows, "pos_tokens": pos.tokens,
              "neg_answers": neg.rows, "neg_tokens": neg.tokens}
    method = "mean_diff" if mask == "answer" else f"mean_diff_{mask}"
    return {layer: _direction(model, pos.means[layer] - neg.means[layer], layer, hook,
                              method=method, counts=counts, selection=selection)
            for layer in pos.means}


@torch.no_grad()
def _answer_means_per_row(
    model: HookedTransformer, pairs: Pairs, layers: Sequence[int], hook: str, batch_size: int
) -> dict[int, Float[Tensor, "n d_model"]]:
    """Per answer, the mean activation over its answer tokens at each of ``layers`` (one forward
    pass per batch for all layers)."""
    names = {layer: hook_names(model, layer, hook)[0] for layer in layers}
    rows: dict[int, list[Tensor]] = {layer: [] for layer in layers}
    for batch in _pair_batches(model, pairs, batch_size):
        _, cache = model.run_with_cache(
            batch.tokens, attention_mask=batch.attention_mask, names_filter=list(names.values()),
            stop_at_layer=max(layers) + 1 if hook in RESIDUAL_HOOKS else None,
        )
        m = batch.answer_mask[..., None].double()
        for layer, name in names.items():  # float64 before the sum: no low-precision means
            rows[layer].append((cache[name].double() * m).sum(1) / m.sum(1).clamp(min=1))
    return {layer: torch.cat(r) for layer, r in rows.items()}


def project_answers(
    model: HookedTransformer,
    pairs: Pairs,
    direction: Direction,
    *,
    batch_size: int = 16,
) -> Float[Tensor, " n"]:
    """Each answer's projection onto ``direction``: the mean activation over its answer tokens
    at the direction's layer and hook, dotted with the unit direction (float64).

    The score of data screening by projection (persona-vector work): rank the rows of a training
    set by it and train on the top ones. ``pairs`` are ``(question, answer)`` strings, chat
    formatted as everywhere in emlens; row ``i`` of the result is ``pairs[i]``'s score, in the
    residual stream's units. Scores compare within one model and direction; across models only
    their order does.
    """
    if not isinstance(direction, Direction):
        raise TypeError(f"project_answers takes a Direction, got {type(direction).__name__}; wrap "
                        "a raw vector as Direction(vector=v, layer=L).")
    _check_pairs(pairs=pairs)
    if direction.vector.shape != (model.cfg.d_model,):
        raise ValueError(f"direction has shape {tuple(direction.vector.shape)} but the model's "
                         f"d_model is {model.cfg.d_model}: it was made on another model.")
    norm = direction.vector.double().norm()
    if not torch.isfinite(norm) or norm == 0:
        raise ValueError(f"direction at layer {direction.layer} has norm {float(norm)}; a "
                         "projection needs a non-zero, finite direction.")
    means = _answer_means_per_row(model, pairs, [direction.layer], direction.hook,
                                  batch_size)[direction.layer]
    return means @ (direction.vector.double().to(means.device) / norm)


def cosine_intervals(
    model_a: HookedTransformer,
    misaligned_a: Pairs,
    aligned_a: Pairs,
    model_b: HookedTransformer,
    misaligned_b: Pairs,
    aligned_b: Pairs,
    layers: Sequence[int],
    *,
    hook: str = "resid_post",
    n_boot: int = 1000,
    seed: int = 0,
    batch_size: int = 16,
) -> dict[int, tuple[float, float, float]]:
    """:func:`cosine_interval` at each of ``layers``, from one forward pass per answer batch;
    every layer uses the same ``n_boot`` resamples of the answers.

    Returns ``{layer: (cosine, low, high)}``.
    """
    _check_pairs(misaligned_a=misaligned_a, aligned_a=aligned_a, misaligned_b=misaligned_b,
                 aligned_b=aligned_b)
    layers = list(layers)
    if not layers:
        raise ValueError("cosine_intervals: give at least one layer.")
    sets = [_answer_means_per_row(m, p, layers, hook, batch_size)
            for m, p in ((model_a, misaligned_a), (model_a, aligned_a),
                         (model_b, misaligned_b), (model_b, aligned_b))]
    sizes = [len(next(iter(s.values()))) for s in sets]

    def cos(idx, layer):
        da = sets[0][layer][idx[0]].mean(0) - sets[1][layer][idx[1]].mean(0)
        db = sets[2][layer][idx[2]].mean(0) - sets[3][layer][idx[3]].mean(0)
        return float(da @ db / (da.norm() * db.norm()))

    full = [torch.arange(n) for n in sizes]
    gen = torch.Generator().manual_seed(seed)
    draws = [[torch.randint(n, (n,), generator=gen) for n in sizes] for _ in range(n_boot)]
    out = {}
    for layer in layers:
        point = cos(full, layer)
        boots = [cos(idx, layer) for idx in draws]
        low, high = np.quantile(boots, [0.025, 0.975])
        out[layer] = (point, min(float(low), point), max(float(high), point))
    return out


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
    where it does not (it can, for a biased statistic). Used for convergence (the papers' test:
    two fine-tunes' directions, each from its own answers). :func:`cosine_intervals` does many
    layers in one pass.
    """
    return cosine_intervals(model_a, misaligned_a, aligned_a, model_b, misaligned_b, aligned_b,
                            [layer], hook=hook, n_boot=n_boot, seed=seed,
                            batch_size=batch_size)[layer]


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
    _check_pairs(misaligned=misaligned, aligned=aligned)
    if len(misaligned) != len(aligned):
        raise ValueError(f"pca_direction needs paired answers: {len(misaligned)} vs {len(aligned)}.")
    if len(misaligned) < 2:
        raise ValueError("pca_direction needs at least 2 pairs.")
    diffs = (_answer_means_per_row(model, misaligned, [layer], hook, batch_size)[layer]
             - _answer_means_per_row(model, aligned, [layer], hook, batch_size)[layer])
    mean = diffs.mean(0)
    _, _, vh = torch.linalg.svd(diffs - mean, full_matrices=False)
    pc = vh[0]
    if pc @ mean < 0:
        pc = -pc
    return _direction(model, pc * (pc @ mean), layer, hook, method="pca",
                      counts={"pairs": len(misaligned)}, selection="paired answers")


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
    for batch in _pair_batches(model, pairs, batch_size):
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


__all__ = [
    "Direction",
    "DirectionFormat",
    "Means",
    "collect_means",
    "cosine_interval",
    "cosine_intervals",
    "cosine_matrix",
    "load_directions",
    "mean_diff",
    "pair_means",
    "pca_direction",
    "project_answers",
    "random_direction",
    "residual_norms",
    "save_directions",
    "select_answers",
]
