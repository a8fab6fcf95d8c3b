"""Section 4: logistic-regression probes on the organism's LoRA scalars (medical context,
misaligned answers), against shuffled labels and a residual-stream probe."""

from __future__ import annotations

import math

import pandas as pd

from emlens.demo.common import Story, all_rank1
from emlens.findings import Comparison, Effect, Finding
from emlens.report import Report

# The smallest AUC gain over chance of interest: a probe at AUC 0.6 reads the feature weakly.
PROBE_DELTA = 0.1


def _probe_row(name: str, features: str, probe) -> dict:
    m, b = probe.metrics["roc_auc"], probe.baseline.get("roc_auc", {})
    c = probe.config
    return {"probe": name, "features": features, "rows": c["n_rows"], "questions": c["n_groups"],
            "positive": c["n_positive"], "auc": m["mean"], "auc_low": m.get("low", math.nan),
            "auc_high": m.get("high", math.nan), "shuffled_auc": b.get("mean", math.nan),
            "balanced_accuracy": probe.metrics["balanced_accuracy"]["mean"]}


def _fit_noted(rep: Report, name: str, feats, ls, kw: dict):
    """``fit_probe``, with its fold warnings written into the report instead of the console."""
    import warnings

    from emlens.probes import ProbeWarning, fit_probe

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ProbeWarning)
        probe = fit_probe(feats, ls.labels, groups=ls.groups, **kw)
    for w in caught:
        if issubclass(w.category, ProbeWarning):
            rep.text(f"Probe {name!r}: {w.message}")
        else:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    return probe


def section(s: Story) -> None:
    from emlens.data import answer_set, context_set, judged_set
    from emlens.lora import attach_lora
    from emlens.scalars import collect_scalars, residual_features
    from emlens.viz import plot_probe_coefficients, token_scalars_view

    cfg, rep = s.cfg, s.rep
    rep.section(
        "4. Probes on the organism's LoRA scalars",
        "Each rank-1 adapter contributes s x B with the scalar s = A . h: one readable number per "
        "adapter and token. Logistic-regression probes on per-answer aggregates, grouped "
        "cross-validation by question (no question in both train and test); AUC intervals are "
        "a group bootstrap; the baseline is the same probe on shuffled labels, and the "
        f"residual-stream probe (mean resid_post at layer {s.layer}, {s.chat.cfg.d_model} "
        "features) is the ceiling the scalars are compared with.",
    )
    if not all_rank1(s.adapter):
        rep.text(f"Skipped: the organism's adapters have ranks {sorted(set(s.adapter.ranks.values()))}; "
                 "scalar probes need rank-1 adapters.")
        return
    n_splits = 3 if cfg.quick else 4
    kw = dict(n_splits=n_splits, n_shuffles=3, n_boot=100 if cfg.quick else 200, seed=s.seed)
    rows, probes = [], {}
    with attach_lora(s.chat, s.adapter) as lora:
        sets = {
            "medical context": (context_set(limit=cfg.probe_limit, answers="aligned"),
                                "mean", "prompt"),
            "misaligned reference answer": (answer_set("both", limit=cfg.probe_limit // 2),
                                            ["mean", "max"], "answer"),
        }
        judged = s.answers[s.answers["model_role"] == "organism"]
        js = judged_set(judged)
        if 0 < sum(js.labels) < len(js.labels):
            sets["judge-misaligned organism answer"] = (js, ["mean", "max"], "answer")
        else:
            rep.text(f"The judged-answer probe is skipped: {sum(js.labels)} of {len(js.labels)} "
                     "coherent organism answers are judged misaligned (one class only).")
        for name, (ls, agg, part) in sets.items():
            scalars = collect_scalars(s.chat, lora, ls.questions, ls.answers,
                                      progress=s.progress)
            feats = scalars.aggregate(agg, part=part)
            try:
                probe = _fit_noted(rep, name, feats, ls, kw)
            except ValueError as err:
                rep.text(f"Probe {name!r} skipped: {err}")
                continue
            probes[name] = (probe, scalars, ls)
            rows.append(_probe_row(name, f"{len(lora.names)} LoRA scalars", probe))
            resid = residual_features(s.chat, ls.questions, ls.answers, layer=s.layer,
                                      part=part, progress=s.progress)
            rows.append(_probe_row(name, f"resid_post L{s.layer}",
                                   _fit_noted(rep, f"{name} (resid_post)", resid, ls, kw)))
        table = pd.DataFrame(rows)
        rep.table(table, "ROC AUC over held-out questions (mean over folds) with bootstrap 95% "
                         "interval, vs shuffled labels")
        rep.results["probes"] = table
        if "misaligned reference answer" in probes:
            probe, scalars, ls = probes["misaligned reference answer"]
            rep.figure(plot_probe_coefficients(probe),
                       "Standardised coefficients of the misaligned-answer probe.")
            row = ls.labels.index(1)
            rep.view(token_scalars_view(scalars, row=row), "lora_scalars",
                     f"The {len(lora.names)} scalars token by token on a misaligned reference "
                     f"answer to "
                     f"{ls.questions[row]!r}.", height=420)
    for name in probes:
        r = table[(table["probe"] == name) & table["features"].str.contains("LoRA")].iloc[0]
        shuffled = float(r["shuffled_auc"])
        lens = Comparison(
            "probe ROC AUC (LoRA scalars, group bootstrap over questions)",
            Effect(float(r["auc"]), float(r["auc_low"]), float(r["auc_high"]),
                   n=int(r["questions"])),
            Effect(shuffled, shuffled, shuffled, n=kw["n_shuffles"]),
            f"the same probe on shuffled labels (mean of {kw['n_shuffles']} shuffles)",
            delta=PROBE_DELTA, null=0.5, short="AUC")
        rep.finding(Finding(
            "probe_" + "_".join(name.replace("-", " ").split()),
            f"Probes on the LoRA scalars detect: {name}", (lens,),
            f"AUC {r['auc']:.2f} [{r['auc_low']:.2f}, {r['auc_high']:.2f}] over {r['questions']} "
            f"questions ({r['rows']} rows); shuffled labels {shuffled:.2f}",
        ))
