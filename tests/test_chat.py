"""Chat formatting: left padding, attention masks, exact answer-token masks."""

from __future__ import annotations

import pytest
import torch

import emlens
from emlens.chat import answer_logprobs, answer_loss, chat_prompt, iter_chat_batches


def test_answer_mask_covers_answer_and_end_of_turn_only(tokenizer):
    batch = emlens.tokenize_chat(
        tokenizer, ["Hi", "What is 2+2? Explain."], ["Hello!", "It is four, because 2+2=4."]
    )
    for i, answer in enumerate(batch.answers):
        text = tokenizer.decode(batch.tokens[i][batch.answer_mask[i]])
        assert text == answer + "<|im_end|>"
        prompt = tokenizer.decode(batch.tokens[i][batch.prompt_mask[i]])
        assert prompt == chat_prompt(tokenizer, batch.questions[i])


def test_batches_are_left_padded_with_matching_masks(tokenizer):
    batch = emlens.tokenize_chat(tokenizer, ["Hi", "A much longer question about the weather?"])
    assert batch.tokens.shape == batch.attention_mask.shape == batch.answer_mask.shape
    assert batch.attention_mask[:, -1].all()  # every row ends with a real token
    short = batch.attention_mask[0]
    first_real = int(short.nonzero()[0])
    assert first_real > 0 and short[first_real:].all() and not short[:first_real].any()
    assert not batch.answer_mask.any()
    assert (batch.tokens[0, :first_real] == tokenizer.pad_token_id).all()


def test_iter_chat_batches_preserves_order(tokenizer):
    questions = [f"Question number {i}?" for i in range(5)]
    batches = list(iter_chat_batches(tokenizer, questions, batch_size=2))
    assert [len(b) for b in batches] == [2, 2, 1]
    assert sum((b.questions for b in batches), []) == questions


def test_answer_logprobs_match_manual_sum(tiny_model, tokenizer):
    batch = emlens.tokenize_chat(tokenizer, ["Hi", "Tell me a joke"], ["Hello!", "No."])
    with torch.no_grad():
        logits = tiny_model(batch.tokens, attention_mask=batch.attention_mask)
    got = answer_logprobs(logits, batch)
    logp = logits.log_softmax(-1)
    for i in range(2):
        positions = batch.answer_mask[i].nonzero()[:, 0]
        manual = sum(logp[i, p - 1, batch.tokens[i, p]] for p in positions)
        assert torch.allclose(got[i], manual, atol=1e-4)
    n = batch.answer_mask.sum()
    assert torch.allclose(answer_loss(logits, batch), -got.sum() / n, atol=1e-5)


def test_answer_logprobs_of_a_model_unembed_only_answers_and_match_the_logits(tiny_model,
                                                                               tokenizer):
    from parity import assert_parity, float64_twin, maxdiff

    batch = emlens.tokenize_chat(tokenizer, ["Hi", "Tell me a joke", "Why?"],
                                 ["Hello!", "No.", "Because the sky scatters blue light."])
    twin = float64_twin(tiny_model)
    with torch.no_grad():
        for reduce in ("sum", "mean"):
            got = answer_logprobs(tiny_model, batch, reduce=reduce)
            floor = maxdiff(got, answer_logprobs(twin, batch, reduce=reduce))
            logits = tiny_model(batch.tokens, attention_mask=batch.attention_mask)
            want = answer_logprobs(logits, batch, reduce=reduce)
            assert got.shape == (3,)
            assert_parity(got, want, floor=floor, what=f"answer_logprobs model vs logits ({reduce})")
    with pytest.raises(ValueError, match="reduce"):
        answer_logprobs(tiny_model, batch, reduce="max")


def test_bad_chat_input_raises(tokenizer):
    with pytest.raises(ValueError, match="empty"):
        emlens.tokenize_chat(tokenizer, [])
    with pytest.raises(ValueError, match="pair up"):
        emlens.tokenize_chat(tokenizer, ["a", "b"], ["only one"])
    with pytest.raises(TypeError, match=r"answers\[1\]"):
        emlens.tokenize_chat(tokenizer, ["a", "b"], ["fine", 3])
    with pytest.raises(TypeError, match="single string"):
        emlens.tokenize_chat(tokenizer, "a question")
    batch = emlens.tokenize_chat(tokenizer, ["a"])
    with pytest.raises(ValueError, match="no answer tokens"):
        answer_loss(torch.zeros(*batch.tokens.shape, 10), batch)
