"""A trainable peft LoRA adapter on any target modules: what an organism recipe trains.

:class:`TrainableAdapter` is a :class:`~emlens.trainable.LoraTrainable` made of
:class:`emlens.lora.LoraHookedModule` modules with ``A`` and ``B`` as float32 parameters, one per
``(layer, module)`` of :func:`emlens.lora.init_adapter` (``q_proj`` ... ``down_proj``, any rank,
rsLoRA or not). Inside :meth:`~TrainableAdapter.applied` the modules are attached by
:mod:`emlens.lora`'s own attach code, so ``hook_scalar`` / ``hook_acts`` fire during training as
they do on an attached adapter; :meth:`~TrainableAdapter.export_peft` writes the peft folder
through :func:`emlens.lora.save_peft`. :class:`~emlens.trainable.TrainableLora` is the
``down_proj``-only special case with its own (stacked) file layout, kept for the shipped runs.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor, nn
from transformer_lens import HookedTransformer

from emlens.hooks import Hooks
from emlens.lora import (
    AdapterLike,
    LoraAdapter,
    LoraHookedModule,
    LoraModule,
    check_compatible,
    init_adapter,
    load_adapter,
    save_peft,
)
from emlens.trainable import LoraTrainable

# the adapter_config.json entries a TrainableAdapter carries into its peft export
_PEFT_KEYS = ("r", "lora_alpha", "use_rslora", "target_modules", "layers_to_transform")


class TrainableAdapter(LoraTrainable):
    """Trainable LoRA adapters on any peft target modules, exported as a peft folder.

    Attributes:
        adapters: one trainable :class:`~emlens.lora.LoraHookedModule` per ``(layer, module)``,
            sorted by layer then module, named as attached (``blocks.L.mlp.lora_down``).
        peft_config: the ``adapter_config.json`` entries the export writes (``r``, ``lora_alpha``,
            ``use_rslora``, ``target_modules``, ``layers_to_transform``) and
            ``base_model_name_or_path``.
    """

    kind = "adapter"

    def __init__(self, adapter: LoraAdapter, *, peft_config: dict[str, Any] | None = None):
        super().__init__()
        if not adapter.modules:
            raise ValueError("The adapter has no modules to train.")
        if adapter.base_biases or any(m.lora_bias is not None for m in adapter.modules):
            raise ValueError("TrainableAdapter trains plain LoRA weights; this adapter has biases.")
        config = {k: adapter.config[k] for k in (*_PEFT_KEYS, "base_model_name_or_path")
                  if k in adapter.config}
        self.peft_config = config | dict(peft_config or {})
        # n_out_heads is set from the model on every attach (LoraTrainable.attach)
        self.adapters = nn.ModuleList(
            LoraHookedModule(m, dtype=torch.float32, device="cpu", n_out_heads=None, trainable=True)
            for m in adapter.modules
        )

    @classmethod
    def for_model(
        cls,
        model: HookedTransformer,
        target_modules: Iterable[str],
        layers: Iterable[int] | None = None,
        *,
        r: int = 1,
        lora_alpha: float = 1.0,
        use_rslora: bool = False,
        base_model_name_or_path: str | None = None,
    ) -> TrainableAdapter:
        """Fresh adapters as peft initialises them (``A`` Kaiming-uniform from torch's global RNG,
        ``B`` zero: the model starts unchanged), on ``model``'s device. ``layers=None``: every
        layer."""
        target_modules = list(target_modules)
        layers = None if layers is None else [int(x) for x in layers]
        adapter = init_adapter(model, target_modules, layers, r=r, lora_alpha=lora_alpha,
                               use_rslora=use_rslora)
        check_compatible(model, adapter, attach=True)
        config = {"r": r, "lora_alpha": lora_alpha, "use_rslora": use_rslora,
                  "target_modules": target_modules, "layers_to_transform": layers,
                  "base_model_name_or_path": base_model_name_or_path}
        return cls(adapter, peft_config=config).to(model.W_E.device)

    @classmethod
    def from_adapter(cls, adapter: AdapterLike) -> TrainableAdapter:
        """Trainable copies of a peft adapter's weights (a folder, hub id or
        :class:`~emlens.lora.LoraAdapter`), e.g. to continue training a shipped organism."""
        return cls(load_adapter(adapter))

    def to_adapter(self) -> LoraAdapter:
        """The current weights as a :class:`~emlens.lora.LoraAdapter` (float32 CPU copies)."""
        config = {k: v for k, v in self.peft_config.items() if v is not None}
        return LoraAdapter(modules=tuple(m.to_lora_module() for m in self.adapters),
                           config=config, source="(TrainableAdapter)")

    def hooks(self) -> Hooks:
        raise NotImplementedError(
            "A TrainableAdapter's q/k/v/gate/up adapters read the norms' outputs, which are not "
            "hook points; apply it with `with params.applied(model):` (or attach_lora(model, "
            "params.to_adapter())) instead of hook pairs."
        )

    def delta(self) -> Float[Tensor, " n"]:
        """Every adapter's ``scaling * B A``, flattened and concatenated (large for big ranks)."""
        return torch.cat([(m.scaling * (m.B @ m.A)).flatten() for m in self.adapters])

    def effective_norm(self) -> float:
        # |B A|_F^2 = sum((B^T B) * (A A^T)): r x r products instead of d_out x d_in ones
        with torch.no_grad():
            sq = sum(m.scaling**2 * ((m.B.T @ m.B) * (m.A @ m.A.T)).sum() for m in self.adapters)
        return float(sq.clamp_min(0).sqrt())

    def metadata(self) -> dict[str, Any]:
        modules = [{"layer": m.layer, "module": m.module, "path": m.path, "rank": m.rank,
                    "scaling": m.scaling, "d_out": m.B.shape[0], "d_in": m.A.shape[1]}
                   for m in self.adapters]
        return {"kind": self.kind, "modules": modules, "peft_config": self.peft_config}

    @classmethod
    def from_metadata(cls, meta: dict[str, Any]) -> TrainableAdapter:
        """An adapter of the shapes :meth:`metadata` describes (weights zero until loaded)."""
        modules = tuple(
            LoraModule(layer=m["layer"], module=m["module"], path=m["path"], scaling=m["scaling"],
                       A=torch.zeros(m["rank"], m["d_in"]), B=torch.zeros(m["d_out"], m["rank"]))
            for m in meta["modules"]
        )
        return cls(LoraAdapter(modules=modules), peft_config=meta["peft_config"])

    def tensors(self) -> dict[str, Tensor]:
        # peft's key names, without its "base_model.model." prefix
        out: dict[str, Tensor] = {}
        for m in self.adapters:
            out[f"{m.path}.lora_A.weight"] = m.A.detach()
            out[f"{m.path}.lora_B.weight"] = m.B.detach()
        return out

    @torch.no_grad()
    def load_tensors(self, tensors: dict[str, Tensor]) -> None:
        want = {k: tuple(v.shape) for k, v in self.tensors().items()}
        got = {k: tuple(v.shape) for k, v in tensors.items()}
        if got != want:
            missing, extra = sorted(set(want) - set(got)), sorted(set(got) - set(want))
            shapes = [k for k in set(want) & set(got) if want[k] != got[k]]
            raise ValueError(f"The tensors do not fit these adapters: missing {missing[:3]}, "
                             f"unexpected {extra[:3]}, other shapes for {sorted(shapes)[:3]}.")
        for m in self.adapters:
            m.A.copy_(tensors[f"{m.path}.lora_A.weight"])
            m.B.copy_(tensors[f"{m.path}.lora_B.weight"])

    def __deepcopy__(self, memo):
        new = TrainableAdapter(self.to_adapter(), peft_config=self.peft_config)
        return new.to(self.adapters[0].A.device)

    def export_peft(self, folder: str | Path) -> Path:
        """Write a peft LoRA folder (``adapter_config.json`` + ``adapter_model.safetensors``)
        with :func:`emlens.lora.save_peft`; :func:`emlens.load_adapter` and peft's
        ``PeftModel.from_pretrained`` read it."""
        config = {k: self.peft_config[k] for k in _PEFT_KEYS if k in self.peft_config}
        return save_peft(self.to_adapter(), folder, config=config,
                         base_model_name_or_path=self.peft_config.get("base_model_name_or_path"))


__all__ = ["TrainableAdapter"]
