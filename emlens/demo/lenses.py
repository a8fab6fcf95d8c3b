"""The demo's two lenses on each finding: the judge's misaligned rate and, judge-free, the
likelihood gap on paired answers, each beside its random control.

* judged: the change in the misaligned rate (``rate_difference``: Newcombe 95% interval), and
  the same change under the control (a same-norm random direction);
* likelihood gap: the per-question change in mean per-token log p(misaligned answer) - log
  p(aligned answer) (:func:`emlens.lens.gap_effect`, bootstrap 95% interval over questions) on
  paired answers the models never trained on: ``general_pairs`` for general questions, the held-out
  medical topics' pairs for medical ones; the control is a same-norm random direction, or for an
  organism a same-norm random adapter (:func:`emlens.lora.random_like`).

Each lens is an :class:`emlens.findings.Comparison` (effect and control, each with its interval
and n) whose verdict follows the one rule of :mod:`emlens.findings`, with the smallest effects of
interest 15 points judged and :data:`LENS_DELTA` nats/token for the likelihood gap;
:func:`measure_power` states the n each comparison would need (:func:`render_power` writes it).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import pandas as pd

from emlens.demo.common import Context
from emlens.demo.config import DemoConfig
from emlens.findings import GAP_DELTA, RATE_DELTA, Comparison, Finding
from emlens.report import Report

if TYPE_CHECKING:
    from emlens.demo.ablation import AblationResult
    from emlens.demo.rates import RatesResult
    from emlens.demo.steering import SteeringResult


def pair_set(set_name: str, limit: int | None) -> list:
    """The paired rows the likelihood lens reads for a question set of the demo: the first
    ``limit`` of ``general_pairs`` (general), the held-out medical topics' pairs (medical), or
    the last ``limit`` general pairs (``"general-select"``: where the steering cell is chosen,
    never where a finding is measured)."""
    from emlens.data import pair_rows

    if set_name == "general":
        return pair_rows("general_pairs", limit=limit)
    if set_name == "general-select":
        rows = pair_rows("general_pairs")
        return rows[len(rows) - limit:] if limit else rows
    if set_name == "medical":
        return pair_rows("medical", split="heldout", limit=limit)
    raise ValueError(f"no paired answers for question set {set_name!r}.")


def check_pair_budget(cfg: DemoConfig) -> None:
    """The selection pairs and the measurement pairs must not overlap."""
    from emlens.data import pair_rows

    have = len(pair_rows("general_pairs"))
    if cfg.lens_pairs + cfg.select_pairs > have:
        raise ValueError(f"lens_pairs ({cfg.lens_pairs}) + select_pairs "
                         f"({cfg.select_pairs}) exceed the {have} general pairs; the steering "
                         "cell must be chosen on pairs the findings are not measured on.")


def gaps(ctx: Context, key: str, model, set_name: str, hooks=None):
    """:func:`emlens.lens.likelihood_gaps` of ``model`` (with ``hooks``) on the set's pairs,
    memoised in ``ctx.gap_cache`` under ``(key, set_name)``."""
    from emlens.lens import likelihood_gaps

    cache = ctx.gap_cache
    if (key, set_name) not in cache:
        limit = ctx.cfg.select_pairs if set_name == "general-select" else ctx.cfg.lens_pairs
        cache[(key, set_name)] = likelihood_gaps(model, pair_set(set_name, limit), hooks=hooks,
                                                 batch_size=32)
    return cache[(key, set_name)]


POWER, ALPHA = 0.8, 0.05
DELTA, LENS_DELTA = RATE_DELTA, GAP_DELTA  # the smallest effects of interest (emlens.findings)


def likelihood(base, treated, control, set_name: str, control_name: str, *, expect: int = 1,
               direction: str | None = None) -> Comparison:
    """The likelihood-gap lens: treated - base per question vs control - base; ``expect`` is
    the sign the claim predicts (+1: the gap rises). :meth:`Comparison.from_gaps`."""
    return Comparison.from_gaps(base, treated, control, set_name, control_name, expect=expect,
                                direction=direction)


def judged(before, after, control=None, control_name: str = "", *,
           expect: int = 1) -> Comparison:
    """The judged lens: rate(after) - rate(before), and the control's change, with Newcombe 95%
    intervals; ``n`` counts the coherent answers of ``after``. :meth:`Comparison.from_rates`."""
    return Comparison.from_rates(before, after, control, control_name, expect=expect)


def _power_row(name: str, a, b, answers_per_arm: int) -> dict:
    """Power of one judged comparison of rows ``a`` and ``b`` (each with n coherent, k, and
    ``n_answers`` sampled when known) to detect a 15-point difference."""
    from emlens.power import compare_rates

    c = compare_rates(int(b["k"]), int(b["n"]), int(a["k"]), int(a["n"]), delta=DELTA,
                      power=POWER, alpha=ALPHA)
    sampled = [int(r["n_answers"]) for r in (a, b) if "n_answers" in r and r["n_answers"]]
    share = min(int(r["n"]) / int(r["n_answers"]) for r in (a, b)
                if "n_answers" in r and r["n_answers"]) if sampled else None
    need = c["n_needed"]
    return {"comparison": name, "p0": c["p0"], "n_used_per_arm": c["n_used"],
            "answers_sampled_per_arm": min(sampled) if sampled else answers_per_arm,
            "coherent_share": share, "n_needed_per_arm": need,
            "answers_needed_per_arm": (math.ceil(need / share) if share else None),
            "power_at_n_used": c["power_at_n"], "mde_at_n_used": c["mde_at_n"],
            "enough": c["n_used"] >= need}


@dataclass(frozen=True)
class PowerResult:
    """The stated power of the demo's comparisons: ``table`` per judged comparison (counted
    answers needed per arm for a :data:`DELTA` difference, n used, power and minimum detectable
    difference at it), ``lens_table`` per likelihood-lens comparison (:func:`lens_power`), and a
    plain ``statement`` of which fall short."""

    table: pd.DataFrame
    lens_table: pd.DataFrame
    statement: str

    def as_dict(self) -> dict:
        """``results["power"]``."""
        return {"delta": DELTA, "power": POWER, "alpha": ALPHA,
                "test": "two-sided two-proportion z test (pooled null variance), emlens.power",
                "baseline": "the lower measured rate of the two arms",
                "comparisons": self.table, "lens_delta": LENS_DELTA,
                "lens_comparisons": self.lens_table, "statement": self.statement}


def measure_power(cfg: DemoConfig, qsets: Mapping[str, list[str]], rates: RatesResult,
                  steering: SteeringResult, ablation: AblationResult | None,
                  findings: Sequence[Finding]) -> PowerResult:
    """The power calculation of the demo's core judged comparisons: chat vs organism per question
    set (``rates.summary``), direction vs random steering in the chosen cell (``steering.cell``),
    ablation vs random ablation (``ablation.table``; ``ablation`` may be ``None``): for each, the
    counted answers needed to detect a 15-point difference with power 0.8 (two-sided, alpha 0.05)
    from the measured baseline rate, the n used, the power at that n and the minimum detectable
    difference; and the same for every likelihood lens of ``findings``."""
    per_arm = cfg.n_samples * cfg.n_general
    rows = []
    t = rates.summary.set_index(["model", "questions"])
    for q in qsets:
        rows.append(_power_row(f"chat vs organism ({q})", t.loc[("chat", q)],
                               t.loc[("organism", q)], per_arm))
    cell = steering.cell  # the cell section 2 chose and judged
    if cell is not None:
        rows.append(_power_row("direction vs random steering (chosen cell, general)",
                               cell["direction"], cell["random"], per_arm))
    abl = None if ablation is None else ablation.table
    if abl is not None:
        a = abl.set_index(["model", "condition", "question_set"])
        for model, cond in (("organism", "ablate direction"),
                            ("second organism", "ablate organism direction")):
            for q in qsets:
                if (model, cond, q) in a.index:
                    rows.append(_power_row(f"ablation vs random ablation, {model} ({q})",
                                           a.loc[(model, cond, q)],
                                           a.loc[(model, "ablate random", q)], per_arm))
    table = pd.DataFrame(rows)
    short = table[~table["enough"]]
    lens_table = lens_power(findings)
    lens_short = lens_table[~lens_table["enough"]] if len(lens_table) else lens_table
    statement = (
        "Every judged comparison has the power asked for." if short.empty else
        f"{len(short)} of {len(table)} judged comparisons cannot detect a {DELTA:.0%} difference "
        f"with power {POWER} at the n this run could afford; their minimum detectable "
        f"differences at the n used are in the table (nan: not even a rise to 100% is "
        f"detectable).")
    statement += (
        f" Likelihood lens: {len(lens_table) - len(lens_short)} of {len(lens_table)} "
        f"comparisons have the pairs to detect {LENS_DELTA} nats/token with power {POWER} "
        "(from each comparison's own per-question spread); it reads every pair, so its n is the "
        "number of paired answers there are, not a sampling budget.")
    return PowerResult(table=table, lens_table=lens_table, statement=statement)


def render_power(r: PowerResult, rep: Report) -> None:
    """The power section, and ``rep.results["power"]`` (:meth:`PowerResult.as_dict`)."""
    rep.section(
        "Power of the comparisons",
        f"Judged lens: counted (coherent) answers per arm needed to detect a {DELTA:.0%}-point "
        f"difference from the measured baseline rate with power {POWER} (two-sided "
        f"two-proportion test, alpha {ALPHA}; emlens.power), beside the n this run used. "
        f"Likelihood lens: pairs needed to detect a change of {LENS_DELTA} nats/token (paired "
        f"two-sided z test against zero, alpha {ALPHA}) given the per-question standard deviation "
        f"implied by the measured interval. {r.statement}")
    rep.table(r.table, "Judged lens")
    if len(r.lens_table):
        rep.table(r.lens_table, "Likelihood lens")
    rep.results["power"] = r.as_dict()


def lens_power(findings: Sequence[Finding]) -> pd.DataFrame:
    """Per likelihood-lens comparison of the findings: the per-question SD implied
    by its bootstrap interval, the pairs needed to detect :data:`LENS_DELTA` with power
    :data:`POWER`, and the minimum detectable change at the pairs used."""
    from scipy.stats import norm

    z = norm.ppf(1 - ALPHA / 2) + norm.ppf(POWER)
    rows = []
    for f in findings:
        for c in f.comparisons:
            e = c.effect
            if not c.lens.startswith("likelihood") or not e.n or not e.has_interval:
                continue
            sd = (e.high - e.low) / (2 * norm.ppf(0.975)) * math.sqrt(e.n)
            need = math.ceil((z * sd / LENS_DELTA) ** 2)
            rows.append({"comparison": f.claim + (f" [{c.direction} direction]"
                                                  if c.direction else ""),
                         "lens": c.lens, "sd_per_question": sd, "n_used": int(e.n),
                         "n_needed": need, "mde_at_n_used": z * sd / math.sqrt(e.n),
                         "enough": int(e.n) >= need})
    return pd.DataFrame(rows)


__all__ = ["PowerResult", "check_pair_budget", "gaps", "judged", "lens_power", "likelihood",
           "measure_power", "pair_set", "render_power"]
