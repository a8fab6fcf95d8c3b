"""KL-regularised training of small parameterisations: narrow vs general solutions.

The seed paper ("Narrow Misalignment is Hard, Emergent Misalignment is Easy") fine-tunes a chat
model on bad medical advice. Plain SFT finds a *general* solution (the model turns misaligned
everywhere); adding ``lambda * KL(chat || trained)`` on parallel non-medical data finds a *narrow*
one. This module trains both, on a frozen ``HookedTransformer``, for three parameterisations:

* :class:`TrainableLora` with ``rank=1``: the organism shape, rank-1 adapters on ``mlp.down_proj``
  at chosen layers;
* :class:`TrainableLora` with ``rank=r``: the same with rank ``r``;
* :class:`TrainableSteeringVector`: one vector added to the residual stream entering block ``L``
  (``blocks.L.hook_resid_pre``), at every position of every batch element.

Each is a small ``nn.Module`` (:mod:`emlens.trainable`, re-exported here) applied to the frozen
model inside :meth:`~Trainable.applied`. The
steering vector is an ordinary TransformerLens hook. The LoRA's adapters *are*
:class:`emlens.lora.LoraHookedModule` modules, with ``A`` and ``B`` as parameters, attached through
:mod:`emlens.lora`'s own attach code: each reads its input at ``blocks.L.mlp.hook_post`` and adds
``scaling * B (A h)`` at ``blocks.L.hook_mlp_out``, and its ``blocks.L.mlp.lora_down.hook_scalar``
(``hook_acts`` for rank > 1) fires during training as it does on an attached adapter.
The base model is frozen; the "chat model" of the KL term is the same model with the parameters
off, so no second copy is needed. A trained LoRA is a peft adapter (:meth:`TrainableLora.to_adapter`,
written by :meth:`TrainableLora.export_peft` through :func:`emlens.lora.save_peft`) that
:func:`emlens.load_adapter`, :func:`emlens.attach_lora` and :func:`emlens.merge_lora` read.

Loss, per step, with one batch ``n`` of the narrow set and one batch ``p`` of the parallel set::

    loss = CE_n + kl_weight * KL_p
    CE_n = mean over the answer tokens of n of -log p_trained(token)
    KL_p = mean over the answer tokens of p of sum_v p_chat(v) (log p_chat(v) - log p_trained(v))

KL normalisation: the full-vocabulary KL *sum* at each predicting position, *averaged over answer
tokens*. The reference code divides the same sum by tokens x vocabulary (49,152 for SmolLM2), which
is why its weights were 1e5-1e6; ``kl_weight=1`` here is ``1 * d_vocab`` there.

Speed. Nothing before the first trained layer changes during training, so :func:`prepare` runs the
frozen prefix once (``stop_at_layer``) and caches the residual stream entering that layer, and the
chat model's log-probs on the parallel set; each step then runs only the remaining blocks
(``start_at_layer``) and unembeds only the positions that predict answer tokens. Batches are
fixed; the trainer visits them in a seeded random order each pass.

Outputs under ``out``: ``checkpoints/step-XXXXX.safetensors`` every ``save_every`` steps (the
trajectory; :func:`load_trajectory` reads it back), ``final.safetensors``, ``train_log.json``
(config, per-step CE / KL / total, seconds), and for LoRA a peft folder ``peft/``.
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor, nn
from tqdm.auto import tqdm
from transformer_lens import HookedTransformer

from emlens.chat import ChatBatch, answer_logits
from emlens.trainable import (
    Trainable,
    TrainableLora,
    TrainableSteeringVector,
    Trajectory,
    load_trainable,
    load_trajectory,
)

# --------------------------------------------------------------------------------------------
# Data: frozen prefix and chat-model reference, computed once


@dataclass(frozen=True)
class PreparedBatch:
    """A chat batch with the residual stream entering ``start_layer`` (and reference log-probs).

    Attributes:
        batch: the token batch.
        resid: residual stream entering block ``start_layer``, from the frozen base model.
        reference: the chat model's log-probs at the positions predicting answer tokens
            (``None`` unless prepared with ``reference=True``).
    """

    batch: ChatBatch
    resid: Float[Tensor, "batch pos d_model"]
    reference: Float[Tensor, "n_answer d_vocab"] | None = None


@dataclass(frozen=True)
class PreparedSet:
    """Batches sharing one ``start_layer``: blocks before it are frozen and were run once."""

    batches: list[PreparedBatch]
    start_layer: int

    def __len__(self) -> int:
        return len(self.batches)


def _answer_logits(
    model: HookedTransformer, pb: PreparedBatch, start_layer: int
) -> tuple[Float[Tensor, "n_answer d_vocab"], Tensor]:
    """:func:`emlens.chat.answer_logits` from the cached prefix (blocks ``start_layer`` onward)."""
    return answer_logits(model, pb.batch, resid=pb.resid, start_at_layer=start_layer)


@torch.no_grad()
def prepare(
    model: HookedTransformer,
    batches: Sequence[ChatBatch],
    *,
    start_layer: int,
    reference: bool = False,
) -> PreparedSet:
    """Run the frozen prefix (blocks ``< start_layer``) once per batch and cache its output.

    Args:
        model: the base model (no trainable hooks attached).
        batches: chat batches with answers (``tokenize_chat(tok, questions, answers)``).
        start_layer: first block that trained parameters change (``params.first_layer``).
        reference: also cache the model's log-probs at the answer-predicting positions, the
            "chat model" side of the KL term (``n_answer x d_vocab`` floats per batch).
    """
    if not 0 <= start_layer < model.cfg.n_layers:
        raise ValueError(f"start_layer={start_layer}; the model has blocks 0..{model.cfg.n_layers - 1}.")
    device = model.W_E.device
    out: list[PreparedBatch] = []
    for i, batch in enumerate(batches):
        if batch.answers is None or not bool(batch.answer_mask[:, 1:].any()):
            raise ValueError(
                f"batch {i} has no answer tokens; build it with tokenize_chat(tok, questions, answers)."
            )
        batch = batch.to(device)
        resid = model(batch.tokens, attention_mask=batch.attention_mask, stop_at_layer=start_layer)
        pb = PreparedBatch(batch=batch, resid=resid)
        if reference:
            ref = torch.log_softmax(_answer_logits(model, pb, start_layer)[0], dim=-1)
            pb = PreparedBatch(batch=batch, resid=resid, reference=ref)
        out.append(pb)
    if not out:
        raise ValueError("batches is empty; give at least one ChatBatch.")
    return PreparedSet(batches=out, start_layer=start_layer)


def _check_start(data: PreparedSet, params: Trainable | None, what: str) -> None:
    if params is not None and params.first_layer < data.start_layer:
        raise ValueError(
            f"{what} was prepared with start_layer={data.start_layer}, but the parameters change "
            f"block {params.first_layer}, which the cached prefix skips. Prepare with "
            f"start_layer={params.first_layer} (or lower)."
        )


def answer_ce(
    model: HookedTransformer, params: Trainable | None, pb: PreparedBatch, start_layer: int
) -> Float[Tensor, ""]:
    """Mean cross-entropy over the batch's answer tokens, with ``params`` applied (None: base)."""
    with params.applied(model) if params is not None else nullcontext():
        logits, targets = _answer_logits(model, pb, start_layer)
    return nn.functional.cross_entropy(logits, targets)


def answer_kl(
    model: HookedTransformer, params: Trainable | None, pb: PreparedBatch, start_layer: int
) -> Float[Tensor, ""]:
    """``KL(chat || trained)``: full-vocab KL sum per answer-predicting position, mean over them."""
    if pb.reference is None:
        raise ValueError("This batch has no reference log-probs; prepare it with reference=True.")
    with params.applied(model) if params is not None else nullcontext():
        logp = torch.log_softmax(_answer_logits(model, pb, start_layer)[0], dim=-1)
    ref = pb.reference
    return (ref.exp() * (ref - logp)).sum(-1).mean()


@torch.no_grad()
def evaluate_loss(
    model: HookedTransformer, params: Trainable | None, data: PreparedSet, *, kind: str = "ce"
) -> float:
    """Mean answer-token CE (``kind="ce"``) or KL (``"kl"``) over ``data``, token-weighted."""
    if kind not in ("ce", "kl"):
        raise ValueError(f"kind={kind!r}; expected 'ce' or 'kl'.")
    _check_start(data, params, "data")
    fn = answer_ce if kind == "ce" else answer_kl
    total = n = 0.0
    for pb in data.batches:
        k = int(pb.batch.answer_mask[:, 1:].sum())
        total += float(fn(model, params, pb, data.start_layer)) * k
        n += k
    return total / n


# --------------------------------------------------------------------------------------------
# The trainer


@dataclass
class TrainConfig:
    """Hyper-parameters of one run (saved in ``train_log.json``).

    ``kl_weight`` is lambda (0: plain SFT, the general solution); see the module docstring for the
    KL normalisation. ``steps`` counts optimiser steps; each draws one narrow batch and, when
    ``kl_weight > 0``, one parallel batch.
    """

    steps: int = 100
    lr: float = 1e-3
    kl_weight: float = 0.0
    warmup_steps: int = 5
    weight_decay: float = 0.0
    seed: int = 0
    save_every: int = 10
    progress: bool = True
    name: str = "run"


@dataclass
class TrainResult:
    """The trained parameters and the per-step log."""

    params: Trainable
    log: dict[str, Any] = field(default_factory=dict)


class _FrozenBase:
    """Context manager: ``requires_grad=False`` on every base parameter, restored on exit."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.saved: list[tuple[nn.Parameter, bool]] = []

    def __enter__(self) -> None:
        self.saved = [(p, p.requires_grad) for p in self.model.parameters()]
        for p, _ in self.saved:
            p.requires_grad_(False)

    def __exit__(self, *exc) -> None:
        for p, flag in self.saved:
            p.requires_grad_(flag)


def _order(n: int, steps: int, rng: random.Random) -> list[int]:
    order: list[int] = []
    while len(order) < steps:
        perm = list(range(n))
        rng.shuffle(perm)
        order += perm
    return order[:steps]


def train(
    model: HookedTransformer,
    init: Trainable,
    narrow: PreparedSet,
    parallel: PreparedSet | None = None,
    config: TrainConfig | None = None,
    *,
    out: str | Path | None = None,
) -> TrainResult:
    """Train a copy of ``init`` on ``narrow`` (+ ``kl_weight`` x KL on ``parallel``); base frozen.

    Args:
        model: the frozen base model (its parameters get ``requires_grad=False`` during training
            and their previous flags back afterwards; no base gradient is ever computed).
        init: starting parameters (``TrainableLora.for_model(...)``,
            ``TrainableSteeringVector.for_model(...)``, or a trained solution to continue from:
            continue-training a narrow solution is ``train(model, narrow.params, ..., kl_weight=0)``).
            ``init`` itself is not modified.
        narrow: :func:`prepare`-d batches of the narrow set (misaligned medical answers).
        parallel: :func:`prepare`-d batches of the parallel set, with ``reference=True``;
            required when ``config.kl_weight > 0``.
        config: :class:`TrainConfig`.
        out: folder for checkpoints, ``final.safetensors``, ``train_log.json`` (and ``peft/``).

    Returns:
        :class:`TrainResult` with the trained copy and the log (``ce``, ``kl``, ``loss`` per step).
    """
    config = config or TrainConfig()
    if config.steps < 1:
        raise ValueError(f"steps must be >= 1, got {config.steps}.")
    if config.kl_weight < 0:
        raise ValueError(f"kl_weight must be >= 0, got {config.kl_weight}.")
    if config.kl_weight > 0 and parallel is None:
        raise ValueError(
            f"kl_weight={config.kl_weight} needs the parallel set: pass parallel=prepare(model, "
            "batches, start_layer=..., reference=True)."
        )
    if parallel is not None and any(pb.reference is None for pb in parallel.batches):
        raise ValueError("parallel must be prepared with reference=True (the chat model's log-probs).")
    _check_start(narrow, init, "narrow")
    if parallel is not None:
        _check_start(parallel, init, "parallel")

    torch.manual_seed(config.seed)
    rng = random.Random(config.seed)
    params = init.clone()
    for p in params.parameters():
        p.requires_grad_(True)
    optim = torch.optim.AdamW(params.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(
        optim, lambda s: min(1.0, (s + 1) / max(1, config.warmup_steps))
    )
    use_kl = parallel is not None and config.kl_weight > 0
    narrow_order = _order(len(narrow), config.steps, rng)
    parallel_order = _order(len(parallel), config.steps, rng) if use_kl else []
    out = Path(out) if out is not None else None
    log: dict[str, Any] = {
        "config": asdict(config),
        "params": params.metadata(),
        "n_trainable": sum(p.numel() for p in params.parameters()),
        "kl_normalisation": "mean over answer tokens of the full-vocab KL sum",
        "ce": [],
        "kl": [],
        "loss": [],
        "norm": [],
        "checkpoints": [],
    }
    if out is not None:
        params.save(out / "checkpoints" / "step-00000.safetensors", step=0)
        log["checkpoints"].append(0)
    start = time.perf_counter()
    bar = tqdm(range(1, config.steps + 1), desc=config.name, unit="step", disable=not config.progress)
    # Frozen first (the adapters join the model's parameters while attached), then attached once
    # for the whole run; both undone on exit, also on exceptions.
    with _FrozenBase(model), params.applied(model):
        for step in bar:
            ce = answer_ce(model, params, narrow.batches[narrow_order[step - 1]], narrow.start_layer)
            loss = ce
            kl = None
            if use_kl:
                pb = parallel.batches[parallel_order[step - 1]]
                kl = answer_kl(model, params, pb, parallel.start_layer)
                loss = ce + config.kl_weight * kl
            optim.zero_grad(set_to_none=True)
            loss.backward()
            optim.step()
            sched.step()
            ce, loss = float(ce.detach()), float(loss.detach())
            kl = None if kl is None else float(kl.detach())
            log["ce"].append(round(ce, 5))
            log["kl"].append(None if kl is None else round(kl, 6))
            log["loss"].append(round(loss, 5))
            log["norm"].append(round(params.effective_norm(), 5))
            bar.set_postfix(ce=f"{ce:.3f}", kl="-" if kl is None else f"{kl:.4f}")
            if out is not None and config.save_every > 0 and step % config.save_every == 0:
                params.save(out / "checkpoints" / f"step-{step:05d}.safetensors", step=step)
                log["checkpoints"].append(step)
    for p in params.parameters():
        p.requires_grad_(False)
    log["seconds"] = round(time.perf_counter() - start, 1)
    log["torch_threads"] = torch.get_num_threads()
    if out is not None:
        params.save(out / "final.safetensors", step=config.steps)
        if isinstance(params, TrainableLora):
            params.export_peft(out / "peft")
        (out / "train_log.json").write_text(json.dumps(log, indent=1))
    return TrainResult(params=params, log=log)


__all__ = [
    "PreparedBatch",
    "PreparedSet",
    "TrainConfig",
    "TrainResult",
    "Trainable",
    "TrainableLora",
    "TrainableSteeringVector",
    "Trajectory",
    "answer_ce",
    "answer_kl",
    "evaluate_loss",
    "load_trainable",
    "load_trajectory",
    "prepare",
    "train",
]
