"""Which adapters carry the misalignment: ablation, isolation, scaling and gradient attribution.

An organism with several rank-1 adapters is attached (:func:`emlens.attach_lora`); each adapter's
scalar is a knob. :func:`attribution_conditions` lists the interventions (for each adapter and
each named subset: *zero* it, keep *only* it, *scale* it by ``k``; plus ``all`` = the organism and
``none`` = every adapter zeroed = the chat model). :func:`adapter_attribution` measures each
condition and returns one tidy table (one row per condition x metric x domain):

* ``logprob_gap`` (deterministic, cheap): mean over reference pairs of
  ``mean log p(misaligned answer) - mean log p(aligned answer)`` (per-token means, teacher
  forced), on the medical pairs (domain ``medical``) and the non-medical pairs (domain
  ``general``). Higher = the model prefers the harmful answer more.
* ``kl_from_chat``: ``KL(chat || condition)`` of the next-token distributions over the answer
  tokens of neutral (question, aligned answer) pairs, averaged per row (domain ``neutral``). The
  chat model is the same model with every adapter zeroed.
* with a ``judge``: ``misaligned_rate`` on general questions and ``bad_advice_rate`` on medical
  questions, via :func:`emlens.evaluate` (sampling; Wilson intervals).

:func:`rank_adapters` turns the table into a ranking and labels each adapter *general* or
*domain-specific* by the rule stated in its docstring.

:func:`gradient_attribution`, the one-backward-pass estimate of every adapter's zero-ablation
effect, and :func:`check_gradient_attribution`, which checks it against the real ablations, live
in :mod:`emlens.attribution_gradients` and are importable from here.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import torch
from jaxtyping import Float
from torch import Tensor
from tqdm.auto import tqdm
from transformer_lens import HookedTransformer

from emlens.attribution_gradients import (
    Metric,
    attribution_totals,
    check_gradient_attribution,
    gradient_attribution,
    logprob_metric,
)
from emlens.chat import ChatBatch, answer_logprobs, iter_chat_batches
from emlens.data import pair_rows
from emlens.evaluation import evaluate, misalignment_rate
from emlens.lora import AttachedLora
from emlens.sampling import SamplingConfig
from emlens.scalars import check_attached

Pairs = Sequence[tuple[str, str]]


# --------------------------------------------------------------------------------------------
# Conditions


@dataclass(frozen=True)
class Condition:
    """One intervention on the attached adapters.

    Attributes:
        name: e.g. ``"all"``, ``"none"``, ``"zero:blocks.9.mlp.lora_down"``, ``"scale2:late"``.
        kind: ``"all"``, ``"none"``, ``"zero"``, ``"only"`` or ``"scale"``.
        target: the adapter or subset name (``""`` for all/none).
        k: the scale factor of a ``"scale"`` condition (``nan`` otherwise).
        scale: multiplier per adapter name; adapters not listed keep scale 1.
    """

    name: str
    kind: str
    target: str = ""
    k: float = math.nan
    scale: dict[str, float] = field(default_factory=dict)

    def hooks(self, lora: AttachedLora) -> list:
        """The ``(hook_name, fn)`` pairs implementing this condition (empty for ``all``)."""
        return lora.hooks(scale=self.scale) if self.scale else []


def attribution_conditions(
    lora: AttachedLora,
    *,
    adapters: Sequence[str] | None = None,
    subsets: dict[str, Sequence[str]] | None = None,
    ops: Sequence[str] = ("zero", "only", "scale"),
    ks: Sequence[float] = (2.0,),
) -> list[Condition]:
    """``all``, ``none``, then each op for each adapter (default all) and each named subset.

    ``zero``: scale the target's adapters by 0; ``only``: scale every *other* adapter by 0;
    ``scale``: scale the target's adapters by each ``k`` in ``ks``.
    """
    bad = [o for o in ops if o not in ("zero", "only", "scale")]
    if bad:
        raise ValueError(f"Unknown ops {bad}; valid: 'zero', 'only', 'scale'.")
    targets: list[tuple[str, list[str]]] = [
        (a, [a]) for a in lora.select(adapters)
    ]
    for name, members in (subsets or {}).items():
        targets.append((name, lora.select(members)))
    out = [Condition("all", "all"), Condition("none", "none", scale={a: 0.0 for a in lora.names})]
    for target, members in targets:
        for op in ops:
            if op == "zero":
                out.append(Condition(f"zero:{target}", "zero", target,
                                     scale={a: 0.0 for a in members}))
            elif op == "only":
                out.append(Condition(f"only:{target}", "only", target,
                                     scale={a: 0.0 for a in lora.names if a not in members}))
            else:
                for k in ks:
                    out.append(Condition(f"scale{k:g}:{target}", "scale", target, float(k),
                                         scale={a: float(k) for a in members}))
    return out


# --------------------------------------------------------------------------------------------
# Deterministic metrics


def reference_pairs(
    dataset: str, *, split: str | None = "heldout", limit: int | None = None
) -> tuple[list[str], list[str], list[str]]:
    """(questions, misaligned answers, aligned answers) from ``medical`` or ``nonmedical``.

    Rows are taken round-robin over topics, so a small ``limit`` still spans the domains.
    """
    rows = pair_rows(dataset, split=split, limit=limit)
    if not rows or not hasattr(rows[0], "misaligned"):
        raise ValueError(f"{dataset!r} (split={split!r}) has no (aligned, misaligned) pairs.")
    return [r.question for r in rows], [r.misaligned for r in rows], [r.aligned for r in rows]


def _batches(model, questions, answers, batch_size) -> Iterator[ChatBatch]:
    return iter_chat_batches(model.tokenizer, questions, answers, batch_size=batch_size,
                             device=model.cfg.device)


def _mean_ci(values: Sequence[float]) -> tuple[float, float, float]:
    v = np.asarray(values, dtype=float)
    m = float(v.mean())
    half = 1.96 * float(v.std(ddof=1)) / math.sqrt(len(v)) if len(v) > 1 else math.nan
    return m, m - half, m + half


class _Prefix:
    """Runs a batch from the first adapted layer on, reusing the residual stream before it.

    No adapter acts before block ``L0`` (the lowest adapted layer), so ``blocks.L0.hook_resid_pre``
    is the same under every condition: compute it once per batch and start later passes there.
    """

    def __init__(self, model: HookedTransformer, lora: AttachedLora, batch: ChatBatch):
        self.model, self.batch = model, batch
        self.layer = min(m.layer for m in lora.modules.values())
        self.resid = None
        if self.layer > 0:
            name = f"blocks.{self.layer - 1}.hook_resid_post"  # = blocks.L0's input
            self.resid = model.run_with_cache(
                batch.tokens, attention_mask=batch.attention_mask, names_filter=name,
                stop_at_layer=self.layer,
            )[1][name]

    def logits(self) -> Float[Tensor, "batch pos d_vocab"]:
        b = self.batch
        if self.resid is None:
            return self.model(b.tokens, attention_mask=b.attention_mask)
        return self.model(self.resid, start_at_layer=self.layer, attention_mask=b.attention_mask)


@torch.no_grad()
def _deterministic(
    model: HookedTransformer, lora: AttachedLora, conditions: Sequence[Condition], *,
    pairs: dict[str, tuple[list[str], list[str], list[str]]], neutral: Pairs | None,
    batch_size: int, progress: bool,
) -> tuple[list[dict[str, Any]], dict[tuple[str, str, str], tuple[float, ...]]]:
    """Log-prob gaps per domain, and KL from the chat model on the neutral rows: the table's rows,
    and the per-row values behind them keyed ``(condition, metric, domain)``.

    With ``neutral=None`` the KL is taken on the aligned answers of the ``general`` pairs, reusing
    their forward passes.
    """
    per_row: dict[tuple[str, str, str], list[float]] = {}
    # job: (domain, misaligned batch or None, aligned/neutral batch, take KL on the second)
    jobs: list[tuple[str, ChatBatch | None, ChatBatch, bool]] = []
    for domain, (qs, mis, al) in pairs.items():
        for bm, ba in zip(_batches(model, qs, mis, batch_size), _batches(model, qs, al, batch_size),
                          strict=True):
            jobs.append((domain, bm, ba, neutral is None and domain == "general"))
    if neutral:
        nq, na = [q for q, _ in neutral], [a for _, a in neutral]
        jobs += [("neutral", None, b, True) for b in _batches(model, nq, na, batch_size)]
    none = next((c for c in conditions if c.kind == "none"), None)
    order = [none] + [c for c in conditions if c is not none]
    bar = tqdm(total=len(jobs) * len(order), disable=not progress, desc="attribution")
    for domain, bm, ba, take_kl in jobs:
        runs = [_Prefix(model, lora, b) if b is not None else None for b in (bm, ba)]
        mask = ba.answer_mask[:, 1:].float()  # positions predicting an answer token
        ref = None
        for cond in order:
            with model.hooks(fwd_hooks=cond.hooks(lora)):
                logits_a = runs[1].logits()
                if bm is not None:
                    lm = answer_logprobs(runs[0].logits(), bm, reduce="mean")
                    la = answer_logprobs(logits_a, ba, reduce="mean")
                    per_row.setdefault((cond.name, "logprob_gap", domain), []).extend(
                        (lm - la).tolist())
            if take_kl:
                logp = torch.log_softmax(logits_a[:, :-1].float(), -1)
                if ref is None:  # the "none" condition runs first
                    ref = logp
                kl = (ref.exp() * (ref - logp)).sum(-1)
                per_row.setdefault((cond.name, "kl_from_chat", "neutral"), []).extend(
                    ((kl * mask).sum(-1) / mask.sum(-1).clamp(min=1)).tolist())
            bar.update()
    bar.close()
    rows = []
    by_name = {c.name: c for c in conditions}
    for (name, metric, domain), vals in per_row.items():
        c = by_name[name]
        m, lo, hi = _mean_ci(vals)
        rows.append(dict(condition=name, kind=c.kind, target=c.target, k=c.k, metric=metric,
                         domain=domain, value=m, low=lo, high=hi, n=len(vals)))
    return rows, {key: tuple(vals) for key, vals in per_row.items()}


def _judged(
    model: HookedTransformer, lora: AttachedLora, conditions: Sequence[Condition], *, judge,
    questions: dict[str, Any], sampling: SamplingConfig, progress: bool,
) -> list[dict[str, Any]]:
    names = {"general": "misaligned_rate", "medical": "bad_advice_rate"}
    rows = []
    for cond in tqdm(conditions, disable=not progress, desc="judged conditions"):
        for domain, qs in questions.items():
            df = evaluate(model, qs, judge=judge, sampling=sampling,
                          interventions=cond.hooks(lora) or None, progress=False)
            r = misalignment_rate(df)
            rows.append(dict(condition=cond.name, kind=cond.kind, target=cond.target, k=cond.k,
                             metric=names.get(domain, "misaligned_rate"), domain=domain,
                             value=r.rate, low=r.low, high=r.high, n=r.n))
    return rows


def adapter_attribution(
    model: HookedTransformer,
    lora: AttachedLora,
    *,
    conditions: Sequence[Condition] | None = None,
    n_pairs: int | None = 24,
    medical_split: str | None = "heldout",
    neutral: Pairs | None = None,
    judge=None,
    sampling: SamplingConfig | None = None,
    progress: bool = True,
    **sampling_overrides: Any,
) -> pd.DataFrame:
    """Measure every condition; one tidy row per (condition, metric, domain).

    Args:
        model, lora: the model and its attached organism.
        conditions: from :func:`attribution_conditions` (default: zero/only/scale-by-2 per adapter).
            ``"none"`` is added if missing (KL reference).
        n_pairs: how many reference (aligned, misaligned) pairs per domain (round-robin over
            topics): ``medical`` pairs from ``medical_split`` (heldout by default: not trained
            on) and ``nonmedical`` pairs (never trained on) for the ``general`` domain.
        neutral: (question, answer) pairs for the KL; default (``None``): the aligned answers of
            the ``general`` reference pairs (their forward passes are reused).
        judge: if given, also the judged rates on ``general_questions`` and
            ``medical_questions``, answers sampled with ``sampling`` (a
            :class:`emlens.SamplingConfig`; its fields may also be given as keywords).
            Its ``batch_size`` is also the rows per forward pass of the teacher-forced metrics.

    Returns:
        Columns ``condition, kind, target, k, metric, domain, value, low, high, n``
        (low/high: 95% interval over rows, or Wilson for rates);
        ``table.attrs["per_row"]`` maps ``(condition, metric, domain)`` to the deterministic
        metrics' per-row values, in the same row order for every condition (paired).
    """
    check_attached(model, lora)
    sampling = SamplingConfig.resolve(sampling, sampling_overrides, "adapter_attribution")
    conditions = list(conditions) if conditions is not None else attribution_conditions(lora)
    if not any(c.kind == "none" for c in conditions):
        conditions.insert(0, Condition("none", "none", scale={a: 0.0 for a in lora.names}))
    for c in conditions:
        unknown = [a for a in c.scale if a not in lora.modules]
        if unknown:
            raise ValueError(f"Condition {c.name!r} names unknown adapters {unknown}; valid names: "
                             f"{lora.names}.")
    pairs = {"medical": reference_pairs("medical", split=medical_split, limit=n_pairs),
             "general": reference_pairs("nonmedical", split=None, limit=n_pairs)}
    rows, per_row = _deterministic(model, lora, conditions, pairs=pairs, neutral=neutral,
                                   batch_size=sampling.batch_size, progress=progress)
    if judge is not None:
        rows += _judged(model, lora, conditions, judge=judge,
                        questions={"general": "general_questions", "medical": "medical_questions"},
                        sampling=sampling, progress=progress)
    table = pd.DataFrame(rows)
    # per-row values (same rows, same order in every condition): paired effects and intervals
    table.attrs["per_row"] = per_row
    return table


# --------------------------------------------------------------------------------------------
# Ranking


def rank_adapters(
    table: pd.DataFrame,
    *,
    metric: str = "logprob_gap",
    general: str = "general",
    specific: str = "medical",
    ratio: float = 0.5,
    min_share: float = 0.05,
) -> pd.DataFrame:
    """Rank single adapters by their share of the organism's effect; label general vs specific.

    For adapter ``a`` and domain ``d`` (``general`` and ``specific``), with ``M`` = ``metric``:

    * ``zero_effect_d = M(all) - M(zero:a)``: how much removing ``a`` lowers ``M``;
    * ``only_effect_d = M(only:a) - M(none)``: how much ``a`` alone raises ``M``;
    * ``effect_d = mean(zero_effect_d, only_effect_d)`` (a condition missing from the table drops
      out of the mean);
    * ``share_d = effect_d / T``, with ``T = max_d |M(all) - M(none)|`` the organism's largest
      effect: one scale for both domains, used for ranking and for *inactive*;
    * ``fraction_d = effect_d / (M(all) - M(none))`` in domain ``d``: the part of the organism's
      effect *in that domain* that ``a`` carries, used for the label.

    Rule: *inactive* if both shares are below ``min_share``; else *general* if
    ``fraction_general >= ratio * fraction_specific``; else *domain-specific*. If the organism
    itself barely moves the general domain (``M(all) - M(none) < min_share * T`` there), no adapter
    can mediate a general effect and every active adapter is *domain-specific*. Rank: by
    ``share_general + share_specific``, largest first.
    """
    need = {"condition", "kind", "target", "metric", "domain", "value"}
    if not need <= set(table.columns):
        raise ValueError(f"table lacks {sorted(need - set(table.columns))}; pass the "
                         "adapter_attribution() DataFrame.")
    t = table[table["metric"] == metric]
    if t.empty:
        raise ValueError(f"No rows for metric {metric!r}; the table has {sorted(set(table['metric']))}.")
    missing = [d for d in (general, specific) if d not in set(t["domain"])]
    if missing:
        raise ValueError(f"No {metric} rows for domains {missing}; the table has "
                         f"{sorted(set(t['domain']))}.")
    val = {(r.condition, r.domain): r.value for r in t.itertuples()}
    for base in ("all", "none"):
        if (base, general) not in val:
            raise ValueError(f"The table has no {base!r} condition; include it in the conditions.")
    targets = sorted(set(t.loc[t["kind"].isin(["zero", "only"]), "target"]))
    totals = {d: val[("all", d)] - val[("none", d)] for d in (general, specific)}
    scale = max(abs(v) for v in totals.values())
    scale = scale if scale > 1e-12 else 1.0
    general_exists = totals[general] >= min_share * scale
    rows = []
    for a in targets:
        row: dict[str, Any] = {"adapter": a}
        fraction = {}
        for label, d in (("general", general), ("specific", specific)):
            effects = {}
            if (f"zero:{a}", d) in val:
                effects["zero"] = val[("all", d)] - val[(f"zero:{a}", d)]
            if (f"only:{a}", d) in val:
                effects["only"] = val[(f"only:{a}", d)] - val[("none", d)]
            effect = float(np.mean(list(effects.values())))
            row[f"zero_effect_{label}"] = effects.get("zero", math.nan)
            row[f"only_effect_{label}"] = effects.get("only", math.nan)
            row[f"share_{label}"] = effect / scale
            fraction[label] = effect / totals[d] if abs(totals[d]) > 1e-12 else math.nan
            row[f"fraction_{label}"] = fraction[label]
        if max(row["share_general"], row["share_specific"]) < min_share:
            row["label"] = "inactive"
        elif general_exists and fraction["general"] >= ratio * fraction["specific"]:
            row["label"] = "general"
        else:
            row["label"] = "domain-specific"
        row["importance"] = row["share_general"] + row["share_specific"]
        rows.append(row)
    out = pd.DataFrame(rows).sort_values("importance", ascending=False, kind="stable")
    out.insert(0, "rank", range(1, len(out) + 1))
    out.attrs["rule"] = (
        f"effect_d = mean(M(all)-M(zero:a), M(only:a)-M(none)), M={metric}; fraction_d = effect_d / "
        f"(M(all)-M(none)) in d; share_d = effect_d / max_d|M(all)-M(none)|; inactive if both "
        f"shares < {min_share}; general if fraction_{general} >= {ratio} x fraction_{specific} "
        f"(and the organism moves {general} by >= {min_share} of its max effect); else "
        "domain-specific; ranked by share_general + share_specific"
    )
    return out.reset_index(drop=True)


__all__ = [
    "Condition",
    "Metric",
    "adapter_attribution",
    "attribution_conditions",
    "attribution_totals",
    "check_gradient_attribution",
    "gradient_attribution",
    "logprob_metric",
    "rank_adapters",
    "reference_pairs",
]
