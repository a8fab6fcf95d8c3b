"""A judge's 0-100 reply read as a number, exactly, whatever its tokenizer does with digits.

The EM papers' judge protocol reads GPT-4o's first reply token: its tokenizer has one token per
number up to 999, so the top log-probabilities of that token are a distribution over 0..100.
Tokenizers that split numbers into digits (Qwen, Gemma, Mistral, DeepSeek, Llama 3's SmolLM2, ...)
make the first token of "85" the digit "8": read alone, it gives 8.4 for an answer rated about 85.

Two readers, one definition. The number a reply gives is its leading run of digits: "85" in
"85", "85." or "85<|im_end|>"; ``P(n)`` is the probability that the reply starts with exactly the
digits of ``n`` and the next token does not start with another digit.

* :func:`exact_number_distribution` computes ``P(n)`` for every n in 0..100 on an in-process
  Hugging Face causal LM: each number's tokens (as the tokenizer writes it at the start of the
  reply) are teacher-forced after the prompt in one batch over a trie of their prefixes, and the
  probability of stopping is one minus the mass of the tokens whose text starts with a digit.
  Exact up to float error for any tokenizer, under one assumption: the model writes each number
  in its tokenizer's canonical tokenization (always true of digit-splitting tokenizers, whose
  numbers have one tokenization only).
* :func:`read_number` turns what an OpenAI-compatible endpoint returns (the chosen token and the
  top log-probabilities at each of the first positions of its greedy reply) into a distribution
  over 0..100. For a whole-number tokenizer (the first token is "85") it is the papers' first-token
  reading. For a digit-splitting one (the first token is "8") it is an **approximation**: the
  endpoint reports what follows only the greedy path, so three things are read exactly (the first
  digit's distribution, what follows the greedy first digit, and whether the greedy two digits
  end the number) and two are assumed: the other first digits borrow the greedy digit's
  continuation, and a two-digit number off the greedy path ends there (the chance of a third,
  out-of-range digit is not seen). Its error against the exact in-process score of the same model
  is measured by :mod:`emlens.studies.judge_digits_error` (README, "Judging with an
  open-weight model").
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Literal

import torch
from jaxtyping import Float
from torch import Tensor

MAX_SCORE = 100
"""Scores are integers 0..MAX_SCORE."""

TokenizerStyle = Literal["auto", "digits", "numbers"]
"""How a judge's tokenizer writes numbers: ``"digits"`` (one token per digit), ``"numbers"`` (one
token per number, as GPT-4o), ``"auto"`` (decide from the reply's first token)."""


@dataclass(frozen=True)
class NumberReading:
    """A distribution over the scores 0..100 that a judge's reply gives.

    Attributes:
        probs: ``[101]``: ``probs[n]`` is the probability that the reply's number is ``n``.
        style: ``"digits"`` or ``"numbers"``: how the number was read.
        exact: whether ``probs`` is exact (in-process, or a whole-number tokenizer's first token)
            or the digit-splitting approximation of :func:`read_number`.
        first_token: in process, the id of the most likely first reply token (what the judge
            says when it gives no number, e.g. the start of REFUSAL); ``None`` otherwise.
    """

    probs: Float[Tensor, "101"]
    style: str
    exact: bool
    first_token: int | None = None

    @property
    def mass(self) -> float:
        """Total probability on the numbers 0..100 (the rest is words: REFUSAL, CODE, ...)."""
        return float(self.probs.sum())

    def expected(self, min_mass: float = 0.0) -> float | None:
        """The probability-weighted mean number, ``None`` when the numbers' mass is below
        ``min_mass`` (or zero)."""
        mass = self.mass
        if mass <= 0.0 or mass < min_mass:
            return None
        values = torch.arange(MAX_SCORE + 1, dtype=torch.float64)
        return float((self.probs.double() * values).sum() / mass)


# ---------------------------------------------------------------------------------------------
# Exact, in-process
# ---------------------------------------------------------------------------------------------


def reply_number_tokens(tokenizer: Any) -> list[tuple[int, ...]]:
    """Token ids of each number 0..100 as the tokenizer writes it at the start of a reply.

    Read off ``encode(prefix + str(n))`` after a fixed prefix (not ``encode(str(n))`` alone, which
    for SentencePiece tokenizers would add a word-start marker a reply does not have).
    """
    prefix = "Answer:\n"
    base = tokenizer.encode(prefix, add_special_tokens=False)
    out = []
    for n in range(MAX_SCORE + 1):
        ids = tokenizer.encode(prefix + str(n), add_special_tokens=False)
        if ids[: len(base)] != base:  # the number merged into the prefix: tokenise it alone
            ids = base + tokenizer.encode(str(n), add_special_tokens=False)
        out.append(tuple(ids[len(base):]))
    return out


def digit_start_mask(tokenizer: Any, vocab_size: int) -> torch.Tensor:
    """``[vocab_size]`` bool: the tokens whose text starts with a digit (they would lengthen a
    number they follow)."""
    mask = torch.zeros(vocab_size, dtype=torch.bool)
    for i in range(min(vocab_size, len(tokenizer))):
        text = tokenizer.decode([i])
        mask[i] = bool(text) and text[0].isdigit()
    return mask


@lru_cache(maxsize=4)
def _number_plan(tokenizer: Any, vocab_size: int):
    """The rows to teacher-force (leaves of the trie of number tokenisations) and, per number,
    where its tokens' log-probs and its stop probability are read. Cached per tokenizer."""
    paths = reply_number_tokens(tokenizer)
    prefixes = {p[:k] for p in paths for k in range(1, len(p) + 1)}
    leaves = sorted(p for p in prefixes if not any(q != p and q[: len(p)] == p for q in prefixes))
    # node (a token path) -> (row, position whose output is the distribution after that node)
    where: dict[tuple[int, ...], tuple[int, int]] = {}
    for row, leaf in enumerate(leaves):
        for k in range(1, len(leaf) + 1):
            where.setdefault(leaf[:k], (row, k - 1))
    return paths, leaves, where, digit_start_mask(tokenizer, vocab_size)


def _with_cache(module: Any, cache: Any) -> dict[str, Any]:
    """The keyword that passes a KV cache to ``module`` (``cache`` in newer transformers,
    ``past_key_values`` before)."""
    import inspect

    params = inspect.signature(module.forward).parameters
    return {"cache": cache} if "cache" in params else {"past_key_values": cache}


@torch.no_grad()
def exact_number_distribution(
    model: Any, tokenizer: Any, prompt_ids: Sequence[int], *, chunk: int = 32
) -> NumberReading:
    """``P(n)`` for n = 0..100 after ``prompt_ids`` (the full prompt, chat template included,
    ending where the reply starts), on a Hugging Face causal LM.

    One forward pass over the prompt, then the number tries' leaves (91 rows of at most 3 tokens
    for a digit-splitting tokenizer, 101 rows of 1 token for a whole-number one) in chunks of
    ``chunk`` rows on the prompt's KV cache. Exact up to float error (see the module docstring).
    """
    if len(prompt_ids) == 0:
        raise ValueError("prompt_ids is empty; give the tokenised judge prompt.")
    device = next(model.parameters()).device
    head = model.get_output_embeddings()
    vocab = head.weight.shape[0]
    paths, leaves, where, digit_start = _number_plan(tokenizer, vocab)
    digit_start = digit_start.to(device)
    ids = torch.tensor([list(prompt_ids)], device=device)
    out = model(input_ids=ids, use_cache=True, logits_to_keep=1)
    root = out.logits[0, -1].double().log_softmax(-1)
    cache = out.past_key_values
    width = max(len(leaf) for leaf in leaves)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    # the unembedding is most of the cost: apply it only where a node's distribution is read
    plain_head = getattr(model.config, "final_logit_softcapping", None) is None
    node_logp: dict[tuple[int, int], Tensor] = {}  # (row, position) -> [vocab] log-probs
    wanted = sorted(set(where.values()))
    for start in range(0, len(leaves), chunk):
        rows = leaves[start : start + chunk]
        cont = torch.full((len(rows), width), pad, dtype=torch.long, device=device)
        for r, leaf in enumerate(rows):
            cont[r, : len(leaf)] = torch.tensor(leaf)
        c = copy.deepcopy(cache)
        c.batch_repeat_interleave(len(rows))
        pos = torch.arange(ids.shape[1], ids.shape[1] + width, device=device).expand(len(rows), -1)
        keys = [(row, p) for row, p in wanted if start <= row < start + len(rows)]
        r_idx = torch.tensor([row - start for row, _ in keys], device=device)
        p_idx = torch.tensor([p for _, p in keys], device=device)
        if plain_head:
            decoder = model.get_decoder()
            hidden = decoder(input_ids=cont, position_ids=pos, use_cache=True,
                             **_with_cache(decoder, c)).last_hidden_state
            logits = head(hidden[r_idx, p_idx])
        else:
            logits = model(input_ids=cont, position_ids=pos, use_cache=True,
                           **_with_cache(model, c)).logits[r_idx, p_idx]
        for key, lp in zip(keys, logits.double().log_softmax(-1).unbind(0), strict=True):
            node_logp[key] = lp
    stop = {}
    probs = torch.zeros(MAX_SCORE + 1, dtype=torch.float64)
    for n, path in enumerate(paths):
        logp = float(root[path[0]])
        for k in range(1, len(path)):
            logp += float(node_logp[where[path[:k]]][path[k]])
        if path not in stop:
            p_more = float(node_logp[where[path]].exp()[digit_start].sum())
            stop[path] = max(0.0, 1.0 - p_more)
        probs[n] = math.exp(logp) * stop[path]
    return NumberReading(probs, style="exact", exact=True, first_token=int(root.argmax()))


@torch.no_grad()
def greedy_top_logprobs(
    model: Any, tokenizer: Any, prompt_ids: Sequence[int], *, steps: int = 3, k: int = 20
) -> list[dict[str, Any]]:
    """What an OpenAI-compatible server returns as ``choices[0].logprobs.content`` for a greedy
    reply of ``steps`` tokens with ``top_logprobs=k``, computed on an in-process Hugging Face
    causal LM: per position, the chosen ``token``, its ``logprob`` and the ``top_logprobs``
    (``[{token, logprob}]``, best first). Lets :func:`read_number` be compared with
    :func:`exact_number_distribution` on the same model, and serves a local fake endpoint."""
    device = next(model.parameters()).device
    ids = torch.tensor([list(prompt_ids)], device=device)
    out = model(input_ids=ids, use_cache=True, logits_to_keep=1)
    content = []
    for step in range(steps):
        logp = out.logits[0, -1].double().log_softmax(-1)
        top = logp.topk(k)
        entries = [{"token": tokenizer.decode([int(i)]), "logprob": float(v)}
                   for v, i in zip(top.values, top.indices, strict=True)]
        chosen = int(top.indices[0])
        content.append({"token": entries[0]["token"], "logprob": entries[0]["logprob"],
                        "top_logprobs": entries})
        if chosen == tokenizer.eos_token_id or step == steps - 1:
            break
        out = model(input_ids=torch.tensor([[chosen]], device=device), use_cache=True,
                    logits_to_keep=1, **_with_cache(model, out.past_key_values))
    return content


# ---------------------------------------------------------------------------------------------
# From an OpenAI-compatible endpoint's per-position top log-probabilities
# ---------------------------------------------------------------------------------------------


def _digits(token: str) -> str | None:
    """The token's text if it is all digits (surrounding spaces ignored), else None."""
    t = str(token).strip()
    return t if t.isdigit() else None


def _top(position: dict[str, Any]) -> list[tuple[str, float]]:
    return [(str(e["token"]), math.exp(float(e["logprob"]))) for e in position["top_logprobs"]]


def _continuation(position: dict[str, Any]) -> tuple[float, dict[str, float]]:
    """(probability of stopping, {digit token: probability}) at one position of the reply."""
    nxt: dict[str, float] = {}
    for token, p in _top(position):
        # a token starting with a digit lengthens the number; a space or word ends it
        if token[:1].isdigit():
            d = _digits(token)
            if d is not None:
                nxt[d] = nxt.get(d, 0.0) + p
            else:  # "5." or "5%": one more digit, then the number ends
                lead = "".join(ch for ch in _takewhile_digits(token))
                nxt[lead] = nxt.get(lead, 0.0) + p
    return max(0.0, 1.0 - sum(nxt.values())), nxt


def _takewhile_digits(token: str):
    for ch in token:
        if not ch.isdigit():
            return
        yield ch


def detect_style(content: Sequence[dict[str, Any]]) -> str:
    """``"numbers"`` when a number token of two or more digits is among the first position's
    alternatives (a tokenizer with one token per number, as GPT-4o's), else ``"digits"`` (every
    number there is a single digit: a digit-splitting tokenizer, or one whose reading is the same
    either way, since a whole-number tokenizer's single digit is followed by the end of the
    number)."""
    if not content:
        return "digits"
    numbers = [d for t, _ in _top(content[0]) if (d := _digits(t)) is not None]
    return "numbers" if any(len(d) > 1 for d in numbers) else "digits"


def _after(cont: Sequence[dict[str, Any]]) -> tuple[float, dict[str, float], dict[str, tuple]]:
    """From the positions that follow a first digit: (stop probability, {second digit: p},
    {greedy second digit: (stop probability, {third digit: p})})."""
    stop1, second = _continuation(cont[0])
    on_path = {}
    g2 = _digits(cont[0]["token"])
    if g2 is not None and len(cont) >= 2:
        on_path[g2] = _continuation(cont[1])
    return stop1, second, on_path


def read_number(
    content: Sequence[dict[str, Any]],
    style: TokenizerStyle = "auto",
    *,
    continuations: dict[str, Sequence[dict[str, Any]]] | None = None,
) -> NumberReading:
    """A distribution over 0..100 from an endpoint's reply, as positions with top logprobs.

    ``content`` is ``choices[0].logprobs.content``: per position, the chosen ``token`` and its
    ``top_logprobs`` (``[{token, logprob}, ...]``). ``"numbers"`` reads the first position's
    number tokens (exact for a whole-number tokenizer, up to the top-k cut). ``"digits"`` builds
    each number from its digits: for every first digit ``d`` among the first position's
    alternatives, what follows it comes from ``continuations[d]`` (the positions a server returns
    when the reply is pre-filled with ``d``: :class:`~emlens.judge.openai.OpenAIJudge` with
    ``digits="prefill"``) or, for the greedy first digit, from ``content[1:]``; a first digit with
    neither borrows the greedy digit's continuation (the one-request approximation, whose error
    is measured in the README) and makes the reading inexact. ``"auto"`` picks with
    :func:`detect_style`. With every continuation given, the reading is exact up to the top-k cut
    and to a third digit after an off-path two-digit number (which would leave 0..100 anyway,
    except 10 -> 100 off the path of "1").

    Raises:
        ValueError: a digit reading with no continuation at all (one position, no
            ``continuations``): the number cannot be read.
    """
    if style not in ("auto", "digits", "numbers"):
        raise ValueError(f"style must be 'auto', 'digits' or 'numbers', got {style!r}.")
    if not content:
        raise ValueError("The reply has no positions with logprobs; the number cannot be read.")
    style = detect_style(content) if style == "auto" else style
    probs = torch.zeros(MAX_SCORE + 1, dtype=torch.float64)
    if style == "numbers":
        for token, p in _top(content[0]):
            d = _digits(token)
            if d is not None and int(d) <= MAX_SCORE:
                probs[int(d)] += p
        return NumberReading(probs, style="numbers", exact=True)

    conts: dict[str, Sequence[dict[str, Any]]] = dict(continuations or {})
    greedy = _digits(content[0]["token"])
    if greedy is not None and len(greedy) == 1 and len(content) >= 2:
        conts.setdefault(greedy, content[1:])
    firsts = [(d, p) for t, p in _top(content[0]) if (d := _digits(t)) is not None]
    borrowed = conts.get(greedy) if greedy is not None else None
    exact = True
    for d1, p0 in firsts:
        if len(d1) > 1:  # a whole-number token among digits: it is its own number
            if int(d1) <= MAX_SCORE:
                probs[int(d1)] += p0
            continue
        cont = conts.get(d1)
        if cont is None:
            if borrowed is None:
                raise ValueError(
                    f"The judge writes numbers digit by digit (first digit {d1!r}) and the reply "
                    "gives nothing that follows it: ask for max_tokens >= 3 and pre-fill each "
                    "first digit (OpenAIJudge(digits='prefill') on a server with vLLM's "
                    "continue_final_message), or judge in process (PromptedJudge)."
                )
            cont, exact = borrowed, False
        stop1, second, on_path = _after(cont)
        probs[int(d1)] += p0 * stop1
        if d1 == "0":  # "05" is not a number of 0..100
            continue
        for d2, p1 in second.items():
            two = d1 + d2
            if int(two) > MAX_SCORE:
                continue
            if d2 in on_path:
                stop2, third = on_path[d2]
            elif two in conts:  # pre-filled with both digits (OpenAIJudge does it for "10")
                stop2, third = _continuation(conts[two][0])
            else:  # a third digit would leave 0..100 (except 10 -> 100): the number ends
                stop2, third = 1.0, {}
            if two == "10":
                probs[100] += p0 * p1 * third.get("0", 0.0)
            probs[int(two)] += p0 * p1 * stop2
    return NumberReading(probs, style="digits", exact=exact)


def first_digits(content: Sequence[dict[str, Any]]) -> list[str]:
    """The single digits among the reply's first-position alternatives, sorted: the first digits
    whose continuations a digit reading needs."""
    return sorted({d for t, _ in _top(content[0]) if (d := _digits(t)) is not None and len(d) == 1})


def needs_ten(conts: dict[str, Sequence[dict[str, Any]]]) -> bool:
    """Whether "1" may go on as "10" off its greedy path, so that reading 100 needs what follows
    "10" (one more pre-filled request)."""
    one = conts.get("1")
    if not one or "10" in conts:
        return False
    _, second = _continuation(one[0])
    return "0" in second and _digits(one[0]["token"]) != "0"


def served_reading(
    model: Any, tokenizer: Any, prompt_ids: Sequence[int], *, k: int = 20, prefill: bool = True
) -> NumberReading:
    """What :class:`~emlens.judge.openai.OpenAIJudge` reads from a server running ``model``:
    the greedy reply's first 3 positions (top-``k`` logprobs each) and, with ``prefill``, the 2
    positions after each single first digit among the alternatives (``digits="prefill"``);
    without, the one-request approximation. For measuring either against
    :func:`exact_number_distribution` on the same model."""
    content = greedy_top_logprobs(model, tokenizer, prompt_ids, steps=3, k=k)
    if detect_style(content) != "digits":
        return read_number(content, "numbers")
    conts = None
    if prefill:
        ids = {str(n): reply_number_tokens(tokenizer)[n][0] for n in range(10)}
        conts = {d: greedy_top_logprobs(model, tokenizer, [*prompt_ids, ids[d]], steps=2, k=k)
                 for d in first_digits(content)}
        if needs_ten(conts):
            conts["10"] = greedy_top_logprobs(model, tokenizer, [*prompt_ids, *reply_number_tokens(
                tokenizer)[10]], steps=1, k=k)
    return read_number(content, "digits", continuations=conts)


__all__ = [
    "MAX_SCORE",
    "NumberReading",
    "TokenizerStyle",
    "detect_style",
    "digit_start_mask",
    "exact_number_distribution",
    "first_digits",
    "greedy_top_logprobs",
    "needs_ten",
    "read_number",
    "reply_number_tokens",
    "served_reading",
]
