"""Section 2: a mean-difference direction from the organism's judged answers, and a steering
sweep of the chat model along it vs a same-norm random direction."""

from __future__ import annotations

import pandas as pd

from emlens.demo import lenses
from emlens.demo.common import Story, clearly_lower, fmt_rate
from emlens.report import lens_text


def section(s: Story) -> None:
    from emlens.data import load_dataset
    from emlens.directions import mean_diff, select_answers
    from emlens.experiments import plot_sweep, sweep
    from emlens.viz import projection_view

    cfg, rep = s.cfg, s.rep
    layers = sorted({round(f * s.chat.cfg.n_layers) for f in cfg["sweep_layers"]})
    org_answers = s.answers[s.answers["model_role"] == "organism"]
    try:
        bad, good, selection = select_answers(org_answers, seed=s.seed)
        protocol = "organism's activations on its own judged answers"
    except ValueError as err:
        rows = [r for r in load_dataset("medical") if r.split == "heldout"]
        bad = [(r.question, r.misaligned) for r in rows]
        good = [(r.question, r.aligned) for r in rows]
        selection = (f"fallback ({err}): held-out medical dataset, misaligned vs aligned "
                     f"reference answers (n={len(rows)} each)")
        protocol = "organism's activations on reference answers"
    s.dirs = mean_diff(s.org, bad, good, layers=layers, selection=selection, progress=False)
    s.chat_dirs = mean_diff(s.chat, bad, good, layers=layers, selection=selection, progress=False)
    s.bad, s.good = bad, good
    # The chat model's judged general answers of section 1 are the unsteered baseline.
    chat_general = s.answers[(s.answers["model_role"] == "chat")
                             & (s.answers["question_set"] == "general")]
    table = sweep(s.chat, s.dirs, layers=layers, scales=list(cfg["sweep_scales"]),
                  questions=s.qsets["general"], judge=s.judge, sampling=s.sampling,
                  progress=s.progress,
                  baseline=chat_general)
    rep.section(
        "2. A mean-difference direction steers the chat model",
        f"Direction per layer = mean resid_post over answer tokens of misaligned minus aligned "
        f"answers; {protocol}; {selection}. Steering adds scale x (mean residual norm at the "
        "layer) along the direction at every position; the control adds a random direction of "
        "exactly the same norm. The unsteered row is the chat model's answers of section 1.",
    )
    rep.table(pd.DataFrame([{"layer": L, "norm": d.norm, **d.counts} for L, d in s.dirs.items()]),
              "Directions")
    rep.table(table, "Sweep on general questions")
    rep.figure(plot_sweep(table), "Misaligned rate and coherence vs relative scale.")
    rep.results["directions"] = {L: d.metadata() for L, d in s.dirs.items()}
    rep.results["sweep"] = table
    steer_rows = table[table["kind"] == "direction"]
    rand_rows = table[table["kind"] == "random"]
    # the cell with the highest misaligned rate; cells where every answer was incoherent have
    # no rate (n = 0) and sort first
    best = steer_rows.sort_values(["rate", "n"], na_position="first").iloc[-1]
    rand_best = rand_rows[(rand_rows["layer"] == best["layer"])
                          & (rand_rows["scale"] == best["scale"])].iloc[0]
    base = table[table["kind"] == "none"].iloc[0]
    ok = clearly_lower(base, best) and clearly_lower(rand_best, best)
    # the likelihood lens at the same cell: the same direction and random control as the sweep's
    from emlens.directions import random_direction
    from emlens.hooks import steering_hooks

    L, raw = int(best["layer"]), float(best["raw_scale"])
    entries = [lenses.judged(base, best, rand_best, "same-norm random direction")]
    d = s.dirs[L]
    steered = {kind: lenses.gaps(s, f"chat + steer {kind} L{L} x{raw:.4g}", s.chat, "general",
                                 steering_hooks(s.chat, vec, layers=L, scale=raw, hook=vec.hook))
               for kind, vec in (("direction", d),
                                 ("random", random_direction(d, seed=s.seed + L)))}
    entries.append(lenses.likelihood(lenses.gaps(s, "chat", s.chat, "general"),
                                     steered["direction"], steered["random"], "general",
                                     "same-norm random direction"))
    rep.finding(
        "Adding the mean-difference direction makes the chat model misaligned (vs a same-norm "
        "random direction)",
        "reproduced" if ok else "not reproduced",
        f"best cell layer {int(best['layer'])}, scale {best['scale']:g}: {fmt_rate(best)}; "
        f"random "
        f"{fmt_rate(rand_best)}; unsteered {fmt_rate(base)}; {lens_text(entries[1])}",
        entries,
    )
    s.layer = int(best["layer"])
    q, a = bad[0]
    rep.view(projection_view(s.org, q, a, s.dirs[s.layer]), "projection_misaligned",
             f"Organism, layer {s.layer}: each answer token's resid_post projected on the "
             f"direction, for a misaligned answer to {q!r}.", height=200)
    q, a = good[0]
    rep.view(projection_view(s.org, q, a, s.dirs[s.layer]), "projection_aligned",
             "The same for an aligned answer.", height=200)
