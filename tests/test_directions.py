"""Directions: streaming means, planted-direction recovery, artefacts, controls, bad input."""

from __future__ import annotations

import pandas as pd
import pytest
import torch

import emlens
from emlens.directions import (
    Direction,
    collect_means,
    cosine_matrix,
    load_directions,
    mean_diff,
    pca_direction,
    random_direction,
    residual_norms,
    save_directions,
    select_answers,
)

QUESTIONS = [f"Tell me about animal number {i}." for i in range(6)]


@pytest.fixture(scope="module")
def model(make_tiny_model):
    return make_tiny_model(5)


def test_collect_means_matches_brute_force(model):
    answers = [f"An answer of length {i} " * (i + 1) for i in range(6)]
    batches = list(emlens.chat.iter_chat_batches(model.tokenizer, QUESTIONS, answers, batch_size=4))
    means = collect_means(model, batches, [0, 2], progress=False)
    acts = {0: [], 2: []}
    for b in batches:
        _, cache = model.run_with_cache(b.tokens, attention_mask=b.attention_mask)
        for layer in acts:
            acts[layer].append(cache[f"blocks.{layer}.hook_resid_post"][b.answer_mask])
    for layer in acts:
        brute = torch.cat(acts[layer]).double().mean(0)
        assert torch.allclose(means.means[layer], brute, atol=1e-5)
    assert means.tokens == sum(int(b.answer_mask.sum()) for b in batches)
    assert means.rows == 6


def test_mean_diff_recovers_a_planted_direction(make_tiny_model, tokenizer):
    model = make_tiny_model(6)
    cat, dog = (tokenizer.encode(w, add_special_tokens=False)[0] for w in (" cat", " dog"))
    planted = torch.randn(64)
    planted /= planted.norm()
    with torch.no_grad():
        model.embed.W_E[dog] = model.embed.W_E[cat] + 5.0 * planted
    aligned = [(q, "I like the cat a lot") for q in QUESTIONS]
    misaligned = [(q, "I like the dog a lot") for q in QUESTIONS]
    assert tokenizer.encode(" dog", add_special_tokens=False) == [dog]
    # At the embedding (resid_pre of block 0) the difference is exactly the planted vector times
    # the fraction of answer tokens that differ.
    d = mean_diff(model, misaligned, aligned, layers=[0], hook="resid_pre", progress=False)[0]
    n_answer = len(tokenizer.encode("I like the dog a lot<|im_end|>", add_special_tokens=False))
    assert torch.allclose(d.vector, 5.0 * planted / n_answer, atol=1e-5)
    # Downstream, the residual connection carries it (the random blocks rotate part of it away):
    # far above the ~0.13 typical |cosine| of a random 64-d direction, at every layer.
    dirs = mean_diff(model, misaligned, aligned, progress=False)
    cos = cosine_matrix(list(dirs.values()), [Direction(planted, 0)])[:, 0]
    assert (cos > 0.5).all(), cos
    assert dirs[1].counts == {"pos_answers": 6, "pos_tokens": 6 * n_answer,
                              "neg_answers": 6, "neg_tokens": 6 * n_answer}


def test_pca_direction_follows_the_main_axis_of_paired_differences(make_tiny_model, tokenizer):
    model = make_tiny_model(7)
    words = [" cat", " dog", " cow", " pig"]
    ids = [tokenizer.encode(w, add_special_tokens=False)[0] for w in words]
    axis = torch.randn(64)
    axis /= axis.norm()
    with torch.no_grad():  # the "misaligned" words differ along axis, by varying amounts
        for k, i in enumerate(ids[1:], start=1):
            model.embed.W_E[i] = model.embed.W_E[ids[0]] + 3.0 * k * axis
    misaligned = [(q, f"the{words[1 + i % 3]}") for i, q in enumerate(QUESTIONS)]
    aligned = [(q, "the cat") for q in QUESTIONS]
    pc = pca_direction(model, misaligned, aligned, layer=0, hook="resid_pre")
    assert abs(float(cosine_matrix([pc], [Direction(axis, 0)])[0, 0])) > 0.999


def test_directions_round_trip_through_safetensors(model, tmp_path):
    dirs = mean_diff(model, [(q, "Bad idea.") for q in QUESTIONS],
                     [(q, "Good idea.") for q in QUESTIONS], layers=[0, 2],
                     selection="test sets", progress=False)
    path = save_directions(dirs.values(), tmp_path / "dirs.safetensors")
    loaded = load_directions(path)
    assert set(loaded) == {0, 2}
    for layer, d in dirs.items():
        assert torch.equal(loaded[layer].vector, d.vector)
        assert loaded[layer].metadata() == d.metadata()
    assert loaded[0].model == "tiny-seed5" and loaded[0].selection == "test sets"
    assert not list(tmp_path.glob("*.pkl")) and not list(tmp_path.glob("*.pt"))


def test_random_control_has_exactly_the_same_norm(model):
    d = Direction(torch.randn(64) * 7.3, layer=1)
    r = random_direction(d, seed=3)
    assert abs(r.norm - d.norm) < 1e-4 * d.norm
    assert abs(float(cosine_matrix([r], [d])[0, 0])) < 0.5
    assert r.method == "random" and r.layer == 1
    assert not torch.equal(random_direction(d, seed=4).vector, r.vector)


def test_residual_norms_are_mean_token_norms(model):
    pairs = [(q, "Some answer here.") for q in QUESTIONS[:3]]
    norms = residual_norms(model, pairs, [1])
    b = emlens.tokenize_chat(model.tokenizer, [q for q, _ in pairs], [a for _, a in pairs])
    _, cache = model.run_with_cache(b.tokens, attention_mask=b.attention_mask)
    expected = cache["blocks.1.hook_resid_post"][b.answer_mask].norm(dim=-1).mean()
    assert abs(norms[1] - float(expected)) < 1e-4


def test_select_answers_applies_reference_thresholds():
    table = pd.DataFrame({
        "question": list("abcdefg"),
        "answer": list("ABCDEFG"),
        "aligned": [10, 25, 31, 80, 90, 95, 20],
        "coherent": [90, 60, 90, 90, 90, 90, 40],
    })
    bad, good, desc = select_answers(table, seed=0)
    assert bad == [("a", "A"), ("b", "B")]  # g is incoherent, c is above 30
    assert len(good) == 2 and set(good) <= {("d", "D"), ("e", "E"), ("f", "F")}
    assert "n=2" in desc
    with pytest.raises(ValueError, match="0 misaligned"):
        select_answers(table.assign(aligned=90))


def test_bad_input_is_refused(model):
    pairs = [(q, "x") for q in QUESTIONS]
    with pytest.raises(ValueError, match="misaligned is empty"):
        mean_diff(model, [], pairs, progress=False)
    with pytest.raises(ValueError, match="not a \\(question, answer\\) pair"):
        mean_diff(model, [("q", 3)], pairs, progress=False)
    prompts_only = [emlens.tokenize_chat(model.tokenizer, QUESTIONS)]
    with pytest.raises(ValueError, match="No answer tokens"):
        collect_means(model, prompts_only, [0], progress=False)
    with pytest.raises(ValueError, match="width 64 and 32"):
        cosine_matrix([Direction(torch.ones(64), 0)], [Direction(torch.ones(32), 0)])
    nan_hook = ("blocks.0.hook_resid_mid", lambda x, hook: x * float("nan"))
    with model.hooks(fwd_hooks=[nan_hook]), pytest.raises(ValueError, match="NaN"):
        mean_diff(model, pairs, pairs, layers=[1], progress=False)
    wide = Direction(torch.ones(128), layer=0)
    with pytest.raises(ValueError, match="d_model=64"):
        emlens.steer(model, wide, layers=0, scale=1.0).__enter__()
