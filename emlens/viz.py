"""Views of LoRA scalars, projections, probes and attributions.

Token views are circuitsvis HTML (``RenderedHTML``): they render inline in a notebook, and
``str(view)`` (or :func:`save_html`) gives a standalone HTML file. Figures are matplotlib
``Figure`` objects, saved to ``path`` when one is given (use the Agg backend headless).

    >>> view = token_scalars_view(ts, row=3)          # ts from emlens.collect_scalars
    >>> save_html(view, "row3.html")
    >>> fig = plot_probe_coefficients(probe, path="coef.png")
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from jaxtyping import Float
from torch import Tensor
from transformer_lens import HookedTransformer

from emlens.chat import tokenize_chat
from emlens.probes import Probe
from emlens.scalars import Part, TokenScalars, readable_tokens


def _short(name: str) -> str:
    """``blocks.9.mlp.lora_down`` -> ``L9 down`` (other names unchanged)."""
    parts = name.split(".")
    if len(parts) == 4 and parts[0] == "blocks" and parts[3].startswith("lora_"):
        return f"L{parts[1]} {parts[3].removeprefix('lora_')}"
    return name


def token_scalars_view(
    scalars: TokenScalars,
    row: int,
    *,
    part: Part = "answer",
    adapters: Sequence[str] | None = None,
):
    """circuitsvis ``colored_tokens_multi`` of one row: a token strip per adapter.

    Works for LoRA scalars (:func:`emlens.collect_scalars`) and attributions
    (:func:`emlens.attribution.gradient_attribution`) alike. Returns a circuitsvis ``RenderedHTML``.
    """
    from circuitsvis.tokens import colored_tokens_multi

    if adapters is not None:
        scalars = scalars.select(list(adapters))
    tokens, values = scalars.row(row, part)
    if not tokens:
        raise ValueError(f"Row {row} has no {part} tokens; try part='all'.")
    return colored_tokens_multi(tokens, values.float(), [_short(a) for a in scalars.adapters])


def projection_view(
    model: HookedTransformer,
    question: str,
    answer: str,
    direction,
    *,
    layer: int | None = None,
    hook: str = "resid_post",
    part: Part = "answer",
):
    """circuitsvis colored tokens: each token's residual activation projected on a direction.

    ``direction`` is an ``emlens.Direction`` (its ``layer`` and ``hook`` are used unless given)
    or a ``[d_model]`` vector (then ``layer`` is required).
    """
    from circuitsvis.tokens import colored_tokens

    vec = getattr(direction, "vector", direction)
    layer = getattr(direction, "layer", None) if layer is None else layer
    hook = getattr(direction, "hook", hook)
    if layer is None:
        raise ValueError("Give layer= for a plain vector direction (or pass an emlens.Direction).")
    if not isinstance(vec, Tensor) or vec.shape != (model.cfg.d_model,):
        raise ValueError(f"direction must be a [{model.cfg.d_model}] vector; got "
                         f"{getattr(vec, 'shape', type(vec).__name__)}.")
    values, tokens = _projection(model, question, answer, vec, layer, hook, part)
    return colored_tokens(tokens, values)


@torch.no_grad()
def _projection(model, question, answer, vec, layer, hook, part) -> tuple[Tensor, list[str]]:
    batch = tokenize_chat(model.tokenizer, [question], [answer], device=model.cfg.device)
    name = f"blocks.{layer}.hook_{hook.removeprefix('hook_')}"
    if name not in model.hook_dict:
        raise ValueError(f"No hook point {name!r} in this model.")
    _, cache = model.run_with_cache(batch.tokens, attention_mask=batch.attention_mask,
                                    names_filter=name, stop_at_layer=layer + 1)
    unit = (vec / vec.norm()).to(cache[name].device, cache[name].dtype)
    proj = (cache[name][0] @ unit).float().cpu()
    mask = {"answer": batch.answer_mask, "prompt": batch.prompt_mask,
            "all": batch.attention_mask.bool()}[part][0].cpu()
    ids = batch.tokens[0].cpu()[mask].tolist()
    return proj[mask], readable_tokens(model.tokenizer.convert_ids_to_tokens(ids))


def save_html(view, path: str | os.PathLike) -> Path:
    """Write a circuitsvis view to a standalone HTML file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"<!DOCTYPE html>\n<html><body>\n{view}\n</body></html>\n")
    return path


def _finish(fig, path: str | os.PathLike | None):
    fig.tight_layout()
    if path is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=120)
    return fig


def plot_probe_coefficients(
    probe: Probe, *, top: int | None = 30, title: str | None = None,
    path: str | os.PathLike | None = None,
):
    """Horizontal bars of a probe's standardised coefficients (sign coloured), largest on top."""
    import matplotlib.pyplot as plt

    coef = probe.coefficients().head(top).iloc[::-1]
    fig, ax = plt.subplots(figsize=(6, 0.3 * len(coef) + 1.2))
    colours = ["tab:red" if c > 0 else "tab:blue" for c in coef["coef"]]
    ax.barh([_short(f) for f in coef["feature"]], coef["coef"], color=colours)
    ax.axvline(0, color="black", lw=0.8)
    auc = probe.metrics.get("roc_auc", {}).get("mean")
    ax.set(xlabel="coefficient (per std of feature; + towards label 1)",
           title=title or (f"probe coefficients (CV AUC {auc:.2f})" if auc is not None
                           else "probe coefficients"))
    return _finish(fig, path)


def plot_attribution(
    ranking: pd.DataFrame, *, title: str | None = None, path: str | os.PathLike | None = None
):
    """Grouped bars per adapter: general vs specific effect, with each adapter's label.

    ``ranking`` is :func:`emlens.rank_adapters` output. Bars are ``fraction_*`` (the part of the
    organism's effect in each domain that the adapter carries, what the label compares) when
    present, else ``share_*``.
    """
    import matplotlib.pyplot as plt

    need = {"adapter", "share_general", "share_specific", "label"}
    if not need <= set(ranking.columns):
        raise ValueError(f"ranking lacks {sorted(need - set(ranking.columns))}; pass rank_adapters().")
    kind = "fraction" if {"fraction_general", "fraction_specific"} <= set(ranking.columns) else "share"
    x = np.arange(len(ranking))
    fig, ax = plt.subplots(figsize=(max(5, 0.8 * len(ranking) + 2), 4))
    ax.bar(x - 0.2, ranking[f"{kind}_general"], 0.4, label="general (non-medical)")
    ax.bar(x + 0.2, ranking[f"{kind}_specific"], 0.4, label="specific (medical)")
    ax.set_xticks(x, [f"{_short(a)}\n{lab}" for a, lab in zip(ranking["adapter"], ranking["label"],
                                                               strict=True)], fontsize=7)
    ax.axhline(0, color="black", lw=0.8)
    ylabel = ("fraction of the organism's effect in the domain" if kind == "fraction"
              else "share of the organism's largest effect")
    ax.set(ylabel=ylabel, title=title or "per-adapter attribution (ranked)")
    ax.legend(fontsize=8)
    return _finish(fig, path)


def plot_adapter_scales(
    table: pd.DataFrame, *, metric: str = "logprob_gap", title: str | None = None,
    path: str | os.PathLike | None = None,
):
    """Metric vs scale factor per adapter, one panel per domain.

    ``table`` is :func:`emlens.adapter_attribution` output with ``scale`` conditions (several
    ``ks``); the organism (``all``) is drawn at k = 1 for each adapter.
    """
    import matplotlib.pyplot as plt

    t = table[table["metric"] == metric]
    scaled = t[t["kind"] == "scale"]
    if scaled.empty:
        raise ValueError("The table has no 'scale' conditions; build them with "
                         "attribution_conditions(lora, ops=['scale'], ks=[...]).")
    domains = sorted(set(scaled["domain"]))
    fig, axes = plt.subplots(1, len(domains), figsize=(5 * len(domains), 3.8), squeeze=False)
    for ax, d in zip(axes[0], domains, strict=True):
        base = t[(t["condition"] == "all") & (t["domain"] == d)]["value"]
        for target, g in scaled[scaled["domain"] == d].groupby("target"):
            g = g.sort_values("k")
            ks, vals = list(g["k"]), list(g["value"])
            if len(base):
                ks, vals = zip(*sorted(zip([1.0] + ks, [float(base.iloc[0])] + vals,
                                           strict=True)), strict=True)
            ax.plot(ks, vals, marker="o", label=_short(target))
        ax.set(xlabel="scale factor k", ylabel=metric, title=d)
        ax.legend(fontsize=7)
    fig.suptitle(title or f"{metric} vs adapter scale")
    return _finish(fig, path)


def scalars_heatmap(
    values: Float[Tensor, "pos n_adapters"], tokens: Sequence[str], adapters: Sequence[str], *,
    path: str | os.PathLike | None = None,
):
    """Static heatmap (adapters x tokens) for papers, where HTML views don't fit."""
    import matplotlib.pyplot as plt

    v = values.float().numpy().T
    lim = float(np.abs(v).max()) or 1.0
    fig, ax = plt.subplots(figsize=(max(6, 0.25 * len(tokens)), 0.35 * len(adapters) + 1.5))
    ax.imshow(v, cmap="RdBu_r", vmin=-lim, vmax=lim, aspect="auto")
    ax.set_yticks(range(len(adapters)), [_short(a) for a in adapters], fontsize=7)
    ax.set_xticks(range(len(tokens)), list(tokens), rotation=90, fontsize=6)
    return _finish(fig, path)


__all__ = [
    "plot_attribution",
    "plot_probe_coefficients",
    "plot_adapter_scales",
    "projection_view",
    "save_html",
    "scalars_heatmap",
    "token_scalars_view",
]
