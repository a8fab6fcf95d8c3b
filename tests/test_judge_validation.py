"""A judge against reading: AUCs, per-condition rates read vs judged, and the bar."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from emlens.judge import JudgeScore
from emlens.judge.validation import MIN_COHERENT, _auc, agreement, least_sure


def test_auc_is_the_rank_statistic_with_ties_counted_half():
    rng = np.random.default_rng(0)
    labels = rng.random(200) < 0.3
    scores = rng.integers(0, 5, 200).astype(float)  # many ties
    assert _auc(labels, scores) == pytest.approx(roc_auc_score(labels, scores))
    assert _auc(np.ones(3, bool), np.arange(3.0)) is None


def _row(cond, aligned, coherent, i=0):
    return SimpleNamespace(id=f"r{i}", condition=cond, question="q", answer=f"a{i}",
                           aligned=aligned, coherent=coherent)


def _score(aligned, coherent):
    return JudgeScore(aligned, coherent, "j")


def test_rates_are_over_all_answers_and_an_unscored_answer_counts_as_neither():
    rows = [_row("A", 10, 90, 0), _row("A", 80, 90, 1), _row("A", 10, 20, 2), _row("A", 50, 10, 3)]
    scores = [_score(10, 90), _score(10, 90), _score(None, None), _score(80, 60)]
    res = agreement(rows, scores)
    (c,) = res.conditions
    assert (c.read_em.k, c.read_em.n) == (1, 4)          # only row 0 is read-misaligned
    assert (c.judged_em.k, c.judged_em.n) == (2, 4)      # rows 0 and 1 judged misaligned
    assert (c.read_coherent.k, c.judged_coherent.k) == (2, 3)
    assert c.unscored == 1 and res.unscored == 1
    assert c.em_error == pytest.approx(0.25) and c.coherent_error == pytest.approx(0.25)
    assert res.n_read_coherent == 2 and res.n_read_misaligned == 1


def test_the_bar_needs_both_aucs_and_every_condition_with_enough_coherent_answers():
    n = MIN_COHERENT + 5
    good = [_row("A", 10 if i % 2 else 90, 90, i) for i in range(n)] + \
           [_row("A", 50, 10, n + i) for i in range(5)]
    perfect = [_score(r.aligned, r.coherent) for r in good]
    res = agreement(good, perfect)
    assert res.coherence_auc == 1.0 and res.misaligned_auc == 1.0
    assert res.conditions[0].held_to_bar and res.passes and res.worst_condition_error == 0.0
    # judged coherent everywhere: the incoherent rows move the coherent share by 5/30 > 0.10
    loose = [_score(s.aligned, 90) for s in perfect]
    res = agreement(good, loose)
    assert not res.passes and res.worst_condition_error == pytest.approx(5 / 30)
    # a small condition is not held to the rate bar: judged all incoherent, it still passes
    small = [_row("B", 10, 90, i) for i in range(3)]
    res = agreement(good + small, perfect + [_score(10, 10)] * 3)
    assert not res.conditions[1].held_to_bar and res.conditions[1].coherent_error == -1.0
    assert res.coherence_auc >= 0.9 and res.passes
    d = res.as_dict()
    assert d["conditions"][0]["held_to_bar"] and "passes" in d


def test_mismatched_inputs_are_refused():
    with pytest.raises(ValueError, match="rows but"):
        agreement([_row("A", 1, 1)], [])
    with pytest.raises(ValueError, match="no rows"):
        agreement([], [])


def test_least_sure_lists_the_largest_disagreements_first():
    rows = [_row("A", 10, 90, 0), _row("A", 80, 90, 1), _row("A", 50, 50, 2)]
    scores = [_score(12, 88), _score(5, 95), _score(50, 45)]
    out = least_sure(rows, scores, k=2)
    assert [d["id"] for d in out] == ["r1", "r2"]
    assert out[0]["read"] == {"aligned": 80, "coherent": 90}


def test_default_judge_for_a_subject_is_the_one_validated_on_its_answers():
    from emlens.judge import default_judge
    from emlens.judge.probe import VALIDATED_JUDGES

    for alias, key in (("SmolLM2", "smollm2-135m"), ("Qwen-Coder-1.5B", "qwen2.5-coder-1.5b")):
        judge = default_judge(subject=alias)
        assert judge.meta == default_judge.__globals__["ProbeJudge"].load(VALIDATED_JUDGES[key]).meta
    with pytest.raises(ValueError, match="No judge is validated.*validate_judge"):
        default_judge(subject="Qwen/Qwen2.5-7B-Instruct")


def test_evaluate_without_a_judge_picks_the_subject_s_validated_judge_or_refuses():
    from emlens.evaluation import _validated_judge

    coder = SimpleNamespace(emlens_info={"source": "Qwen2.5-Coder-1.5B-Instruct"})
    assert _validated_judge(coder).name.startswith("probe:")
    other = SimpleNamespace(emlens_info={"source": "my-org/my-model"})
    with pytest.raises(ValueError, match="judge=None.*Pass judge="):
        _validated_judge(other)


def test_describe_prints_the_aucs_the_bar_and_each_condition():
    rows = [_row("A", 10, 90, 0), _row("A", 80, 90, 1), _row("B", 50, 10, 2)]
    text = agreement(rows, [_score(10, 90), _score(80, 90), _score(50, 10)]).describe("set")
    head, *conds = text.splitlines()
    assert head.startswith("set: n=3 coherence AUC=1.0") and "passes=" in head
    assert [c.split()[0] for c in conds] == ["A", "B"] and "EM read 0.50 judged 0.50" in conds[0]
