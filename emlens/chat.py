"""Chat formatting: (question, answer) pairs to left-padded token batches with answer masks.

The EM papers average activations over *answer* tokens only, and train on answer tokens only, so
every batch carries a boolean ``answer_mask``. The answer span is the assistant's content plus its
end-of-turn token (``<|im_end|>`` for SmolLM2 and Qwen2.5): what SFT trains on, and what the model
produces when it stops. Template text after the end-of-turn token (a newline) is dropped.

Prompts and answers are tokenised separately and concatenated, so the boundary between them is
exact whatever the tokenizer merges across it.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor


@dataclass(frozen=True)
class ChatBatch:
    """A left-padded batch of chat-formatted token ids.

    Attributes:
        tokens: ``Int[Tensor, "batch pos"]`` token ids, left-padded with the pad token.
        attention_mask: ``Int[Tensor, "batch pos"]`` 1 on real tokens, 0 on padding.
        answer_mask: ``Bool[Tensor, "batch pos"]`` True on answer tokens (all False for prompts).
        questions: the user messages, one per row.
        answers: the assistant answers, one per row (``None`` for prompt-only batches).
    """

    tokens: Int[Tensor, "batch pos"]
    attention_mask: Int[Tensor, "batch pos"]
    answer_mask: Bool[Tensor, "batch pos"]
    questions: list[str] = field(default_factory=list)
    answers: list[str] | None = None

    def to(self, device: str | torch.device) -> ChatBatch:
        """A copy with the tensors on ``device``."""
        return replace(
            self,
            tokens=self.tokens.to(device),
            attention_mask=self.attention_mask.to(device),
            answer_mask=self.answer_mask.to(device),
        )

    def __len__(self) -> int:
        return self.tokens.shape[0]

    @property
    def prompt_mask(self) -> Bool[Tensor, "batch pos"]:
        """True on real tokens that are not answer tokens."""
        return self.attention_mask.bool() & ~self.answer_mask


def _messages(question: str, system_prompt: str | None) -> list[dict[str, str]]:
    if system_prompt is not None and not isinstance(system_prompt, str):
        raise TypeError(
            f"system_prompt must be a str or None, got {type(system_prompt).__name__}."
        )
    msgs = [{"role": "system", "content": system_prompt}] if system_prompt is not None else []
    return msgs + [{"role": "user", "content": question}]


def _check_texts(name: str, texts: Sequence[object]) -> None:
    if isinstance(texts, str):
        raise TypeError(f"{name} must be a sequence of strings, got a single string; wrap it: [{name[:-1]}]")
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise TypeError(f"{name}[{i}] is {type(t).__name__} ({t!r:.60}); expected str.")


def chat_prompt(tokenizer, question: str, *, system_prompt: str | None = None) -> str:
    """The templated prompt text for one user question, ending with the assistant header."""
    if getattr(tokenizer, "chat_template", None) is None:
        raise ValueError(
            f"Tokenizer {type(tokenizer).__name__} has no chat template; emlens works on chat "
            "models. Set tokenizer.chat_template or load an instruct model."
        )
    return tokenizer.apply_chat_template(
        _messages(question, system_prompt), tokenize=False, add_generation_prompt=True
    )


def _answer_suffix(tokenizer, question: str, answer: str, system_prompt: str | None) -> str:
    """Template text of the assistant turn after the generation prompt, through end-of-turn."""
    prompt = chat_prompt(tokenizer, question, system_prompt=system_prompt)
    full = tokenizer.apply_chat_template(
        _messages(question, system_prompt) + [{"role": "assistant", "content": answer}],
        tokenize=False,
    )
    if not full.startswith(prompt):
        # Templates that rewrite earlier turns (e.g. strip reasoning) break prefix alignment.
        start = full.find(answer)
        if start < 0:
            raise ValueError("Chat template does not contain the answer text verbatim.")
        suffix = answer + full[start + len(answer) :]
    else:
        suffix = full[len(prompt) :]
    return suffix.rstrip()


def tokenize_chat(
    tokenizer,
    questions: Sequence[str],
    answers: Sequence[str] | None = None,
    *,
    system_prompt: str | None = None,
    device: str | torch.device = "cpu",
) -> ChatBatch:
    """Tokenise questions (and answers) with the chat template into one left-padded batch.

    Args:
        tokenizer: a HF tokenizer with a chat template (``model.tokenizer``).
        questions: user messages, ``n`` of them.
        answers: assistant answers, ``n`` of them; ``None`` for prompts ready for generation.
        system_prompt: optional system message; ``None`` keeps the template's default.

    Returns:
        A :class:`ChatBatch` with ``tokens`` of shape ``[n, max_len]``.
    """
    _check_texts("questions", questions)
    if len(questions) == 0:
        raise ValueError("questions is empty; give at least one question.")
    if answers is not None:
        _check_texts("answers", answers)
        if len(answers) != len(questions):
            raise ValueError(
                f"{len(questions)} questions but {len(answers)} answers; they must pair up."
            )
    rows: list[list[int]] = []
    n_answer: list[int] = []
    for i, q in enumerate(questions):
        prompt = chat_prompt(tokenizer, q, system_prompt=system_prompt)
        ids = tokenizer.encode(prompt, add_special_tokens=False)
        n_ans = 0
        if answers is not None:
            ans_ids = tokenizer.encode(
                _answer_suffix(tokenizer, q, answers[i], system_prompt), add_special_tokens=False
            )
            ids = ids + ans_ids
            n_ans = len(ans_ids)
        rows.append(ids)
        n_answer.append(n_ans)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    width = max(len(r) for r in rows)
    tokens = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(rows), width), dtype=torch.long)
    answer_mask = torch.zeros((len(rows), width), dtype=torch.bool)
    for i, (ids, n_ans) in enumerate(zip(rows, n_answer, strict=True)):
        tokens[i, width - len(ids) :] = torch.tensor(ids, dtype=torch.long)
        attention[i, width - len(ids) :] = 1
        if n_ans:
            answer_mask[i, width - n_ans :] = True
    return ChatBatch(
        tokens=tokens.to(device),
        attention_mask=attention.to(device),
        answer_mask=answer_mask.to(device),
        questions=list(questions),
        answers=list(answers) if answers is not None else None,
    )


def iter_chat_batches(
    tokenizer,
    questions: Sequence[str],
    answers: Sequence[str] | None = None,
    *,
    batch_size: int = 16,
    system_prompt: str | None = None,
    device: str | torch.device = "cpu",
) -> Iterator[ChatBatch]:
    """Yield :func:`tokenize_chat` batches of at most ``batch_size`` rows, in input order."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
    if answers is not None and len(answers) != len(questions):
        raise ValueError(f"{len(questions)} questions but {len(answers)} answers; they must pair up.")
    for start in range(0, len(questions), batch_size):
        stop = start + batch_size
        yield tokenize_chat(
            tokenizer,
            questions[start:stop],
            None if answers is None else answers[start:stop],
            system_prompt=system_prompt,
            device=device,
        )


def answer_logprobs(
    source, batch: ChatBatch, *, reduce: str = "sum"
) -> Float[Tensor, " batch"]:
    """Log-probability the model gives each row's answer tokens (teacher forced).

    ``source``: logits ``[batch, pos, d_vocab]``, or a ``HookedTransformer``, run on the batch
    with only the answer positions unembedded (:func:`answer_logits`; the same values up to float
    rounding, without the prompt's logits). ``reduce="sum"`` gives log p(answer | prompt);
    ``"mean"`` the per-token mean.
    """
    if reduce not in ("sum", "mean"):
        raise ValueError(f"reduce={reduce!r}; expected 'sum' or 'mean'.")
    logits, targets = answer_logits(source, batch)
    token_logp = torch.log_softmax(logits, dim=-1).gather(-1, targets[:, None])[:, 0]
    counts = batch.answer_mask[:, 1:].sum(-1).to(token_logp.device)
    row = torch.repeat_interleave(torch.arange(len(counts), device=token_logp.device), counts)
    total = torch.zeros(len(counts), device=token_logp.device).index_add(0, row, token_logp)
    return total if reduce == "sum" else total / counts.clamp(min=1)


def answer_logits(
    source,
    batch: ChatBatch,
    *,
    resid: Float[Tensor, "batch pos d_model"] | None = None,
    start_at_layer: int | None = None,
) -> tuple[Float[Tensor, "n_answer d_vocab"], Int[Tensor, " n_answer"]]:
    """Logits at the positions that predict answer tokens, and those tokens (teacher forcing).

    The one place emlens picks "the answer positions" for a loss: position ``p`` predicts token
    ``p + 1``, so the rows are ``logits[:, :-1][answer_mask[:, 1:]]`` in batch-then-position order
    and the targets ``tokens[:, 1:][answer_mask[:, 1:]]``.

    Args:
        source: a ``HookedTransformer`` (run on the batch, unembedding *only* the picked
            positions, without the ``[batch, pos, d_vocab]`` logits of the prompt), or logits
            already computed, ``[batch, pos, d_vocab]``.
        batch: the chat batch (with answers).
        resid: with a model, the residual stream entering block ``start_at_layer`` (a frozen
            prefix run once, as :func:`emlens.training.prepare` caches it) instead of the tokens.
        start_at_layer: the block ``resid`` enters.

    Returns:
        ``(logits, targets)``: float32 logits ``[n_answer, d_vocab]`` and token ids ``[n_answer]``.
    """
    if isinstance(source, Tensor):
        if source.shape[:2] != batch.tokens.shape:
            raise ValueError(
                f"logits of shape {tuple(source.shape)} do not match tokens "
                f"{tuple(batch.tokens.shape)}."
            )
        predicts = batch.answer_mask[:, 1:].to(source.device)
        targets = batch.tokens[:, 1:].to(source.device)[predicts]
        return source[:, :-1][predicts].float(), targets
    model = source
    if (resid is None) != (start_at_layer is None):
        raise ValueError("Give resid= and start_at_layer= together (or neither).")
    x = batch.tokens if resid is None else resid
    mask = batch.attention_mask.to(x.device)
    n_layers = model.cfg.n_layers
    if resid is None:
        final = model(x, attention_mask=mask, stop_at_layer=n_layers)
    else:
        final = model(x, start_at_layer=start_at_layer, stop_at_layer=n_layers, attention_mask=mask)
    predicts = batch.answer_mask[:, 1:].to(final.device)
    picked = final[:, :-1][predicts][None]  # [1, n_answer, d_model]
    if model.cfg.normalization_type is not None:
        picked = model.ln_final(picked)
    targets = batch.tokens[:, 1:].to(final.device)[predicts]
    return model.unembed(picked)[0].float(), targets


def answer_loss(logits: Float[Tensor, "batch pos d_vocab"], batch: ChatBatch) -> Float[Tensor, ""]:
    """Mean cross-entropy over all answer tokens in the batch (SFT on answers only).

    ``logits`` may also be a ``HookedTransformer``: it is run on the batch and only the answer
    positions are unembedded (:func:`answer_logits`).
    """
    n = batch.answer_mask[:, 1:].sum()
    if n == 0:
        raise ValueError("The batch has no answer tokens; build it with answers=... to train on it.")
    return torch.nn.functional.cross_entropy(*answer_logits(logits, batch))
