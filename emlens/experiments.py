"""Steering and ablation experiments with judged rates and same-norm random controls.

* :func:`compare_conditions`: evaluate one model under several interventions on several question
  sets; one tidy row per (condition, question set) with the misaligned rate and its Wilson 95%
  interval. On medical questions the same rate is the bad-advice rate.
* :func:`sweep`: steer along per-layer directions over a grid of layers x scales, with a random
  direction of the same norm at every cell.
* :func:`ablation_experiment`: misalignment before/after ablating a direction (and a random one),
  e.g. a fine-tune's own direction, or another organism's (transfer).

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
from emlens.evaluation import ALIGNED_BELOW, COHERENT_ABOVE, evaluate, rates
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
    **sampling_overrides: Any,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Judged rates of ``model`` under each condition on each question set.

    Args:
        conditions: ``{name: hooks}``; ``None`` or ``[]`` is the unmodified model.
        questions: ``{set name: questions}`` where questions is anything ``evaluate`` takes
            (a dataset name such as ``"general_questions"``, or a list of strings).
        sampling: a :class:`emlens.SamplingConfig`; its fields may also be given as keywords.

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
                             interventions=list(hooks or []), progress=progress)
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
    """
    if not layers or not scales:
        raise ValueError("layers and scales must be non-empty.")
    by_layer = {layer: directions for layer in layers} if isinstance(directions, Direction) else directions
    missing = [layer for layer in layers if layer not in by_layer]
    if missing:
        raise ValueError(f"No direction for layers {missing}; have {sorted(by_layer)}.")
    cfg = SamplingConfig.resolve(sampling, sampling_overrides, "sweep")
    common = dict(judge=judge, sampling=cfg, progress=progress)
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
    pairs = list(zip(base_answers["question"], base_answers["answer"], strict=True))
    norms = residual_norms(model, pairs, list(layers), hook=by_layer[layers[0]].hook)
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
    **sampling_overrides: Any,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Rates with no ablation, with ``direction`` ablated, and with a same-norm random direction
    ablated, on each question set (default: general questions and held-out medical questions,
    whose rate is the bad-advice rate).

    ``layers="all"`` with ``hook="resid_post"`` projects the direction out of the residual stream
    after every block, as in the papers; ``hook="writers"`` ablates it from every write instead.
    Pass another organism's direction to measure transfer. ``sampling`` (a
    :class:`emlens.SamplingConfig`, or its fields as keywords) sets how answers are sampled; its
    seed also seeds the random control direction.
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
                              progress=progress)


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
