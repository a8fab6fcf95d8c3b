"""Checking an adapter against a model (:func:`check_compatible`) and folding it into a copy of
the weights (:func:`merge_lora`, :func:`unmerge_lora`)."""

from __future__ import annotations

import copy

import einops
import torch
from torch import Tensor
from transformer_lens import HookedTransformer

from emlens.hooks import check_scale
from emlens.lora.adapter import (
    NORMED_INPUT,
    AdapterLike,
    LoraAdapter,
    LoraModule,
    load_adapter,
    module_shapes,
)

# --------------------------------------------------------------------------------------------
# Checking an adapter against a model


def _processing(model: HookedTransformer) -> str:
    info = getattr(model, "emlens_info", None) or {}
    if "processing" in info:
        return str(info["processing"])
    return "fold_ln" if model.cfg.normalization_type in ("RMSPre", "LNPre") else "none"


def check_compatible(
    model: HookedTransformer, adapter: AdapterLike, *, attach: bool = False
) -> LoraAdapter:
    """Load ``adapter`` and check it fits ``model``; raise one error listing every mismatch.

    Checks layer count, module kinds, ``d_model`` / ``d_mlp`` / head sizes, and the model's weight
    processing (see the module docstring). Returns the loaded adapter.
    """
    adapter = load_adapter(adapter)
    cfg = model.cfg
    shapes = module_shapes(model)
    processing = _processing(model)
    problems: list[str] = []
    if not cfg.gated_mlp and any(
        m.module in ("gate_proj", "up_proj", "down_proj") for m in adapter.modules
    ):
        problems.append(
            f"the model's MLP is not gated ({cfg.original_architecture}); expected a Llama/Qwen2-style model"
        )
    if attach and (cfg.use_split_qkv_input or cfg.use_attn_in):
        problems.append("the model has use_split_qkv_input/use_attn_in set; attach needs them off")
    for m in adapter.modules:
        if m.layer >= cfg.n_layers:
            problems.append(f"{m.path}: layer {m.layer}, but the model has {cfg.n_layers} layers")
            continue
        want = shapes[m.module]
        got = (m.B.shape[0], m.A.shape[1])
        if got != want:
            problems.append(
                f"{m.path}: adapter maps d_in={got[1]} -> d_out={got[0]}, the model's {m.module} maps "
                f"d_in={want[1]} -> d_out={want[0]} (d_model={cfg.d_model}, d_mlp={cfg.d_mlp}, "
                f"n_heads={cfg.n_heads}, n_key_value_heads={cfg.n_key_value_heads}, d_head={cfg.d_head})"
            )
        if processing != "none" and m.module in NORMED_INPUT:
            problems.append(
                f"{m.path}: the model was loaded with processing={processing!r}, which folds the "
                f"RMSNorm weight into {m.module}'s weight; the unfolded weight is lost, so this "
                "adapter cannot be applied exactly"
            )
        if (
            m.module == "o_proj"
            and processing == "full"
            and cfg.original_architecture == "Qwen2ForCausalLM"
        ):
            problems.append(
                f"{m.path}: processing='full' folded Qwen2's value biases into b_O, which an o_proj "
                "adapter would need unfolded"
            )
    for (layer, module), bias in adapter.base_biases.items():
        if layer >= cfg.n_layers:
            problems.append(f"layers.{layer}.{module}.bias: the model has {cfg.n_layers} layers")
        elif module in ("gate_proj", "up_proj"):
            problems.append(
                f"layers.{layer}.{module}.bias: TransformerLens's gated MLP has no {module} bias"
            )
        elif bias.shape[0] != shapes[module][0]:
            problems.append(
                f"layers.{layer}.{module}.bias: size {bias.shape[0]}, expected {shapes[module][0]}"
            )
        elif attach:
            problems.append(
                f"layers.{layer}.{module}.bias: the adapter replaces base biases (bias="
                f"{adapter.config.get('bias')!r}); attach keeps base weights, use merge_lora"
            )
        elif processing != "none":
            problems.append(
                f"layers.{layer}.{module}.bias: base-bias changes need processing='none'"
            )
    for m in adapter.modules:
        if m.lora_bias is not None and m.module in ("gate_proj", "up_proj"):
            problems.append(f"{m.path}: lora_bias on {m.module} has no TransformerLens equivalent")
    if problems:
        base = adapter.config.get("base_model_name_or_path")
        raise ValueError(
            f"Adapter {adapter.source or '(in memory)'} (trained on {base!r}) does not fit "
            f"{getattr(model, 'emlens_info', {}).get('source', model.cfg.model_name)!r}:\n  - "
            + "\n  - ".join(problems)
            + "\nLoad the base model the adapter was trained on, with processing='none'."
        )
    return adapter


# --------------------------------------------------------------------------------------------
# Merge


def _param_deltas(
    model: HookedTransformer, m: LoraModule, scale: float
) -> list[tuple[str, Tensor]]:
    """(parameter name, delta in TransformerLens layout) pairs for one adapter."""
    cfg = model.cfg
    n_kv = cfg.n_key_value_heads or cfg.n_heads
    attn = model.blocks[m.layer].attn
    gqa = "_" if hasattr(attn, "_W_K") else ""
    delta = scale * m.delta_weight()
    bias = None if m.lora_bias is None else scale * m.scaling * m.lora_bias
    prefix = f"blocks.{m.layer}"
    out: list[tuple[str, Tensor]] = []
    if m.module in ("q_proj", "k_proj", "v_proj"):
        n = cfg.n_heads if m.module == "q_proj" else n_kv
        letter = m.module[0].upper()
        w_name = f"W_{letter}" if letter == "Q" else f"{gqa}W_{letter}"
        out.append((f"{prefix}.attn.{w_name}", einops.rearrange(delta, "(n h) m -> n m h", n=n)))
        if bias is not None:
            out.append(
                (
                    f"{prefix}.attn.{w_name.replace('W_', 'b_')}",
                    einops.rearrange(bias, "(n h) -> n h", n=n),
                )
            )
    elif m.module == "o_proj":
        out.append(
            (f"{prefix}.attn.W_O", einops.rearrange(delta, "m (n h) -> n h m", n=cfg.n_heads))
        )
        if bias is not None:
            out.append((f"{prefix}.attn.b_O", bias))
    else:
        w_name = {"gate_proj": "W_gate", "up_proj": "W_in", "down_proj": "W_out"}[m.module]
        out.append((f"{prefix}.mlp.{w_name}", delta.T))
        if bias is not None:
            out.append((f"{prefix}.mlp.b_out", bias))
    return out


def _bias_param(model: HookedTransformer, layer: int, module: str) -> tuple[str, str]:
    gqa = "_" if hasattr(model.blocks[layer].attn, "_W_K") else ""
    name = {
        "q_proj": "attn.b_Q",
        "k_proj": f"attn.{gqa}b_K",
        "v_proj": f"attn.{gqa}b_V",
        "o_proj": "attn.b_O",
        "down_proj": "mlp.b_out",
    }[module]
    pattern = "(n h) -> n h" if module in ("q_proj", "k_proj", "v_proj") else "m -> m"
    return f"blocks.{layer}.{name}", pattern


def _copy_model(model: HookedTransformer) -> HookedTransformer:
    cfg = copy.deepcopy(model.cfg)
    cfg.init_weights = False  # every weight is overwritten below
    new = HookedTransformer(cfg, tokenizer=model.tokenizer, move_to_device=False)
    # clone() keeps each tensor's strides. Weights loaded from HF are transposed views of the HF
    # layout, which TransformerLens's F.linear(x, W.T.contiguous()) uses without a copy; a
    # contiguous TL-layout copy would pay a transpose of every weight on every forward.
    tensors = dict(model.named_parameters()) | dict(model.named_buffers())
    with torch.no_grad():
        for name, t in list(new.named_parameters()) + list(new.named_buffers()):
            if name not in tensors:
                raise RuntimeError(f"Cannot copy the model: it has no tensor {name!r}.")
            t.data = tensors[name].detach().clone()
    new.train(model.training)
    new.emlens_info = dict(getattr(model, "emlens_info", None) or {})
    base = getattr(model, "_emlens_lora_base", None)
    if base:
        new._emlens_lora_base = {k: v.clone() for k, v in base.items()}
    return new


def merge_lora(
    model: HookedTransformer, adapter: AdapterLike, scale: float = 1.0, *, inplace: bool = False
) -> HookedTransformer:
    """Fold a LoRA adapter into the weights of a copy of ``model`` (or of ``model`` itself).

    Args:
        model: a Llama/Qwen2-style ``HookedTransformer`` (see the module docstring on processing).
        adapter: a peft folder, hub id, or :class:`LoraAdapter`.
        scale: multiplies the whole adapter effect (0 gives the base model, 1 the peft model).
        inplace: mutate ``model`` instead of returning a merged copy.

    Returns:
        The merged model. Its ``emlens_info["lora"]`` lists what was merged, and it keeps the base
        values of every weight it changed, so :func:`unmerge_lora` restores them bit for bit.
    """
    scale = check_scale(scale)
    adapter = check_compatible(model, adapter)
    merged = model if inplace else _copy_model(model)
    params = dict(merged.named_parameters())
    base: dict[str, Tensor] = getattr(merged, "_emlens_lora_base", None) or {}
    updates: list[tuple[str, Tensor]] = []
    for m in adapter.modules:
        updates += _param_deltas(merged, m, scale)
    for (layer, module), new_bias in adapter.base_biases.items():
        name, pattern = _bias_param(merged, layer, module)
        current = params[name].detach().float()
        new_tl = (
            einops.rearrange(new_bias, pattern, n=current.shape[0]) if "n" in pattern else new_bias
        )
        updates.append((name, scale * (new_tl.to(current.device) - current)))
    with torch.no_grad():
        for name, delta in updates:
            p = params[name]
            base.setdefault(name, p.detach().clone())
            p.add_(delta.to(device=p.device, dtype=p.dtype))
    merged._emlens_lora_base = base
    merged.emlens_info = dict(getattr(merged, "emlens_info", None) or {})
    merged.emlens_info["lora"] = list(merged.emlens_info.get("lora", [])) + [
        {"source": adapter.source, "scale": scale, "n_adapters": len(adapter)}
    ]
    return merged


def unmerge_lora(model: HookedTransformer, *, inplace: bool = False) -> HookedTransformer:
    """Undo every :func:`merge_lora` on ``model``: restore the saved base weights bit for bit."""
    base = getattr(model, "_emlens_lora_base", None)
    if not base:
        raise ValueError(
            "This model has no merged LoRA weights to restore (it was not returned by merge_lora, "
            "or was already unmerged)."
        )
    out = model if inplace else _copy_model(model)
    params = dict(out.named_parameters())
    with torch.no_grad():
        for name, value in base.items():
            params[name].copy_(value)
    out._emlens_lora_base = {}
    out.emlens_info = {
        k: v for k, v in (getattr(out, "emlens_info", None) or {}).items() if k != "lora"
    }
    return out

