"""Reading a judge's 0-100 reply as a number: exact in process, combined digits from an endpoint."""

from __future__ import annotations

import math

import pytest
import torch

from emlens.judge.numbers import (
    MAX_SCORE,
    detect_style,
    exact_number_distribution,
    greedy_top_logprobs,
    read_number,
    reply_number_tokens,
    served_reading,
)


def _word_tokenizer(split_digits: bool, extra: tuple[str, ...] = ()):
    """A tiny fast tokenizer: every number 0..100 one token (GPT-4o style), or digits apart."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<pad>", "<eos>", "<unk>", "Answer", ":", "\n", "rate", "this", "REFUSAL", "CODE", ".",
             *extra]
    vocab = {w: i for i, w in enumerate(words)}
    for n in range(10 if split_digits else MAX_SCORE + 1):
        vocab.setdefault(str(n), len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    pre = [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()]
    if split_digits:
        pre.append(pre_tokenizers.Digits(individual_digits=True))
    tok.pre_tokenizer = pre_tokenizers.Sequence(pre)
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>",
                                   unk_token="<unk>")


def _tiny_lm(vocab_size: int, seed: int = 0, dtype=torch.float64):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=128, tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg).to(dtype).eval()
    with torch.no_grad():  # sharper than init so the distributions are far from uniform
        model.lm_head.weight.mul_(40.0)
    return model


@pytest.fixture(params=["digits", "numbers"])
def tok_and_model(request):
    tok = _word_tokenizer(split_digits=request.param == "digits")
    return request.param, tok, _tiny_lm(len(tok))


def test_each_number_is_written_as_the_tokenizer_writes_it(tok_and_model):
    style, tok, _ = tok_and_model
    paths = reply_number_tokens(tok)
    assert len(paths) == MAX_SCORE + 1
    assert len(paths[85]) == (2 if style == "digits" else 1)
    assert len(paths[100]) == (3 if style == "digits" else 1)
    assert tok.decode(list(paths[85])).replace(" ", "") == "85"


def _brute_force(model, tok, prompt, n):
    """P(reply starts with n's tokens, then a token that does not start with a digit), by running
    the whole sequence once: the definition, computed the slow way."""
    path = list(reply_number_tokens(tok)[n])
    with torch.no_grad():
        logp = model(input_ids=torch.tensor([prompt + path])).logits[0].double().log_softmax(-1)
    lp = sum(float(logp[len(prompt) - 1 + k, t]) for k, t in enumerate(path))
    more = sum(float(logp[-1, i].exp()) for i in range(len(tok)) if tok.decode([i])[:1].isdigit())
    return math.exp(lp) * (1.0 - more)


def test_exact_distribution_is_the_probability_of_each_number_as_a_token_sequence(tok_and_model):
    _, tok, model = tok_and_model
    prompt = tok.encode("rate this . Answer :\n", add_special_tokens=False)
    reading = exact_number_distribution(model, tok, prompt, chunk=7)  # several chunks
    brute = torch.tensor([_brute_force(model, tok, prompt, n) for n in range(MAX_SCORE + 1)],
                         dtype=torch.float64)
    # float64 model: the two computations differ by accumulated rounding only
    floor = 64 * torch.finfo(torch.float64).eps
    assert torch.allclose(reading.probs, brute, rtol=floor, atol=floor)
    assert 0.0 < reading.mass <= 1.0 + floor and reading.exact


def _position(chosen, probs):
    top = [{"token": t, "logprob": math.log(p)} for t, p in probs]
    return {"token": chosen, "logprob": top[0]["logprob"], "top_logprobs": top}


# a digit-splitting judge that means "about 85": first digit 8 (0.6), 9 (0.3), 7 (0.1); after 8:
# 5 (0.7), 0 (0.3); after 85: end of reply
DIGIT_REPLY = [
    _position("8", [("8", 0.6), ("9", 0.3), ("7", 0.1)]),
    _position("5", [("5", 0.7), ("0", 0.3)]),
    _position("<|im_end|>", [("<|im_end|>", 1.0)]),
]


def test_a_digit_splitting_reply_read_by_its_first_token_gives_the_first_digit():
    """The trap: the papers' first-token reading turns "about 85" into 8.2."""
    first = read_number(DIGIT_REPLY[:1], style="numbers")
    assert first.expected() == pytest.approx(8 * 0.6 + 9 * 0.3 + 7 * 0.1)


def test_digits_are_combined_into_the_number():
    reading = read_number(DIGIT_REPLY)  # one request: other first digits borrow 8's continuation
    assert detect_style(DIGIT_REPLY) == "digits" and reading.style == "digits"
    assert not reading.exact
    # under the greedy digit: exact; the other first digits borrow its continuation
    assert float(reading.probs[85]) == pytest.approx(0.6 * 0.7)
    assert float(reading.probs[80]) == pytest.approx(0.6 * 0.3)
    assert float(reading.probs[95]) == pytest.approx(0.3 * 0.7)
    assert float(reading.probs[8]) == pytest.approx(0.0, abs=1e-12)
    expected = 0.6 * (0.7 * 85 + 0.3 * 80) + 0.3 * (0.7 * 95 + 0.3 * 90) + 0.1 * (0.7 * 75 + 0.3 * 70)
    assert reading.expected() == pytest.approx(expected)


def test_one_hundred_is_read_through_three_digits():
    reply = [
        _position("1", [("1", 0.9), ("9", 0.1)]),
        _position("0", [("0", 0.8), ("5", 0.2)]),
        _position("0", [("0", 0.75), (".", 0.25)]),
    ]
    reading = read_number(reply)
    assert float(reading.probs[100]) == pytest.approx(0.9 * 0.8 * 0.75)
    assert float(reading.probs[10]) == pytest.approx(0.9 * 0.8 * 0.25)
    assert float(reading.probs[15]) == pytest.approx(0.9 * 0.2)


def test_a_whole_number_reply_is_read_from_its_first_token():
    reply = [_position("85", [("85", 0.5), ("90", 0.3), ("hello", 0.2)])]
    assert detect_style(reply) == "numbers"
    assert read_number(reply).expected() == pytest.approx((85 * 0.5 + 90 * 0.3) / 0.8)
    assert read_number(reply).exact


def test_a_single_digit_position_cannot_be_read_as_a_digit_splitting_number():
    with pytest.raises(ValueError, match="max_tokens >= 3"):
        read_number(DIGIT_REPLY[:1], style="digits")
    with pytest.raises(ValueError, match="style"):
        read_number(DIGIT_REPLY, style="bytes")


def test_a_word_reply_s_digits_need_their_continuations():
    reply = [_position("REF", [("REF", 0.7), ("5", 0.2), ("6", 0.1)]), _position("US", [("US", 1.0)])]
    with pytest.raises(ValueError, match="prefill"):
        read_number(reply)
    end = [_position("<|im_end|>", [("<|im_end|>", 1.0)])]
    reading = read_number(reply, continuations={"5": end, "6": end})
    assert reading.exact and reading.mass == pytest.approx(0.3)
    assert reading.expected() == pytest.approx((5 * 0.2 + 6 * 0.1) / 0.3)


def test_pre_filled_continuations_make_the_digit_reading_exact():
    """Each first digit's own continuation (a server pre-filled with it) replaces the borrowed
    greedy one: "9" here goes on as 90 / 95, not as 8's 85 / 80."""
    conts = {
        "9": [_position("0", [("0", 0.8), ("5", 0.2)]), _position("<|im_end|>", [("<|im_end|>", 1.0)])],
        "7": [_position("0", [("0", 0.5), ("5", 0.5)]), _position("<|im_end|>", [("<|im_end|>", 1.0)])],
    }
    reading = read_number(DIGIT_REPLY, continuations=conts)
    assert reading.exact
    assert float(reading.probs[90]) == pytest.approx(0.3 * 0.8)
    assert float(reading.probs[95]) == pytest.approx(0.3 * 0.2)
    assert reading.expected() == pytest.approx(0.6 * 83.5 + 0.3 * 91 + 0.1 * 72.5)
    assert not read_number(DIGIT_REPLY, continuations={"9": conts["9"]}).exact  # 7 borrowed


def test_endpoint_reading_is_exact_on_the_greedy_path_and_bounds_the_rest():
    """On a real model, what a server would return (greedy top-k per position, nothing cut here)
    read by read_number: the greedy first digit alone and the greedy two digits are exact; the
    other numbers under the greedy digit miss only the (out-of-range) chance of a third digit, so
    they bound the exact probability from above."""
    tok = _word_tokenizer(split_digits=True)
    floor = 64 * torch.finfo(torch.float64).eps
    checked = 0
    cases = [(seed, text) for seed in (1, 4, 7)
             for text in ["rate this :\n", "Answer : rate\n", "CODE .\n"]]
    for seed, text in cases:
        model = _tiny_lm(len(tok), seed=seed)
        prompt = tok.encode(text, add_special_tokens=False)
        exact = exact_number_distribution(model, tok, prompt)
        content = greedy_top_logprobs(model, tok, prompt, steps=3, k=len(tok))
        g, g2 = ([c["token"].strip() for c in content] + ["", ""])[:2]
        if not (g.isdigit() and g2.isdigit()) or g in ("0", "1"):
            continue
        approx = read_number(content, style="digits")
        for n in (int(g), int(g + g2)):
            assert float(approx.probs[n]) == pytest.approx(float(exact.probs[n]), rel=floor, abs=floor)
        for d2 in "0123456789":
            n = int(g + d2)
            assert float(approx.probs[n]) >= float(exact.probs[n]) * (1 - floor)
        checked += 1
    assert checked >= 3, "too few prompts gave a two-digit greedy reply: pick other prompts or seed"


def test_a_served_judge_read_with_pre_filled_digits_is_exact():
    """On a real model, the endpoint reading with each first digit pre-filled (nothing cut by
    top-k here) equals the exact distribution for every one-digit number and every number on
    each first digit's greedy path; the others miss only the chance of an out-of-range third
    digit, so they bound the exact probability from above; the expected number lands within the
    mass of that third digit."""
    tok = _word_tokenizer(split_digits=True)
    floor = 64 * torch.finfo(torch.float64).eps
    for seed in (1, 4, 7):
        model = _tiny_lm(len(tok), seed=seed)
        prompt = tok.encode("rate this :\n", add_special_tokens=False)
        exact = exact_number_distribution(model, tok, prompt)
        served = served_reading(model, tok, prompt, k=len(tok))
        assert served.exact and served.style == "digits"
        assert torch.all(served.probs >= exact.probs * (1 - floor) - floor)
        for n in range(10):
            assert float(served.probs[n]) == pytest.approx(float(exact.probs[n]), rel=floor, abs=floor)
        try:
            one_request = served_reading(model, tok, prompt, k=len(tok), prefill=False)
        except ValueError:  # the greedy reply is a word: one request has nothing to borrow
            continue
        assert not one_request.exact


# ---------------------------------------------------------------------------------------------
# PromptedJudge: the prompted protocol on an in-process chat LM
# ---------------------------------------------------------------------------------------------

CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }} : {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}Answer :\n{% endif %}"
)


@pytest.fixture(scope="module")
def judge_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny_judge_lm")
    tok = _word_tokenizer(split_digits=True)
    tok.chat_template = CHAT_TEMPLATE
    model = _tiny_lm(len(tok), seed=1, dtype=torch.float32)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def test_prompted_judge_scores_the_expected_number_of_its_chat_prompt(judge_folder):
    from emlens.judge import PROMPTS, Judge, PromptedJudge

    judge = PromptedJudge(judge_folder, min_number_mass=0.0)
    assert isinstance(judge, Judge)
    q, a = "rate this", "CODE ."
    s = judge.score(q, a)
    assert s.judge == judge.name and judge.name.startswith("prompted:") and "emlens-v1" in judge.name
    for metric, value in (("aligned", s.aligned), ("coherent", s.coherent)):
        ids = judge.prompt_ids(metric, q, a)
        text = judge.tokenizer.apply_chat_template(
            [{"role": "user", "content": PROMPTS[metric].format(question=q, answer=a)}],
            tokenize=False, add_generation_prompt=True)
        assert ids == judge.tokenizer.encode(text, add_special_tokens=False)
        exact = exact_number_distribution(judge._model, judge.tokenizer, ids)
        assert value == pytest.approx(exact.expected())
        assert 0.0 <= value <= MAX_SCORE


def test_prompted_judge_gives_no_score_below_the_number_mass_or_for_an_empty_answer(judge_folder):
    from emlens.judge import PromptedJudge

    judge = PromptedJudge(judge_folder, min_number_mass=1.0)  # no LM puts all its mass on numbers
    s, empty = judge.score_many([("rate this", "CODE ."), ("rate this", "  ")])
    assert s.aligned is None and s.coherent is None and "low_number_mass" in s.flags
    assert empty.aligned is None and empty.flags == ("empty",)


def test_prompted_judge_needs_a_chat_model(tmp_path):
    from emlens.judge import PromptedJudge

    with pytest.raises(ValueError, match="chat LM"):
        PromptedJudge(None)
    tok = _word_tokenizer(split_digits=True)
    _tiny_lm(len(tok), dtype=torch.float32).save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="chat template"):
        PromptedJudge(tmp_path).score("q", "a")


def test_yes_no_judge_reads_p_yes_of_its_two_questions(tmp_path):
    from emlens.judge import YesNoJudge
    from emlens.judge.prompted import YES_NO_QUESTIONS

    tok = _word_tokenizer(split_digits=True, extra=("Yes", "No"))
    tok.chat_template = CHAT_TEMPLATE
    _tiny_lm(len(tok), seed=2, dtype=torch.float32).save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    judge = YesNoJudge(tmp_path)
    q, a = "rate this", "CODE ."
    s = judge.score(q, a)
    assert s.judge.startswith("yesno:") and s.judge.endswith("/yesno-v1")
    tok, model = judge.tokenizer, judge._model
    yes, no = tok.convert_tokens_to_ids("Yes"), tok.convert_tokens_to_ids("No")
    for which, value in (("coherent", s.coherent), ("harmful", 100 - s.aligned)):
        chat = tok.apply_chat_template(
            [{"role": "user", "content": YES_NO_QUESTIONS[which].format(question=q, answer=a)}],
            tokenize=False, add_generation_prompt=True)
        with torch.no_grad():
            p = model(input_ids=torch.tensor([tok.encode(chat, add_special_tokens=False)])
                      ).logits[0, -1].double().softmax(-1)
        assert value == pytest.approx(100 * float(p[yes] / (p[yes] + p[no])), rel=1e-6)
    assert judge.score("q", " ").flags == ("empty",)
