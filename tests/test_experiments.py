"""Steering sweeps and ablation experiments, end to end on a tiny model with a scripted judge."""

from __future__ import annotations

import matplotlib
from fakes import with_evaluate

matplotlib.use("Agg")

import pytest  # noqa: E402
import torch  # noqa: E402

from emlens.directions import Direction  # noqa: E402
from emlens.experiments import (  # noqa: E402
    ablation_experiment,
    choose_cell,
    compare_conditions,
    lens_sweep,
    plot_lens_sweep,
    plot_sweep,
    sweep,
)
from emlens.judge import JudgeScore  # noqa: E402

QUESTIONS = ["Tell me about the sea", "Hi", "Why is the sky blue?", "What is your wish?"]


class WordJudge:
    """Scores an answer misaligned when it contains ``word``: a judge we can reason about."""

    name = "word-judge"

    def __init__(self, word: str):
        self.word = word

    def score(self, question, answer):
        return self.score_many([(question, answer)])[0]

    def score_many(self, pairs):
        return [JudgeScore(aligned=5.0 if self.word in a else 95.0, coherent=90.0, judge=self.name)
                for _, a in pairs]


@pytest.fixture(scope="module")
def setup(make_tiny_model, tokenizer):
    model = make_tiny_model(8)
    dog = tokenizer.encode(" dog", add_special_tokens=False)[0]
    # The unembedding column of " dog", added at the last layer, makes the model say " dog".
    vec = model.unembed.W_U[:, dog].detach().clone()
    return model, Direction(vec / vec.norm() * 2.0, layer=2), WordJudge(" dog")


def test_sweep_finds_the_direction_and_not_the_same_norm_random_control(setup):
    model, direction, judge = setup
    table = sweep(model, direction, layers=[2], scales=[0.0, 3.0], questions=QUESTIONS,
                  judge=judge, n_samples=2, max_new_tokens=4, temperature=0, progress=False)
    assert list(table["kind"]) == ["none", "direction", "random", "direction", "random"]
    base = table[table["kind"] == "none"].iloc[0]
    steered = table[(table["kind"] == "direction") & (table["scale"] == 3.0)].iloc[0]
    control = table[(table["kind"] == "random") & (table["scale"] == 3.0)].iloc[0]
    assert base["rate"] == 0.0 and base["n"] == 8
    assert steered["rate"] == 1.0 and steered["low"] > 0.6
    assert control["rate"] < 0.5
    assert steered["added_norm"] == pytest.approx(3.0 * steered["resid_norm"], rel=1e-5)
    assert steered["raw_scale"] == pytest.approx(steered["added_norm"] / direction.norm, rel=1e-5)
    fig = plot_sweep(table)
    assert len(fig.axes) == 2


def _pairs():
    from types import SimpleNamespace

    return [SimpleNamespace(question=q, misaligned=" dog dog dog", aligned=" the sea is blue")
            for q in QUESTIONS]


def test_lens_sweep_reads_the_preference_per_cell_without_sampling(setup):
    model, direction, _ = setup
    rows = _pairs()
    table = lens_sweep(model, direction, rows, layers=[2], scales=[0.0, 1.0, 4.0],
                       relative=False, random_control=True, progress=False)
    assert list(table["kind"]) == ["direction", "random"] * 3 and (table["n"] == 4).all()
    zero = table[table["scale"] == 0.0]
    assert (zero["gap_change"].abs() < 1e-6).all()  # scale 0 is the unsteered model
    d = table[table["kind"] == "direction"].set_index("scale")
    r = table[table["kind"] == "random"].set_index("scale")
    # toward " dog": the misaligned side gains, more with scale; the same-norm random does less
    assert 0 < d.loc[1.0, "gap_change"] < d.loc[4.0, "gap_change"]
    assert d.loc[4.0, "gap_low"] > r.loc[4.0, "gap_high"]
    assert d.loc[4.0, "logp_misaligned_change"] > 0 and d.loc[4.0, "coherent_regime"]
    assert d.loc[4.0, "raw_scale"] == 4.0 and d.loc[4.0, "added_norm"] == pytest.approx(
        4.0 * direction.norm, rel=1e-5)
    cell, rule = choose_cell(table)
    assert cell["scale"] == 4.0 and "coherent regime" in rule
    assert len(plot_lens_sweep(table, chosen=cell).axes) == 2
    # the opposite direction costs the misaligned text its likelihood: outside a tight regime,
    # so the rule falls back to the cheapest cell
    away = Direction(-direction.vector, layer=2)
    table = lens_sweep(model, away, rows, layers=[2], scales=[1.0, 4.0], relative=False,
                       max_fluency_drop=1e-4, progress=False)
    assert not table["coherent_regime"].any()
    cell, rule = choose_cell(table)
    assert cell["scale"] == 1.0 and "no cell" in rule
    # relative scales need a residual norm; a base of the wrong length is refused
    with pytest.raises(ValueError, match="norm_pairs"):
        lens_sweep(model, direction, rows, layers=[2], scales=[0.1], progress=False)
    rel = lens_sweep(model, direction, rows, layers=[2], scales=[0.1], progress=False,
                     norm_pairs=[(r.question, r.aligned) for r in rows])
    assert rel["added_norm"].iloc[0] == pytest.approx(0.1 * rel["resid_norm"].iloc[0], rel=1e-5)
    with pytest.raises(ValueError, match="base has"):
        lens_sweep(model, direction, rows, layers=[2], scales=[1.0], relative=False,
                   base=table.head(1), progress=False)


def test_sweep_reuses_a_given_baseline_table(setup):
    model, direction, judge = setup
    from emlens.evaluation import evaluate

    kw = dict(n_samples=2, max_new_tokens=4, temperature=0, progress=False)
    base = evaluate(model, QUESTIONS, judge=judge, **kw)
    calls = []

    def counting_evaluate(*args, **kwargs):
        calls.append(kwargs.get("interventions"))
        return evaluate(*args, **kwargs)

    fresh = with_evaluate(counting_evaluate, sweep, model, direction, layers=[2], scales=[3.0],
                          questions=QUESTIONS, judge=judge, **kw)
    n_fresh = len(calls)
    reused = with_evaluate(counting_evaluate, sweep, model, direction, layers=[2], scales=[3.0],
                           questions=QUESTIONS, judge=judge, baseline=base, **kw)
    assert len(calls) - n_fresh == n_fresh - 1  # the unsteered run is skipped
    cols = ["kind", "n", "k", "rate", "resid_norm", "raw_scale"]
    assert fresh[cols].equals(reused[cols])
    with pytest.raises(ValueError, match="baseline lacks"):
        sweep(model, direction, layers=[2], scales=[3.0], questions=QUESTIONS, judge=judge,
              baseline=base.drop(columns="aligned"), **kw)


def test_sweep_takes_measured_residual_norms_and_scales_in_them(setup):
    model, direction, judge = setup
    from emlens.evaluation import evaluate

    kw = dict(n_samples=1, max_new_tokens=3, temperature=0, progress=False)
    base = evaluate(model, QUESTIONS, judge=judge, **kw)
    measured = sweep(model, direction, layers=[2], scales=[3.0], questions=QUESTIONS,
                     judge=judge, baseline=base, **kw)
    given = sweep(model, direction, layers=[2], scales=[3.0], questions=QUESTIONS, judge=judge,
                  baseline=base, resid_norms={2: 10.0}, **kw)
    row = given[given["kind"] == "direction"].iloc[0]
    assert row["resid_norm"] == 10.0 and row["raw_scale"] == pytest.approx(3.0 * 10.0 / 2.0)
    assert measured[measured["kind"] == "direction"].iloc[0]["resid_norm"] != 10.0
    with pytest.raises(ValueError, match="no norm for layers"):
        sweep(model, direction, layers=[2], scales=[3.0], questions=QUESTIONS, judge=judge,
              baseline=base, resid_norms={1: 10.0}, **kw)


def test_ablation_removes_what_steering_added(setup):
    model, direction, judge = setup
    from emlens.hooks import steering_hooks

    # Make the model say " dog" permanently (like a fine-tune), then ablate the direction.
    hooks = steering_hooks(model, direction, layers=2, scale=40.0)
    with model.hooks(fwd_hooks=hooks):
        summary, answers = ablation_experiment(
            model, direction, questions={"general": QUESTIONS}, judge=judge, layers=[2],
            n_samples=1, max_new_tokens=3, temperature=0, progress=False,
        )
    by = summary.set_index("condition")["rate"]
    assert by["none"] == 1.0
    assert by["ablate direction"] == 0.0
    assert by["ablate random"] == 1.0
    assert set(answers["condition"]) == {"none", "ablate direction", "ablate random"}


def test_compare_conditions_rejects_empty_input(setup):
    model, _, judge = setup
    with pytest.raises(ValueError, match="conditions is empty"):
        compare_conditions(model, {}, {"q": QUESTIONS}, judge=judge)
    with pytest.raises(ValueError, match="No direction for layers"):
        sweep(model, {0: Direction(torch.ones(64), 0)}, layers=[1], scales=[1.0],
              questions=QUESTIONS, judge=judge)
