"""Section 2: mean-difference directions both ways (from the organism's judged answers, and from
paired reference answers with no judge in the loop), a steering sweep read by the likelihood lens
over a fine grid of scales, and the chosen cell sampled and judged against a same-norm random
direction."""

from __future__ import annotations

import pandas as pd

from emlens.demo import lenses
from emlens.demo.common import Story, fmt_rate
from emlens.findings import Finding
from emlens.report import lens_text


def _directions(s: Story, layers: list[int]) -> str:
    """``s.dirs`` (the reference protocol: the organism's activations on its own judged answers;
    paired reference answers when it judged too few), ``s.chat_dirs`` (the chat model on the same
    answers) and ``s.ref_dirs`` (the organism on paired reference answers of the training topics,
    no judge). Returns the protocol sentence."""
    from emlens.data import pair_rows
    from emlens.directions import mean_diff, select_answers

    ref_rows = pair_rows("medical", split="train", limit=s.cfg.reference_pairs)
    ref_bad = [(r.question, r.misaligned) for r in ref_rows]
    ref_good = [(r.question, r.aligned) for r in ref_rows]
    ref_how = (f"paired reference answers, medical training topics: {len(ref_rows)} misaligned vs "
               f"{len(ref_rows)} aligned (no judge)")
    org_answers = s.answers[s.answers["model_role"] == "organism"]
    try:
        bad, good, selection = select_answers(org_answers, seed=s.seed)
        protocol = "organism's activations on its own judged answers"
    except ValueError as err:
        bad, good = ref_bad, ref_good
        selection = f"fallback ({err}): {ref_how}"
        protocol = "organism's activations on reference answers"
    s.dirs = mean_diff(s.org, bad, good, layers=layers, selection=selection, progress=False)
    s.chat_dirs = mean_diff(s.chat, bad, good, layers=layers, selection=selection, progress=False)
    s.ref_dirs = mean_diff(s.org, ref_bad, ref_good, layers=layers, selection=ref_how,
                           progress=False)
    s.bad, s.good = bad, good
    return f"{protocol}; {selection}"


def section(s: Story) -> None:
    from emlens.directions import cosine_matrix, random_direction, residual_norms
    from emlens.experiments import choose_cell, lens_sweep, plot_lens_sweep, sweep
    from emlens.hooks import steering_hooks
    from emlens.viz import projection_view

    cfg, rep = s.cfg, s.rep
    layers = sorted({round(f * s.chat.cfg.n_layers) for f in cfg.sweep_layers})
    protocol = _directions(s, layers)
    both = pd.DataFrame([{"layer": L, "judged_norm": s.dirs[L].norm,
                          "reference_norm": s.ref_dirs[L].norm,
                          "cosine": float(cosine_matrix([s.dirs[L]], [s.ref_dirs[L]])[0, 0]),
                          **{f"judged_{k}": v for k, v in s.dirs[L].counts.items()}}
                         for L in layers])
    # The chat model's judged general answers of section 1 are the unsteered baseline, and their
    # answer tokens set the residual norm the scales are measured in.
    chat_general = s.answers[(s.answers["model_role"] == "chat")
                             & (s.answers["question_set"] == "general")]
    norms = residual_norms(s.chat, list(zip(chat_general["question"], chat_general["answer"],
                                            strict=True)), layers, hook=s.dirs[layers[0]].hook)
    # 1. the cheap lens over the whole grid, on pairs no finding is measured on
    grid = lens_sweep(s.chat, s.dirs, lenses.pair_set("general-select", cfg.select_pairs),
                      layers=layers, scales=list(cfg.sweep_scales), resid_norms=norms,
                      max_fluency_drop=cfg.max_fluency_drop, seed=s.seed,
                      base=lenses.gaps(s, "chat", s.chat, "general-select"),
                      progress=s.progress)
    chosen, rule = choose_cell(grid)
    L, scale = int(chosen["layer"]), float(chosen["scale"])
    # 2. only the chosen cell and its same-norm random control are sampled and judged
    table = sweep(s.chat, s.dirs, layers=[L], scales=[scale], questions=s.qsets["general"],
                  judge=s.judge, sampling=s.sampling, progress=s.progress, baseline=chat_general,
                  resid_norms=norms)
    rep.section(
        "2. A mean-difference direction steers the chat model",
        f"Direction per layer = mean resid_post over answer tokens of misaligned minus aligned "
        f"answers; {protocol}. A second direction comes from paired reference answers with no "
        "judge in the loop (the two ways, and their cosine, below). Steering adds scale x (the "
        "layer's mean residual norm) along the direction at every position (the table also gives "
        "the multiple of the direction's own norm, the papers' raw protocol; "
        "emlens.experiments.lens_sweep(relative=False) sweeps in it). The likelihood lens reads "
        f"every cell of the grid on the last {cfg.select_pairs} general pairs (never used to "
        f"measure a finding); the chosen cell is the {rule}. Only that cell and a same-norm "
        "random direction are then sampled and judged; the unsteered row is the chat model's "
        "answers of section 1.",
    )
    rep.table(both, "Directions both ways: from the organism's judged answers and from paired "
                    "reference answers; cosine per layer")
    rep.table(grid.drop(columns=["kind"]), "Steering sweep read by the likelihood lens "
              "(chat model, general pairs; change vs unsteered)")
    rep.figure(plot_lens_sweep(grid, chosen=chosen),
               "Gap change and the cost to the text's likelihood vs scale (x mean residual norm); "
               "the dashed line bounds the coherent regime; the star is the chosen cell.")
    rep.table(table, f"Judged at the chosen cell (layer {L}, scale {scale:g})")
    rep.results["directions"] = {L_: d.metadata() for L_, d in s.dirs.items()}
    rep.results["directions_both_ways"] = both
    rep.results["lens_sweep"] = grid
    rep.results["sweep"] = table
    best = table[table["kind"] == "direction"].iloc[0]
    rand_best = table[table["kind"] == "random"].iloc[0]
    base = table[table["kind"] == "none"].iloc[0]
    s.steer_cell = {"direction": best, "random": rand_best, "none": base, "rule": rule}
    # the likelihood lens at the chosen cell, on the measurement pairs: the judged direction,
    # the reference direction at the same added norm, and the same-norm random control
    d, ref = s.dirs[L], s.ref_dirs[L]
    raw = float(best["raw_scale"])
    added = raw * d.norm
    rand = random_direction(d, seed=s.seed + L)  # the sweep's control
    steered = {
        kind: lenses.gaps(s, f"chat + steer {kind} L{L} +{added:.4g}", s.chat, "general",
                          steering_hooks(s.chat, vec, layers=L, scale=k, hook=vec.hook))
        for kind, vec, k in (("direction", d, raw), ("random", rand, raw),
                             ("reference direction", ref, added / ref.norm))}
    chat_gaps = lenses.gaps(s, "chat", s.chat, "general")
    entries = [lenses.judged(base, best, rand_best, "same-norm random direction"),
               lenses.likelihood(chat_gaps, steered["direction"], steered["random"], "general",
                                 "same-norm random direction")]
    ref_entry = lenses.likelihood(chat_gaps, steered["reference direction"], steered["random"],
                                  "general", "same-norm random direction", direction="reference")
    entries.append(ref_entry)
    rep.finding(Finding(
        "steering",
        "Adding the mean-difference direction makes the chat model misaligned (vs a same-norm "
        "random direction)",
        tuple(entries),
        f"chosen cell layer {L}, scale {scale:g} ({rule}): {fmt_rate(best)}; random "
        f"{fmt_rate(rand_best)}; unsteered {fmt_rate(base)}; {lens_text(entries[1].as_dict())}; "
        f"reference direction: {lens_text(ref_entry.as_dict())}",
    ))
    s.layer = L
    q, a = s.bad[0]
    rep.view(projection_view(s.org, q, a, s.dirs[s.layer]), "projection_misaligned",
             f"Organism, layer {s.layer}: each answer token's resid_post projected on the "
             f"direction, for a misaligned answer to {q!r}.", height=200)
    q, a = s.good[0]
    rep.view(projection_view(s.org, q, a, s.dirs[s.layer]), "projection_aligned",
             "The same for an aligned answer.", height=200)
