"""Batched, KV-cached generation on a HookedTransformer, with interventions.

``generate`` runs its own decode loop with a key-value cache. For the models emlens loads (Llama,
Qwen2) each step is :func:`emlens.decode.decode_forward`: TransformerLens's forward pass without
the work its cached path redoes at every step, firing every hook point that has a hook with the
tensor TransformerLens gives it; other models step through ``HookedTransformer.forward`` with
TransformerLens's own cache. Either way every hook on the model (from ``steer``/``ablate``
blocks, ``model.hooks`` or ``interventions=``, attached LoRA adapters) applies during generation
exactly as in a plain forward pass. It publishes the absolute position of each chunk to
position-aware hooks (see :mod:`emlens.hooks`), so ``positions="generated"`` touches only new
tokens, with or without the cache.

Sampling is reproducible per answer: each (prompt, sample) pair draws from its own generator
seeded from ``seed``, with the Gumbel-max trick, so an answer does not depend on the batch size or
on which other prompts share its batch. That is what lets a long run resume: ``rows=`` generates
only some (prompt, sample) pairs, and ``on_batch=`` hands each finished batch to the caller
(``emlens.evaluate`` commits it to its answer cache there), so a run killed mid-way and rerun
regenerates only the answers it had not finished, and they are the answers it would have given.
"""

from __future__ import annotations

import difflib
import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor
from tqdm.auto import tqdm
from transformer_lens import HookedTransformer
from transformer_lens.cache.key_value_cache import TransformerLensKeyValueCache

from emlens.chat import tokenize_chat
from emlens.decode import FastKVCache, decode_forward, fast_decode_blocker
from emlens.hooks import Hooks, generation_positions
from emlens.sampling import SamplingConfig

END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|end_of_text|>", "<|endoftext|>", "<end_of_turn>")


@dataclass(frozen=True)
class Generation:
    """One generated answer.

    Attributes:
        prompt_index: index of the prompt in the ``prompts`` list.
        sample: sample number, ``0 .. n_samples - 1``.
        prompt: the prompt (question) text as given.
        text: the decoded answer, without the end-of-turn token.
        tokens: ``Int[Tensor, "n_new"]`` the generated token ids, end-of-turn token included
            when the model stopped.
        finished: True when the model emitted an end-of-turn token before ``max_new_tokens``.
        logits: ``Float[Tensor, "n_new d_vocab"]`` the logits each token was chosen from, when
            ``generate(..., return_logits=True)``; else None.
    """

    prompt_index: int
    sample: int
    prompt: str
    text: str
    tokens: Int[Tensor, " n_new"]
    finished: bool
    logits: Float[Tensor, "n_new d_vocab"] | None = None


def stop_token_ids(tokenizer) -> set[int]:
    """End-of-turn token ids of a chat tokenizer (its EOS plus known end-of-turn markers)."""
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    vocab = tokenizer.get_vocab()
    ids |= {vocab[t] for t in END_OF_TURN_TOKENS if t in vocab}
    return ids


def _row_seed(seed: int, prompt_index: int, sample: int) -> int:
    digest = hashlib.sha256(f"{seed}:{prompt_index}:{sample}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def sample_next(
    logits: Float[Tensor, "batch d_vocab"],
    *,
    temperature: float,
    top_p: float,
    generators: Sequence[torch.Generator] | None,
) -> Int[Tensor, " batch"]:
    """Next token per row: greedy when ``temperature == 0``, else top-p sampling (Gumbel-max)."""
    if temperature == 0:
        return logits.argmax(-1)
    scores = logits.float() / temperature
    if top_p < 1.0:
        sorted_scores, order = scores.sort(dim=-1, descending=True)
        cum = sorted_scores.softmax(-1).cumsum(-1)
        # Drop a token when the mass before it already reaches top_p (the top token always stays).
        drop_sorted = (cum - sorted_scores.softmax(-1)) >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        scores = scores.masked_fill(drop, float("-inf"))
    assert generators is not None
    uniform = torch.stack(
        [torch.rand(scores.shape[-1], generator=g, device="cpu") for g in generators]
    ).to(scores.device)
    gumbel = -torch.log(-torch.log(uniform.clamp(min=1e-20, max=1 - 1e-7)))
    return (scores + gumbel).argmax(-1)


def _check_prompts(prompts) -> None:
    if isinstance(prompts, str):
        raise TypeError("prompts must be a list of strings, got a single string; wrap it in [ ].")
    if not isinstance(prompts, Sequence):
        raise TypeError(f"prompts must be a list of strings, got {type(prompts).__name__}.")
    if len(prompts) == 0:
        raise ValueError("prompts is empty; give at least one prompt.")
    for i, p in enumerate(prompts):
        if not isinstance(p, str):
            raise TypeError(f"prompts[{i}] is {type(p).__name__}; expected str.")


def check_interventions(model: HookedTransformer, interventions) -> Hooks:
    """Validate ``(hook_name, fn)`` pairs against ``model``; return them as a list.

    Raises ValueError naming a hook point the model does not have (with close matches), and
    TypeError for a malformed pair, before any forward pass.
    """
    if interventions is None:
        return []
    if isinstance(interventions, tuple) and len(interventions) == 2 and isinstance(interventions[0], str):
        raise TypeError("interventions must be a list of (hook_name, fn) pairs; wrap the pair in [ ].")
    pairs = list(interventions)
    for i, pair in enumerate(pairs):
        if not (isinstance(pair, tuple | list) and len(pair) == 2):
            raise TypeError(f"interventions[{i}] must be a (hook_name, fn) pair, got {pair!r:.80}.")
        name, fn = pair
        if not callable(fn):
            raise TypeError(f"interventions[{i}]: the hook function for {name!r} is not callable.")
        if callable(name):
            continue  # a TransformerLens name filter
        if not isinstance(name, str):
            raise TypeError(f"interventions[{i}]: hook name must be a str, got {type(name).__name__}.")
        if name not in model.hook_dict:
            close = difflib.get_close_matches(name, list(model.hook_dict), n=3)
            raise ValueError(
                f"interventions[{i}]: the model has no hook point {name!r}"
                + (f"; did you mean {close}?" if close else "")
                + " (list them with model.hook_dict.keys())."
            )
    return pairs


@torch.no_grad()
def generate(
    model: HookedTransformer,
    prompts: Sequence[str],
    *,
    sampling: SamplingConfig | None = None,
    stop_at_eos: bool = True,
    interventions: Hooks | None = None,
    use_cache: bool = True,
    progress: bool = True,
    return_logits: bool = False,
    rows: Sequence[tuple[int, int]] | None = None,
    on_batch: Callable[[list[Generation]], None] | None = None,
    **sampling_overrides: Any,
) -> list[Generation]:
    """Generate answers to chat prompts.

    Args:
        model: a HookedTransformer with a chat tokenizer. Hooks already on it apply.
        prompts: user questions; each is formatted with the chat template.
        sampling: a :class:`emlens.SamplingConfig` (n_samples, max_new_tokens, temperature,
            top_p, seed, batch_size, system_prompt); any of its fields may also be passed as a
            keyword, overriding it. Rows are prompts x samples, flattened prompt-major.
        stop_at_eos: stop a row at its first end-of-turn token.
        interventions: extra ``(hook_name, fn)`` pairs active during generation (e.g.
            ``emlens.steering_hooks(...)``), equivalent to an enclosing ``steer`` block.
        use_cache: use the KV cache (True) or re-run the whole sequence through the plain
            ``model(...)`` forward each step (slow; the reference the cached paths are tested
            against).
        progress: show a tqdm bar over batches.
        return_logits: keep each step's logits in ``Generation.logits`` (memory: n_new x d_vocab
            floats per answer; for tests and analysis).
        rows: the ``(prompt_index, sample)`` pairs to generate, in order (default: every pair,
            prompt-major). Each answer depends only on ``(seed, prompt_index, sample)``, so a
            subset gives the same answers as the full run.
        on_batch: called with each batch's :class:`Generation` list as soon as the batch is
            decoded (before the next one starts); e.g. :meth:`emlens.evaluation.AnswerStore.commit`.

    Returns:
        One :class:`Generation` per row: ``len(prompts) * n_samples`` of them, ordered
        prompt-major, unless ``rows`` is given.
    """
    cfg = SamplingConfig.resolve(sampling, sampling_overrides, "generate")
    _check_prompts(prompts)
    max_new_tokens, temperature, top_p = cfg.max_new_tokens, cfg.temperature, cfg.top_p
    n_samples, batch_size, seed, system_prompt = (cfg.n_samples, cfg.batch_size, cfg.seed,
                                                  cfg.system_prompt)
    rows = _check_rows(rows, len(prompts), n_samples)
    interventions = check_interventions(model, interventions)
    tokenizer = model.tokenizer
    if tokenizer is None:
        raise ValueError("model has no tokenizer; load it with emlens.load_model or set one.")
    _check_context(model, prompts, max_new_tokens, system_prompt)
    if seed is None:
        seed = int(torch.randint(0, 2**62, (1,)).item())
    stops = torch.tensor(sorted(stop_token_ids(tokenizer)), dtype=torch.long)
    device = model.cfg.device
    results: list[Generation] = []
    batches = range(0, len(rows), batch_size)
    with model.hooks(fwd_hooks=interventions):
        for start in tqdm(batches, desc="generate", disable=not progress, unit="batch"):
            chunk = rows[start : start + batch_size]
            batch = tokenize_chat(
                tokenizer, [prompts[p] for p, _ in chunk], system_prompt=system_prompt,
                device=device,
            )
            generators = None
            if temperature > 0:
                generators = [
                    torch.Generator().manual_seed(_row_seed(seed, p, s)) for p, s in chunk
                ]
            new, step_logits = _decode(
                model, batch.tokens, batch.attention_mask, max_new_tokens=max_new_tokens,
                temperature=temperature, top_p=top_p, generators=generators,
                stops=stops.to(device) if stop_at_eos else None, use_cache=use_cache,
                return_logits=return_logits,
            )
            decoded = []
            for i, ((p, s), ids) in enumerate(zip(chunk, new, strict=True)):
                finished = bool(stop_at_eos and len(ids) and ids[-1] in stops)
                text_ids = ids[:-1] if finished else ids
                decoded.append(
                    Generation(
                        prompt_index=p, sample=s, prompt=prompts[p],
                        text=tokenizer.decode(text_ids, skip_special_tokens=False),
                        tokens=ids, finished=finished,
                        logits=None if step_logits is None else step_logits[i, : len(ids)],
                    )
                )
            results.extend(decoded)
            if on_batch is not None:
                on_batch(decoded)
    return results


def _check_rows(rows, n_prompts: int, n_samples: int) -> list[tuple[int, int]]:
    """``rows`` as a list of ``(prompt_index, sample)`` pairs in range (default: all, prompt-major)."""
    if rows is None:
        return [(p, s) for p in range(n_prompts) for s in range(n_samples)]
    out = []
    for i, row in enumerate(rows):
        if not (isinstance(row, tuple | list) and len(row) == 2
                and all(isinstance(x, int) and not isinstance(x, bool) for x in row)):
            raise TypeError(f"rows[{i}] must be a (prompt_index, sample) pair of ints, got {row!r:.60}.")
        p, s = row
        if not (0 <= p < n_prompts and 0 <= s < n_samples):
            raise ValueError(f"rows[{i}] = {tuple(row)} is out of range: prompt_index must be in "
                             f"[0, {n_prompts}) and sample in [0, n_samples={n_samples}).")
        out.append((p, s))
    if len(set(out)) != len(out):
        raise ValueError("rows repeats a (prompt_index, sample) pair; give each pair once.")
    return out


def _check_context(
    model: HookedTransformer, prompts: Sequence[str], max_new_tokens: int, system_prompt: str | None
) -> None:
    """Refuse, before any work, a request whose longest prompt plus answer exceeds ``n_ctx``."""
    n_ctx = model.cfg.n_ctx
    batch = tokenize_chat(model.tokenizer, list(prompts), system_prompt=system_prompt)
    lengths = batch.attention_mask.sum(-1)
    longest = int(lengths.max())
    # A left-padded batch is as wide as its longest prompt; the answer continues from there.
    if longest + max_new_tokens > n_ctx:
        worst = int(lengths.argmax())
        raise ValueError(
            f"prompt {worst} is {longest} tokens with the chat template; with max_new_tokens="
            f"{max_new_tokens} the sequence would reach {longest + max_new_tokens} > the model's "
            f"context n_ctx={n_ctx}. Lower max_new_tokens to at most {max(0, n_ctx - longest)} "
            "or shorten the prompt (or load the model with a larger n_ctx)."
        )


def _decode(
    model: HookedTransformer,
    tokens: Int[Tensor, "batch pos"],
    attention_mask: Int[Tensor, "batch pos"],
    *,
    max_new_tokens: int,
    temperature: float,
    top_p: float,
    generators: Sequence[torch.Generator] | None,
    stops: Tensor | None,
    use_cache: bool,
    return_logits: bool = False,
) -> tuple[list[Tensor], Tensor | None]:
    """Decode loop for one left-padded batch.

    Returns each row's new tokens (cut after its first stop token) and, if ``return_logits``,
    the ``[batch, n_steps, d_vocab]`` logits they were chosen from.
    """
    n, prompt_len = tokens.shape
    device = tokens.device
    done = torch.zeros(n, dtype=torch.bool, device=device)
    out = torch.empty(n, 0, dtype=torch.long, device=device)
    fast = use_cache and fast_decode_blocker(model) is None
    if fast:
        cache = FastKVCache(model, n, prompt_len + max_new_tokens)
    elif use_cache:
        cache = TransformerLensKeyValueCache.init_cache(model.cfg, device, n)
    seq, mask = tokens, attention_mask
    kept: list[Tensor] = []
    with generation_positions(prompt_len) as state:
        step_input, step_mask = tokens, attention_mask
        for step in range(max_new_tokens):
            if use_cache:
                state.offset = 0 if step == 0 else prompt_len + step - 1
                if fast:
                    logits = decode_forward(model, step_input, cache, step_mask)
                else:
                    logits = model(step_input, attention_mask=step_mask, past_kv_cache=cache)
            else:
                state.offset = 0
                logits = model(seq, attention_mask=mask)
            if return_logits:
                kept.append(logits[:, -1].float().cpu())
            next_tok = sample_next(
                logits[:, -1], temperature=temperature, top_p=top_p, generators=generators
            )
            if stops is not None:
                # Finished rows keep emitting a stop token; they are cut below.
                next_tok = torch.where(done, stops[0], next_tok)
                done = done | torch.isin(next_tok, stops)
            out = torch.cat([out, next_tok[:, None]], dim=1)
            if bool(done.all()):
                break
            ones = torch.ones(n, 1, dtype=mask.dtype, device=device)
            if not use_cache:
                seq, mask = torch.cat([seq, next_tok[:, None]], 1), torch.cat([mask, ones], 1)
            step_input, step_mask = next_tok[:, None], ones
    rows = []
    for i in range(n):
        ids = out[i]
        if stops is not None:
            hit = torch.isin(ids, stops).nonzero()
            if len(hit):
                ids = ids[: int(hit[0]) + 1]
        rows.append(ids.cpu())
    return rows, (torch.stack(kept, dim=1) if return_logits else None)
