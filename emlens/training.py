"""The one trainer: small parameterisations of a frozen model, with an optional KL term.

The seed paper ("Narrow Misalignment is Hard, Emergent Misalignment is Easy") fine-tunes a chat
model on bad medical advice. Plain SFT finds a *general* solution (the model turns misaligned
everywhere); adding ``lambda * KL(chat || trained)`` on parallel non-medical data finds a *narrow*
one. :func:`train` does both (``kl_weight=0`` is plain fine-tuning), on a frozen
``HookedTransformer``, for any :class:`~emlens.trainable.Trainable`:

* :class:`TrainableSteeringVector`: one vector added to the residual stream entering block ``L``
  (``blocks.L.hook_resid_pre``), at every position of every batch element;
* :class:`TrainableLora`: rank-``r`` adapters on ``mlp.down_proj`` at chosen layers;
* :class:`TrainableAdapter`: peft LoRA on any target modules, what an organism recipe
  (:mod:`emlens.organisms.train`) trains through this same function.

Each is a small ``nn.Module`` (:mod:`emlens.trainable`, :mod:`emlens.trainable_adapter`) applied
to the frozen model inside :meth:`~Trainable.applied`; LoRA adapters *are*
:class:`emlens.lora.LoraHookedModule` modules attached by :mod:`emlens.lora`'s attach code, so
their ``hook_scalar`` fires during training as on an attached adapter. The "chat model" of the KL
term is the same model with the parameters off, so no second copy is needed.

Loss, per step, with one batch ``n`` of the narrow set and one batch ``p`` of the parallel set::

    loss = CE_n + kl_weight * KL_p
    CE_n = mean over the answer tokens of n of -log p_trained(token)
    KL_p = mean over the answer tokens of p of sum_v p_chat(v) (log p_chat(v) - log p_trained(v))

KL normalisation: the full-vocabulary KL *sum* at each predicting position, *averaged over answer
tokens*. The reference code divides the same sum by tokens x vocabulary (49,152 for SmolLM2), which
is why its weights were 1e5-1e6; ``kl_weight=1`` here is ``1 * d_vocab`` there.

Optimiser: AdamW with a linear warm-up, ``lr * min(1, step / warmup_steps)`` at step ``step``
(:meth:`TrainConfig.lr_at`, set on the optimiser before each step; no ``lr_scheduler``, so a
resumed run needs no replay).

Speed. Nothing before the first trained layer changes during training, so :func:`prepare` runs the
frozen prefix once (``stop_at_layer``) and caches the residual stream entering that layer, and the
chat model's log-probs on the parallel set; each step then runs only the remaining blocks
(``start_at_layer``) and unembeds only the positions that predict answer tokens. Batches are
fixed; the trainer visits them in a seeded random order each pass (``shuffle=True``) or in the
order given. Sets whose batches are each visited once (an organism's epochs) skip the cache
(``prepare(..., start_layer=None)``): it would save nothing.

Outputs under ``out`` (:mod:`emlens.train_runs`): ``checkpoints/step-XXXXX.safetensors`` at step 0
and every ``save_every`` steps (the trajectory; :func:`load_trajectory` reads it back), with the
state to resume from (``resume/``, removed when the run completes), ``final.safetensors``,
``train_log.json`` (config, per-step CE / KL / total / lr / norm / tokens, seconds), and for LoRA
runs the peft export (``adapter_config.json`` + ``adapter_model.safetensors``) in ``out`` itself.
An interrupted run called again with the same arguments carries on from its last checkpoint and
ends with the parameters an uninterrupted one gives.
"""

from __future__ import annotations

import json
import math
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

from emlens import train_runs
from emlens.chat import ChatBatch, answer_logits
from emlens.train_runs import load_checkpoint, load_trainable, load_trajectory
from emlens.trainable import Trainable, TrainableLora, TrainableSteeringVector, Trajectory
from emlens.trainable_adapter import TrainableAdapter

# --------------------------------------------------------------------------------------------
# Data: frozen prefix and chat-model reference, computed once


@dataclass(frozen=True)
class PreparedBatch:
    """A chat batch with the residual stream entering ``start_layer`` (and reference log-probs).

    Attributes:
        batch: the token batch.
        resid: residual stream entering block ``start_layer``, from the frozen base model;
            ``None`` when not cached (the losses run the model from the tokens).
        reference: the chat model's log-probs at the positions predicting answer tokens
            (``None`` unless prepared with ``reference=True``).
    """

    batch: ChatBatch
    resid: Float[Tensor, "batch pos d_model"] | None
    reference: Float[Tensor, "n_answer d_vocab"] | None = None


@dataclass(frozen=True)
class PreparedSet:
    """Batches sharing one ``start_layer``: blocks before it are frozen and were run once
    (``start_layer=0`` and no cached ``resid``: nothing was run ahead)."""

    batches: list[PreparedBatch]
    start_layer: int

    def __len__(self) -> int:
        return len(self.batches)


def _answer_logits(
    model: HookedTransformer, pb: PreparedBatch, start_layer: int
) -> tuple[Float[Tensor, "n_answer d_vocab"], Tensor]:
    """:func:`emlens.chat.answer_logits` from the cached prefix (blocks ``start_layer`` onward),
    or from the tokens when the batch has none."""
    if pb.resid is None:
        return answer_logits(model, pb.batch)
    return answer_logits(model, pb.batch, resid=pb.resid, start_at_layer=start_layer)


@torch.no_grad()
def prepare(
    model: HookedTransformer,
    batches: Sequence[ChatBatch],
    *,
    start_layer: int | None,
    reference: bool = False,
) -> PreparedSet:
    """Run the frozen prefix (blocks ``< start_layer``) once per batch and cache its output.

    Args:
        model: the base model (no trainable hooks attached).
        batches: chat batches with answers (``tokenize_chat(tok, questions, answers)``).
        start_layer: first block that trained parameters change (``params.first_layer``);
            ``None``: cache nothing, every step runs the whole model (for batches visited once,
            such as an organism's epochs, where a cache saves no time and costs memory).
        reference: also cache the model's log-probs at the answer-predicting positions, the
            "chat model" side of the KL term (``n_answer x d_vocab`` floats per batch).
    """
    if start_layer is not None and not 0 <= start_layer < model.cfg.n_layers:
        raise ValueError(f"start_layer={start_layer}; the model has blocks 0..{model.cfg.n_layers - 1} "
                         "(or None: no cached prefix).")
    device = model.W_E.device
    out: list[PreparedBatch] = []
    for i, batch in enumerate(batches):
        if batch.answers is None or not bool(batch.answer_mask[:, 1:].any()):
            raise ValueError(
                f"batch {i} has no answer tokens; build it with tokenize_chat(tok, questions, answers)."
            )
        batch = batch.to(device)
        resid = None
        if start_layer is not None:
            resid = model(batch.tokens, attention_mask=batch.attention_mask,
                          stop_at_layer=start_layer)
        pb = PreparedBatch(batch=batch, resid=resid)
        if reference:
            ref = torch.log_softmax(_answer_logits(model, pb, start_layer or 0)[0], dim=-1)
            pb = PreparedBatch(batch=batch, resid=resid, reference=ref)
        out.append(pb)
    if not out:
        raise ValueError("batches is empty; give at least one ChatBatch.")
    return PreparedSet(batches=out, start_layer=start_layer or 0)


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


@dataclass(frozen=True)
class TrainConfig:
    """Hyper-parameters of one run (saved in ``train_log.json``; a resumed run must match them).

    Attributes:
        steps: optimiser steps; each draws one narrow batch and, when ``kl_weight > 0``, one
            parallel batch.
        lr: AdamW's learning rate after the warm-up.
        kl_weight: lambda of the KL term; 0 is plain fine-tuning (the general solution). See the
            module docstring for the KL normalisation.
        warmup_steps: the learning rate rises linearly to ``lr`` over these steps (:meth:`lr_at`).
        weight_decay: AdamW's decoupled weight decay.
        seed: seeds the batch order (and torch's RNG at the start of the run).
        save_every: a checkpoint (and the state to resume from) every this many steps, and at
            step 0; 0: none, so the run cannot resume.
        shuffle: visit the batches in a seeded random order each pass; False: in the order given
            (an organism's batches, already drawn epoch by epoch).
        progress: show a progress bar (not part of the run's identity).
        name: the progress bar's label (not part of the run's identity).
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
    shuffle: bool = True

    def __post_init__(self) -> None:
        for key, low in (("steps", 1), ("warmup_steps", 0), ("seed", 0), ("save_every", 0)):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{key} must be an int >= {low}, got {value!r}.")
        for key, low in (("lr", 0.0), ("kl_weight", 0.0), ("weight_decay", 0.0)):
            value = getattr(self, key)
            if not isinstance(value, int | float) or not math.isfinite(value) or value < low:
                raise ValueError(f"{key} must be a finite number >= {low:g}, got {value!r}.")
        if self.lr == 0:
            raise ValueError("lr must be > 0, got 0.")

    def lr_at(self, step: int) -> float:
        """The learning rate of step ``step`` (1-based): ``lr * min(1, step / warmup_steps)``."""
        return self.lr * min(1.0, step / max(1, self.warmup_steps))


@dataclass
class TrainResult:
    """The trained parameters and the log (as written to ``train_log.json``)."""

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


def _order(n: int, steps: int, rng: random.Random, shuffle: bool) -> list[int]:
    if not shuffle:
        return [i % n for i in range(steps)]
    order: list[int] = []
    while len(order) < steps:
        perm = list(range(n))
        rng.shuffle(perm)
        order += perm
    return order[:steps]


def _check_inputs(init: Trainable, narrow: PreparedSet, parallel: PreparedSet | None,
                  config: TrainConfig) -> None:
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


_PER_STEP = ("ce", "kl", "loss", "lr", "norm", "step_tokens", "step_answer_tokens")
_LOG_KEYS = {"config", "params", "n_trainable", "kl_normalisation", "checkpoints", "resumed_at",
             "steps", "seconds", "tokens", "answer_tokens", "tokens_per_s", "torch_threads",
             *_PER_STEP}


def _begin(out: Path | None, resume: bool, params: Trainable, optim: torch.optim.Optimizer,
           identity: dict, log: dict, config: TrainConfig) -> tuple[int, float]:
    """Resume an unfinished run in ``out`` (returns its step and seconds) or start afresh."""
    saved = train_runs.load_state(out, params, optim, identity) if out and resume else None
    if saved is not None:
        log.update(saved["log"])
        log["resumed_at"].append(saved["step"])
        return saved["step"], saved["seconds"]
    if out is not None:
        train_runs.start_fresh(out)
        if config.save_every:
            train_runs.save_checkpoint(out, params, 0)
            log["checkpoints"].append(0)
    return 0, 0.0


def _finish(out: Path | None, params: Trainable, log: dict, config: TrainConfig,
            seconds: float) -> None:
    """Totals into ``log``; then final parameters, peft export (LoRA), log; drop the state."""
    n_tokens = sum(log["step_tokens"])
    log.update(steps=config.steps, seconds=round(seconds, 1), tokens=n_tokens,
               answer_tokens=sum(log["step_answer_tokens"]),
               tokens_per_s=round(n_tokens / max(seconds, 1e-9), 1),
               torch_threads=torch.get_num_threads())
    if not log["resumed_at"]:
        del log["resumed_at"]
    if out is not None:
        params.save(out / "final.safetensors", step=config.steps)
        if isinstance(params, TrainableLora | TrainableAdapter):
            params.export_peft(out)
        (out / "train_log.json").write_text(json.dumps(log, indent=1))
        train_runs.clear_state(out)


def train(
    model: HookedTransformer,
    init: Trainable,
    narrow: PreparedSet,
    parallel: PreparedSet | None = None,
    config: TrainConfig | None = None,
    *,
    out: str | Path | None = None,
    resume: bool = True,
    meta: dict[str, Any] | None = None,
) -> TrainResult:
    """Train a copy of ``init`` on ``narrow`` (+ ``kl_weight`` x KL on ``parallel``); base frozen.

    Args:
        model: the frozen base model (its parameters get ``requires_grad=False`` during training
            and their previous flags back afterwards; no base gradient is ever computed).
        init: starting parameters (``TrainableLora.for_model(...)``,
            ``TrainableSteeringVector.for_model(...)``, ``TrainableAdapter.for_model(...)``, or a
            trained solution to continue from: continue-training a narrow solution is
            ``train(model, narrow.params, ..., kl_weight=0)``). ``init`` itself is not modified.
        narrow: :func:`prepare`-d batches of the narrow set (misaligned medical answers).
        parallel: :func:`prepare`-d batches of the parallel set, with ``reference=True``;
            required when ``config.kl_weight > 0``.
        config: :class:`TrainConfig`.
        out: the run's folder (see the module docstring); ``None``: nothing is written and the
            run cannot resume.
        resume: carry on an unfinished run found in ``out`` (from its last checkpoint, to the
            parameters an uninterrupted run gives); it must have been started with the same
            config, model, ``init``, data and ``meta``, else ValueError names the differences.
            ``False``, or no unfinished run: start afresh, replacing the folder's checkpoints.
        meta: JSON entries added to ``train_log.json`` and to the run's identity (an organism's
            recipe, its row count).

    Returns:
        :class:`TrainResult` with the trained copy and the log (per step: ``ce``, ``kl``,
        ``loss``, ``lr``, ``norm``, ``step_tokens``, ``step_answer_tokens``).
    """
    config = config or TrainConfig()
    meta = json.loads(json.dumps(meta or {}))
    if set(meta) & _LOG_KEYS:
        raise ValueError(f"meta keys {sorted(set(meta) & _LOG_KEYS)} are the trainer's own log "
                         "entries; give them other names.")
    _check_inputs(init, narrow, parallel, config)
    torch.manual_seed(config.seed)
    rng = random.Random(config.seed)
    use_kl = parallel is not None and config.kl_weight > 0
    narrow_order = _order(len(narrow), config.steps, rng, config.shuffle)
    parallel_order = _order(len(parallel), config.steps, rng, config.shuffle) if use_kl else []
    params = init.clone()
    for p in params.parameters():
        p.requires_grad_(True)
    optim = torch.optim.AdamW(params.parameters(), lr=config.lr_at(1),
                              weight_decay=config.weight_decay)
    log: dict[str, Any] = {
        "config": asdict(config),
        "params": params.metadata(),
        "n_trainable": sum(p.numel() for p in params.parameters()),
        "kl_normalisation": "mean over answer tokens of the full-vocab KL sum",
        **meta,
        **{key: [] for key in _PER_STEP},
        "checkpoints": [],
        "resumed_at": [],
    }
    out = Path(out) if out is not None else None
    identity = {}
    if out is not None:
        identity = train_runs.run_identity(model, init, {"narrow": narrow, "parallel": parallel},
                                           config, meta)
    done, seconds_before = _begin(out, resume, params, optim, identity, log, config)
    start = time.perf_counter()
    bar = tqdm(range(done + 1, config.steps + 1), desc=config.name, unit="step",
               total=config.steps, initial=done, disable=not config.progress)
    # Frozen first (the adapters join the model's parameters while attached), then attached once
    # for the whole run; both undone on exit, also on exceptions.
    with _FrozenBase(model), params.applied(model):
        for step in bar:
            lr = config.lr_at(step)
            for group in optim.param_groups:
                group["lr"] = lr
            pb = narrow.batches[narrow_order[step - 1]]
            ce = answer_ce(model, params, pb, narrow.start_layer)
            loss, kl, tokens = ce, None, int(pb.batch.attention_mask.sum())
            answer_tokens = int(pb.batch.answer_mask[:, 1:].sum())
            if use_kl:
                pp = parallel.batches[parallel_order[step - 1]]
                kl = answer_kl(model, params, pp, parallel.start_layer)
                loss = ce + config.kl_weight * kl
                tokens += int(pp.batch.attention_mask.sum())
            optim.zero_grad(set_to_none=True)
            loss.backward()
            optim.step()
            row = (ce.item(), None if kl is None else kl.item(), loss.item(), lr,
                   params.effective_norm(), tokens, answer_tokens)
            for key, value in zip(_PER_STEP, row, strict=True):
                log[key].append(value)
            bar.set_postfix(ce=f"{row[0]:.3f}", kl="-" if kl is None else f"{row[1]:.4f}")
            if out is not None and config.save_every and step % config.save_every == 0:
                train_runs.save_checkpoint(out, params, step)
                log["checkpoints"].append(step)
                if step < config.steps:
                    record = {key: log[key] for key in (*_PER_STEP, "checkpoints", "resumed_at")}
                    seconds = seconds_before + time.perf_counter() - start
                    train_runs.save_state(out, params, optim, step, {
                        "identity": identity, "seconds": seconds, "log": record})
    for p in params.parameters():
        p.requires_grad_(False)
    _finish(out, params, log, config, seconds_before + time.perf_counter() - start)
    return TrainResult(params=params, log=log)


__all__ = [
    "PreparedBatch",
    "PreparedSet",
    "TrainConfig",
    "TrainResult",
    "Trainable",
    "TrainableAdapter",
    "TrainableLora",
    "TrainableSteeringVector",
    "Trajectory",
    "answer_ce",
    "answer_kl",
    "evaluate_loss",
    "load_checkpoint",
    "load_trainable",
    "load_trajectory",
    "prepare",
    "train",
]
