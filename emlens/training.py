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

Each is a small ``nn.Module`` applied to the frozen model inside :meth:`~Trainable.applied`. The
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

import copy
import json
import math
import random
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Float
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from tqdm.auto import tqdm
from transformer_lens import HookedTransformer
from transformer_lens.hook_points import HookPoint

from emlens.chat import ChatBatch, answer_logits
from emlens.embedded import EMBEDDED_HUB_ID
from emlens.hooks import Hooks
from emlens.lora import (
    AttachedLora,
    LoraAdapter,
    LoraHookedModule,
    LoraModule,
    attach_modules,
    check_compatible,
    save_peft,
)

# --------------------------------------------------------------------------------------------
# Parameterisations


class Trainable(nn.Module):
    """Base class: a few trainable tensors acting on a frozen model through TransformerLens hooks.

    Subclasses define :meth:`hooks`, :attr:`first_layer`, :meth:`delta` (the flat vector used for
    cosines and PCA), :meth:`effective_norm` and :meth:`scaled`.
    """

    kind: str = ""

    @property
    def first_layer(self) -> int:
        """The first block whose computation these parameters change."""
        raise NotImplementedError

    def hooks(self) -> Hooks:
        """``(hook_name, fn)`` pairs applying the parameters; use with ``model.hooks(...)``."""
        raise NotImplementedError

    @contextmanager
    def applied(self, model: HookedTransformer) -> Iterator[Any]:
        """Context manager: the parameters act on ``model`` inside the block, and on exit (also
        on exceptions) nothing of them is left on it. Used by the losses and :func:`train`."""
        with model.hooks(fwd_hooks=self.hooks()):
            yield self

    def tensors(self) -> dict[str, Tensor]:
        """The tensors :meth:`save` writes (the state dict)."""
        return dict(self.state_dict())

    def load_tensors(self, tensors: dict[str, Tensor]) -> None:
        """Set the parameters from :meth:`tensors` (as read back from a saved file)."""
        self.load_state_dict(tensors)

    def delta(self) -> Float[Tensor, " n"]:
        """The parameters' effect as one flat vector (the vector; or every ``scaling * B A``)."""
        raise NotImplementedError

    def effective_norm(self) -> float:
        """L2 norm of :meth:`delta`: the size of the change made to the model."""
        return float(self.delta().detach().norm())

    def scaled(self, alpha: float) -> Trainable:
        """A copy whose effect is ``alpha`` times this one's (``delta`` scales by ``alpha``)."""
        raise NotImplementedError

    def metadata(self) -> dict[str, Any]:
        """What :func:`load_trainable` needs to rebuild the module (JSON-serialisable)."""
        raise NotImplementedError

    def clone(self) -> Trainable:
        """A deep copy (fresh parameters, same values)."""
        return copy.deepcopy(self)

    def save(self, path: str | Path, **extra: Any) -> Path:
        """Write the parameters to a safetensors file, the metadata (and ``extra``) in its header."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        meta = {k: json.dumps(v) for k, v in (self.metadata() | extra).items()}
        tensors = {k: v.detach().cpu().contiguous() for k, v in self.tensors().items()}
        save_file(tensors, str(path), metadata=meta)
        return path


class TrainableSteeringVector(Trainable):
    """One vector added to the residual stream entering block ``layer``, at every position.

    The hook is on ``blocks.{layer}.hook_resid_pre`` (the residual stream after block
    ``layer - 1``) and adds the same vector to every position of every batch element.
    """

    kind = "steering_vector"

    def __init__(self, d_model: int, layer: int, init: Float[Tensor, " d_model"] | None = None):
        super().__init__()
        if layer < 0:
            raise ValueError(f"layer must be >= 0, got {layer}.")
        self.layer = layer
        vec = torch.zeros(d_model) if init is None else init.detach().clone().float()
        if vec.shape != (d_model,):
            raise ValueError(f"init has shape {tuple(vec.shape)}; expected ({d_model},).")
        self.vector = nn.Parameter(vec)

    @classmethod
    def for_model(cls, model: HookedTransformer, layer: int) -> TrainableSteeringVector:
        """A zero vector (leaves the model unchanged) sized for ``model``."""
        if not 0 <= layer < model.cfg.n_layers:
            raise ValueError(f"layer={layer}, but the model has blocks 0..{model.cfg.n_layers - 1}.")
        return cls(model.cfg.d_model, layer).to(model.W_E.device)

    @property
    def hook_name(self) -> str:
        return f"blocks.{self.layer}.hook_resid_pre"

    @property
    def first_layer(self) -> int:
        return self.layer

    def hooks(self) -> Hooks:
        def add_vector(resid: Float[Tensor, "batch pos d_model"], hook: HookPoint) -> Tensor:
            # Broadcast over batch and position: every element is steered, not just element 0.
            return resid + self.vector.to(resid.dtype)

        return [(self.hook_name, add_vector)]

    def delta(self) -> Float[Tensor, " d_model"]:
        return self.vector

    def scaled(self, alpha: float) -> TrainableSteeringVector:
        out = self.clone()
        with torch.no_grad():
            out.vector.mul_(alpha)
        return out

    def metadata(self) -> dict[str, Any]:
        return {"kind": self.kind, "d_model": self.vector.shape[0], "layer": self.layer}


class TrainableLora(Trainable):
    """Rank-``r`` LoRA adapters on ``mlp.down_proj`` at ``layers``: :mod:`emlens.lora`'s modules.

    ``adapters[i]`` (on layer ``layers[i]``) is a trainable :class:`~emlens.lora.LoraHookedModule`
    named ``blocks.L.mlp.lora_down``: inside :meth:`applied` (or :meth:`attach`) it is attached to
    the model by :mod:`emlens.lora`'s attach code, reads ``h`` at ``blocks.L.mlp.hook_post``, adds
    ``scaling * B (A h)`` at ``blocks.L.hook_mlp_out`` and fires ``blocks.L.mlp.lora_down.hook_scalar``
    (rank 1; ``hook_acts`` for rank > 1). ``scaling = lora_alpha / rank``, as in peft. Initialised
    as peft does: ``A`` Kaiming-uniform, ``B`` zero, so the model starts unchanged.

    Attributes:
        A: ``[n_adapters, rank, d_mlp]`` (peft ``lora_A.weight`` per layer), stacked from the
            adapters (read-only: change the adapters' own ``A``).
        B: ``[n_adapters, d_model, rank]`` (peft ``lora_B.weight`` per layer), likewise.
    """

    kind = "lora"

    def __init__(
        self,
        d_model: int,
        d_mlp: int,
        layers: Sequence[int],
        *,
        rank: int = 1,
        lora_alpha: float = 1.0,
    ):
        super().__init__()
        layers = [int(x) for x in layers]
        if not layers or len(set(layers)) != len(layers) or min(layers) < 0:
            raise ValueError(f"layers must be distinct non-negative block indices, got {layers}.")
        if rank < 1:
            raise ValueError(f"rank must be >= 1, got {rank}.")
        self.layers = sorted(layers)
        self.rank = rank
        self.lora_alpha = float(lora_alpha)
        adapters = []
        for layer in self.layers:
            A = torch.empty(rank, d_mlp)
            nn.init.kaiming_uniform_(A, a=math.sqrt(5))  # peft's init for lora_A
            lora = LoraModule(layer=layer, module="down_proj", A=A, B=torch.zeros(d_model, rank),
                              scaling=self.scaling)
            adapters.append(LoraHookedModule(lora, dtype=torch.float32, device="cpu",
                                             n_out_heads=None, trainable=True))
        self.adapters = nn.ModuleList(adapters)

    @classmethod
    def for_model(
        cls,
        model: HookedTransformer,
        layers: Sequence[int],
        *,
        rank: int = 1,
        lora_alpha: float = 1.0,
    ) -> TrainableLora:
        """Adapters sized for ``model``'s down_proj (needs a gated, Llama-style MLP)."""
        bad = [x for x in layers if not 0 <= x < model.cfg.n_layers]
        if bad:
            raise ValueError(f"layers {bad} out of range; the model has {model.cfg.n_layers} blocks.")
        if model.cfg.d_mlp is None:
            raise ValueError("The model has no MLP (d_mlp is None); LoRA on down_proj needs one.")
        return cls(
            model.cfg.d_model, model.cfg.d_mlp, layers, rank=rank, lora_alpha=lora_alpha
        ).to(model.W_E.device)

    @property
    def A(self) -> Float[Tensor, "n_adapters rank d_mlp"]:
        return torch.stack([m.A for m in self.adapters])

    @property
    def B(self) -> Float[Tensor, "n_adapters d_model rank"]:
        return torch.stack([m.B for m in self.adapters])

    @property
    def scaling(self) -> float:
        return self.lora_alpha / self.rank

    @property
    def first_layer(self) -> int:
        return self.layers[0]

    @property
    def hook_names(self) -> list[str]:
        """The adapters' activation hook points (``blocks.L.mlp.lora_down.hook_scalar`` for rank 1)."""
        point = "hook_scalar" if self.rank == 1 else "hook_acts"
        return [f"{m.adapter_name}.{point}" for m in self.adapters]

    def to_adapter(self, base_model_name_or_path: str | None = None) -> LoraAdapter:
        """The current weights as a peft-style :class:`~emlens.lora.LoraAdapter` (CPU copies):
        attach it with :func:`emlens.attach_lora`, merge it with :func:`emlens.merge_lora`."""
        config = {"r": self.rank, "lora_alpha": self.lora_alpha, "target_modules": ["down_proj"],
                  "layers_to_transform": self.layers}
        if base_model_name_or_path is not None:
            config["base_model_name_or_path"] = base_model_name_or_path
        return LoraAdapter(modules=tuple(m.to_lora_module() for m in self.adapters), config=config,
                           source="(TrainableLora)")

    def attach(self, model: HookedTransformer) -> AttachedLora:
        """Attach these very modules (their parameters, not copies) to ``model`` through
        :mod:`emlens.lora`'s attach code; remove with the handle (a context manager)."""
        adapter = check_compatible(model, self.to_adapter(), attach=True)
        return attach_modules(model, adapter, {m.adapter_name: m for m in self.adapters})

    def _attached_to(self, model: HookedTransformer) -> bool:
        return all(model.mod_dict.get(m.adapter_name) is m for m in self.adapters)

    @contextmanager
    def applied(self, model: HookedTransformer) -> Iterator[Any]:
        """Attached inside the block (a no-op when already attached to ``model``, e.g. inside
        :func:`train`); removed on exit, also on exceptions."""
        if self._attached_to(model):
            yield self
            return
        with self.attach(model):
            yield self

    def hooks(self) -> Hooks:
        """``(hook_name, fn)`` pairs running the adapters' own read/add, for APIs that take hook
        pairs (``evaluate(interventions=...)``). The adapters' hook points are only addressable
        by name when attached: use :meth:`applied` / :meth:`attach` to read or steer them."""
        hooks: Hooks = []
        for m in self.adapters:

            def read(h: Float[Tensor, "batch pos d_mlp"], hook: HookPoint, m=m) -> None:
                m.read(h)

            def add(out: Float[Tensor, "batch pos d_model"], hook: HookPoint, m=m) -> Tensor:
                return m.add(out)

            hooks += [(f"blocks.{m.layer}.mlp.hook_post", read),
                      (f"blocks.{m.layer}.hook_mlp_out", add)]
        return hooks

    def delta_weights(self) -> Float[Tensor, "n_adapters d_model d_mlp"]:
        """``scaling * B A`` per adapter (HF layout ``[d_out, d_in]``)."""
        return self.scaling * torch.einsum("nor,nri->noi", self.B, self.A)

    def delta(self) -> Float[Tensor, " n"]:
        return self.delta_weights().flatten()

    def scaled(self, alpha: float) -> TrainableLora:
        out = self.clone()
        with torch.no_grad():
            for m in out.adapters:
                m.B.mul_(alpha)
        return out

    def metadata(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "d_model": self.adapters[0].B.shape[0],
            "d_mlp": self.adapters[0].A.shape[1],
            "layers": self.layers,
            "rank": self.rank,
            "lora_alpha": self.lora_alpha,
        }

    def tensors(self) -> dict[str, Tensor]:
        # The saved layout (every checkpoint and final.safetensors): stacked A and B.
        return {"A": self.A.detach(), "B": self.B.detach()}

    @torch.no_grad()
    def load_tensors(self, tensors: dict[str, Tensor]) -> None:
        if set(tensors) != {"A", "B"}:
            raise ValueError(f"expected tensors 'A' and 'B', got {sorted(tensors)}.")
        for key in ("A", "B"):
            want = (len(self.adapters), *getattr(self.adapters[0], key).shape)
            if tuple(tensors[key].shape) != want:
                raise ValueError(f"{key} has shape {tuple(tensors[key].shape)}; expected {want}.")
            for m, value in zip(self.adapters, tensors[key], strict=True):
                getattr(m, key).copy_(value)

    def __deepcopy__(self, memo):
        meta = self.metadata()
        new = TrainableLora(
            meta["d_model"], meta["d_mlp"], self.layers, rank=self.rank, lora_alpha=self.lora_alpha
        )
        new.load_tensors(self.tensors())
        return new.to(self.adapters[0].A.device)

    def export_peft(
        self, folder: str | Path, *, base_model_name_or_path: str = EMBEDDED_HUB_ID
    ) -> Path:
        """Write a peft LoRA folder (``adapter_config.json`` + ``adapter_model.safetensors``)
        with :func:`emlens.lora.save_peft`; :func:`emlens.load_adapter` and peft's
        ``PeftModel.from_pretrained`` read it."""
        return save_peft(self.to_adapter(), folder, base_model_name_or_path=base_model_name_or_path)


def load_trainable(path: str | Path) -> Trainable:
    """Rebuild a :class:`Trainable` saved with :meth:`Trainable.save` (a checkpoint or final file)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"No checkpoint file at {path}; expected a .safetensors file.")
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = {k: json.loads(v) for k, v in (f.metadata() or {}).items()}
    tensors = load_file(str(path))
    kind = meta.get("kind")
    if kind == TrainableSteeringVector.kind:
        module: Trainable = TrainableSteeringVector(meta["d_model"], meta["layer"])
    elif kind == TrainableLora.kind:
        module = TrainableLora(
            meta["d_model"], meta["d_mlp"], meta["layers"], rank=meta["rank"],
            lora_alpha=meta["lora_alpha"],
        )
    else:
        raise ValueError(
            f"{path} has kind={kind!r} in its metadata; expected 'steering_vector' or 'lora' "
            "(a file written by Trainable.save)."
        )
    module.load_tensors(tensors)
    return module


@dataclass(frozen=True)
class Trajectory:
    """Checkpoints of one run: ``steps[i]`` and the parameters ``params[i]`` after that step."""

    steps: list[int]
    params: list[Trainable]

    def deltas(self) -> Float[Tensor, "n_checkpoints n"]:
        """Every checkpoint's :meth:`Trainable.delta`, stacked."""
        return torch.stack([p.delta().detach() for p in self.params])


def load_trajectory(out: str | Path) -> Trajectory:
    """Read ``out/checkpoints/step-*.safetensors`` (written by :func:`train`) in step order."""
    files = sorted(Path(out, "checkpoints").glob("step-*.safetensors"))
    if not files:
        raise FileNotFoundError(
            f"No checkpoints under {Path(out, 'checkpoints')}; train with out=... and save_every."
        )
    steps = [int(f.stem.split("-")[1]) for f in files]
    return Trajectory(steps=steps, params=[load_trainable(f) for f in files])


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
