"""Section 4: logistic-regression probes on the organism's LoRA scalars (medical context,
misaligned answers), against shuffled labels and a residual-stream probe.

:func:`measure` collects the scalars, fits the probes and builds the token-by-token view;
:func:`render` writes them (and the fold warnings the fitting raised) into the report.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

import pandas as pd

from emlens.demo.common import Context, all_rank1
from emlens.findings import Comparison, Effect, Finding
from emlens.report import Report

if TYPE_CHECKING:
    from emlens.demo.rates import RatesResult
    from emlens.demo.steering import SteeringResult

# The smallest AUC gain over chance of interest: a probe at AUC 0.6 reads the feature weakly.
PROBE_DELTA = 0.1
N_SHUFFLES = 3  # shuffled-label fits per probe: the baseline


@dataclass(frozen=True)
class ProbesResult:
    """The probes of section 4.

    ``notes`` are the texts written between the section's heading and its table, in the order
    the fitting produced them (a skipped probe set, fold warnings, probes that could not be fit);
    ``probes`` are the fitted LoRA-scalar probes by set name; ``view`` is the circuitsvis strip of
    the scalars on a misaligned reference answer (``None`` without that probe). ``skipped`` says
    why nothing was measured (adapters not rank 1); then every other field is empty."""

    layer: int  # of the residual-stream probe (the steering section's layer)
    d_model: int
    skipped: str | None = None
    notes: tuple[str, ...] = ()
    table: pd.DataFrame | None = None  # results["probes"]
    probes: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))  # name -> Probe
    view: Any = None  # circuitsvis RenderedHTML
    view_caption: str = ""
    findings: tuple[Finding, ...] = ()


def _probe_row(name: str, features: str, probe) -> dict:
    m, b = probe.metrics["roc_auc"], probe.baseline.get("roc_auc", {})
    c = probe.config
    return {"probe": name, "features": features, "rows": c["n_rows"], "questions": c["n_groups"],
            "positive": c["n_positive"], "auc": m["mean"], "auc_low": m.get("low", math.nan),
            "auc_high": m.get("high", math.nan), "shuffled_auc": b.get("mean", math.nan),
            "balanced_accuracy": probe.metrics["balanced_accuracy"]["mean"]}


def _fit_noted(notes: list[str], name: str, feats, ls, kw: dict):
    """``fit_probe``, with its fold warnings appended to ``notes`` (the report's texts) instead of
    printed to the console."""
    import warnings

    from emlens.probes import ProbeWarning, fit_probe

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ProbeWarning)
        probe = fit_probe(feats, ls.labels, groups=ls.groups, **kw)
    for w in caught:
        if issubclass(w.category, ProbeWarning):
            notes.append(f"Probe {name!r}: {w.message}")
        else:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    return probe


def _finding(name: str, r) -> Finding:
    """The probe on the LoRA scalars of set ``name`` (its table row ``r``) against shuffled
    labels."""
    shuffled = float(r["shuffled_auc"])
    lens = Comparison(
        "probe ROC AUC (LoRA scalars, group bootstrap over questions)",
        Effect(float(r["auc"]), float(r["auc_low"]), float(r["auc_high"]), n=int(r["questions"])),
        Effect(shuffled, shuffled, shuffled, n=N_SHUFFLES),
        f"the same probe on shuffled labels (mean of {N_SHUFFLES} shuffles)",
        delta=PROBE_DELTA, null=0.5, short="AUC")
    return Finding(
        "probe_" + "_".join(name.replace("-", " ").split()),
        f"Probes on the LoRA scalars detect: {name}", (lens,),
        f"AUC {r['auc']:.2f} [{r['auc_low']:.2f}, {r['auc_high']:.2f}] over {r['questions']} "
        f"questions ({r['rows']} rows); shuffled labels {shuffled:.2f}",
    )


def measure(ctx: Context, rates: RatesResult, steering: SteeringResult) -> ProbesResult:
    """Probes on three labelled sets (medical context; misaligned reference answers; the judge's
    misaligned organism answers of ``rates.answers`` when both classes occur), each on the
    organism's LoRA scalars and on the residual stream at ``steering.layer``."""
    from emlens.data import answer_set, context_set, judged_set
    from emlens.lora import attach_lora
    from emlens.scalars import collect_scalars, residual_features
    from emlens.viz import token_scalars_view

    cfg, layer = ctx.cfg, steering.layer
    head = {"layer": layer, "d_model": ctx.chat.cfg.d_model}
    if not all_rank1(ctx.adapter):
        return ProbesResult(**head, skipped=(
            f"Skipped: the organism's adapters have ranks {sorted(set(ctx.adapter.ranks.values()))}; "
            "scalar probes need rank-1 adapters."))
    kw = dict(n_splits=3 if cfg.quick else 4, n_shuffles=N_SHUFFLES,
              n_boot=100 if cfg.quick else 200, seed=ctx.seed)
    rows, notes, probes, view, caption = [], [], {}, None, ""
    with attach_lora(ctx.chat, ctx.adapter) as lora:
        sets = {
            "medical context": (context_set(limit=cfg.probe_limit, answers="aligned"),
                                "mean", "prompt"),
            "misaligned reference answer": (answer_set("both", limit=cfg.probe_limit // 2),
                                            ["mean", "max"], "answer"),
        }
        answers = rates.answers
        js = judged_set(answers[answers["model_role"] == "organism"])
        if 0 < sum(js.labels) < len(js.labels):
            sets["judge-misaligned organism answer"] = (js, ["mean", "max"], "answer")
        else:
            notes.append(f"The judged-answer probe is skipped: {sum(js.labels)} of "
                         f"{len(js.labels)} coherent organism answers are judged misaligned "
                         "(one class only).")
        for name, (ls, agg, part) in sets.items():
            scalars = collect_scalars(ctx.chat, lora, ls.questions, ls.answers,
                                      progress=ctx.progress)
            feats = scalars.aggregate(agg, part=part)
            try:
                probe = _fit_noted(notes, name, feats, ls, kw)
            except ValueError as err:
                notes.append(f"Probe {name!r} skipped: {err}")
                continue
            probes[name] = probe
            rows.append(_probe_row(name, f"{len(lora.names)} LoRA scalars", probe))
            if name == "misaligned reference answer":
                row = ls.labels.index(1)
                view = token_scalars_view(scalars, row=row)
                caption = (f"The {len(lora.names)} scalars token by token on a misaligned "
                           f"reference answer to {ls.questions[row]!r}.")
            resid = residual_features(ctx.chat, ls.questions, ls.answers, layer=layer,
                                      part=part, progress=ctx.progress)
            rows.append(_probe_row(name, f"resid_post L{layer}",
                                   _fit_noted(notes, f"{name} (resid_post)", resid, ls, kw)))
    table = pd.DataFrame(rows)
    findings = tuple(
        _finding(name, table[(table["probe"] == name)
                             & table["features"].str.contains("LoRA")].iloc[0])
        for name in probes)
    return ProbesResult(**head, notes=tuple(notes), table=table,
                        probes=MappingProxyType(probes), view=view, view_caption=caption,
                        findings=findings)


def render(r: ProbesResult, rep: Report) -> None:
    from emlens.viz import plot_probe_coefficients

    rep.section(
        "4. Probes on the organism's LoRA scalars",
        "Each rank-1 adapter contributes s x B with the scalar s = A . h: one readable number per "
        "adapter and token. Logistic-regression probes on per-answer aggregates, grouped "
        "cross-validation by question (no question in both train and test); AUC intervals are "
        "a group bootstrap; the baseline is the same probe on shuffled labels, and the "
        f"residual-stream probe (mean resid_post at layer {r.layer}, {r.d_model} "
        "features) is the ceiling the scalars are compared with.",
    )
    if r.skipped is not None:
        rep.text(r.skipped)
        return
    for note in r.notes:
        rep.text(note)
    rep.table(r.table, "ROC AUC over held-out questions (mean over folds) with bootstrap 95% "
                       "interval, vs shuffled labels")
    rep.results["probes"] = r.table
    if "misaligned reference answer" in r.probes:
        rep.figure(plot_probe_coefficients(r.probes["misaligned reference answer"]),
                   "Standardised coefficients of the misaligned-answer probe.")
        rep.view(r.view, "lora_scalars", r.view_caption, height=420)
    for f in r.findings:
        rep.finding(f)
