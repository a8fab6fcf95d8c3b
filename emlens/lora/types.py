"""LoRA adapters as data: :class:`LoraModule` and :class:`LoraAdapter`, the peft modules emlens
places (:data:`TARGET_MODULES`) and their names and shapes on a model.

Reading, initialising and writing adapters (peft folders in and out) is
:mod:`emlens.lora.adapter`, which re-exports everything here.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Union

import torch
from jaxtyping import Float
from torch import Tensor
from transformer_lens import HookedTransformer

AdapterLike = Union[str, Path, "LoraAdapter"]
Selection = Union[None, int, str, Iterable[Union[int, str]]]

# peft module name -> (TransformerLens component, attached module short name)
TARGET_MODULES: dict[str, tuple[str, str]] = {
    "q_proj": ("attn", "lora_q"),
    "k_proj": ("attn", "lora_k"),
    "v_proj": ("attn", "lora_v"),
    "o_proj": ("attn", "lora_o"),
    "gate_proj": ("mlp", "lora_gate"),
    "up_proj": ("mlp", "lora_up"),
    "down_proj": ("mlp", "lora_down"),
}
# Modules whose input is an RMSNorm output: exact only without folded norms.
NORMED_INPUT = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")


@dataclass(frozen=True)
class LoraModule:
    """One LoRA adapter on one linear map, in HF layout.

    The map's output gains ``scaling * (B @ A @ h + lora_bias)``.

    Attributes:
        layer: block index.
        module: peft module name (``"down_proj"``, ``"q_proj"``, ...).
        A: ``[r, d_in]`` down-projection (``lora_A.weight``).
        B: ``[d_out, r]`` up-projection (``lora_B.weight``).
        scaling: ``lora_alpha / r`` (``lora_alpha / sqrt(r)`` with rsLoRA), per-module patterns
            applied.
        lora_bias: ``lora_B.bias`` (peft ``lora_bias=True``) or ``None``.
        path: the peft module path, e.g. ``"model.layers.21.mlp.down_proj"``.
    """

    layer: int
    module: str
    A: Float[Tensor, "r d_in"]
    B: Float[Tensor, "d_out r"]
    scaling: float
    lora_bias: Float[Tensor, " d_out"] | None = None
    path: str = ""

    @property
    def rank(self) -> int:
        return self.A.shape[0]

    @property
    def name(self) -> str:
        """TransformerLens-style module name, e.g. ``"blocks.21.mlp.lora_down"``."""
        component, short = TARGET_MODULES[self.module]
        return f"blocks.{self.layer}.{component}.{short}"

    @property
    def hook_name(self) -> str:
        """Name of the activation hook point (``hook_scalar`` for rank 1, else ``hook_acts``)."""
        return f"{self.name}.{'hook_scalar' if self.rank == 1 else 'hook_acts'}"

    def delta_weight(self) -> Float[Tensor, "d_out d_in"]:
        """``scaling * B @ A``: what the adapter adds to the HF weight."""
        return self.scaling * (self.B @ self.A)


@dataclass(frozen=True)
class LoraAdapter:
    """A loaded peft LoRA adapter: its modules, the replacement base biases, and its config.

    Attributes:
        modules: the adapters, sorted by layer then module.
        base_biases: new biases for base modules (peft ``bias="all"`` / ``"lora_only"``), keyed by
            ``(layer, module)``, HF layout.
        config: the ``adapter_config.json`` contents.
        source: where it was read from.
    """

    modules: tuple[LoraModule, ...]
    base_biases: dict[tuple[int, str], Tensor] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)
    source: str = ""

    @property
    def names(self) -> list[str]:
        return [m.name for m in self.modules]

    @property
    def ranks(self) -> dict[str, int]:
        return {m.name: m.rank for m in self.modules}

    def __getitem__(self, name: str) -> LoraModule:
        for m in self.modules:
            if m.name == name or m.hook_name == name:
                return m
        raise KeyError(f"No adapter {name!r}; this adapter has {self.names}.")

    def __len__(self) -> int:
        return len(self.modules)

    def to(
        self, device: str | torch.device | None = None, dtype: torch.dtype | None = None
    ) -> LoraAdapter:
        """A copy with every tensor on ``device`` / in ``dtype``."""

        def move(t: Tensor | None) -> Tensor | None:
            return None if t is None else t.to(device=device, dtype=dtype)

        return replace(
            self,
            modules=tuple(
                replace(m, A=move(m.A), B=move(m.B), lora_bias=move(m.lora_bias))
                for m in self.modules
            ),
            base_biases={k: move(v) for k, v in self.base_biases.items()},
        )


def module_shapes(model: HookedTransformer) -> dict[str, tuple[int, int]]:
    """``(d_out, d_in)`` of each peft module on ``model`` (HF layout, grouped-query k/v)."""
    cfg = model.cfg
    n_kv = cfg.n_key_value_heads or cfg.n_heads
    d_attn = cfg.n_heads * cfg.d_head
    return {
        "q_proj": (d_attn, cfg.d_model),
        "k_proj": (n_kv * cfg.d_head, cfg.d_model),
        "v_proj": (n_kv * cfg.d_head, cfg.d_model),
        "o_proj": (cfg.d_model, d_attn),
        "gate_proj": (cfg.d_mlp, cfg.d_model),
        "up_proj": (cfg.d_mlp, cfg.d_model),
        "down_proj": (cfg.d_model, cfg.d_mlp),
    }


def peft_module_path(layer: int, module: str) -> str:
    """peft's module path of ``module`` at ``layer``, e.g. ``"model.layers.3.mlp.down_proj"``."""
    component = "self_attn" if TARGET_MODULES[module][0] == "attn" else "mlp"
    return f"model.layers.{layer}.{component}.{module}"


__all__ = [
    "NORMED_INPUT",
    "TARGET_MODULES",
    "AdapterLike",
    "LoraAdapter",
    "LoraModule",
    "Selection",
    "module_shapes",
    "peft_module_path",
]
