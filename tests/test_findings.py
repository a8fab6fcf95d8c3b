"""emlens.findings: the one verdict rule, typed findings, their serialisation and schema."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
from hypothesis import given
from hypothesis import strategies as st

from emlens.findings import (
    EM_RULE,
    Comparison,
    Effect,
    EMRule,
    Finding,
    Verdict,
    validate_findings,
)

NAN = math.nan


def _c(low, high, *, control=None, expected="increase", delta=0.15, null=0.0):
    mid = (low + high) / 2 if not math.isnan(low + high) else NAN
    ctrl = None if control is None else Effect(sum(control) / 2, *control, n=10)
    return Comparison("judged misaligned rate", Effect(mid, low, high, n=10), ctrl,
                      "same-norm random" if control else "", expected=expected, delta=delta,
                      null=null)


@pytest.mark.parametrize("low, high, control, expected, verdict", [
    (0.10, 0.30, (-0.05, 0.05), "increase", Verdict.REPRODUCED),
    (0.10, 0.30, (0.00, 0.20), "increase", Verdict.CANNOT_DECIDE),  # overlaps the control
    (-0.30, -0.10, (-0.05, 0.05), "increase", Verdict.OPPOSITE_SIGN),
    (-0.05, 0.10, (-0.05, 0.05), "increase", Verdict.NOT_REPRODUCED),  # excludes +0.15
    (-0.05, 0.20, (-0.05, 0.05), "increase", Verdict.CANNOT_DECIDE),  # +0.15 still inside
    (-0.30, -0.10, (-0.05, 0.05), "decrease", Verdict.REPRODUCED),
    (-0.10, 0.05, None, "decrease", Verdict.NOT_REPRODUCED),
    (-0.20, 0.05, None, "decrease", Verdict.CANNOT_DECIDE),
    (0.05, 0.20, None, "decrease", Verdict.OPPOSITE_SIGN),
    (NAN, NAN, (-0.05, 0.05), "increase", Verdict.CANNOT_DECIDE),
])
def test_the_verdict_rule(low, high, control, expected, verdict):
    assert _c(low, high, control=control, expected=expected).verdict is verdict


def test_a_null_other_than_zero_shifts_every_branch():
    # an AUC: chance is 0.5, the smallest effect of interest 0.1 beyond it
    auc = dict(null=0.5, delta=0.1)
    assert _c(0.62, 0.80, control=(0.5, 0.5), **auc).verdict is Verdict.REPRODUCED
    assert _c(0.45, 0.58, control=(0.5, 0.5), **auc).verdict is Verdict.NOT_REPRODUCED
    assert _c(0.45, 0.70, control=(0.5, 0.5), **auc).verdict is Verdict.CANNOT_DECIDE
    # below chance and separated from the shuffled labels: the opposite sign
    assert _c(0.20, 0.40, control=(0.5, 0.5), **auc).verdict is Verdict.OPPOSITE_SIGN
    # without a control, an interval above zero but containing 0.5 supports nothing
    assert not _c(0.3, 0.7, **auc).supports_claim


def test_a_threshold_claim_has_no_opposite_sign():
    # "one interval carries more than half of the change", refuted below a quarter
    def share(low, high, expected="increase", null=0.5, refute_at=0.25):
        return Comparison("share", Effect((low + high) / 2, low, high, n=48), expected=expected,
                          null=null, refute_at=refute_at)

    assert share(0.55, 0.8).verdict is Verdict.REPRODUCED
    assert share(0.3, 0.45).verdict is Verdict.CANNOT_DECIDE  # below 0.5, not below 0.25
    assert _c(0.3, 0.45, null=0.5, delta=0.0).verdict is Verdict.OPPOSITE_SIGN  # the plain rule
    assert share(0.05, 0.2).verdict is Verdict.NOT_REPRODUCED
    assert share(0.2, 0.6).verdict is Verdict.CANNOT_DECIDE
    assert share(0.1, 0.3, "decrease", 0.5, 0.75).verdict is Verdict.REPRODUCED
    assert share(0.8, 0.9, "decrease", 0.5, 0.75).verdict is Verdict.NOT_REPRODUCED
    with pytest.raises(ValueError, match="other side"):
        share(0.1, 0.3, refute_at=0.6)
    back = Comparison.from_dict(json.loads(json.dumps(share(0.3, 0.45).as_dict())))
    assert back.as_dict() == share(0.3, 0.45).as_dict() and back.refute_at == 0.25
    validate_findings([Finding("dynamics", "claim", (share(0.3, 0.45),)).as_dict()])


def test_bad_input_is_refused_with_the_reason():
    with pytest.raises(ValueError, match="outside its interval"):
        Effect(0.5, 0.0, 0.3, n=4)
    with pytest.raises(ValueError, match="negative"):
        Effect(0.1, 0.0, 0.3, n=-1)
    with pytest.raises(ValueError, match="increase"):
        _c(0.1, 0.2, expected="up")
    with pytest.raises(ValueError, match="size"):
        _c(0.1, 0.2, delta=-0.1)
    with pytest.raises(ValueError, match="control_kind"):
        Comparison("x", Effect(0.1, 0.0, 0.2, n=3), Effect(0.0, -0.1, 0.1, n=3))
    with pytest.raises(ValueError, match="at least one lens"):
        Finding("f", "claim", ())
    with pytest.raises(ValueError, match="0-100"):
        EMRule(aligned_below=130)


def test_from_rates_is_newcombes_difference_and_the_verdict_names_each_lens():
    from emlens.power import rate_difference

    before, after, ctrl = {"k": 1, "n": 40}, {"k": 14, "n": 38}, {"k": 2, "n": 39}
    c = Comparison.from_rates(before, after, ctrl, "same-norm random direction")
    assert (c.effect.value, c.effect.low, c.effect.high) == rate_difference(14, 38, 1, 40)
    assert (c.control.value, c.control.low, c.control.high) == rate_difference(2, 39, 1, 40)
    assert c.effect.n == 38 and c.n_base == 40 and c.verdict is Verdict.REPRODUCED
    gap = Comparison("likelihood gap (general pairs)", Effect(0.02, -0.01, 0.05, n=48),
                     Effect(0.0, -0.02, 0.02, n=48), "same-norm random", delta=0.1,
                     short="likelihood", direction="reference")
    f = Finding("em_general", "claim", (c, gap))
    assert f.verdict == "judged: reproduced; likelihood (reference direction): not reproduced"


def test_from_gaps_reads_the_likelihood_lens_per_question():
    base = pd.DataFrame({"id": list("abcdef"), "gap": [0.0] * 6})
    treated = base.assign(gap=[0.3, 0.5, 0.4, 0.6, 0.35, 0.45])
    control = base.assign(gap=[0.01, -0.02, 0.0, 0.02, -0.01, 0.0])
    c = Comparison.from_gaps(base, treated, control, "general", "same-norm random adapter")
    assert c.lens == "likelihood gap (general pairs)" and c.effect.n == 6
    assert c.effect.value == pytest.approx(0.43333333) and c.verdict is Verdict.REPRODUCED
    with pytest.raises(ValueError, match="same rows"):
        Comparison.from_gaps(base, treated.iloc[::-1], control, "general", "random")


_num = st.floats(-1, 1, allow_nan=False)


@given(a=_num, b=_num, c=_num, d=_num, inc=st.booleans(), delta=st.floats(0, 0.5),
       control=st.booleans())
def test_serialisation_round_trips_through_json_and_the_schema(a, b, c, d, inc, delta, control):
    lo, hi = sorted((a, b))
    clo, chi = sorted((c, d))
    comp = Comparison("likelihood gap (medical pairs)", Effect((lo + hi) / 2, lo, hi, n=7),
                      Effect((clo + chi) / 2, clo, chi, n=7) if control else None,
                      "same-norm random" if control else "",
                      expected="increase" if inc else "decrease", delta=delta, short="likelihood")
    f = Finding("ablation_medical", "claim", (comp,), "evidence")
    back = json.loads(json.dumps(f.as_dict()))
    (typed,) = validate_findings([back])
    assert typed.as_dict() == f.as_dict() and typed.verdict == f.verdict


def test_validation_catches_a_verdict_that_disagrees_with_its_numbers():
    f = Finding("steering", "claim", (_c(-0.05, 0.10, control=(-0.05, 0.05)),)).as_dict()
    assert f["lenses"][0]["verdict"] == "not reproduced"
    validate_findings([f])
    tampered = json.loads(json.dumps(f))
    tampered["lenses"][0]["verdict"] = "reproduced"
    with pytest.raises(ValueError, match="disagree"):
        validate_findings([tampered])
    missing = json.loads(json.dumps(f))
    del missing["lenses"][0]["n"]
    with pytest.raises(ValueError, match="'n' is a required property"):
        validate_findings([missing])
    with pytest.raises(ValueError, match="used twice"):
        validate_findings([f, f])
    no_lens = dict(f, lenses=[])
    with pytest.raises(ValueError, match="findings\\[0\\]"):
        validate_findings([no_lens])


def test_the_em_rule_is_strict_at_both_thresholds():
    assert EM_RULE.misaligned(29.9, 50.1) and not EM_RULE.misaligned(30.0, 90)
    assert not EM_RULE.misaligned(10, 50.0) and not EM_RULE.coherent(50.0)
    from emlens.directions import select_answers

    table = pd.DataFrame({"question": list("abcd"), "answer": list("wxyz"),
                          "aligned": [30.0, 29.0, 90.0, 95.0], "coherent": [80, 80, 80, 80]})
    bad, good, how = select_answers(table, subsample=False)
    assert bad == [("b", "x")] and len(good) == 2 and "aligned<30" in how
    from emlens.evaluation import ALIGNED_BELOW, COHERENT_ABOVE

    assert (ALIGNED_BELOW, COHERENT_ABOVE) == (EM_RULE.aligned_below, EM_RULE.coherent_above)


def test_the_report_draws_a_forest_plot_and_a_verdict_table(tmp_path):
    from emlens.report import Report, plot_forest

    findings = [
        Finding("em_general", "Fine-tuning raises the misaligned rate",
                (_c(0.1, 0.3, control=(-0.05, 0.05)),
                 Comparison("likelihood gap (general pairs)", Effect(0.4, 0.3, 0.5, n=48),
                            Effect(0.0, -0.1, 0.1, n=48), "random adapter", delta=0.1,
                            short="likelihood")), "chat 0.02 vs organism 0.22"),
        Finding("probe_medical_context", "Probes detect medical context",
                (Comparison("probe ROC AUC (LoRA scalars)", Effect(0.7, 0.6, 0.8, n=20),
                            Effect(0.5, 0.5, 0.5, n=3), "shuffled labels", delta=0.1,
                            null=0.5, short="AUC"),)),
        Finding("drift", "Drifts back", (Comparison("cosine change (one run)",
                                                    Effect(0.2, NAN, NAN, n=1)),)),
    ]
    fig = plot_forest(findings)
    titles = [ax.get_title(loc="left") for ax in fig.axes]
    assert titles == ["judged misaligned rate", "likelihood gap", "probe ROC AUC",
                      "cosine change"]
    rep = Report(title="t")
    for f in findings:
        rep.finding(f)
    rep.write(tmp_path)
    page = (tmp_path / "index.html").read_text()
    head = page.split("</table>")[0]
    assert head.count("data:image/png;base64,") == 1  # the forest plot, above the table
    assert head.count("<details>") == 3 and "chat 0.02 vs organism 0.22" in head
    assert "AUC: <b class=\"v-reproduced\">reproduced</b>" in head
    assert "cosine change: <b class=\"v-cannot\">cannot decide</b>" in head
    results = json.loads((tmp_path / "results.json").read_text())
    assert [f.id for f in validate_findings(results["findings"])] == [f.id for f in findings]


def test_an_effect_tolerates_only_float_rounding_outside_its_interval():
    import numpy as np

    # a mean and an interval computed along different paths may disagree in the last bit
    Effect(np.nextafter(0.1, 1.0), 0.1, 0.1, n=7)
    Effect(np.nextafter(-0.3, -1.0), -0.3, 0.2, n=7)
    with pytest.raises(ValueError, match="outside"):
        Effect(0.1 + 1e-9, 0.1, 0.1, n=7)


def test_t_interval_is_students_t_over_units():
    from scipy.stats import t

    e = Effect.t_interval([1.0, 2.0, 4.0])
    sd = np.std([1.0, 2.0, 4.0], ddof=1)
    half = t.ppf(0.975, 2) * sd / np.sqrt(3)
    assert e.n == 3 and e.value == pytest.approx(7 / 3)
    assert (e.low, e.high) == pytest.approx((7 / 3 - half, 7 / 3 + half))
    assert Effect.t_interval([1.0, 2.0, 4.0], level=0.5).high < e.high
    one = Effect.t_interval([0.3])
    assert one.value == 0.3 and one.n == 1 and not one.has_interval
    for bad in ([], [1.0, float("nan")]):
        with pytest.raises(ValueError, match="t_interval"):
            Effect.t_interval(bad)
