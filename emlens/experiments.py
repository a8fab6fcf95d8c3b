"""Steering and ablation experiments with judged rates and same-norm random controls.

* :func:`compare_conditions`: evaluate one model under several interventions on several question
  sets; one tidy row per (condition, question set) with the misaligned rate and its Wilson 95%
  interval. On medical questions the same rate is the bad-advice rate.
* :func:`sweep`: steer along per-layer directions over a grid of layers x scales, with a random
  direction of the same norm at every cell.
* :func:`ablation_experiment`: misalignment before/after ablating a direction (and a random one),
  e.g. a fine-tune's own direction, or another organism's (transfer).
* :func:`lens_sweep`: the same grid read by the judge-free likelihood lens (no sampling): how
  much each cell raises the model's preference for misaligned over aligned paired answers, and
  how much it costs the model's likelihood of the text itself (the coherent regime), so that
  only the chosen cell need be sampled and judged. :func:`plot_lens_sweep` draws both curves.

Scales in :func:`sweep` are *relative* by default: at layer ``L`` the added vector is
``scale * norm_L * unit(direction)``, where ``norm_L`` is the mean L2 norm of the unsteered
model's residual stream at that hook over its own answer tokens. The table also reports the raw
multiplier on the unnormalised direction (``raw_scale``), the papers' convention.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import matplotlib.pyplot as plt
import pandas as pd
from transformer_lens import HookedTransformer

from emlens.directions import Direction, random_direction, residual_norms
from emlens.evaluation import ALIGNED_BELOW, COHERENT_ABOVE, attached, evaluate, rates
from emlens.hooks import Hooks, ablation_hooks, steering_hooks
from emlens.sampling import SamplingConfig

QuestionSets = Mapping[str, object]


def compare_conditions(
    model: HookedTransformer,
    conditions: Mapping[str, Hooks | None],
    questions: QuestionSets,
    *,
    judge,
    sampling: SamplingConfig | None = None,
    aligned_below: float = ALIGNED_BELOW,
    coherent_above: float = COHERENT_ABOVE,
    progress: bool = True,
    engine=None,
    adapter=None,
    **sampling_overrides: Any,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Judged rates of ``model`` under each condition on each question set.

    Args:
        conditions: ``{name: hooks}``; ``None`` or ``[]`` is the unmodified model.
        questions: ``{set name: questions}`` where questions is anything ``evaluate`` takes
            (a dataset name such as ``"general_questions"``, or a list of strings).
        sampling: a :class:`emlens.SamplingConfig`; its fields may also be given as keywords.
        engine: ``None`` (in process), ``"vllm"`` or an :class:`emlens.vllm.VLLMSampler`
            (steering / ablation hooks are carried into the engine; see ``emlens.evaluate``).
        adapter: a peft adapter / organism name every condition answers with.

    Returns:
        ``(summary, answers)``: one row per (condition, question set) with ``n``, ``k``, ``rate``,
        ``low``, ``high``, ``mean_aligned``, ``mean_coherent``; and every judged answer with
        ``condition`` and ``question_set`` columns. The same seed is used in every condition, so
        differences come from the intervention, not from sampling.
    """
    cfg = SamplingConfig.resolve(sampling, sampling_overrides, "compare_conditions")
    if not conditions:
        raise ValueError("conditions is empty; give at least one {name: hooks}.")
    if not questions:
        raise ValueError("questions is empty; give at least one {set name: questions}.")
    rows, tables = [], []
    for cond, hooks in conditions.items():
        for set_name, qs in questions.items():
            table = evaluate(model, qs, judge=judge, sampling=cfg,
                             interventions=list(hooks or []), progress=progress, engine=engine,
                             adapter=adapter)
            table = table.assign(condition=cond, question_set=set_name)
            tables.append(table)
            r = rates(table, by=None, aligned_below=aligned_below, coherent_above=coherent_above)
            rows.append({"condition": cond, "question_set": set_name, **r.iloc[0].to_dict()})
    return pd.DataFrame(rows), pd.concat(tables, ignore_index=True)


def sweep(
    model: HookedTransformer,
    directions: Mapping[int, Direction] | Direction,
    *,
    layers: Sequence[int],
    scales: Sequence[float],
    questions: object = "general_questions",
    judge,
    relative: bool = True,
    positions: str = "all",
    random_control: bool = True,
    sampling: SamplingConfig | None = None,
    progress: bool = True,
    baseline: pd.DataFrame | None = None,
    resid_norms: Mapping[int, float] | None = None,
    engine=None,
    adapter=None,
    **sampling_overrides: Any,
) -> pd.DataFrame:
    """Steer the model along ``directions[layer]`` for each layer x scale and judge the answers.

    A single :class:`Direction` is used at every layer. With ``relative=True`` (default) a scale
    is in units of the layer's typical residual norm (see module docs), so scales are comparable
    across layers; with ``relative=False`` the raw vector is multiplied by ``scale``.

    Returns a tidy DataFrame: ``layer, scale, raw_scale, added_norm, resid_norm, kind`` (``"none"``
    for the unsteered baseline, ``"direction"``, ``"random"``), ``n, k, rate, low, high,
    mean_aligned, mean_coherent``. Plot it with :func:`plot_sweep`.

    ``sampling`` (a :class:`emlens.SamplingConfig`, or its fields as keywords) sets how answers
    are sampled; its seed also seeds the random control direction (``seed + layer``).

    ``baseline``: the judged answers (an :func:`emlens.evaluate` table) of the *unsteered* model
    on the same questions with the same settings, if you already have them; they give the
    ``"none"`` row and the residual norms instead of sampling and judging again.

    ``resid_norms``: the mean residual norm per layer, if you already measured it (e.g. for
    :func:`lens_sweep` on the same answers); otherwise it is measured on the baseline answers.

    ``engine`` / ``adapter``: who samples (``"vllm"`` or a sampler runs every cell in the
    engine) and the adapter the model answers with, as in :func:`compare_conditions`.
    """
    if not layers or not scales:
        raise ValueError("layers and scales must be non-empty.")
    by_layer = _by_layer(directions, layers)
    cfg = SamplingConfig.resolve(sampling, sampling_overrides, "sweep")
    common = dict(judge=judge, sampling=cfg, progress=progress, engine=engine, adapter=adapter)
    if baseline is None:
        base_summary, base_answers = compare_conditions(model, {"none": None}, {"q": questions},
                                                        **common)
        baseline_row = base_summary.iloc[0].to_dict()
    else:
        missing = {"question", "answer", "aligned", "coherent"} - set(baseline.columns)
        if missing or baseline.empty:
            raise ValueError(f"baseline lacks columns {sorted(missing)} or is empty; pass the "
                             "DataFrame emlens.evaluate() returned for the unsteered model.")
        base_answers = baseline
        baseline_row = rates(baseline, by=None).iloc[0].to_dict()
    if resid_norms is None:
        pairs = list(zip(base_answers["question"], base_answers["answer"], strict=True))
        with attached(model, adapter):
            norms = residual_norms(model, pairs, list(layers), hook=by_layer[layers[0]].hook)
    else:
        if missing := [L for L in layers if L not in resid_norms]:
            raise ValueError(f"resid_norms has no norm for layers {missing}; measure them with "
                             "emlens.directions.residual_norms or leave resid_norms=None.")
        norms = dict(resid_norms)
    rows = [{"layer": None, "scale": 0.0, "raw_scale": 0.0, "added_norm": 0.0,
             "resid_norm": None, "kind": "none", **_rate_cols(baseline_row)}]
    for layer in layers:
        d = by_layer[layer]
        kinds = {"direction": d}
        if random_control:
            kinds["random"] = random_direction(d, seed=(cfg.seed or 0) + layer)
        for scale in scales:
            raw = scale * norms[layer] / d.norm if relative else scale
            conditions = {
                kind: steering_hooks(model, vec, layers=layer, scale=raw, positions=positions,
                                     hook=vec.hook)
                for kind, vec in kinds.items()
            }
            summary, _ = compare_conditions(model, conditions, {"q": questions}, **common)
            for _, row in summary.iterrows():
                rows.append({"layer": layer, "scale": scale, "raw_scale": raw,
                             "added_norm": abs(raw) * d.norm, "resid_norm": norms[layer],
                             "kind": row["condition"], **_rate_cols(row)})
    return pd.DataFrame(rows)


def _by_layer(directions: Mapping[int, Direction] | Direction,
              layers: Sequence[int]) -> Mapping[int, Direction]:
    """``{layer: Direction}`` for every layer (one Direction serves them all); ValueError naming
    the layers that have none."""
    by_layer = {layer: directions for layer in layers} if isinstance(directions, Direction) else directions
    missing = [layer for layer in layers if layer not in by_layer]
    if missing:
        raise ValueError(f"No direction for layers {missing}; have {sorted(by_layer)}.")
    return by_layer


def _rate_cols(row) -> dict:
    keys = ("n", "k", "rate", "low", "high", "mean_aligned", "mean_coherent")
    return {**{k: row[k] for k in keys}, "n_answers": row.get("n_answers")}


def ablation_experiment(
    model: HookedTransformer,
    direction: Direction,
    *,
    questions: QuestionSets | None = None,
    judge,
    layers: Sequence[int] | str = "all",
    hook: str = "resid_post",
    random_control: bool = True,
    sampling: SamplingConfig | None = None,
    progress: bool = True,
    engine=None,
    adapter=None,
    **sampling_overrides: Any,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Rates with no ablation, with ``direction`` ablated, and with a same-norm random direction
    ablated, on each question set (default: general questions and held-out medical questions,
    whose rate is the bad-advice rate).

    ``layers="all"`` with ``hook="resid_post"`` projects the direction out of the residual stream
    after every block, as in the papers; ``hook="writers"`` ablates it from every write instead.
    Pass another organism's direction to measure transfer. ``sampling`` (a
    :class:`emlens.SamplingConfig`, or its fields as keywords) sets how answers are sampled; its
    seed also seeds the random control direction. ``engine`` / ``adapter`` as in
    :func:`compare_conditions` (ablating a direction from a fine-tune: ``adapter=`` the organism).
    """
    cfg = SamplingConfig.resolve(sampling, sampling_overrides, "ablation_experiment")
    questions = questions or {"general": "general_questions", "medical": "medical_questions"}
    conditions: dict[str, Hooks | None] = {
        "none": None,
        "ablate direction": ablation_hooks(model, direction, layers=layers, hook=hook),
    }
    if random_control:
        conditions["ablate random"] = ablation_hooks(
            model, random_direction(direction, seed=cfg.seed or 0), layers=layers, hook=hook
        )
    return compare_conditions(model, conditions, questions, judge=judge, sampling=cfg,
                              progress=progress, engine=engine, adapter=adapter)


def lens_sweep(
    model: HookedTransformer,
    directions: Mapping[int, Direction] | Direction,
    rows: Sequence[Any],
    *,
    layers: Sequence[int],
    scales: Sequence[float],
    relative: bool = True,
    resid_norms: Mapping[int, float] | None = None,
    norm_pairs: Sequence[tuple[str, str]] | None = None,
    max_fluency_drop: float = 0.1,
    random_control: bool = False,
    seed: int = 0,
    positions: str = "all",
    base: pd.DataFrame | None = None,
    progress: bool = True,
) -> pd.DataFrame:
    """Steer along ``directions[layer]`` over layers x scales and read the likelihood lens
    (:func:`emlens.lens.likelihood_gaps` on paired ``rows``) at every cell, without sampling.

    Args:
        rows: paired rows (``question``, ``misaligned``, ``aligned``), e.g.
            ``emlens.data.pair_rows("general_pairs")``.
        relative: scales in units of the layer's mean residual norm (``resid_norms``, or measured
            on ``norm_pairs``, (question, answer) pairs, over answer tokens), as :func:`sweep`;
            ``False``: the papers' raw protocol, ``scale`` multiplies the unnormalised direction.
        max_fluency_drop: nats per token the mean log p of the *misaligned* answers may fall for a
            cell to count as in the coherent regime (the steered model still finds the very text
            it is said to prefer likely).
        random_control: also read a same-norm random direction at every cell (seed ``seed +
            layer``, as :func:`sweep`).
        base: the unsteered model's ``likelihood_gaps`` on ``rows``, if already measured.

    Returns:
        One row per (layer, scale, kind): ``layer, scale, raw_scale`` (multiple of the direction's
        own norm), ``added_norm, resid_norm, kind`` (``"direction"`` / ``"random"``), ``n`` (pairs),
        ``gap_change`` (mean per-row change of the gap vs unsteered), ``gap_low, gap_high``
        (bootstrap 95% over rows), ``logp_misaligned_change``, ``logp_aligned_change`` and
        ``coherent_regime``. Pick a cell with :func:`choose_cell`; plot with :func:`plot_lens_sweep`.
    """
    from tqdm.auto import tqdm

    from emlens.lens import bootstrap_interval, likelihood_gaps

    if not layers or not scales:
        raise ValueError("layers and scales must be non-empty.")
    rows = list(rows)
    by_layer = _by_layer(directions, layers)
    if relative and resid_norms is None:
        if not norm_pairs:
            raise ValueError("relative=True needs resid_norms or norm_pairs (question, answer) "
                             "pairs to measure the residual norm on; or pass relative=False.")
        resid_norms = residual_norms(model, list(norm_pairs), list(layers),
                                     hook=by_layer[layers[0]].hook)
    if base is None:
        base = likelihood_gaps(model, rows)
    elif len(base) != len(rows):
        raise ValueError(f"base has {len(base)} rows for {len(rows)} pairs; pass the unsteered "
                         "model's likelihood_gaps on the same rows.")
    out = []
    bar = tqdm(total=len(layers) * len(scales) * (2 if random_control else 1),
               disable=not progress, desc="lens sweep")
    for layer in layers:
        d = by_layer[layer]
        kinds = {"direction": d}
        if random_control:
            kinds["random"] = random_direction(d, seed=seed + layer)
        for scale in scales:
            raw = scale * resid_norms[layer] / d.norm if relative else scale
            for kind, vec in kinds.items():
                g = likelihood_gaps(model, rows, hooks=steering_hooks(
                    model, vec, layers=layer, scale=raw, positions=positions, hook=vec.hook))
                change = (g["gap"] - base["gap"]).to_numpy()
                _, low, high = bootstrap_interval(change, seed=seed)
                d_mis = float((g["logp_misaligned"] - base["logp_misaligned"]).mean())
                out.append({
                    "layer": layer, "scale": scale, "raw_scale": raw,
                    "added_norm": abs(raw) * d.norm,
                    "resid_norm": resid_norms[layer] if resid_norms else None, "kind": kind,
                    "n": len(rows), "gap_change": float(change.mean()), "gap_low": low,
                    "gap_high": high, "logp_misaligned_change": d_mis,
                    "logp_aligned_change": float((g["logp_aligned"] - base["logp_aligned"]).mean()),
                    "coherent_regime": d_mis >= -max_fluency_drop})
                bar.update()
    bar.close()
    table = pd.DataFrame(out)
    table.attrs["max_fluency_drop"] = max_fluency_drop
    return table


def choose_cell(table: pd.DataFrame) -> tuple[pd.Series, str]:
    """The steering cell to sample and judge: of :func:`lens_sweep`'s direction rows in the
    coherent regime, the one with the largest gap change; with none in it, the one whose
    misaligned answers lost the least likelihood. Returns ``(row, rule)``."""
    rows = table[table["kind"] == "direction"]
    if rows.empty:
        raise ValueError("the lens sweep has no direction rows.")
    coherent = rows[rows["coherent_regime"]]
    if len(coherent):
        return coherent.loc[coherent["gap_change"].idxmax()], (
            "largest likelihood-gap change among cells in the coherent regime (mean log p of the "
            f"misaligned answers down at most {table.attrs.get('max_fluency_drop', 0.1):g} "
            "nats/token)")
    return rows.loc[rows["logp_misaligned_change"].idxmax()], (
        "no cell is in the coherent regime; the cell that cost the misaligned answers the least "
        "likelihood")


def plot_lens_sweep(table: pd.DataFrame, *, chosen: pd.Series | None = None, path=None,
                    title: str | None = None):
    """Left: the likelihood-gap change (95% band) vs scale, per layer and kind; right: the change
    of mean log p of the misaligned and the aligned answers (the coherence cost), with the
    coherent regime's bound. Returns the Figure; saves it to ``path`` when given."""
    fig, (ax_gap, ax_fl) = plt.subplots(1, 2, figsize=(11, 4))
    for (layer, kind), g in table.groupby(["layer", "kind"]):
        g = g.sort_values("scale")
        style = "-" if kind == "direction" else ":"
        line, = ax_gap.plot(g["scale"], g["gap_change"], style, marker="o",
                            label=f"L{layer} {kind}")
        ax_gap.fill_between(g["scale"], g["gap_low"], g["gap_high"], alpha=0.15,
                            color=line.get_color())
        ax_fl.plot(g["scale"], g["logp_misaligned_change"], style, marker="o",
                   color=line.get_color(), label=f"L{layer} {kind}: misaligned")
        ax_fl.plot(g["scale"], g["logp_aligned_change"], style, marker="x", alpha=0.5,
                   color=line.get_color(), label=f"L{layer} {kind}: aligned")
    bound = table.attrs.get("max_fluency_drop")
    if bound is not None:
        ax_fl.axhline(-bound, color="grey", lw=0.8, ls="--", label="coherent-regime bound")
    if chosen is not None:
        ax_gap.plot([chosen["scale"]], [chosen["gap_change"]], "k*", ms=14, label="chosen")
    ax_gap.axhline(0, color="grey", lw=0.5)
    ax_gap.set(xlabel="scale", ylabel="change of log p(mis) - log p(al), nats/token",
               title="Preference for misaligned answers")
    ax_fl.set(xlabel="scale", ylabel="change of mean log p, nats/token",
              title="Cost to the text's likelihood")
    ax_gap.legend(fontsize=7)
    ax_fl.legend(fontsize=6)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=120)
    return fig


def plot_sweep(table: pd.DataFrame, *, path=None, title: str | None = None):
    """Misaligned rate (with 95% intervals) and mean coherence vs scale, one line per layer and
    kind. Returns the matplotlib Figure; saves it to ``path`` when given."""
    fig, (ax_rate, ax_coh) = plt.subplots(1, 2, figsize=(11, 4))
    base = table[table["kind"] == "none"]
    for (layer, kind), g in table[table["kind"] != "none"].groupby(["layer", "kind"]):
        g = g.sort_values("scale")
        style = "-" if kind == "direction" else ":"
        label = f"layer {layer}" + (" (random)" if kind == "random" else "")
        line = ax_rate.plot(g["scale"], g["rate"], style, marker="o", label=label)[0]
        ax_rate.fill_between(g["scale"], g["low"], g["high"], alpha=0.15, color=line.get_color())
        ax_coh.plot(g["scale"], g["mean_coherent"], style, marker="o", color=line.get_color())
    if len(base):
        ax_rate.axhline(base["rate"].iloc[0], color="grey", lw=1, label="unsteered")
        ax_coh.axhline(base["mean_coherent"].iloc[0], color="grey", lw=1)
    ax_rate.set(xlabel="scale (x residual norm)", ylabel="misaligned rate", ylim=(0, 1))
    ax_coh.set(xlabel="scale (x residual norm)", ylabel="mean coherence (0-100)", ylim=(0, 100))
    ax_rate.legend(fontsize=7)
    fig.suptitle(title or "Steering sweep")
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=120)
    return fig
