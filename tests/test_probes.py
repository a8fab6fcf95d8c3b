"""emlens.probes: grouped-CV probes, baselines, JSON round trip, label recipes, bad input."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from emlens.data import answer_set, context_set, judged_set, pair_rows
from emlens.probes import Probe, fit_probe, reference_probe


def planted(n_groups=40, per_group=2, d=6, strength=2.0, seed=0):
    """Two answers per question (one of each label); feature 3 carries the label."""
    rng = np.random.default_rng(seed)
    groups = np.repeat(np.arange(n_groups), per_group)
    y = np.tile([0, 1], n_groups * per_group // 2)
    x = rng.normal(size=(len(y), d))
    x[:, 3] += strength * y
    names = [f"f{i}" for i in range(d)]
    return pd.DataFrame(x, columns=names), y, groups


def test_probe_recovers_a_planted_signal_and_its_sign():
    x, y, g = planted()
    probe = fit_probe(x, y, groups=g, n_shuffles=2, n_boot=100)
    assert probe.metrics["roc_auc"]["mean"] > 0.85
    low, high = probe.metrics["roc_auc"]["low"], probe.metrics["roc_auc"]["high"]
    assert low < probe.metrics["roc_auc"]["mean"] < high and low > 0.75
    assert probe.metrics["balanced_accuracy"]["mean"] > 0.75
    coef = probe.coefficients()
    assert coef.loc[0, "feature"] == "f3" and coef.loc[0, "sign"] == "+"
    # The shuffled-label baseline sits at chance.
    assert abs(probe.baseline["roc_auc"]["mean"] - 0.5) < 0.12


def test_probe_sits_at_chance_on_shuffled_labels():
    x, y, g = planted()
    rng = np.random.default_rng(3)
    probe = fit_probe(x, rng.permutation(y), groups=g, n_shuffles=0)
    assert abs(probe.metrics["roc_auc"]["mean"] - 0.5) < 0.12
    assert probe.baseline == {}


def test_grouped_splits_stop_duplicate_rows_from_leaking():
    # Each question's rows are identical and share a random label: a probe can only "succeed" by
    # seeing the same question in train and test.
    rng = np.random.default_rng(0)
    n_groups, dup = 40, 4
    base = rng.normal(size=(n_groups, 30))
    labels = rng.permutation(np.repeat([0, 1], n_groups // 2))
    x, y, g = np.repeat(base, dup, 0), np.repeat(labels, dup), np.repeat(np.arange(n_groups), dup)
    leaky = fit_probe(x, y, n_shuffles=0, n_boot=0, C=100.0)  # each row its own group
    grouped = fit_probe(x, y, groups=g, n_shuffles=0, n_boot=0, C=100.0)
    assert leaky.metrics["roc_auc"]["mean"] > 0.95
    assert grouped.metrics["roc_auc"]["mean"] < 0.75


def test_no_group_is_in_train_and_test_and_C_is_chosen_per_fold():
    x, y, g = planted(n_groups=20)
    probe = fit_probe(x, y, groups=g, n_splits=4, n_shuffles=0, n_boot=0)
    assert len(probe.folds) == 4
    assert sum(f["n_test"] for f in probe.folds) == len(y)  # each row tested exactly once
    assert all(f["C"] in (0.001, 0.01, 0.1, 1.0, 10.0) for f in probe.folds)


def test_reference_preset_reports_mean_and_std_of_each_metric():
    # C=0.01 (unscaled sum of losses) was set for token-level data: it needs many rows.
    x, y, g = planted(n_groups=500, strength=2.0)
    probe = reference_probe(x, y, groups=g, n_shuffles=0, n_boot=0)
    assert probe.config["penalty"] == "l1" and probe.config["balance"] == "subsample"
    assert probe.C == 0.01 and len(probe.folds) == 10 * 5
    for m in ("accuracy", "precision", "recall", "f1", "roc_auc"):
        assert set(probe.metrics[m]) >= {"mean", "std"}
    assert probe.metrics["roc_auc"]["mean"] > 0.9
    # L1 at C=0.01 keeps the planted feature and drops most of the noise.
    coef = probe.coefficients()
    assert coef.loc[0, "feature"] == "f3" and (coef["coef"] == 0).sum() >= 3


def test_subsampling_balances_an_imbalanced_training_set():
    rng = np.random.default_rng(1)
    y = (rng.random(300) < 0.15).astype(int)
    x = rng.normal(size=(300, 3))
    x[:, 0] += 2.5 * y
    probe = fit_probe(x, y, balance="subsample", C=1.0, n_shuffles=0, n_boot=0)
    # a majority-class predictor would have recall 0 on the rare class
    assert probe.metrics["recall"]["mean"] > 0.6


def test_few_negative_groups_still_fit_with_C_chosen_or_fallen_back():
    # The demo's judged-answer probe: 16 questions x 3 answers, only a few aligned answers in a
    # few questions. Unstratified inner folds used to leave one class in a training split and
    # crash inside scikit-learn.
    from emlens.probes import FALLBACK_C

    groups = np.repeat(np.arange(16), 3)
    for negatives in ([0, 3, 6], [0, 1, 2, 3], [0, 3], [0, 1, 3, 4], [0, 1, 9, 21, 30, 45]):
        rng = np.random.default_rng(0)
        y = np.ones(48, dtype=int)
        y[negatives] = 0
        x = rng.normal(size=(48, 9))
        x[:, 0] -= 2.0 * (1 - y)
        probe = fit_probe(x, y, groups=groups, n_splits=2, n_shuffles=1, n_boot=20)
        assert 0.0 <= probe.metrics["roc_auc"]["mean"] <= 1.0
        assert all(f["C"] in (*probe.config["Cs"], FALLBACK_C) for f in probe.folds)
    # one negative group only: no inner split can hold both classes -> the fallback C
    from emlens.probes import _fit_one

    y1 = np.ones(48, dtype=int)
    y1[[0, 1, 2]] = 0  # group 0
    _, c = _fit_one(x, y1, groups, C=None, Cs=(0.01, 10.0), penalty="l2", balance="weight",
                    seed=0, rng=rng)
    assert c == FALLBACK_C


def test_probe_round_trips_through_json(tmp_path):
    x, y, g = planted()
    probe = fit_probe(x, y, groups=g, n_shuffles=0, n_boot=20)
    path = probe.save(tmp_path / "probe.json")
    data = json.loads(path.read_text())
    assert data["format"] == "emlens.probe" and data["feature_names"][3] == "f3"
    loaded = Probe.load(path)
    np.testing.assert_allclose(loaded.predict_proba(x), probe.predict_proba(x))
    assert loaded.metrics == probe.metrics and loaded.config == probe.config
    bad = tmp_path / "other.json"
    bad.write_text(json.dumps({"coef": [1.0]}))
    with pytest.raises(ValueError, match="not an emlens probe"):
        Probe.load(bad)


def test_probe_fit_is_one_standardised_l2_fit_without_cv():
    from sklearn.linear_model import LogisticRegression

    x, y, _ = planted()
    x["const"] = 1.0
    probe = Probe.fit(x, y, C=0.5)
    xn = x.to_numpy()
    mean, scale = xn.mean(0), xn.std(0) + 1e-6
    lr = LogisticRegression(C=0.5, class_weight="balanced", max_iter=5000).fit((xn - mean) / scale, y)
    assert probe.mean == mean.tolist() and probe.scale == scale.tolist()
    assert probe.scale[-1] == pytest.approx(1e-6) and probe.feature_names[-1] == "const"
    assert probe.coef == lr.coef_[0].tolist() and probe.intercept == lr.intercept_[0]
    np.testing.assert_allclose(probe.predict_proba(x), lr.predict_proba((xn - mean) / scale)[:, 1])
    assert probe.metrics == {} and probe.config["n_rows"] == len(y) and probe.C == 0.5
    with pytest.raises(ValueError, match="both classes"):
        Probe.fit(x, np.zeros(len(y)))
    with pytest.raises(ValueError, match="both classes"):
        Probe.fit(x.iloc[:0], [])


def test_final_model_matches_the_planted_direction_on_new_rows():
    x, y, g = planted(seed=0)
    probe = fit_probe(x, y, groups=g, n_shuffles=0, n_boot=0)
    x2, y2, _ = planted(seed=9)
    p = probe.predict_proba(x2)
    assert p[y2 == 1].mean() > p[y2 == 0].mean() + 0.2
    with pytest.raises(ValueError, match="6"):
        probe.predict_proba(x2.iloc[:, :4])


@pytest.mark.parametrize(
    "labels, groups, match",
    [
        (np.ones(10), None, "all one class"),
        (np.tile([0, 1], 4), None, "10 rows but labels have 8"),
        (np.tile([0, 1], 5), np.arange(7), "groups have 7"),
        (np.tile([0, 2], 5), None, "binary"),
    ],
)
def test_bad_labels_are_refused_with_what_was_given(labels, groups, match):
    x = np.random.default_rng(0).normal(size=(10, 2))
    with pytest.raises(ValueError, match=match):
        fit_probe(x, labels, groups=groups)


def test_too_many_splits_for_the_groups_is_refused():
    x = np.random.default_rng(0).normal(size=(8, 2))
    with pytest.raises(ValueError, match="number of groups"):
        fit_probe(x, np.tile([0, 1], 4), groups=np.repeat([0, 1, 2, 3], 2), n_splits=5)


def test_label_recipes_pair_answers_with_their_question_group():
    ctx = context_set(limit=5)
    assert len(ctx) == 20 and sum(ctx.labels) == 10
    assert ctx.groups[0] == ctx.groups[1] and ctx.answers[0] != ctx.answers[1]
    med = answer_set("medical", split="heldout")
    assert set(med.labels) == {0, 1} and len(med) == 2 * len(pair_rows("medical", split="heldout"))
    frame = med.frame()
    assert (frame.groupby("group")["label"].sum() == 1).all()  # one bad answer per question
    # round-robin: a small limit spans several topics
    assert len({r.topic for r in pair_rows("nonmedical", limit=12)}) == 12
    with pytest.raises(ValueError, match="dataset="):
        answer_set("sports")


def test_judged_set_drops_unscored_answers():
    table = pd.DataFrame({"question": ["q1", "q1", "q2"], "answer": ["a", "b", "c"],
                          "misaligned": [True, None, False], "question_id": ["x", "x", "y"]})
    s = judged_set(table)
    assert s.labels == [1, 0] and s.groups == ["x", "y"]
    with pytest.raises(ValueError, match="lacks columns"):
        judged_set(table.drop(columns=["misaligned"]))
