"""Gradient attribution of attached adapters: one backward pass instead of one ablation each.

:func:`gradient_attribution` is the one-backward-pass estimate: for each adapter and token,
``scalar * d(metric)/d(scalar)``. Summed over a row's tokens it is the derivative of the metric
with respect to scaling the adapter at scale 1, so its negative is the first-order estimate of
zeroing the adapter. :func:`check_gradient_attribution` compares that estimate with the real
zero-ablation effects and reports the correlation. The ablation conditions, their measured table
and the ranking are :mod:`emlens.attribution`, which re-exports everything here.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import pandas as pd
import torch
from jaxtyping import Float
from torch import Tensor
from tqdm.auto import tqdm
from transformer_lens import HookedTransformer

from emlens.chat import ChatBatch, answer_logprobs, iter_chat_batches
from emlens.lora import AttachedLora
from emlens.scalars import TokenScalars, check_attached, join_token_scalars, token_rows

Metric = Callable[[Tensor, ChatBatch], Tensor]  # (logits, batch) -> per-row value [batch]


def logprob_metric(reduce: str = "mean") -> Metric:
    """Metric: each row's answer log-probability (``"mean"`` per token, or ``"sum"``)."""

    def metric(logits: Tensor, batch: ChatBatch) -> Tensor:
        return answer_logprobs(logits, batch, reduce=reduce)

    return metric


def gradient_attribution(
    model: HookedTransformer,
    lora: AttachedLora,
    questions: Sequence[str],
    answers: Sequence[str],
    *,
    metric: Metric | None = None,
    adapters: Sequence[str] | None = None,
    batch_size: int = 8,
    progress: bool = True,
) -> TokenScalars:
    """``scalar x d(metric)/d(scalar)`` for every adapter and token, one backward pass per batch.

    ``metric(logits, batch) -> [batch]`` is summed over rows before the backward pass (rows are
    independent, so each row's gradients are its own). Default: mean answer log-probability.
    Gradients are total derivatives: they flow through later adapters' scalars too, so a row's
    sum over tokens equals ``d metric / d scale_a`` at scale 1 (what finite differences measure).

    Returns:
        :class:`TokenScalars` of attributions over every real token (prompt tokens included: an
        adapter acting on the prompt changes the answer through attention);
        ``.aggregate("sum", part="all")`` gives per-row, per-adapter totals.
    """
    check_attached(model, lora)
    names = lora.select(adapters)
    rank_r = [n for n in names if lora.modules[n].rank != 1]
    if rank_r:
        raise ValueError(f"Gradient attribution needs rank-1 adapters; {rank_r} have rank > 1.")
    metric = metric or logprob_metric("mean")
    hook_names = [lora.modules[n].hook.name for n in names]
    metas, chunks, offset = [], [], 0
    acts: dict[str, Tensor] = {}  # this batch's scalar activations, graph attached

    def keep(act: Tensor, hook) -> Tensor:
        acts[hook.name] = act
        return act

    def leaf_embed(x: Tensor, hook) -> Tensor:
        # Make sure the graph exists even if the model's parameters are frozen.
        return x if x.requires_grad else x.detach().requires_grad_(True)

    n_batches = -(-len(questions) // batch_size)
    batches = iter_chat_batches(model.tokenizer, questions, answers, batch_size=batch_size,
                                device=model.cfg.device)
    for batch in tqdm(batches, total=n_batches, disable=not progress, desc="gradient attribution"):
        acts.clear()
        with torch.enable_grad(), model.hooks(
            fwd_hooks=[("hook_embed", leaf_embed)] + [(h, keep) for h in hook_names]
        ):
            logits = model(batch.tokens, attention_mask=batch.attention_mask)
            total = metric(logits, batch).sum()
            grads = torch.autograd.grad(total, [acts[h] for h in hook_names], allow_unused=True)
        attr = torch.stack(
            [acts[h].detach() * (torch.zeros_like(acts[h]) if g is None else g)
             for h, g in zip(hook_names, grads, strict=True)], dim=-1,
        )
        meta, real = token_rows(batch, model.tokenizer, offset)
        chunks.append(attr.cpu().float()[real])
        metas.append(meta)
        offset += len(batch)
    return join_token_scalars(chunks, metas, names, offset)


@torch.no_grad()
def _metric_values(model, lora, questions, answers, metric, hooks, batch_size) -> Tensor:
    out = []
    with model.hooks(fwd_hooks=hooks):
        for b in iter_chat_batches(model.tokenizer, questions, answers, batch_size=batch_size,
                                   device=model.cfg.device):
            out.append(metric(model(b.tokens, attention_mask=b.attention_mask), b).float().cpu())
    return torch.cat(out)


def check_gradient_attribution(
    model: HookedTransformer,
    lora: AttachedLora,
    questions: Sequence[str],
    misaligned: Sequence[str],
    aligned: Sequence[str],
    *,
    batch_size: int = 8,
    progress: bool = True,
) -> pd.DataFrame:
    """Gradient estimate vs real zero-ablation effect on the log-prob gap, per adapter.

    The metric is the per-row gap ``mean log p(misaligned) - mean log p(aligned)``. For each
    adapter: ``predicted`` = minus the summed attribution (first-order effect of zeroing it),
    ``actual`` = gap with the adapter zeroed minus the gap with every adapter on; both averaged
    over rows. ``df.attrs`` holds ``pearson`` and ``spearman`` across adapters and
    ``pearson_rows`` across (row, adapter) pairs.
    """
    check_attached(model, lora)
    if not (len(questions) == len(misaligned) == len(aligned)):
        raise ValueError(f"{len(questions)} questions, {len(misaligned)} misaligned and "
                         f"{len(aligned)} aligned answers; they must pair up.")
    metric = logprob_metric("mean")
    kw = dict(metric=metric, batch_size=batch_size, progress=progress)
    pred_rows = -(
        gradient_attribution(model, lora, questions, misaligned, **kw).aggregate("sum", part="all")
        - gradient_attribution(model, lora, questions, aligned, **kw).aggregate("sum", part="all")
    )

    def gap(hooks) -> Tensor:
        return (_metric_values(model, lora, questions, misaligned, metric, hooks, batch_size)
                - _metric_values(model, lora, questions, aligned, metric, hooks, batch_size))

    base = gap([])
    actual_rows = {}
    for a in tqdm(lora.names, disable=not progress, desc="zero-ablation"):
        actual_rows[a] = (gap(lora.hooks(a, scale=0.0)) - base).numpy()
    actual = pd.DataFrame(actual_rows)[list(pred_rows.columns)]
    df = pd.DataFrame({"adapter": list(pred_rows.columns),
                       "predicted": pred_rows.mean().to_numpy(),
                       "actual": actual.mean().to_numpy()})
    df.attrs["pearson"] = float(np.corrcoef(df["predicted"], df["actual"])[0, 1])
    df.attrs["spearman"] = float(df["predicted"].rank().corr(df["actual"].rank()))
    df.attrs["pearson_rows"] = float(np.corrcoef(pred_rows.to_numpy().ravel(),
                                                 actual.to_numpy().ravel())[0, 1])
    return df


def attribution_totals(attributions: TokenScalars, *, part: str = "all") -> Float[Tensor, " n_adapters"]:
    """Per-adapter attribution summed over ``part`` tokens and averaged over rows."""
    return torch.tensor(attributions.aggregate("sum", part=part).mean().to_numpy())


__all__ = [
    "Metric",
    "attribution_totals",
    "check_gradient_attribution",
    "gradient_attribution",
    "logprob_metric",
]
