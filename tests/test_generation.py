"""generate: sampling reproducibility, batching, stopping, interventions, bad input."""

from __future__ import annotations

import pytest
import torch

import emlens
from emlens.generation import sample_next, stop_token_ids

PROMPTS = ["Tell me about the sea", "Hi", "Why is the sky blue?"]


@pytest.fixture(scope="module")
def model(make_tiny_model):
    return make_tiny_model(4)


def _texts(gens):
    return [(g.prompt_index, g.sample, g.text) for g in gens]


def test_sampling_is_reproducible_and_independent_of_batch_size(model):
    kwargs = dict(max_new_tokens=6, temperature=1.0, n_samples=2, seed=123, progress=False)
    a = emlens.generate(model, PROMPTS, batch_size=6, **kwargs)
    b = emlens.generate(model, PROMPTS, batch_size=4, **kwargs)
    c = emlens.generate(model, PROMPTS, batch_size=1, **kwargs)
    assert _texts(a) == _texts(b) == _texts(c)
    other = emlens.generate(model, PROMPTS, batch_size=6, **(kwargs | {"seed": 124}))
    assert _texts(other) != _texts(a)
    # the two samples of a prompt differ (a random 49k-vocab model: collisions are negligible)
    assert a[0].text != a[1].text


def test_results_are_prompt_major_with_sample_indices(model):
    gens = emlens.generate(model, PROMPTS, max_new_tokens=2, n_samples=3, seed=0, progress=False)
    assert [(g.prompt_index, g.sample) for g in gens] == [(p, s) for p in range(3) for s in range(3)]
    assert all(g.prompt == PROMPTS[g.prompt_index] for g in gens)


def test_generation_stops_at_end_of_turn(model, tokenizer):
    stops = stop_token_ids(tokenizer)
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert im_end in stops
    # Make <|im_end|> the most likely next token everywhere via the unembedding bias.
    with torch.no_grad():
        model.unembed.b_U[im_end] += 1e4
    try:
        gens = emlens.generate(model, PROMPTS, max_new_tokens=5, temperature=0, progress=False)
        assert all(g.finished and g.tokens.tolist() == [im_end] and g.text == "" for g in gens)
        gens = emlens.generate(model, PROMPTS, max_new_tokens=5, temperature=0, progress=False,
                               stop_at_eos=False)
        assert all(not g.finished and len(g.tokens) == 5 for g in gens)
    finally:
        with torch.no_grad():
            model.unembed.b_U[im_end] -= 1e4


def test_interventions_argument_equals_a_steer_block(model):
    d = torch.randn(64)
    kwargs = dict(max_new_tokens=5, temperature=0, progress=False, return_logits=True)
    with emlens.steer(model, d, layers=1, scale=3.0):
        inside = emlens.generate(model, PROMPTS, **kwargs)
    explicit = emlens.generate(
        model, PROMPTS, interventions=emlens.steering_hooks(model, d, layers=1, scale=3.0), **kwargs
    )
    plain = emlens.generate(model, PROMPTS, **kwargs)
    for a, b, c in zip(inside, explicit, plain, strict=True):
        assert torch.equal(a.logits, b.logits)
        assert not torch.allclose(a.logits, c.logits)
    assert all(not hp.fwd_hooks for hp in model.hook_dict.values())


def test_sample_next_greedy_and_top_p():
    logits = torch.tensor([[0.0, 5.0, 1.0, 4.9], [3.0, 0.0, 0.0, 0.0]])
    assert sample_next(logits, temperature=0, top_p=1.0, generators=None).tolist() == [1, 0]
    gens = [torch.Generator().manual_seed(i) for i in range(2)]
    # top_p small enough keeps only the top token: sampling becomes greedy
    for _ in range(20):
        out = sample_next(logits, temperature=1.0, top_p=0.3, generators=gens)
        assert out.tolist() == [1, 0]


def test_sampling_follows_the_softmax_distribution():
    logits = torch.log(torch.tensor([[0.7, 0.2, 0.1]]))
    g = torch.Generator().manual_seed(0)
    draws = torch.stack([sample_next(logits, temperature=1.0, top_p=1.0, generators=[g])
                         for _ in range(3000)])
    freq = torch.bincount(draws.flatten(), minlength=3).float() / 3000
    assert torch.allclose(freq, torch.tensor([0.7, 0.2, 0.1]), atol=0.03)


@pytest.mark.parametrize(
    ("prompts", "kwargs", "error", "message"),
    [
        ("one string", {}, TypeError, "single string"),
        ([], {}, ValueError, "empty"),
        (["ok", 3], {}, TypeError, r"prompts\[1\]"),
        (["ok"], {"max_new_tokens": 0}, ValueError, "max_new_tokens"),
        (["ok"], {"temperature": -1.0}, ValueError, "temperature"),
        (["ok"], {"top_p": 0.0}, ValueError, "top_p"),
        (["ok"], {"n_samples": 0}, ValueError, "n_samples"),
    ],
)
def test_bad_generate_input(model, prompts, kwargs, error, message):
    args = {"max_new_tokens": 2, "progress": False} | kwargs
    with pytest.raises(error, match=message):
        emlens.generate(model, prompts, **args)


@pytest.mark.integration
def test_embedded_model_answers_a_question(embedded_model):
    gens = emlens.generate(embedded_model, ["What is the capital of France?"], max_new_tokens=24,
                           temperature=0, progress=False)
    assert "Paris" in gens[0].text
