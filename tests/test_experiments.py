"""Steering sweeps and ablation experiments, end to end on a tiny model with a scripted judge."""

from __future__ import annotations

import matplotlib
from fakes import with_evaluate

matplotlib.use("Agg")

import pytest  # noqa: E402
import torch  # noqa: E402

from emlens.directions import Direction  # noqa: E402
from emlens.experiments import ablation_experiment, compare_conditions, plot_sweep, sweep  # noqa: E402
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
