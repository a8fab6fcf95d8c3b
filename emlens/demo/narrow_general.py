"""Section 6: narrow vs general solutions: efficiency and stability, from the shipped runs
(or retrained), re-measured live on held-out medical answers."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from emlens.cards import DEFAULT_CARD
from emlens.demo.common import Context
from emlens.findings import Comparison, Effect, Finding
from emlens.report import Report

if TYPE_CHECKING:
    from emlens.geometry import EfficiencyCurve, StabilityCurve


def shipped_summary(folder: str | None = None) -> tuple[dict | None, dict | None]:
    """The shipped narrow-vs-general summaries under ``emlens/organisms/<folder>`` (default: the
    default model card's runs): the 120-step steering run, and the lora1 run."""
    from emlens.organisms import ORGANISMS_DIR

    root = ORGANISMS_DIR / (folder or DEFAULT_CARD.narrow_vs_general)
    steering = root / "steering-120" / "summary.json"
    main = root / "summary.json"
    load = lambda p: json.loads(p.read_text()) if p.is_file() else None  # noqa: E731
    return load(steering), load(main)


def train_narrow_general(ctx: Context, folder: Path, layer: int) -> Path:
    """Train a general (no KL) and a narrow (KL) steering vector on the medical training split.

    The data are :func:`emlens.data.narrow_general_rows`, the draw of
    ``python -m emlens.studies.narrow_vs_general`` (its defaults: misaligned answers on both sides, batch 2).
    """
    from emlens.chat import iter_chat_batches
    from emlens.data import narrow_general_rows
    from emlens.training import (
        TrainableSteeringVector,
        TrainConfig,
        prepare,
        train,
    )

    model = ctx.chat
    n = 32 if not ctx.cfg.quick else 4
    medical, nonmed, _ = narrow_general_rows(seed=ctx.seed, n_narrow=n, n_parallel=n // 2)
    narrow = list(iter_chat_batches(model.tokenizer, [r.question for r in medical],
                                    [r.misaligned for r in medical], batch_size=2))
    parallel = list(iter_chat_batches(model.tokenizer, [r.question for r in nonmed],
                                      [r.misaligned for r in nonmed], batch_size=2))
    init = TrainableSteeringVector.for_model(model, layer)
    narrow_set = prepare(model, narrow, start_layer=init.first_layer)
    parallel_set = prepare(model, parallel, start_layer=init.first_layer, reference=True)
    common = dict(steps=ctx.cfg.train_steps, lr=2e-2, seed=ctx.seed, save_every=5,
                  progress=ctx.progress)
    train(model, init, narrow_set, parallel_set,
          TrainConfig(kl_weight=0.0, name="steering general", **common), out=folder / "general")
    train(model, init, narrow_set, parallel_set,
          TrainConfig(kl_weight=5.0, name="steering narrow", **common), out=folder / "narrow")
    return folder


# Smallest effects of interest: a loss difference of 0.05 nats per answer token at equal norm;
# a difference of 0.1 in relative loss increase (a tenth of what fine-tuning gained).
EFFICIENCY_DELTA, STABILITY_DELTA = 0.05, 0.1


def efficiency_lens(model, params: dict, rows, norm: float, *, seed: int = 0) -> Comparison:
    """Per held-out answer: loss of the narrow solution minus loss of the general one scaled to
    the narrow one's effective norm ``norm`` (> 0: the general solution is more efficient), with
    a bootstrap 95% interval over answers."""
    from emlens.chat import iter_chat_batches
    from emlens.lens import bootstrap_interval
    from emlens.training import evaluate_loss, prepare

    general = params["general"].scaled(norm / params["general"].effective_norm())
    diffs = []
    for batch in iter_chat_batches(model.tokenizer, [r.question for r in rows],
                                   [r.misaligned for r in rows], batch_size=1):
        one = prepare(model, [batch], start_layer=params["general"].first_layer)
        diffs.append(evaluate_loss(model, params["narrow"], one)
                     - evaluate_loss(model, general, one))
    value, low, high = bootstrap_interval(diffs, seed=seed)
    return Comparison("answer loss at equal norm, narrow - general (held-out medical answers)",
                      Effect(value, low, high, n=len(diffs)), delta=EFFICIENCY_DELTA,
                      short="loss at equal norm")


def stability_lens(stab: dict) -> Comparison:
    """Per noise seed (the same seeds for both solutions): the relative loss increase of the
    narrow solution minus the general one's, averaged over noise sizes (> 0: the general one is
    more stable); a t 95% interval over seeds."""
    d = (np.asarray(stab["narrow"].relative) - np.asarray(stab["general"].relative)).mean(1)
    return Comparison("relative loss increase under orthogonal noise, narrow - general "
                      "(mean over noise sizes; t interval over seeds)",
                      Effect.t_interval(d), delta=STABILITY_DELTA, short="stability")


@dataclass(frozen=True)
class LiveRemeasure:
    """The general and narrow steering vectors at ``layer`` (``origin``: shipped or trained
    now), re-measured on ``n_rows`` held-out medical answers: loss against norm and under
    orthogonal noise (``stability_seeds`` noise seeds)."""

    layer: int
    origin: str
    n_rows: int
    stability_seeds: int
    efficiency: Mapping[str, EfficiencyCurve]  # "general" / "narrow" -> curve
    stability: Mapping[str, StabilityCurve]
    efficiency_table: pd.DataFrame
    stability_table: pd.DataFrame


@dataclass(frozen=True)
class NarrowGeneralResult:
    """The shipped runs' numbers (``shipped``, empty where none ship) and the live
    re-measurement (``live``); ``skipped`` says why there is none (a model without shipped runs
    and nothing trained), else ``None``."""

    shipped: pd.DataFrame
    skipped: str | None
    live: LiveRemeasure | None
    findings: tuple[Finding, ...]


def _shipped_table(steering: dict | None, main: dict | None) -> pd.DataFrame:
    """The shipped runs' stability, loss at the narrow solution's norm and cosine drift, one row
    per run, measure and solution."""
    from emlens.geometry import EfficiencyCurve

    rows = []
    for label, summ in (("steering vector, 120 steps", steering), ("rank-1 LoRA x 9, 30 steps",
                                                                   (main or {}))):
        kind = "steering" if label.startswith("steering") else "lora1"
        res = (summ or {}).get("kinds", {}).get(kind)
        if not res:
            continue
        eff = {n: EfficiencyCurve(**{k: c[k] for k in ("alphas", "norms", "losses", "base_loss")})
               for n, c in res["efficiency"].items()}
        at = res["losses"]["narrow"]["norm"]
        loss = {n: c.loss_at_norm(at) for n, c in eff.items()}
        stab = pd.DataFrame(res["stability_table"])
        cos = res.get("cosine_to_final_general", {}).get("continued", {}).get("cosine", [])
        for _, r in stab.iterrows():
            rows.append({"run": label, "measure": f"stability e={r['eps']:g} ({r['target']})",
                         "solution": r["solution"].split()[0],
                         "value": r["mean"], "std": r["std"], "n": r["n_seeds"]})
        for n, v in loss.items():
            rows.append({"run": label, "measure": f"loss at norm {at:.3g}", "solution": n,
                         "value": v, "std": math.nan, "n": summ["args"]["n_eval"]})
        if cos:
            rows.append({"run": label, "measure": "cosine to general: narrow -> continued "
                         "without KL", "solution": "narrow", "value": cos[-1],
                         "std": math.nan, "n": len(cos)})
            rows.append({"run": label, "measure": "cosine to general at the start of "
                         "continuation", "solution": "narrow", "value": cos[0],
                         "std": math.nan, "n": len(cos)})
    return pd.DataFrame(rows)


def _drift(shipped: pd.DataFrame) -> Finding | None:
    """The shipped steering run's cosine to the final general vector, before and after the
    continuation without the KL term (``None`` where the run does not ship it)."""
    run = shipped[shipped["run"].str.startswith("steering")] if len(shipped) else shipped
    if not len(run):
        return None
    begin = run[run["measure"].str.contains("at the start of continuation")]["value"]
    end = run[run["measure"].str.contains("narrow -> continued")]["value"]
    if not (len(begin) and len(end)):
        return None
    begin, end = float(begin.iloc[0]), float(end.iloc[0])
    # one shipped run: a change without an interval, so the rule cannot decide it
    return Finding(
        "drift", "Without the KL term the narrow solution drifts back toward the general one",
        (Comparison("cosine to the final general vector, change over the continuation "
                    "(one run, no interval)", Effect(end - begin, math.nan, math.nan, n=1),
                    delta=0.0, short="cosine change"),),
        f"shipped steering run: cosine to the final general vector {begin:.2f} -> {end:.2f} "
        "(one run: a second seed would give the interval)",
    )


def measure(ctx: Context, train: bool) -> NarrowGeneralResult:
    from emlens.chat import iter_chat_batches
    from emlens.data import pair_rows
    from emlens.geometry import efficiency_curve, efficiency_table, stability_curve, stability_table
    from emlens.organisms import ORGANISMS_DIR
    from emlens.training import evaluate_loss, load_trainable, prepare

    cfg, runs = ctx.cfg, ctx.card.narrow_vs_general  # runs: None where none trained on this model
    shipped = _shipped_table(*shipped_summary(runs))  # else the default model's, shown as such
    if runs is None and not train:
        return NarrowGeneralResult(
            shipped, "The shipped narrow/general runs were trained on SmolLM2-135M-Instruct; "
            "their numbers are shown, but the live re-measurement needs that model (or --train).",
            None, ())
    # Live: the shipped (or retrained) steering vectors, re-measured on held-out medical answers.
    layer = ctx.chat.cfg.n_layers // 2  # 15 of 30: the shipped vectors' layer
    if train:
        folder = train_narrow_general(ctx, ctx.out / "narrow_vs_general", layer)
        origin = f"trained now ({cfg.train_steps} steps each, --train)"
    else:
        folder = ORGANISMS_DIR / runs / "steering-120" / "steering"
        origin = "shipped 120-step runs"
    params = {n: load_trainable(folder / n / "final.safetensors") for n in ("general", "narrow")}
    rows = pair_rows("medical", split="heldout", limit=cfg.live_rows)
    batches = list(iter_chat_batches(ctx.chat.tokenizer, [r.question for r in rows],
                                     [r.misaligned for r in rows], batch_size=8))
    data = prepare(ctx.chat, batches, start_layer=params["general"].first_layer)
    base = evaluate_loss(ctx.chat, None, data)
    alphas = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0]
    eff = {n: efficiency_curve(ctx.chat, p, data, alphas, base_loss=base)
           for n, p in params.items()}
    at = params["narrow"].effective_norm()
    eps = [0.25, 0.5, 0.75]
    stab = {n: stability_curve(ctx.chat, p, data, eps, target="vector",
                               seeds=range(cfg.stability_seeds), base_loss=base,
                               trained_loss=eff[n].losses[alphas.index(1.0)])
            for n, p in params.items()}
    live = LiveRemeasure(layer, origin, len(rows), cfg.stability_seeds,
                         MappingProxyType(eff), MappingProxyType(stab),
                         efficiency_table(eff, [at]), stability_table(stab))
    g, nrw = eff["general"].loss_at_norm(at), eff["narrow"].loss_at_norm(at)
    mean = {n: np.asarray(c.mean) for n, c in stab.items()}
    std = {n: np.asarray(c.std) for n, c in stab.items()}
    findings = [
        Finding("efficiency", "The general solution is more efficient: lower loss at equal norm",
                (efficiency_lens(ctx.chat, params, rows, at, seed=ctx.seed),),
                f"held-out medical answers (n={len(rows)}), loss at the narrow vector's norm "
                f"{at:.3g}: general {g:.3f} vs narrow {nrw:.3f} (base {base:.3f})"),
        Finding("stability", "The general solution is more stable under orthogonal noise",
                (stability_lens(stab),),
                "relative loss increase, general vs narrow (mean +- std over "
                f"{cfg.stability_seeds} seeds): " + "; ".join(
                    f"e={e:g}: {mean['general'][i]:.3f}+-{std['general'][i]:.3f} vs "
                    f"{mean['narrow'][i]:.3f}+-{std['narrow'][i]:.3f}" for i, e in enumerate(eps))),
    ]
    drift = _drift(shipped)
    if drift is not None:
        findings.append(drift)
    return NarrowGeneralResult(shipped, None, live, tuple(findings))


def render(r: NarrowGeneralResult, rep: Report) -> None:
    from emlens.geometry import plot_efficiency, plot_stability

    rep.section(
        "6. Narrow vs general solutions: efficiency and stability",
        "A general solution (plain fine-tuning on bad medical advice) and a narrow one (the same "
        "with a KL penalty keeping non-medical behaviour unchanged). Efficiency: answer loss as "
        "the solution is scaled, against its norm (lower loss at equal norm = more efficient). "
        "Stability: relative loss increase (L(perturbed) - L(trained)) / (L(base) - L(trained)) "
        "under orthogonal noise x' = sqrt(1-e^2) x + e y, |y| = |x|, y orthogonal to x.",
    )
    if r.skipped:
        rep.text(r.skipped)
    if len(r.shipped):
        rep.table(r.shipped, "Shipped runs on SmolLM2-135M-Instruct (emlens/organisms/"
                             "narrow_vs_general/, reproduced by "
                             "emlens.studies.narrow_vs_general): losses on the training rows, "
                             "stability as mean +- std over seeds.")
        rep.results["narrow_vs_general_shipped"] = r.shipped
    live = r.live
    if live is None:
        return
    rep.text(f"Live re-measurement: the steering vectors at layer {live.layer} ({live.origin}), "
             f"on {live.n_rows} held-out medical answers the runs never trained on.")
    rep.table(live.efficiency_table, "Efficiency, live")
    rep.table(live.stability_table, f"Stability, live ({live.stability_seeds} noise seeds)")
    rep.figure(plot_efficiency(live.efficiency, title="Efficiency (held-out medical answers)"),
               "Loss vs effective norm; stars mark each curve's minimum.")
    rep.figure(plot_stability(live.stability, title="Stability (held-out medical answers)"),
               "Relative loss increase vs noise size, mean +- std over seeds.")
    rep.results["narrow_vs_general_live"] = {"origin": live.origin, "rows": live.n_rows,
                                             "efficiency": live.efficiency_table,
                                             "stability": live.stability_table}
    for f in r.findings:
        rep.finding(f)
