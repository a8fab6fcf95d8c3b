"""Section 5: per-adapter attribution (zero / keep-only ablations ranked), with gradient
attribution checked against real ablation.

:func:`measure` runs the ablations and the gradient check; :func:`render` writes the tables, the
figure and the two findings.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd

from emlens.demo.common import Context, all_rank1
from emlens.findings import GAP_DELTA, Comparison, Effect, Finding
from emlens.report import Report


@dataclass(frozen=True)
class AttributionResult:
    """Per-adapter attribution of section 5.

    ``table`` is :func:`emlens.attribution.adapter_attribution`'s (per-pair values in
    ``table.attrs["per_row"]``), ``totals`` its organism-vs-chat rows, ``ranking``
    :func:`emlens.attribution.rank_adapters`'s and ``check`` the gradient estimate against real
    zero-ablation (:func:`emlens.attribution.check_gradient_attribution`). ``skipped`` says why
    nothing was measured (adapters not rank 1); then every table is ``None``."""

    n_pairs: int  # held-out pairs per domain
    ops: tuple[str, ...]  # the ablations: "zero", and "only" (keep one adapter alone)
    skipped: str | None = None
    table: pd.DataFrame | None = None  # results["attribution"]
    totals: pd.DataFrame | None = None
    ranking: pd.DataFrame | None = None  # results["ranking"]
    check: pd.DataFrame | None = None
    findings: tuple[Finding, ...] = ()


def measure(ctx: Context) -> AttributionResult:
    """Zero (and keep-only) ablations of each adapter on held-out medical and non-medical pairs,
    ranked; gradient attribution checked against the zero-ablations on the medical pairs."""
    from emlens.attribution import (
        adapter_attribution,
        attribution_conditions,
        check_gradient_attribution,
        rank_adapters,
    )
    from emlens.data import pair_rows
    from emlens.lora import attach_lora

    cfg, n = ctx.cfg, ctx.cfg.attribution_pairs
    head = {"n_pairs": n, "ops": tuple(cfg.attribution_ops)}
    if not all_rank1(ctx.adapter):
        return AttributionResult(**head,
                                 skipped="Skipped: per-adapter attribution needs rank-1 adapters.")
    with attach_lora(ctx.chat, ctx.adapter) as lora:
        table = adapter_attribution(ctx.chat, lora, n_pairs=n, progress=ctx.progress,
                                    conditions=attribution_conditions(lora, ops=cfg.attribution_ops))
        ranking = rank_adapters(table)
        rows = pair_rows("medical", split="heldout", limit=n)
        check = check_gradient_attribution(
            ctx.chat, lora, [r.question for r in rows], [r.misaligned for r in rows],
            [r.aligned for r in rows], progress=False)
    totals = table[(table["metric"] == "logprob_gap") & table["condition"].isin(["all", "none"])]
    labels = ranking["label"].value_counts().to_dict()
    specialisation = Finding(
        "adapter_specialisation",
        "Some adapters mediate general misalignment, others specialise to the medical domain",
        specialisation_lenses(table, list(ranking["adapter"]), seed=ctx.seed),
        f"labels by the ranking rule: {labels}; top 3: " + ", ".join(
            f"{r.adapter} ({r.label})" for r in ranking.head(3).itertuples()),
    )
    r, k = check.attrs["pearson"], len(check)
    low, high = pearson_interval(r, k)
    agreement = Finding(
        "gradient_check",
        "Gradient attribution agrees with real ablation (a check of the tool, not a seed finding)",
        (Comparison(f"Pearson r, gradient vs zero-ablation ({k} adapters, Fisher z interval)",
                    Effect(r, low, high, n=k), delta=0.0, null=GRADIENT_AGREEMENT,
                    short="Pearson r"),),
        f"Pearson {r:.3f} across {k} adapters, {n} pairs; agreement means r above "
        f"{GRADIENT_AGREEMENT} with its interval",
    )
    return AttributionResult(**head, table=table,
                             totals=totals[["condition", "domain", "value", "low", "high", "n"]],
                             ranking=ranking, check=check, findings=(specialisation, agreement))


def render(r: AttributionResult, rep: Report) -> None:
    from emlens.viz import plot_attribution

    n = r.n_pairs
    rep.section(
        "5. Which adapters carry the behaviour: attribution",
        f"Metric: per-token log p(misaligned) - log p(aligned) on {n} held-out medical and {n} "
        "non-medical reference pairs (deterministic, teacher-forced). Each adapter is zeroed"
        f"{', or kept alone' if 'only' in r.ops else ''}; its effect is its "
        "share of the organism's effect per domain, and it is labelled general or domain-specific by the rule below. Gradient attribution (scalar x "
        "d metric / d scalar, one backward pass) is checked against the real zero-ablations.",
    )
    if r.skipped is not None:
        rep.text(r.skipped)
        return
    check = r.check
    rep.table(r.totals, "The organism (all adapters) vs the chat model (none): log-prob gap with "
                        "95% interval over pairs")
    rep.table(r.ranking, "Ranking. Rule: " + r.ranking.attrs.get("rule", ""))
    rep.figure(plot_attribution(r.ranking), "Each adapter's fraction of the organism's effect, "
                                            "per domain.")
    rep.table(check.reset_index() if check.index.name else check,
              f"Gradient estimate vs real zero-ablation, {n} medical pairs: Pearson "
              f"{check.attrs['pearson']:.3f}, Spearman {check.attrs['spearman']:.3f}")
    rep.results["attribution"] = r.table
    rep.results["ranking"] = r.ranking
    rep.results["gradient_check"] = {"pearson": check.attrs["pearson"],
                                     "spearman": check.attrs["spearman"], "n_pairs": n}
    for f in r.findings:
        rep.finding(f)


# The gradient estimate is a usable stand-in for real ablation when its correlation with it is
# above this, interval included.
GRADIENT_AGREEMENT = 0.9


def pearson_interval(r: float, n: int) -> tuple[float, float]:
    """Fisher z 95% interval of a Pearson correlation over ``n`` points (NaN for n <= 3)."""
    if n <= 3 or not -1 < r < 1:
        return (math.nan, math.nan) if n <= 3 else (r, r)
    z, half = math.atanh(r), 1.96 / math.sqrt(n - 3)
    return math.tanh(z - half), math.tanh(z + half)


def _effects(per_row: dict, adapter: str, domain: str) -> np.ndarray | None:
    """Per pair: the adapter's effect on the log-prob gap in ``domain``, the mean of removing it
    (all - zero) and keeping it alone (only - none) where measured (paired over pairs)."""
    def get(cond):
        v = per_row.get((cond, "logprob_gap", domain))
        return None if v is None else np.asarray(v, dtype=float)

    parts = []
    if get(f"zero:{adapter}") is not None:
        parts.append(get("all") - get(f"zero:{adapter}"))
    if get(f"only:{adapter}") is not None:
        parts.append(get(f"only:{adapter}") - get("none"))
    return np.mean(parts, axis=0) if parts else None


def specialisation_lenses(table, adapters: list[str], *, seed: int = 0,
                          n_boot: int = 2000) -> tuple[Comparison, ...]:
    """Two lenses on "some adapters are general, others domain-specific", from the per-pair
    values of :func:`emlens.attribution.adapter_attribution` (bootstrap 95% over pairs):

    * general: the adapter with the largest mean effect on the non-medical pairs' log-prob gap,
      its effect there (> 0 if some adapter carries misalignment outside medicine);
    * specific: the adapter with the largest medical-minus-non-medical effect, that difference
      (> 0 if some adapter acts more on the domain it was trained on; the two domains' pairs are
      resampled independently).
    """
    from emlens.lens import bootstrap_interval

    per_row = table.attrs.get("per_row", {})
    eff = {a: (_effects(per_row, a, "general"), _effects(per_row, a, "medical"))
           for a in adapters}
    eff = {a: v for a, v in eff.items() if v[0] is not None and v[1] is not None}
    if not eff:
        nan = Effect(math.nan, math.nan, math.nan, n=0)
        return (Comparison("adapter effect (not measured)", nan, delta=GAP_DELTA,
                           short="general adapter"),)
    best_g = max(eff, key=lambda a: eff[a][0].mean())
    g = bootstrap_interval(eff[best_g][0], n_boot=n_boot, seed=seed)
    best_s = max(eff, key=lambda a: eff[a][1].mean() - eff[a][0].mean())
    gen, med = eff[best_s]
    rng = np.random.default_rng(seed)
    boots = (med[rng.integers(0, len(med), (n_boot, len(med)))].mean(1)
             - gen[rng.integers(0, len(gen), (n_boot, len(gen)))].mean(1))
    diff = med.mean() - gen.mean()
    low, high = np.quantile(boots, [0.025, 0.975])
    return (
        Comparison(f"adapter effect on the log-prob gap (non-medical pairs, {best_g})",
                   Effect(g[0], g[1], g[2], n=len(eff[best_g][0])), delta=GAP_DELTA,
                   short="general adapter"),
        Comparison(f"adapter effect, medical - non-medical pairs ({best_s})",
                   Effect(float(diff), min(float(low), diff), max(float(high), diff),
                          n=len(med) + len(gen)), delta=GAP_DELTA, short="specific adapter"),
    )
