"""Section 3: ablating the direction in the organism and in a second organism (transfer), and
the cosines between directions (convergence)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import pandas as pd

from emlens.demo import lenses
from emlens.demo.common import Context, fmt_rate, resolve_adapter
from emlens.findings import Comparison, Effect, Finding
from emlens.report import Report, lens_text

if TYPE_CHECKING:
    from emlens.demo.rates import RatesResult
    from emlens.demo.steering import SteeringResult

# The smallest cosine of interest between two fine-tunes' directions: "not reproduced" when the
# interval lies below it (the seeds report cosines above 0.8 between organisms).
CONVERGENCE_DELTA = 0.5


@dataclass(frozen=True)
class AblationResult:
    """Section 3: the judged rates with the direction or a same-norm random one ablated, in the
    organism and (when given) a second organism (``table``), the cosines between directions
    (``cosines``; ``cos_rand`` for a same-norm random direction), and the ablation, transfer and
    convergence findings."""

    layer: int  # the direction's layer (section 2's chosen cell)
    transfer_name: str | None  # the second organism, or None when not run
    table: pd.DataFrame
    cosines: pd.DataFrame
    cos_rand: float
    own_how: str  # how the second organism's own direction was selected ("" when not run)
    findings: tuple[Finding, ...]


def measure(ctx: Context, rates: RatesResult, steering: SteeringResult,
            transfer_organism: str | None) -> AblationResult:
    from emlens.directions import (
        cosine_interval,
        cosine_matrix,
        mean_diff,
        random_direction,
        select_answers,
    )
    from emlens.evaluation import rates as rate_table
    from emlens.experiments import compare_conditions
    from emlens.hooks import ablation_hooks
    from emlens.lora import merge_lora

    layer, dirs = steering.layer, steering.dirs
    d, rand = dirs[layer], random_direction(dirs[layer], seed=ctx.seed)

    def ablate(model, direction):
        return ablation_hooks(model, direction, layers="all")

    # The unablated organism was judged in section 1 with the same settings and seed.
    org_none = rates.answers[rates.answers["model_role"] == "organism"]
    summary, _ = compare_conditions(
        ctx.org, {"ablate direction": ablate(ctx.org, d), "ablate random": ablate(ctx.org, rand)},
        ctx.qsets, judge=ctx.judge, sampling=ctx.sampling, progress=ctx.progress)
    none = rate_table(org_none, by="question_set").reset_index().assign(condition="none")
    table = pd.concat([none, summary], ignore_index=True).assign(model="organism")
    # the likelihood lens: each model's gaps unablated, ablated, and with the random ablated
    lens_models = {"organism": ctx.org}
    transfer_name, own, own_how = None, None, ""
    if transfer_organism:
        transfer_name = str(transfer_organism)
        org2 = merge_lora(ctx.chat, resolve_adapter(transfer_organism))
        t_summary, t_answers = compare_conditions(
            org2, {"none": None, "ablate organism direction": ablate(org2, d),
                   "ablate random": ablate(org2, rand)}, ctx.qsets, judge=ctx.judge,
            sampling=ctx.sampling, progress=ctx.progress)
        table = pd.concat([table, t_summary.assign(model="second organism")], ignore_index=True)
        lens_models["second organism"] = org2
        # Convergence as in the papers: each fine-tune's direction from its *own* judged answers.
        try:
            bad2, good2, own_how = select_answers(t_answers[t_answers["condition"] == "none"],
                                                  seed=ctx.seed)
            own = mean_diff(org2, bad2, good2, layers=list(dirs), selection=own_how,
                            progress=False)
        except ValueError as err:
            own_how = f"no direction from the second organism's own answers: {err}"
    gap_lens = {}
    ref = steering.ref_dirs[layer] if steering.ref_dirs else None
    for model_name, m in lens_models.items():
        for set_name in ctx.qsets:
            kinds = [("none", "", None), ("direction", f" - ablate L{layer}", ablate(m, d)),
                     ("random", f" - ablate random L{layer}", ablate(m, rand))]
            if ref is not None and model_name == "organism":
                kinds.append(("reference", f" - ablate reference L{layer}", ablate(m, ref)))
            got = {kind: lenses.gaps(ctx, f"{model_name}{suffix}", m, set_name, hooks)
                   for kind, suffix, hooks in kinds}
            gap_lens[(model_name, set_name)] = [lenses.likelihood(
                got["none"], got["direction"], got["random"], set_name,
                "same-norm random direction", expect=-1)]
            if "reference" in got:
                # a random direction is a fine control for any direction's ablation (projecting
                # out removes the component whatever the norm)
                gap_lens[(model_name, set_name)].append(lenses.likelihood(
                    got["none"], got["reference"], got["random"], set_name,
                    "same-norm random direction", expect=-1, direction="reference"))
    lens_models.clear()
    # Cosines: the two organisms' directions, each from its own judged answers (the papers'
    # convergence test), and, as a reference, the chat model's activations on the organism's
    # answers (on the same text most of a mean difference is the text itself).
    pairs = [("organism vs chat model, same answers", steering.chat_dirs)]
    if own is not None:
        pairs.insert(0, ("organism vs second organism, each on its own answers", own))
    cos = pd.DataFrame([
        {"pair": name, "layer": L, "cosine": float(cosine_matrix([dirs[L]], [other[L]])[0, 0])}
        for name, other in pairs for L in dirs
    ])
    cos_rand = float(cosine_matrix([d], [rand])[0, 0])
    findings = []
    t = table.set_index(["model", "condition", "question_set"])
    for model, cond in (("organism", "ablate direction"),
                        ("second organism", "ablate organism direction")):
        if model not in set(table["model"]):
            continue
        for set_name in ctx.qsets:
            before, after = t.loc[(model, "none", set_name)], t.loc[(model, cond, set_name)]
            rnd = t.loc[(model, "ablate random", set_name)]
            what = "the organism" if model == "organism" else "a second organism (transfer)"
            entries = [lenses.judged(before, after, rnd, "same-norm random direction", expect=-1),
                       *gap_lens[(model, set_name)]]
            findings.append(Finding(
                f"{'ablation' if model == 'organism' else 'transfer'}_{set_name}",
                f"Ablating the direction removes misalignment from {what} ({set_name})",
                tuple(entries),
                f"before {fmt_rate(before)}; after {fmt_rate(after)}; random ablation "
                f"{fmt_rate(rnd)}; " + "; ".join(lens_text(e.as_dict()) for e in entries[1:]),
            ))
    ref = cos[cos["pair"].str.contains("chat model")]["cosine"]
    conv = cos[cos["pair"].str.contains("second organism")]["cosine"]
    # the lens: the cosine at the direction's layer with a bootstrap interval over answers, vs
    # a random direction's cosine and its 95% range (sqrt(d) cos is about N(0, 1) in d dims)
    bad, good = list(steering.bad), list(steering.good)
    if own is not None:
        value, low, high = cosine_interval(ctx.org, bad, good, org2, bad2, good2, layer,
                                           hook=d.hook, seed=ctx.seed)
        effect = Effect(value, low, high, n=len(bad) + len(good) + len(bad2) + len(good2))
    else:
        effect = Effect(math.nan, math.nan, math.nan, n=0)
    band = 1.96 / math.sqrt(d.vector.numel())
    conv_lens = Comparison(
        f"cosine of directions (layer {layer}, bootstrap over answers)", effect,
        Effect(cos_rand, min(cos_rand, -band), max(cos_rand, band), n=1),
        "same-norm random direction (95% range of a random direction's cosine)",
        delta=CONVERGENCE_DELTA, short="cosine")
    findings.append(Finding(
        "convergence", "Directions converge across fine-tunes (each from its own judged answers)",
        (conv_lens,),
        (f"cosine per layer {conv.min():.2f}-{conv.max():.2f} (layers "
         f"{', '.join(map(str, dirs))}); " if len(conv) else "not measured; ")
        + f"random same-norm direction: {cos_rand:.3f}; second organism: "
        f"{own_how or 'not run'}; reference, chat model on the organism's answers: "
        f"{ref.min():.2f}-{ref.max():.2f}",
    ))
    return AblationResult(layer=layer, transfer_name=transfer_name, table=table, cosines=cos,
                          cos_rand=cos_rand, own_how=own_how, findings=tuple(findings))


def render(r: AblationResult, rep: Report) -> None:
    rep.section(
        "3. Ablating the direction; transfer to a second organism; convergence",
        f"The organism's layer-{r.layer} direction is projected out of resid_post after every "
        "block, in the organism and (transfer) in a second, independently trained fine-tune "
        f"({r.transfer_name or 'none given'}); the control projects out a same-norm random "
        "direction. The unablated organism's rows are section 1's answers. The likelihood lens "
        "also reads the organism with section 2's reference-answer direction ablated the same way "
        "(no judge in the loop).",
    )
    cols = ["model", "condition", "question_set", "n", "k", "rate", "low", "high",
            "mean_aligned", "mean_coherent"]
    rep.table(r.table[cols])
    rep.table(r.cosines, f"Cosine similarity of directions (a same-norm random direction: "
                         f"{r.cos_rand:.3f}). Second organism: {r.own_how or 'not run'}.")
    rep.results["ablation"] = r.table
    rep.results["cosines"] = r.cosines
    for f in r.findings:
        rep.finding(f)
