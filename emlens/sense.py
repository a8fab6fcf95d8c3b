"""Signals of sense for the offline judge: does an answer read as meaningful language that
addresses its question?

A probe on a small LM's mean hidden state sees topic and style, and scores fluent nonsense as
coherent. These features measure sense more directly, all from the *judge* LM (never the subject
model) and from the text itself:

* likelihood: mean, 10th and 25th percentile of the per-token log-probability of the answer given
  ``"Question: {q}\\nAnswer:"``, the share of very unlikely tokens (log p < -8), and the mean
  predictive entropy;
* relevance: the same mean log-probability given a question-free prompt, and the difference
  (pointwise mutual information between question and answer: an answer unrelated to its question
  gains nothing from it);
* repetition and form: distinct word 1/2/3-gram ratios, the share of repeated word 4-grams, the
  gzip compression ratio, the share of alphabetic characters, chat-marker debris, and the length.

``SenseFeatures(pairs)`` returns ``Float[Tensor, "n n_features"]`` in :data:`SENSE_FEATURES` order.
Likelihoods read at most ``max_answer_tokens`` answer tokens (the unembedding over the judge LM's
262k-token vocabulary is the cost).
"""

from __future__ import annotations

import gzip
import math
import re
from collections.abc import Sequence

import torch
from jaxtyping import Float
from torch import Tensor
from tqdm.auto import tqdm

from emlens.judge import JudgeLMReader, check_pairs

Pair = tuple[str, str]

LIKELIHOOD_FEATURES = ("lp_mean", "lp_q10", "lp_q25", "frac_unlikely", "entropy_mean",
                       "lp_mean_noq", "pmi")
TEXT_FEATURES = ("distinct1", "distinct2", "distinct3", "repeat4", "gzip_ratio", "alpha_frac",
                 "marker_frac", "log_words")
SENSE_FEATURES = LIKELIHOOD_FEATURES + TEXT_FEATURES
READING_LIKELIHOOD = LIKELIHOOD_FEATURES[:5]
QUESTION_TEMPLATE = "Question: {question}\nAnswer:"
NO_QUESTION_PROMPT = "Answer:"
UNLIKELY = -8.0
EMPTY_LP = -20.0
_WORD = re.compile(r"[A-Za-z0-9']+")
_MARKER = re.compile(r"<\|?[a-z_]+\|?>|\|im_(start|end)\||<end_of_turn>")


def text_features(answer: str) -> list[float]:
    """The :data:`TEXT_FEATURES` of one answer (no model involved)."""
    words = [w.lower() for w in _WORD.findall(answer)]
    n = len(words)

    def distinct(k: int) -> float:
        grams = [tuple(words[i : i + k]) for i in range(n - k + 1)]
        return len(set(grams)) / len(grams) if grams else 1.0

    grams4 = [tuple(words[i : i + 4]) for i in range(n - 3)]
    repeat4 = 1.0 - len(set(grams4)) / len(grams4) if grams4 else 0.0
    raw = answer.encode()
    gz = len(gzip.compress(raw, mtime=0)) / max(1, len(raw)) if raw else 1.0
    chars = [c for c in answer if not c.isspace()]
    alpha = sum(c.isalpha() for c in chars) / len(chars) if chars else 0.0
    marker = sum(len(m.group(0)) for m in _MARKER.finditer(answer)) / max(1, len(answer))
    return [distinct(1), distinct(2), distinct(3), repeat4, gz, alpha, marker, math.log1p(n)]


def answer_token_stats(model, hidden: Float[Tensor, "batch pos d_model"], ids, lengths: Sequence[int],
                       n_ans: Sequence[int]) -> list[list[float]]:
    """Per row of a right-padded batch: [mean, q10, q25, frac_unlikely, entropy] of the
    log-probabilities of its last ``n_ans[i]`` tokens (the answer) under ``model``'s head, read
    from its final hidden states; an empty answer gets the least likely values."""
    out = []
    for i, (length, k) in enumerate(zip(lengths, n_ans, strict=True)):
        if k == 0:  # an empty answer: the least likely values, so nothing reads as sense
            out.append([EMPTY_LP, EMPTY_LP, EMPTY_LP, 1.0, 0.0])
            continue
        pos = torch.arange(length - k - 1, length - 1)  # positions predicting answer tokens
        logits = model.lm_head(hidden[i, pos]).float()
        if getattr(model.config, "final_logit_softcapping", None):
            cap = model.config.final_logit_softcapping
            logits = torch.tanh(logits / cap) * cap
        logp = logits.log_softmax(-1)
        lp = logp.gather(-1, ids[i, pos + 1][:, None])[:, 0]
        entropy = -(logp.exp() * logp).sum(-1)
        out.append([lp.mean().item(), lp.quantile(0.10).item(), lp.quantile(0.25).item(),
                    (lp < UNLIKELY).float().mean().item(), entropy.mean().item()])
    return out


class SenseFeatures(JudgeLMReader):
    """Likelihood, relevance and repetition features of (question, answer) pairs.

    Args:
        source: judge LM (``None``: base Gemma 3 270M, as :class:`emlens.judge.HiddenStateFeatures`).
        batch_size: rows per forward pass.
        max_answer_tokens: answer tokens scored by likelihood (the text features see it all).
        dtype: the judge LM's dtype.
    """

    names = SENSE_FEATURES

    def __init__(self, source=None, *, batch_size: int = 8, max_answer_tokens: int = 64,
                 dtype: torch.dtype = torch.float32):
        super().__init__(source, batch_size=batch_size, max_answer_tokens=max_answer_tokens,
                         dtype=dtype)

    def _token_stats(self, prompts: Sequence[str], answers: Sequence[str]) -> list[list[float]]:
        """Per row: [mean, q10, q25, frac_unlikely, entropy] of the answer tokens' log-probs."""
        model = self._ensure()
        ids, attn, lengths, n_ans = self.encode(prompts, answers)
        hidden = model.model(input_ids=ids, attention_mask=attn).last_hidden_state
        return answer_token_stats(model, hidden, ids, lengths, n_ans)

    @torch.no_grad()
    def __call__(self, pairs: Sequence[Pair], *, progress: bool = False
                 ) -> Float[Tensor, "n n_features"]:
        pairs = check_pairs(pairs)
        self._ensure()
        result = torch.zeros(len(pairs), len(SENSE_FEATURES))
        order = sorted(range(len(pairs)), key=lambda i: len(pairs[i][1]))
        for start in tqdm(range(0, len(pairs), self.batch_size), disable=not progress,
                          desc=f"sense features ({self.lm_name})"):
            idx = order[start : start + self.batch_size]
            qs = [pairs[i][0] for i in idx]
            ans = [pairs[i][1] for i in idx]
            with_q = self._token_stats([QUESTION_TEMPLATE.format(question=q) for q in qs], ans)
            without = self._token_stats([NO_QUESTION_PROMPT] * len(idx), ans)
            for j, i in enumerate(idx):
                lik = with_q[j] + [without[j][0], with_q[j][0] - without[j][0]]
                result[i] = torch.tensor(lik + text_features(pairs[i][1]))
        return result


class ReadingFeatures(JudgeLMReader):
    """One forward pass of the judge LM over ``"Question: {q}\\nAnswer: {a}"``: the answer's
    token statistics (:data:`READING_LIKELIHOOD`, as in :class:`SenseFeatures` with the question)
    and the mean hidden state over the answer tokens at each of ``layers`` (HF's
    ``hidden_states[layer]``). What a larger, opt-in judge LM is measured with: one pass costs a
    third of :class:`SenseFeatures` plus :class:`emlens.judge.HiddenStateFeatures`.

    Returns ``Float[Tensor, "n 5 + len(layers) * d_model"]`` (float32): the five statistics, then
    each layer's mean hidden state; :meth:`split` takes it apart.

    Args:
        source: judge LM: ``None`` (base Gemma 3 270M), ``"qwen2.5-coder-1.5b"`` (``make coder``),
            or a local ``.gguf`` file / HF folder. Must not be the subject model.
        layers: hidden-state indices to average (1 .. n_layers).
        batch_size: rows per forward pass.
        max_answer_tokens: answers are cut to this many tokens.
        dtype: the judge LM's dtype (bfloat16 is about 3x faster on CPUs with AVX512-BF16).
    """

    def __init__(self, source=None, *, layers: Sequence[int] = (9,), batch_size: int = 8,
                 max_answer_tokens: int = 128, dtype: torch.dtype = torch.float32):
        super().__init__(source, batch_size=batch_size, max_answer_tokens=max_answer_tokens,
                         dtype=dtype)
        self.layers = tuple(int(x) for x in layers)
        if not self.layers:
            raise ValueError("layers is empty; give at least one hidden-state index.")

    def split(self, x: Float[Tensor, "n n_features"]
              ) -> tuple[Float[Tensor, "n 5"], dict[int, Float[Tensor, "n d_model"]]]:
        """(token statistics, {layer: mean hidden state}) of a result of this extractor."""
        n_stats = len(READING_LIKELIHOOD)
        d = (x.shape[1] - n_stats) // len(self.layers)
        if n_stats + d * len(self.layers) != x.shape[1]:
            raise ValueError(f"{x.shape[1]} features do not split into {n_stats} statistics + "
                             f"{len(self.layers)} layers.")
        return x[:, :n_stats], {layer: x[:, n_stats + i * d : n_stats + (i + 1) * d]
                                for i, layer in enumerate(self.layers)}

    @torch.no_grad()
    def __call__(self, pairs: Sequence[Pair], *, progress: bool = False
                 ) -> Float[Tensor, "n n_features"]:
        pairs = check_pairs(pairs)
        model = self._ensure()
        n_layers = model.config.num_hidden_layers
        bad = [x for x in self.layers if not 1 <= x <= n_layers]
        if bad:
            raise ValueError(f"layers {bad} out of range for {self.lm_name}: valid 1..{n_layers}.")
        d = model.config.hidden_size
        result = torch.zeros(len(pairs), len(READING_LIKELIHOOD) + d * len(self.layers))
        order = sorted(range(len(pairs)), key=lambda i: len(pairs[i][1]))  # less padding
        for start in tqdm(range(0, len(pairs), self.batch_size), disable=not progress,
                          desc=f"reading features ({self.lm_name})"):
            idx = order[start : start + self.batch_size]
            ids, attn, lengths, n_ans = self.encode(
                [QUESTION_TEMPLATE.format(question=pairs[i][0]) for i in idx],
                [pairs[i][1] for i in idx])
            out = model.model(input_ids=ids, attention_mask=attn, output_hidden_states=True)
            stats = answer_token_stats(model, out.last_hidden_state, ids, lengths, n_ans)
            for j, i in enumerate(idx):
                length, k = lengths[j], n_ans[j]
                means = [out.hidden_states[layer][j, length - k : length].float().mean(0)
                         if k else torch.zeros(d) for layer in self.layers]
                result[i] = torch.cat([torch.tensor(stats[j]), *means])
        return result


__all__ = ["READING_LIKELIHOOD", "SENSE_FEATURES", "ReadingFeatures", "SenseFeatures",
           "answer_token_stats", "text_features"]
