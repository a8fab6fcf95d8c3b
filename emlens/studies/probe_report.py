"""Probes on the shipped organism's LoRA scalars, and per-adapter attribution (issue 6).

    python -m emlens.studies.probe_report                 # defaults below (CPU, ~30 min)
    python -m emlens.studies.probe_report --n-questions 20 --n-pairs 4 --ops zero only   # quicker

1. Rows: ``--n-questions`` questions of ``medical`` and of ``nonmedical`` (round-robin over
   topics), each with its aligned and its misaligned reference answer.
2. Features: per-answer mean of the 9 rank-1 scalars (answer tokens; prompt tokens for the
   context probe too), and, for comparison, the mean residual stream at ``--resid-layer``.
3. Probes (grouped by question, 5 folds, shuffled-label baseline, and the reference preset):
   medical vs non-medical context; misaligned vs aligned answer; bad vs good medical advice.
4. Attribution: zero / keep-only (/ scale) each adapter; log-prob gap of misaligned vs aligned
   reference answers on ``--n-pairs`` held-out medical and non-medical pairs; KL from the chat
   model; ranking with the general / domain-specific rule; gradient attribution checked against
   real zero-ablation.

Writes tables, probes (JSON), figures and an HTML token view to ``--out`` and prints a summary.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from emlens.attribution import (
    adapter_attribution,
    attribution_conditions,
    check_gradient_attribution,
    rank_adapters,
    reference_pairs,
)
from emlens.data import context_set
from emlens.lora import attach_lora
from emlens.models import load_model
from emlens.organisms import load_organism
from emlens.probes import fit_probe, reference_probe
from emlens.scalars import collect_scalars, residual_features
from emlens.viz import plot_attribution, plot_probe_coefficients, save_html, token_scalars_view

PROBE_COLUMNS = ["probe", "n", "groups", "roc_auc", "auc_low", "auc_high", "balanced_accuracy",
                 "bacc_low", "bacc_high", "shuffled_auc", "accuracy", "accuracy_std", "f1",
                 "f1_std"]
"""The columns of the probe table that are printed."""


def short(name: str) -> str:
    """A scalar's hook name as its layer: ``blocks.9.mlp.lora_down`` -> ``L9``."""
    return "L" + name.split(".")[1]


def probe_line(name: str, probe) -> dict:
    """One row of the probe table for the fitted :class:`emlens.probes.Probe` ``probe``: ``n``,
    ``groups``, ``C``, each cross-validated metric's mean and ``_std``, the AUC's and balanced
    accuracy's intervals and the shuffled-label baseline's."""
    m, b = probe.metrics, probe.baseline
    row = {"probe": name, "n": probe.config["n_rows"], "groups": probe.config["n_groups"],
           "C": probe.C}
    for k in ("roc_auc", "balanced_accuracy", "accuracy", "precision", "recall", "f1"):
        row[k] = m[k]["mean"]
        row[f"{k}_std"] = m[k]["std"]
    row["auc_low"], row["auc_high"] = m["roc_auc"].get("low"), m["roc_auc"].get("high")
    row["bacc_low"] = m["balanced_accuracy"].get("low")
    row["bacc_high"] = m["balanced_accuracy"].get("high")
    row["shuffled_auc"] = b.get("roc_auc", {}).get("mean", np.nan)
    row["shuffled_bacc"] = b.get("balanced_accuracy", {}).get("mean", np.nan)
    return row


def run_probes(model, lora, frame: pd.DataFrame, groups: Sequence[str], out: Path, *,
               resid_layer: int = 15, batch_size: int = 8, seed: int = 0) -> dict:
    """Scalars, residual features and the probes on the rows of ``frame`` (columns ``question``,
    ``answer``, ``medical``, ``misaligned``; ``groups``: one question id per row), with the
    adapter attached as ``lora``.

    Writes ``token_scalars.csv.gz``, ``probes.csv``, one ``probe_*.json`` per probe, the
    coefficient figures and ``tokens_row1.html`` to ``out`` and prints the tables. Returns the
    timings (``scalar_seconds``, ``resid_seconds``) and ``probe_coefficients``.
    """
    summary = {}
    t = time.time()
    ts = collect_scalars(model, lora, list(frame["question"]), list(frame["answer"]),
                         batch_size=batch_size)
    summary["scalar_seconds"] = time.time() - t
    ts.frame().to_csv(out / "token_scalars.csv.gz", index=False)
    ans = ts.aggregate("mean", part="answer").rename(columns=short)
    ans3 = ts.aggregate(["mean", "max", "last"], part="answer")
    prm = ts.aggregate("mean", part="prompt").rename(columns=short)
    t = time.time()
    resid = residual_features(model, list(frame["question"]), list(frame["answer"]),
                              layer=resid_layer, batch_size=batch_size)
    summary["resid_seconds"] = time.time() - t

    med = (frame["medical"] == 1).to_numpy()
    probes = {
        "context | scalars answer-mean": (ans, frame["medical"], groups),
        "context | scalars prompt-mean": (prm, frame["medical"], groups),
        f"context | resid L{resid_layer} answer-mean": (resid, frame["medical"], groups),
        "misaligned | scalars answer-mean": (ans, frame["misaligned"], groups),
        "misaligned | scalars mean+max+last": (ans3, frame["misaligned"], groups),
        f"misaligned | resid L{resid_layer} answer-mean": (resid, frame["misaligned"], groups),
        "bad-advice (medical only) | scalars answer-mean":
            (ans[med], frame["misaligned"][med],
             [g for g, m in zip(groups, med, strict=True) if m]),
    }
    table, fitted = [], {}
    for name, (x, y, g) in probes.items():
        p = fit_probe(x, np.asarray(y), groups=g, seed=seed)
        fitted[name] = p
        table.append(probe_line(name, p))
        if "resid" not in name:
            r = reference_probe(x, np.asarray(y), groups=g, seed=seed)
            table.append(probe_line(name + " [reference preset]", r))
        print(f"{name}: AUC {p.metrics['roc_auc']['mean']:.3f} (shuffled "
              f"{p.baseline['roc_auc']['mean']:.3f})", flush=True)
    probe_table = pd.DataFrame(table)
    probe_table.to_csv(out / "probes.csv", index=False)
    for name, p in fitted.items():
        slug = name.replace(" | ", "__").replace(" ", "_").replace("(", "").replace(")", "")
        p.save(out / f"probe_{slug}.json")
    coef = {name: fitted[name].coefficients()[["feature", "coef"]].set_index("feature")["coef"]
            .round(3).to_dict() for name in fitted if "resid" not in name and "+" not in name}
    summary["probe_coefficients"] = coef

    plot_probe_coefficients(fitted["misaligned | scalars answer-mean"],
                            path=out / "probe_misaligned_coef.png")
    plot_probe_coefficients(fitted["context | scalars answer-mean"],
                            path=out / "probe_context_coef.png")
    save_html(token_scalars_view(ts, 1), out / "tokens_row1.html")

    with pd.option_context("display.width", 200, "display.max_columns", 30):
        print("\nPROBES (grouped 5-fold CV by question; intervals: 95% group bootstrap)")
        print(probe_table[PROBE_COLUMNS].round(3).to_string(index=False))
    print("\nCOEFFICIENTS (standardised; + = towards medical / misaligned)")
    print(json.dumps(coef, indent=1))
    return summary


def run_attribution(model, lora, out: Path, *, ops: Sequence[str] = ("zero", "only"),
                    n_pairs: int = 8, batch_size: int = 8, n_grad: int = 4) -> dict:
    """Per-adapter attribution (:func:`emlens.attribution.adapter_attribution` under ``ops``, on
    ``n_pairs`` pairs per domain), its ranking, and the gradient attribution checked against real
    zero-ablation on ``n_grad`` held-out medical pairs, with the adapter attached as ``lora``.

    Writes ``attribution.csv``, ``ranking.csv``, ``ranking.png`` and ``gradient_check.csv`` to
    ``out`` and prints the tables. Returns the timings, ``ranking_rule`` and ``gradient_check``
    (the check's summary numbers).
    """
    summary = {}
    t = time.time()
    conds = attribution_conditions(lora, ops=list(ops))
    att = adapter_attribution(model, lora, conditions=conds, n_pairs=n_pairs,
                              batch_size=batch_size)
    summary["attribution_seconds"] = time.time() - t
    att.to_csv(out / "attribution.csv", index=False)
    ranking = rank_adapters(att)
    ranking.to_csv(out / "ranking.csv", index=False)
    summary["ranking_rule"] = ranking.attrs["rule"]
    plot_attribution(ranking, path=out / "ranking.png")
    gap = att[att["metric"] != "kl_from_chat"].pivot(index="condition", columns="domain",
                                                     values="value")
    kl = att[att["metric"] == "kl_from_chat"].set_index("condition")["value"].rename("kl")
    with pd.option_context("display.width", 200, "display.max_columns", 30):
        print("\nATTRIBUTION (log-prob gap misaligned-aligned, per-token mean; KL from chat)")
        print(gap.join(kl).round(4).to_string(), flush=True)
        print("\nRANKING (rule: " + ranking.attrs["rule"] + ")")
        print(ranking.round(3).to_string(index=False), flush=True)
    t = time.time()
    qs, mis, al = reference_pairs("medical", split="heldout", limit=n_grad)
    check = check_gradient_attribution(model, lora, qs, mis, al, batch_size=batch_size)
    summary["gradient_check_seconds"] = time.time() - t
    check.to_csv(out / "gradient_check.csv", index=False)
    summary["gradient_check"] = dict(check.attrs)
    print("\nGRADIENT vs ZERO-ABLATION (medical heldout gap):")
    with pd.option_context("display.width", 200, "display.max_columns", 30):
        print(check.round(4).to_string(index=False), json.dumps(check.attrs), flush=True)
    return summary


def report(organism: str = "rank1-down-medical", n_questions: int = 40, n_pairs: int = 8,
           ops: Sequence[str] = ("zero", "only"), resid_layer: int = 15, batch_size: int = 8,
           seed: int = 0, n_grad: int = 4, skip_probes: bool = False,
           skip_attribution: bool = False, out: str | Path = "report/probe_report") -> dict:
    """The whole study of the module docstring on the embedded chat model and ``organism``.

    Writes :func:`run_probes`'s and :func:`run_attribution`'s files and ``summary.json``
    (``summary_probes.json`` / ``summary_attribution.json`` when one part is skipped) to ``out``.
    Returns that summary: ``args`` (these settings), both parts' results and ``seconds``.
    """
    settings = dict(organism=organism, n_questions=n_questions, n_pairs=n_pairs, ops=list(ops),
                    resid_layer=resid_layer, batch_size=batch_size, seed=seed, n_grad=n_grad,
                    skip_probes=skip_probes, skip_attribution=skip_attribution, out=str(out))
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    t0 = time.time()
    model = load_model()
    adapter = load_organism(organism)
    print(f"loaded model + {organism} in {time.time() - t0:.0f}s; "
          f"threads={torch.get_num_threads()}")

    rows = context_set(limit=n_questions)  # both answers per question
    frame = rows.frame()
    frame["medical"] = rows.labels
    frame["misaligned"] = [i % 2 for i in range(len(frame))]  # aligned then misaligned per question
    groups = list(frame["group"])
    summary: dict = {"args": settings}

    with attach_lora(model, adapter) as lora:
        if not skip_probes:
            summary.update(run_probes(model, lora, frame, groups, out, resid_layer=resid_layer,
                                      batch_size=batch_size, seed=seed))
        if not skip_attribution:
            summary.update(run_attribution(model, lora, out, ops=ops, n_pairs=n_pairs,
                                           batch_size=batch_size, n_grad=n_grad))
    summary["seconds"] = time.time() - t0
    name = "summary" + ("_probes" if skip_attribution else "") + (
        "_attribution" if skip_probes else "")
    (out / f"{name}.json").write_text(json.dumps(summary, indent=1, default=str))
    return summary


def main(argv: Sequence[str] | None = None) -> None:
    """The command line: ``python -m emlens.studies.probe_report [--organism NAME]
    [--n-questions N] [--n-pairs N] [--ops OP ...] [--skip-probes] [--out DIR] ...``."""
    import matplotlib

    matplotlib.use("Agg")  # figures go to files
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--organism", default="rank1-down-medical")
    ap.add_argument("--n-questions", type=int, default=40, help="per dataset, for the probes")
    ap.add_argument("--n-pairs", type=int, default=8, help="per domain, for the attribution")
    ap.add_argument("--ops", nargs="+", default=["zero", "only"], help="zero only scale")
    ap.add_argument("--resid-layer", type=int, default=15)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--n-grad", type=int, default=4, help="medical pairs for the gradient check")
    ap.add_argument("--skip-probes", action="store_true")
    ap.add_argument("--skip-attribution", action="store_true")
    ap.add_argument("--out", default="report/probe_report")
    args = ap.parse_args(argv)
    summary = report(**vars(args))
    print(f"\nwrote {args.out}/ in {summary['seconds']:.0f}s")


__all__ = [
    "PROBE_COLUMNS",
    "main",
    "probe_line",
    "report",
    "run_attribution",
    "run_probes",
    "short",
]


if __name__ == "__main__":
    main()
