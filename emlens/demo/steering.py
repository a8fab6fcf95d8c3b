"""Section 2: mean-difference directions both ways (from the organism's judged answers, and from
paired reference answers with no judge in the loop), a steering sweep read by the likelihood lens
over a fine grid of scales, and the chosen cell sampled and judged against a same-norm random
direction."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

import pandas as pd

from emlens.demo import lenses
from emlens.demo.common import Context, fmt_rate
from emlens.findings import Finding
from emlens.report import Report, lens_text

if TYPE_CHECKING:
    from emlens.demo.rates import RatesResult
    from emlens.directions import Direction

Pair = tuple[str, str]  # (question, answer)


@dataclass(frozen=True)
class View:
    """A circuitsvis view built in ``measure`` (it needs the model), written by ``render``."""

    view: Any
    name: str
    caption: str
    height: int


@dataclass(frozen=True)
class SteeringResult:
    """Section 2: the directions, the lens sweep, the chosen cell judged, the steering finding.

    ``dirs`` (layer -> Direction) is the organism's activations on its own judged answers
    (paired reference answers when it judged too few), from the pairs ``bad`` and ``good``;
    ``chat_dirs`` the chat model on the same answers; ``ref_dirs`` the organism on paired
    reference answers of the training topics (no judge). ``layer`` and ``scale`` are the chosen
    cell's; ``cell`` holds its judged rate rows (``"direction"``, ``"random"``, ``"none"``) and
    the ``"rule"`` that chose it.
    """

    layer: int
    scale: float
    dirs: Mapping[int, Direction]
    chat_dirs: Mapping[int, Direction]
    ref_dirs: Mapping[int, Direction]
    bad: tuple[Pair, ...]
    good: tuple[Pair, ...]
    protocol: str  # how the directions were extracted
    select_pairs: int  # the general pairs the lens sweep reads
    both: pd.DataFrame  # the directions both ways, with their cosine per layer
    grid: pd.DataFrame  # the lens sweep
    chosen: pd.Series  # the grid's row of the chosen cell
    table: pd.DataFrame  # the chosen cell sampled and judged
    cell: Mapping[str, Any]
    views: tuple[View, ...]
    findings: tuple[Finding, ...]


def _directions(ctx: Context, answers: pd.DataFrame, layers: list[int]):
    """``(dirs, chat_dirs, ref_dirs, bad, good, protocol)``: see :class:`SteeringResult`;
    ``protocol`` is the sentence saying how ``dirs`` was extracted."""
    from emlens.data import pair_rows
    from emlens.directions import mean_diff, select_answers

    ref_rows = pair_rows("medical", split="train", limit=ctx.cfg.reference_pairs)
    ref_bad = [(r.question, r.misaligned) for r in ref_rows]
    ref_good = [(r.question, r.aligned) for r in ref_rows]
    ref_how = (f"paired reference answers, medical training topics: {len(ref_rows)} misaligned vs "
               f"{len(ref_rows)} aligned (no judge)")
    org_answers = answers[answers["model_role"] == "organism"]
    try:
        bad, good, selection = select_answers(org_answers, seed=ctx.seed)
        protocol = "organism's activations on its own judged answers"
    except ValueError as err:
        bad, good = ref_bad, ref_good
        selection = f"fallback ({err}): {ref_how}"
        protocol = "organism's activations on reference answers"
    dirs = mean_diff(ctx.org, bad, good, layers=layers, selection=selection, progress=False)
    chat_dirs = mean_diff(ctx.chat, bad, good, layers=layers, selection=selection,
                          progress=False)
    ref_dirs = mean_diff(ctx.org, ref_bad, ref_good, layers=layers, selection=ref_how,
                         progress=False)
    return dirs, chat_dirs, ref_dirs, bad, good, f"{protocol}; {selection}"


def measure(ctx: Context, rates: RatesResult) -> SteeringResult:
    from emlens.directions import cosine_matrix, random_direction, residual_norms
    from emlens.experiments import choose_cell, lens_sweep, sweep
    from emlens.hooks import steering_hooks
    from emlens.viz import projection_view

    cfg, answers = ctx.cfg, rates.answers
    layers = sorted({round(f * ctx.chat.cfg.n_layers) for f in cfg.sweep_layers})
    dirs, chat_dirs, ref_dirs, bad, good, protocol = _directions(ctx, answers, layers)
    both = pd.DataFrame([{"layer": L, "judged_norm": dirs[L].norm,
                          "reference_norm": ref_dirs[L].norm,
                          "cosine": float(cosine_matrix([dirs[L]], [ref_dirs[L]])[0, 0]),
                          **{f"judged_{k}": v for k, v in dirs[L].counts.items()}}
                         for L in layers])
    # The chat model's judged general answers of section 1 are the unsteered baseline, and their
    # answer tokens set the residual norm the scales are measured in.
    chat_general = answers[(answers["model_role"] == "chat")
                           & (answers["question_set"] == "general")]
    norms = residual_norms(ctx.chat, list(zip(chat_general["question"], chat_general["answer"],
                                              strict=True)), layers, hook=dirs[layers[0]].hook)
    # 1. the cheap lens over the whole grid, on pairs no finding is measured on
    grid = lens_sweep(ctx.chat, dirs, lenses.pair_set("general-select", cfg.select_pairs),
                      layers=layers, scales=list(cfg.sweep_scales), resid_norms=norms,
                      max_fluency_drop=cfg.max_fluency_drop, seed=ctx.seed,
                      base=lenses.gaps(ctx, "chat", ctx.chat, "general-select"),
                      progress=ctx.progress)
    chosen, rule = choose_cell(grid)
    L, scale = int(chosen["layer"]), float(chosen["scale"])
    # 2. only the chosen cell and its same-norm random control are sampled and judged
    table = sweep(ctx.chat, dirs, layers=[L], scales=[scale], questions=ctx.qsets["general"],
                  judge=ctx.judge, sampling=ctx.sampling, progress=ctx.progress,
                  baseline=chat_general, resid_norms=norms)
    best = table[table["kind"] == "direction"].iloc[0]
    rand_best = table[table["kind"] == "random"].iloc[0]
    base = table[table["kind"] == "none"].iloc[0]
    cell = {"direction": best, "random": rand_best, "none": base, "rule": rule}
    # the likelihood lens at the chosen cell, on the measurement pairs: the judged direction,
    # the reference direction at the same added norm, and the same-norm random control
    d, ref = dirs[L], ref_dirs[L]
    raw = float(best["raw_scale"])
    added = raw * d.norm
    rand = random_direction(d, seed=ctx.seed + L)  # the sweep's control
    steered = {
        kind: lenses.gaps(ctx, f"chat + steer {kind} L{L} +{added:.4g}", ctx.chat, "general",
                          steering_hooks(ctx.chat, vec, layers=L, scale=k, hook=vec.hook))
        for kind, vec, k in (("direction", d, raw), ("random", rand, raw),
                             ("reference direction", ref, added / ref.norm))}
    chat_gaps = lenses.gaps(ctx, "chat", ctx.chat, "general")
    entries = [lenses.judged(base, best, rand_best, "same-norm random direction"),
               lenses.likelihood(chat_gaps, steered["direction"], steered["random"], "general",
                                 "same-norm random direction")]
    ref_entry = lenses.likelihood(chat_gaps, steered["reference direction"], steered["random"],
                                  "general", "same-norm random direction", direction="reference")
    entries.append(ref_entry)
    finding = Finding(
        "steering",
        "Adding the mean-difference direction makes the chat model misaligned (vs a same-norm "
        "random direction)",
        tuple(entries),
        f"chosen cell layer {L}, scale {scale:g} ({rule}): {fmt_rate(best)}; random "
        f"{fmt_rate(rand_best)}; unsteered {fmt_rate(base)}; {lens_text(entries[1].as_dict())}; "
        f"reference direction: {lens_text(ref_entry.as_dict())}",
    )
    q, a = bad[0]
    views = [View(projection_view(ctx.org, q, a, dirs[L]), "projection_misaligned",
                  f"Organism, layer {L}: each answer token's resid_post projected on the "
                  f"direction, for a misaligned answer to {q!r}.", 200)]
    q, a = good[0]
    views.append(View(projection_view(ctx.org, q, a, dirs[L]), "projection_aligned",
                      "The same for an aligned answer.", 200))
    return SteeringResult(
        layer=L, scale=scale, dirs=MappingProxyType(dirs), chat_dirs=MappingProxyType(chat_dirs),
        ref_dirs=MappingProxyType(ref_dirs), bad=tuple(bad), good=tuple(good), protocol=protocol,
        select_pairs=cfg.select_pairs, both=both, grid=grid, chosen=chosen, table=table,
        cell=MappingProxyType(cell), views=tuple(views), findings=(finding,))


def render(r: SteeringResult, rep: Report) -> None:
    from emlens.experiments import plot_lens_sweep

    rule = r.cell["rule"]
    rep.section(
        "2. A mean-difference direction steers the chat model",
        f"Direction per layer = mean resid_post over answer tokens of misaligned minus aligned "
        f"answers; {r.protocol}. A second direction comes from paired reference answers with no "
        "judge in the loop (the two ways, and their cosine, below). Steering adds scale x (the "
        "layer's mean residual norm) along the direction at every position (the table also gives "
        "the multiple of the direction's own norm, the papers' raw protocol; "
        "emlens.experiments.lens_sweep(relative=False) sweeps in it). The likelihood lens reads "
        f"every cell of the grid on the last {r.select_pairs} general pairs (never used to "
        f"measure a finding); the chosen cell is the {rule}. Only that cell and a same-norm "
        "random direction are then sampled and judged; the unsteered row is the chat model's "
        "answers of section 1.",
    )
    rep.table(r.both, "Directions both ways: from the organism's judged answers and from paired "
                      "reference answers; cosine per layer")
    rep.table(r.grid.drop(columns=["kind"]), "Steering sweep read by the likelihood lens "
              "(chat model, general pairs; change vs unsteered)")
    rep.figure(plot_lens_sweep(r.grid, chosen=r.chosen),
               "Gap change and the cost to the text's likelihood vs scale (x mean residual norm); "
               "the dashed line bounds the coherent regime; the star is the chosen cell.")
    rep.table(r.table, f"Judged at the chosen cell (layer {r.layer}, scale {r.scale:g})")
    rep.results["directions"] = {L: d.metadata() for L, d in r.dirs.items()}
    rep.results["directions_both_ways"] = r.both
    rep.results["lens_sweep"] = r.grid
    rep.results["sweep"] = r.table
    for f in r.findings:
        rep.finding(f)
    for v in r.views:
        rep.view(v.view, v.name, v.caption, height=v.height)
