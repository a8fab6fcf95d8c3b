"""Directional ablation as a LoRA adapter, for engines that take adapters but no hooks (vLLM).

``emlens.ablate(model, d, hook="writers")`` projects the unit direction ``u`` out of everything
that writes to the residual stream: the embedding and every attention and MLP output. Each of
those writers is a linear map ``W`` (HF layout ``[d_out, d_in]``; the embedding a lookup table),
and projecting ``u`` out of its output is a rank-1 weight edit::

    (I - u u^T) W  =  W + B A     with  B = -u  [d_model, 1],  A = u^T W  [1, d_in]

so the ablation is itself a LoRA adapter: rank 1 on every ``o_proj`` and ``down_proj`` and a
rank-1 ``lora_embedding_A/B`` on ``embed_tokens`` (``A = (E u)^T``, ``B = -u``; only the input
embedding, so a tied ``lm_head`` keeps its weights, as under the hooks). An organism's adapter
composes with it into one adapter: a writer the organism adapts gets
``B = [(I - u u^T) s B_o, -u]``, ``A = [A_o; u^T W]`` (the projection also removes ``u`` from what
the organism writes, as the hooks do, since an attached adapter's output is added before
``hook_mlp_out`` / ``hook_attn_out``); a module that is not a writer (``q/k/v/gate/up_proj``) is
copied. Every module is padded with zero rows to one rank ``R`` and written with ``lora_alpha =
R`` (scaling 1, the organism's scaling folded into its ``B``), so any peft reader (peft, vLLM)
computes exactly these products.

:func:`ablation_peft` writes that folder; :func:`ablation_adapter_state` returns its tensors.
The test checks the folder, loaded by peft on the HF model, against the hooks on the
HookedTransformer, within the float floor.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import einops
import torch
from jaxtyping import Float
from torch import Tensor
from transformer_lens import HookedTransformer

from emlens.hooks import as_vector
from emlens.lora.adapter import AdapterLike, LoraAdapter, load_adapter, peft_module_path

WRITERS = ("o_proj", "down_proj")
EMBED_PATH = "model.embed_tokens"


class WriterWeights:
    """The residual writers' weights of one model, in HF layout, read on demand.

    Build it from a HookedTransformer (:meth:`from_model`) or a HF model folder of safetensors
    (:meth:`from_folder`, what vLLM serves); both give ``embed`` ``[d_vocab, d_model]`` and
    ``writer(layer, module)`` ``[d_model, d_in]``.
    """

    def __init__(self, n_layers: int, d_model: int, get: Callable[[str], Tensor],
                 has_bias: Callable[[int, str], bool], source: str) -> None:
        self.n_layers, self.d_model, self._get, self._has_bias = n_layers, d_model, get, has_bias
        self.source = source

    @classmethod
    def from_model(cls, model: HookedTransformer) -> WriterWeights:
        """From a HookedTransformer loaded with ``processing="none"`` or ``"fold_ln"``."""
        info = getattr(model, "emlens_info", None) or {}
        if info.get("processing", "none") == "full":
            raise ValueError("The ablation adapter is written against the HF weights; a model "
                             "loaded with processing='full' has its writers centred. Load it "
                             "with processing='none' (the default).")

        def get(name: str) -> Tensor:
            if name == EMBED_PATH:
                return model.W_E.detach()
            layer, module = _parse(name)
            block = model.blocks[layer]
            if module == "o_proj":
                return einops.rearrange(block.attn.W_O.detach(), "n h m -> m (n h)")
            return block.mlp.W_out.detach().T

        def has_bias(layer: int, module: str) -> bool:
            block = model.blocks[layer]
            b = block.attn.b_O if module == "o_proj" else block.mlp.b_out
            return bool(b.detach().abs().max() > 0)

        return cls(model.cfg.n_layers, model.cfg.d_model, get, has_bias, model.cfg.model_name)

    @classmethod
    def from_folder(cls, folder: str | os.PathLike) -> WriterWeights:
        """From a HF model folder (``config.json`` + ``*.safetensors``, sharded or not)."""
        from safetensors import safe_open

        folder = Path(folder)
        config = json.loads((folder / "config.json").read_text())
        files = sorted(folder.glob("*.safetensors"))
        if not files:
            raise FileNotFoundError(f"{folder} has no *.safetensors weights; the ablation "
                                    "adapter reads the writers' weights from them.")
        where: dict[str, Path] = {}
        for f in files:
            with safe_open(str(f), "pt") as st:
                for k in st.keys():  # noqa: SIM118 (safe_open is not a mapping)
                    where[k] = f

        def get(name: str) -> Tensor:
            key = f"{name}.weight"
            if key not in where:
                raise KeyError(f"{folder} has no tensor {key!r}; is it a Llama / Qwen2 model?")
            with safe_open(str(where[key]), "pt") as st:
                return st.get_tensor(key)

        def has_bias(layer: int, module: str) -> bool:
            return f"{peft_module_path(layer, module)}.bias" in where

        return cls(int(config["num_hidden_layers"]), int(config["hidden_size"]), get, has_bias,
                   str(folder))

    @property
    def embed(self) -> Float[Tensor, "d_vocab d_model"]:
        return self._get(EMBED_PATH)

    def writer(self, layer: int, module: str) -> Float[Tensor, "d_model d_in"]:
        return self._get(peft_module_path(layer, module))


def _parse(path: str) -> tuple[int, str]:
    parts = path.split(".")
    return int(parts[2]), parts[-1]


def unit_direction(direction, d_model: int) -> Float[Tensor, " d_model"]:
    """``direction`` (a Direction or tensor) as a float64 unit vector, refusing a wrong width,
    a non-float dtype, a NaN/inf or zero norm."""
    vec = as_vector(direction).detach()
    if vec.shape != (d_model,):
        raise ValueError(f"direction has shape {tuple(vec.shape)}, but the model's residual "
                         f"stream has d_model={d_model}; was it extracted from another model?")
    if not vec.is_floating_point():
        raise ValueError(f"direction dtype is {vec.dtype}; expected a floating dtype.")
    norm = vec.double().norm()
    if not torch.isfinite(norm):
        raise ValueError("direction has a NaN or infinite norm; check how it was computed.")
    if norm == 0:
        raise ValueError("direction has zero norm; there is nothing to ablate.")
    return (vec.double() / norm)


def ablation_adapter_state(
    weights: WriterWeights | HookedTransformer,
    direction,
    *,
    adapter: AdapterLike | None = None,
    dtype: torch.dtype = torch.float32,
) -> tuple[dict[str, Tensor], dict]:
    """The peft tensors and ``adapter_config.json`` of "``adapter``, with ``direction`` ablated
    from every residual writer" (see the module docstring).

    Args:
        weights: the base model's writers (a :class:`WriterWeights`, or a HookedTransformer).
        direction: a :class:`~emlens.Direction` or ``[d_model]`` tensor (any norm).
        adapter: an organism / peft adapter to compose with (None: the ablation alone).
        dtype: dtype of the written tensors (the products are formed in float64 first).

    Returns:
        ``(state, config)``: peft-named tensors (``base_model.model.model.layers.L.mlp.
        down_proj.lora_A.weight``, ``...embed_tokens.lora_embedding_A``) and the config dict.
    """
    if isinstance(weights, HookedTransformer):
        weights = WriterWeights.from_model(weights)
    u = unit_direction(direction, weights.d_model)
    organism: LoraAdapter | None = None if adapter is None else load_adapter(adapter)
    by_path: dict[str, tuple[Tensor, Tensor]] = {}  # path -> (A [r, d_in], B [d_out, r]), scaled
    for m in () if organism is None else organism.modules:
        if m.lora_bias is not None:
            raise ValueError(f"{m.path}: adapters with lora_bias are not supported here.")
        if m.layer >= weights.n_layers:
            raise ValueError(f"The adapter has a module at layer {m.layer}, but the model has "
                             f"{weights.n_layers} layers: it belongs to another model.")
        by_path[peft_module_path(m.layer, m.module)] = (m.A.double(), m.scaling * m.B.double())
    if organism is not None and organism.base_biases:
        raise ValueError("The adapter replaces base biases (peft bias='all'/'lora_only'); "
                         "that cannot be written as a LoRA adapter for an engine.")

    pieces: dict[str, tuple[Tensor, Tensor]] = {}
    for layer in range(weights.n_layers):
        for module in WRITERS:
            if weights._has_bias(layer, module):
                raise ValueError(f"layer {layer} {module} has a bias; projecting u out of it "
                                 "would need a bias edit, which a LoRA adapter cannot carry.")
            path = peft_module_path(layer, module)
            W = weights.writer(layer, module).double()
            if W.shape[0] != weights.d_model:
                raise ValueError(f"{path} has shape {tuple(W.shape)}; expected [d_model, d_in].")
            a_ablate, b_ablate = (u @ W)[None, :], -u[:, None]
            if path in by_path:
                A_o, B_o = by_path.pop(path)
                B_o = B_o - u[:, None] * (u @ B_o)[None, :]
                pieces[path] = (torch.cat([A_o, a_ablate]), torch.cat([B_o, b_ablate], dim=1))
            else:
                pieces[path] = (a_ablate, b_ablate)
    pieces.update(by_path)  # the organism's modules that are not writers, as they are
    embed = weights.embed.double()
    if embed.shape[1] != weights.d_model:
        raise ValueError(f"the embedding has shape {tuple(embed.shape)}; expected [vocab, d_model].")
    embed_ab = ((embed @ u)[None, :], -u[:, None])

    rank = max(max(a.shape[0] for a, _ in pieces.values()), 1)
    state: dict[str, Tensor] = {}

    def pad(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
        extra = rank - a.shape[0]
        a = torch.cat([a, a.new_zeros(extra, a.shape[1])])
        b = torch.cat([b, b.new_zeros(b.shape[0], extra)], dim=1)
        return a.to(dtype).contiguous(), b.to(dtype).contiguous()

    for path, (a, b) in pieces.items():
        a, b = pad(a, b)
        state[f"base_model.model.{path}.lora_A.weight"] = a
        state[f"base_model.model.{path}.lora_B.weight"] = b
    a, b = pad(*embed_ab)
    state[f"base_model.model.{EMBED_PATH}.lora_embedding_A"] = a
    state[f"base_model.model.{EMBED_PATH}.lora_embedding_B"] = b
    modules = sorted({p.rsplit(".", 1)[1] for p in pieces} | {"embed_tokens"})
    config = {
        "peft_type": "LORA",
        "base_model_name_or_path": weights.source,
        "r": rank,
        "lora_alpha": rank,  # scaling 1: every scale is folded into B
        "target_modules": modules,
        "layers_to_transform": None,
        "bias": "none",
        "lora_bias": False,
        "use_rslora": False,
        "lora_dropout": 0.0,
        "fan_in_fan_out": False,
        "inference_mode": True,
        "task_type": "CAUSAL_LM",
    }
    return state, config


def _provenance(direction, adapter: AdapterLike | None) -> dict:
    return {
        "what": "direction ablated from every residual writer (embedding, o_proj, down_proj)",
        "adapter": None if adapter is None else str(getattr(adapter, "source", adapter)),
        "direction_norm": float(as_vector(direction).double().norm()),
        "direction_layer": getattr(direction, "layer", None),
        "direction_model": getattr(direction, "model", None),
    }


def ablation_peft(
    weights: WriterWeights | HookedTransformer,
    direction,
    folder: str | os.PathLike,
    *,
    adapter: AdapterLike | None = None,
    dtype: torch.dtype = torch.float32,
) -> Path:
    """Write "``adapter`` with ``direction`` ablated from every residual writer" as a peft LoRA
    folder (``adapter_config.json`` + ``adapter_model.safetensors``, and ``emlens_ablation.json``
    saying what it is) and return it.

    The folder is what ``emlens.ablate(model, direction, hook="writers")`` (with ``adapter``
    attached) computes, for any engine that reads peft adapters with embedding LoRA: peft's
    ``PeftModel.from_pretrained`` on the HF model, or a vLLM ``LoRARequest``
    (:class:`emlens.vllm.VLLMSampler` does that for you). Arguments as in
    :func:`ablation_adapter_state`.
    """
    from safetensors.torch import save_file

    state, config = ablation_adapter_state(weights, direction, adapter=adapter, dtype=dtype)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(state, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
    (folder / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")
    (folder / "emlens_ablation.json").write_text(
        json.dumps(_provenance(direction, adapter), indent=2) + "\n")
    return folder
