"""What :mod:`emlens.training` trains: small parameterisations of a frozen ``HookedTransformer``.

* :class:`TrainableSteeringVector`: one vector added at ``blocks.L.hook_resid_pre``, every
  position of every batch element;
* :class:`TrainableLora`: rank-``r`` adapters on ``mlp.down_proj`` at chosen layers, whose
  adapters *are* :class:`emlens.lora.LoraHookedModule` modules with ``A`` and ``B`` as parameters,
  attached through :mod:`emlens.lora`'s attach code (so ``hook_scalar`` fires during training), and
  exported as peft folders through :func:`emlens.lora.save_peft`; its base :class:`LoraTrainable`
  (attach, apply, scale) is shared with :class:`emlens.trainable_adapter.TrainableAdapter`.

Each is applied inside :meth:`Trainable.applied` (hooks removed on exit, also on exceptions), is
saved as safetensors + JSON metadata (:meth:`Trainable.save`, :func:`load_trainable`), and a
training run's checkpoints are read back as a :class:`Trajectory` (:func:`load_trajectory`).
"""

from __future__ import annotations

import copy
import json
import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Float
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from transformer_lens import HookedTransformer
from transformer_lens.hook_points import HookPoint

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
from emlens.lora.attach import out_heads

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


class LoraTrainable(Trainable):
    """Base class of the trainables made of LoRA modules: :attr:`adapters`, trainable
    :class:`~emlens.lora.LoraHookedModule` modules (``A`` and ``B`` parameters) attached to the
    model by :mod:`emlens.lora`'s own attach code, so their hook points fire during training.

    Subclasses build :attr:`adapters` and define :meth:`to_adapter` (the weights as a
    :class:`~emlens.lora.LoraAdapter`, checked against the model on every attach).
    """

    adapters: nn.ModuleList

    def to_adapter(self) -> LoraAdapter:
        """The current weights as a :class:`~emlens.lora.LoraAdapter` (float32 CPU copies)."""
        raise NotImplementedError

    @property
    def first_layer(self) -> int:
        return min(m.layer for m in self.adapters)

    @property
    def hook_names(self) -> list[str]:
        """The adapters' activation hook points (``hook_scalar`` for rank 1, else ``hook_acts``)."""
        return [f"{m.adapter_name}.{'hook_scalar' if m.rank == 1 else 'hook_acts'}"
                for m in self.adapters]

    def attach(self, model: HookedTransformer) -> AttachedLora:
        """Attach these very modules (their parameters, not copies) to ``model`` through
        :mod:`emlens.lora`'s attach code; remove with the handle (a context manager)."""
        adapter = check_compatible(model, self.to_adapter(), attach=True)
        for m in self.adapters:
            m.n_out_heads = out_heads(model, m.module)
        return attach_modules(model, adapter, {m.adapter_name: m for m in self.adapters})

    @contextmanager
    def applied(self, model: HookedTransformer) -> Iterator[Any]:
        """Attached inside the block (a no-op when already attached to ``model``, e.g. inside
        :func:`train`); removed on exit, also on exceptions."""
        if all(model.mod_dict.get(m.adapter_name) is m for m in self.adapters):
            yield self
            return
        with self.attach(model):
            yield self

    def scaled(self, alpha: float) -> LoraTrainable:
        out = self.clone()
        with torch.no_grad():
            for m in out.adapters:
                m.B.mul_(alpha)
        return out


class TrainableLora(LoraTrainable):
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

    def to_adapter(self, base_model_name_or_path: str | None = None) -> LoraAdapter:
        """The current weights as a peft-style :class:`~emlens.lora.LoraAdapter` (CPU copies):
        attach it with :func:`emlens.attach_lora`, merge it with :func:`emlens.merge_lora`."""
        config = {"r": self.rank, "lora_alpha": self.lora_alpha, "target_modules": ["down_proj"],
                  "layers_to_transform": self.layers}
        if base_model_name_or_path is not None:
            config["base_model_name_or_path"] = base_model_name_or_path
        return LoraAdapter(modules=tuple(m.to_lora_module() for m in self.adapters), config=config,
                           source="(TrainableLora)")

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
