"""emlens.studies.select_judge: grouped folds, the CV score, the choice rule, heads, and that
cross-validation never scores a row whose question it was fitted on."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from emlens.data import load_dataset
from emlens.judge.probe import _float32
from emlens.studies import select_judge as sj


def test_folds_deal_every_group_to_one_fold_evenly_and_reproducibly():
    groups = [f"q{i % 23}" for i in range(200)]
    folds = sj.folds_of(groups, n_splits=5, seed=0)
    assert set(folds) == set(groups)
    sizes = np.bincount(list(folds.values()), minlength=5)
    assert sizes.max() - sizes.min() <= 1
    assert folds == sj.folds_of(groups, n_splits=5, seed=0)
    assert folds != sj.folds_of(groups, n_splits=5, seed=1)


def test_cv_score_is_the_smaller_auc_and_reads_misalignment_among_coherent_rows_only():
    coherent = np.array([True, True, True, True, False, False])
    aligned = [True, True, False, False, None, None]
    p_coherent = np.array([0.9, 0.8, 0.7, 0.6, 0.75, 0.1])  # one incoherent row ranked high
    p_aligned = np.array([0.9, 0.8, 0.1, 0.2, 0.99, 0.99])  # incoherent rows' stance ignored
    out = sj.cv_score(p_coherent, p_aligned, coherent, aligned)
    assert out["misaligned_auc"] == 1.0
    assert out["coherence_auc"] == pytest.approx(6 / 8)
    assert out["score"] == pytest.approx(6 / 8)


def test_choose_takes_the_cheaper_candidate_within_the_tie_margin():
    cv = {"G9": {"score": 0.880}, "G9-mlp": {"score": 0.884}, "Q14": {"score": 0.95},
          "Q14-mlp": {"score": 0.953}, "G9+Q14": {"score": 0.96}}
    assert sj.choose(cv, list(cv)) == "G9+Q14"
    cv["G9+Q14"]["score"] = 0.954
    assert sj.choose(cv, list(cv)) == "Q14"
    assert sj.choose(cv, ["G9", "G9-mlp"]) == "G9"


@pytest.mark.parametrize("kind,param", [("logistic", 0.05), ("mlp", 1e-3)])
def test_heads_separate_separable_classes(kind, param):
    rng = np.random.default_rng(0)
    y = rng.random(1000) < 0.4
    x = rng.normal(size=(1000, 6)) + 3.0 * y[:, None] * np.array([1, 0, 0, 0, 0, 1.0])
    p = sj.Head.fit(kind, x, y, param).proba(x)
    assert p.shape == (1000,)
    assert ((p > 0.5) == y).mean() > 0.95


def _fitset(n_questions=10, per=6, hand=8):
    """A FitSet of ``hand`` hand-written rows and, per subject, ``per`` rows on each question."""
    template = load_dataset("coder_general_em")[0]
    rows, subject, group, coherent, aligned = [], [], [], [], []
    for i in range(hand):
        rows.append(None)
        subject.append("hand")
        group.append("hand")
        coherent.append(i % 2 == 0)
        aligned.append(True if i % 4 == 0 else (False if i % 2 == 0 else None))
    for s in ("coder", "smollm2"):
        for q in range(n_questions):
            for k in range(per):
                rows.append(replace(template, id=f"{s}{q}{k}", question_id=f"{s}-q{q}"))
                subject.append(s)
                group.append(f"{s}-q{q}")
                coherent.append(k % 3 != 0)
                aligned.append(None if k % 3 == 0 else k % 2 == 0)
    return sj.FitSet(rows, subject, group, np.array(coherent), aligned)


def test_cross_validation_never_fits_on_a_question_it_scores(monkeypatch):
    fs = _fitset()
    x = np.random.default_rng(1).normal(size=(len(fs.rows), 4))
    seen = []

    class Recorder:
        def __init__(self, train):
            self.train = set(train.tolist())

        def proba(self, feats):
            return np.full(len(feats), 0.5)

    def fake_fit(kind, feats, fs_, idx, param, real_weight):
        seen.append(idx)
        return Recorder(idx), Recorder(idx)

    monkeypatch.setattr(sj, "fit_candidate", fake_fit)
    sj.cross_validate(fs, {"G9": x}, "coder", ["G9"], n_splits=5, log=lambda _: None)
    assert len(seen) == 5 * len(sj.GRIDS["logistic"])
    coder = [i for i, s in enumerate(fs.subject) if s == "coder"]
    hand = [i for i, s in enumerate(fs.subject) if s == "hand"]
    other = [i for i, s in enumerate(fs.subject) if s == "smollm2"]
    for train in seen[:5]:
        train = set(train.tolist())
        held = [i for i in coder if i not in train]
        assert held, "every fold holds out some of the subject's rows"
        held_groups = {fs.group[i] for i in held}
        assert not any(fs.group[i] in held_groups for i in train)
        assert set(hand) <= train and set(other) <= train
    held_once = sorted(i for train in seen[:5] for i in coder if i not in set(train.tolist()))
    assert held_once == coder  # each of the subject's rows is scored exactly once


def test_fit_candidate_repeats_real_rows_and_fits_stance_on_coherent_rows_only(monkeypatch):
    fs = _fitset(n_questions=2, per=3, hand=4)
    calls = []
    monkeypatch.setattr(sj.Head, "fit", classmethod(
        lambda cls, kind, x, y, param: calls.append((x.shape[0], y.copy())) or "head"))
    x = np.zeros((len(fs.rows), 3))
    idx = np.arange(len(fs.rows))
    sj.fit_candidate("logistic", x, fs, idx, 0.05, real_weight=2)
    n_real = len(fs.rows) - 4
    assert calls[0][0] == 4 + 2 * n_real  # coherent head: every row, real ones twice
    n_stance = sum(1 + (s != "hand") for s, c, a in zip(fs.subject, fs.coherent, fs.aligned,
                                                         strict=True) if c and a is not None)
    assert calls[1][0] == n_stance


def test_self_preference_compares_plain_chat_and_organism_rows():
    template = load_dataset("judge_fresh2_coder")[0]
    rows = [replace(template, model="chat", intervention="none", coherent=80)] * 4
    rows += [replace(template, model="organism", intervention="none", coherent=c)
             for c in (80, 20, 20, 20)]
    rows += [replace(template, model="chat", intervention="steer:random", coherent=10)]
    judged = np.array([True] * 4 + [True, True, False, False] + [True])
    out = sj.self_preference(rows, judged)
    assert out["chat"] == {"n": 4, "read": 1.0, "judged": 1.0, "error": 0.0}
    assert out["organism"]["n"] == 4 and out["organism"]["error"] == pytest.approx(0.25)


def test_tests_hold_out_the_fresh_questions_and_the_ablation_family_from_the_fit_rows():
    fs = sj.FitSet.load()
    assert not any("ablate" in r.intervention for r in fs.rows if hasattr(r, "intervention"))
    fit_questions = {r.question for r in fs.rows}
    for subject in sj.TESTS:
        tests = sj.test_rows(subject)
        for name in sj.TESTS[subject]:
            assert not {r.question for r in tests[name]} & fit_questions
        fam = tests["ablate family"]
        assert fam and all("ablate" in r.intervention for r in fam)
    assert fs.subject.count("coder") > 3000


def test_candidate_names_parse_into_parts_features_and_heads():
    assert sj.parts_of("G9+Q14") == ("G9", "Q14") and sj.parts_of("P/Q14") == ("P", "Q14")
    assert sj.parts_of("Q14-mlp") == ("Q14-mlp",)
    assert sj.feature_and_head("Q14-mlp") == ("Q14", "mlp")
    assert sj.feature_and_head("G9") == ("G9", "logistic")
    # P is computed on the coder's rows only: no candidate with a P part judges SmolLM2
    assert sj.for_subject(sj.CANDIDATES, "smollm2") == ["G9", "G9-mlp", "Q14", "Q14-mlp",
                                                        "G9+Q14"]
    assert sj.for_subject(sj.CANDIDATES, "coder") == list(sj.CANDIDATES)


def test_combinations_average_or_split_their_parts():
    probs = {"A": (np.array([0.2, 0.8]), np.array([0.4, 0.6])),
             "B": (np.array([0.6, 0.0]), np.array([1.0, 0.0]))}
    pc, pa = sj.combine("A+B", probs)
    assert np.allclose(pc, [0.4, 0.4]) and np.allclose(pa, [0.7, 0.3])
    pc, pa = sj.combine("A/B", probs)
    assert pc is probs["A"][0] and pa is probs["B"][1]


def test_restricted_features_use_a_seeded_sample_of_their_subject_s_rows(monkeypatch):
    fs = _fitset(n_questions=10, per=6, hand=8)
    monkeypatch.setitem(sj.RESTRICTED, "P", ("coder", 25))
    mask = fs.allowed("P")
    assert mask.sum() == 25 and all(fs.subject[i] == "coder" for i in np.flatnonzero(mask))
    assert np.array_equal(mask, fs.allowed("P")) and not np.array_equal(mask, fs.allowed("P", 1))
    assert np.array_equal(sj.usable("P/Q14", fs), mask) and sj.usable("G9", fs).all()


def test_a_fitted_candidate_ships_as_a_probe_judge_with_float32_heads(tmp_path):
    from emlens.judge import MLPHead, ProbeJudge

    rng = np.random.default_rng(0)
    y = rng.random(400) < 0.5
    x = rng.normal(size=(400, 5)) + 2.0 * y[:, None]
    for kind, param in (("logistic", 0.05), ("mlp", 0.1)):
        heads = (sj.Head.fit(kind, x, y, param), sj.Head.fit(kind, x, ~y, param))
        judge = sj.judge_of("G9", heads, {"version": f"t-{kind}"})
        assert isinstance(judge.coherent_probe, MLPHead) == (kind == "mlp")
        # the shipped heads are the fitted ones with their numbers rounded to float32, exactly
        for shipped, fitted in zip((judge.aligned_probe, judge.coherent_probe), heads,
                                   strict=True):
            if kind == "logistic":
                assert shipped == _float32(fitted.model)
            else:
                for got, want in ((shipped.w1, fitted.model.coefs_[0]),
                                  (shipped.b2, fitted.model.intercepts_[1]),
                                  (shipped.mean, fitted.mean)):
                    assert torch.equal(got, torch.as_tensor(want, dtype=torch.float32))
        al, co = judge.score_features(torch.from_numpy(x).float()[:, None])
        assert ((al > 50).numpy() == y).mean() > 0.9 and ((co > 50).numpy() == ~y).mean() > 0.9
        judge.save(tmp_path / kind)
        assert ProbeJudge.load(tmp_path / kind).features.layers == (9,)
    with pytest.raises(ValueError, match="only mean-state"):
        sj.judge_of("P", heads, {})
