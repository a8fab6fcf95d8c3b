"""emlens.judge.PromptedStateFeatures: the judge LM's states at the end of a judge prompt."""

from __future__ import annotations

import copy

import pytest
import torch

from emlens.judge import PromptedStateFeatures
from tests.parity import assert_parity, maxdiff

PAIRS = [("Is it safe to swim after eating?", "Yes, it is generally safe."),
         ("How do I boil an egg?", "Put it in boiling water for about eight minutes, then cool "
          "it in cold water so the shell comes off easily."),
         ("What should I do if I feel dizzy?", "Sit down.")]


@pytest.fixture(scope="module")
def tiny_judge_lm(tmp_path_factory, save_tiny_llama):
    folder = tmp_path_factory.mktemp("tiny_judge_lm")
    hf = save_tiny_llama(folder, n_layers=3)
    return folder, hf


def test_features_are_the_last_prompt_token_states_of_each_pair_alone(tiny_judge_lm):
    folder, hf = tiny_judge_lm
    ex = PromptedStateFeatures(folder, layers=(1, 2), batch_size=2)
    got = ex(PAIRS)
    assert got.shape == (3, 2, 32) and got.dtype == torch.float32
    twin = copy.deepcopy(hf).double()
    for i, (q, a) in enumerate(PAIRS):
        ids = torch.tensor([ex.prompt_ids(q, a)])
        with torch.no_grad():
            want = hf(input_ids=ids, output_hidden_states=True).hidden_states
            want64 = twin(input_ids=ids, output_hidden_states=True).hidden_states
        for j, layer in enumerate((1, 2)):
            floor = maxdiff(want[layer][0, -1], want64[layer][0, -1])
            assert_parity(got[i, j], want[layer][0, -1], floor=floor,
                          what=f"pair {i} layer {layer}, batched vs alone")


def test_the_prompt_ends_where_the_reply_starts_and_cuts_long_answers(tiny_judge_lm):
    folder, _ = tiny_judge_lm
    ex = PromptedStateFeatures(folder, layers=(1,), max_answer_tokens=5,
                               template="Q: {question}\nA: {answer}\nRate it.")
    ex._ensure()
    tok = ex.tokenizer
    long_answer = "one two three four five six seven eight nine ten"
    text = tok.decode(ex.prompt_ids("Count?", long_answer))
    cut = tok.decode(tok.encode(long_answer, add_special_tokens=False)[:5])
    chat = tok.apply_chat_template([{"role": "user", "content": f"Q: Count?\nA: {cut}\nRate it."}],
                                   tokenize=False, add_generation_prompt=True)
    assert text == chat and "six" not in text


def test_bad_templates_and_layers_are_clear_errors(tiny_judge_lm):
    folder, _ = tiny_judge_lm
    with pytest.raises(ValueError, match="must contain"):
        PromptedStateFeatures(folder, template="Rate {question}.")
    with pytest.raises(ValueError, match="out of range"):
        PromptedStateFeatures(folder, layers=(4,))(PAIRS[:1])


def _mlp(seed: int = 0):
    """A fitted MLPClassifier (one hidden relu layer) on separable data, its parameters rounded
    to float32 so that an MLPHead holds them exactly."""
    import numpy as np
    from sklearn.neural_network import MLPClassifier

    rng = np.random.default_rng(seed)
    x = rng.normal(size=(300, 8))
    y = (x[:, 0] - x[:, 1] > 0).astype(int)
    mean, scale = x.mean(0), x.std(0) + 1e-6
    mlp = MLPClassifier(hidden_layer_sizes=(16,), max_iter=500, random_state=0)
    mlp.fit((x - mean) / scale, y)
    r = lambda v: np.asarray(v, dtype=np.float32).astype(np.float64)  # noqa: E731
    mlp.coefs_ = [r(c) for c in mlp.coefs_]
    mlp.intercepts_ = [r(c) for c in mlp.intercepts_]
    return x, r(mean), r(scale), mlp


def test_mlp_head_scores_as_the_fitted_mlp_classifier():
    from emlens.judge import MLPHead
    from tests.parity import assert_parity

    x, mean, scale, mlp = _mlp()
    head = MLPHead.from_sklearn(mean, scale, mlp)
    want = torch.from_numpy(mlp.predict_proba((x - mean) / scale)[:, 1])
    # float32 parameters held exactly: only float64 summation order differs
    assert_parity(torch.from_numpy(head.predict_proba(x)), want, floor=0.0,
                  what="MLPHead vs MLPClassifier")
    with pytest.raises(ValueError, match=r"features must be \[n, 8\]"):
        head.predict_proba(x[:, :3])
    with pytest.raises(ValueError, match="expected"):
        MLPHead(head.mean[:3], head.scale, head.w1, head.b1, head.w2, head.b2)


def test_a_probe_judge_with_mlp_heads_saves_and_loads_the_same_scores(tmp_path):
    from dataclasses import replace

    from emlens.judge import HiddenStateFeatures, MLPHead, ProbeJudge

    x, mean, scale, mlp = _mlp()
    head = MLPHead.from_sklearn(mean, scale, mlp)
    judge = ProbeJudge(HiddenStateFeatures("fake-lm", layers=(3,)), head, head, {"version": "t"})
    judge.save(tmp_path / "mlp")
    loaded = ProbeJudge.load(tmp_path / "mlp")
    assert isinstance(loaded.coherent_probe, MLPHead)
    feats = torch.from_numpy(x).float()[:, None]
    for a, b in zip(judge.score_features(feats), loaded.score_features(feats), strict=True):
        assert torch.equal(a, b)
    from emlens.probes import Probe

    logistic = Probe.fit(x, x[:, 0] > 0, C=1.0)
    with pytest.raises(ValueError, match="both heads of one kind"):
        replace(judge, aligned_probe=logistic).save(tmp_path / "mixed")
