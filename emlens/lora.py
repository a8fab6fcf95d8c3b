"""peft LoRA adapters on a HookedTransformer: read, merge, and attach with per-adapter hook points.

A LoRA adapter on a linear map ``W`` (HF layout ``[d_out, d_in]``) adds ``scaling * B (A h)`` to the
map's output, where ``h`` is the map's input, ``A`` is ``[r, d_in]`` and ``B`` is ``[d_out, r]``.
For a rank-1 adapter, ``A . h`` is one number per token: a readable feature, and scaling it is a
steering knob. emlens gives two views of any peft adapter on a Llama/Qwen2-style model:

* :func:`merge_lora` folds every adapter into a *copy* of the model's weights (fast, exact; the
  input model is untouched). :func:`unmerge_lora` restores the base weights bit for bit.
* :func:`attach_lora` keeps the base weights and adds each adapter as a small module with a
  TransformerLens ``HookPoint`` carrying its activation ``A . h``, so ``run_with_cache`` and
  ``run_with_hooks`` work on it unchanged.

Hook-point names. Each adapter becomes a submodule ``lora_<short>`` of the block component it
belongs to, ``<short>`` being the peft module name without ``_proj``::

    q_proj    -> blocks.{L}.attn.lora_q        k_proj  -> blocks.{L}.attn.lora_k
    v_proj    -> blocks.{L}.attn.lora_v        o_proj  -> blocks.{L}.attn.lora_o
    gate_proj -> blocks.{L}.mlp.lora_gate      up_proj -> blocks.{L}.mlp.lora_up
    down_proj -> blocks.{L}.mlp.lora_down

A rank-1 adapter's activation is ``<name>.hook_scalar`` with shape ``[batch, pos]``; a rank-r
adapter's is ``<name>.hook_acts`` with shape ``[batch, pos, r]`` (the two names differ so that code
written for scalars cannot silently read an r-vector). ``names_filter=lambda n: "lora" in n`` picks
them all.

Data path of an attached adapter. No TransformerLens module is replaced. The adapter reads its
input where the base map reads it and adds its output at the hook point right after the map:

======================  ===============================  ==============================
peft module             input read at                    output added at
======================  ===============================  ==============================
q/k/v_proj              output of ``blocks.L.ln1``       ``attn.hook_q`` / ``_k`` / ``_v``
o_proj                  ``attn.hook_z`` (heads flat)     ``blocks.L.hook_attn_out``
gate_proj / up_proj     output of ``blocks.L.ln2``       ``mlp.hook_pre`` / ``hook_pre_linear``
down_proj               ``mlp.hook_post``                ``blocks.L.hook_mlp_out``
======================  ===============================  ==============================

Both are plain torch forward hooks that TransformerLens does not manage, so they survive
``model.hooks()`` blocks and ``model.reset_hooks()``, with or without ``including_permanent=True``
(an adapter is never left half wired); they are removed when the attach block exits (also on
exceptions) or on ``handle.remove()``. The read runs
after any hook you add on the same point (your patch of ``mlp.hook_post`` reaches the adapter, as
it would in the HF model) and the add runs before yours (``hook_mlp_out`` includes the adapter's
output). With ``use_attn_result`` the per-head ``hook_result`` does not include an ``o_proj``
adapter.

Training. ``attach_lora(model, adapter, trainable=True)`` attaches the same modules with ``A``
and ``B`` as float32 parameters: train them (the base frozen) and the hook points above fire
during training; :meth:`AttachedLora.to_adapter` reads the result back and :func:`save_peft` (the
one writer of peft folders in emlens) saves it. :class:`emlens.training.TrainableLora` and
:mod:`emlens.organisms.train` train this way.

Weight processing. Models loaded with ``processing="fold_ln"`` or ``"full"`` have the RMSNorm
weights folded into ``W_Q/W_K/W_V/W_gate/W_in``; the unfolded weight is gone, so adapters on
``q/k/v/gate/up_proj`` cannot be expressed exactly and are refused (load with ``processing="none"``,
the default). ``down_proj`` works under every mode; ``o_proj`` too, except on a ``"full"`` model
with value biases (Qwen2), whose folded value biases would need the lost ``b_V``.
"""

from __future__ import annotations

import copy
import fnmatch
import json
import math
import re
import warnings
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Union

import einops
import torch
from jaxtyping import Float
from torch import Tensor, nn
from transformer_lens import HookedTransformer
from transformer_lens.hook_points import HookPoint

from emlens.hooks import HookFn, Hooks, check_scale

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
_NORMED_INPUT = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")
_KEY_RE = re.compile(
    r"^(?P<path>(?:.*\.)?layers\.(?P<layer>\d+)\.(?P<block>self_attn|mlp)\."
    r"(?P<module>[a-z_]+_proj))\.(?P<rest>.+)$"
)
_REST_RE = re.compile(
    r"^(?:lora_(?P<ab>A|B)(?:\.[\w-]+)?\.(?P<wb>weight|bias)|(?:base_layer\.)?bias)$"
)
# Config options that change what an adapter computes and that we do not implement.
_UNSUPPORTED_OPTIONS = {
    "use_dora": "DoRA (weight-decomposed LoRA) rescales the merged weight per column",
    "modules_to_save": "modules_to_save trains full copies of modules (embeddings, lm_head, ...)",
    "trainable_token_indices": "trainable_token_indices trains embedding rows",
    "target_parameters": "target_parameters puts LoRA on raw parameters (MoE experts)",
    "layer_replication": "layer_replication duplicates layers",
    "alora_invocation_tokens": "activated LoRA (aLoRA) switches on after invocation tokens",
    "use_qalora": "QA-LoRA pools the input in groups",
    "use_bdlora": "block-diagonal LoRA",
    "arrow_config": "Arrow routes between adapters",
    "monteclora_config": "MonteCLoRA samples adapter weights",
    "kasa_config": "KaSA rescales singular values",
    "velora_config": "VeLoRA",
}


# --------------------------------------------------------------------------------------------
# Reading adapters


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


def _resolve_files(
    source: str | Path, allow_pickle: bool, revision: str | None
) -> tuple[Path, Path]:
    folder = Path(source)
    if not folder.exists():
        if Path(source).suffix or str(source).count("/") != 1:
            raise FileNotFoundError(
                f"No adapter folder at {source!r}. Give a local peft folder (adapter_config.json + "
                "adapter_model.safetensors) or a hub id 'owner/name'."
            )
        from huggingface_hub import snapshot_download

        patterns = ["adapter_config.json", "adapter_model.safetensors"]
        try:
            folder = Path(
                snapshot_download(
                    str(source),
                    revision=revision,
                    allow_patterns=patterns + (["adapter_model.bin"] if allow_pickle else []),
                )
            )
        except Exception as err:
            raise FileNotFoundError(
                f"{source!r} is not a local folder, and downloading it as a hub id failed "
                f"({type(err).__name__}: {err}). Check the path, or the id and your network."
            ) from err
    if folder.is_file():
        raise ValueError(f"{folder} is a file; give the peft adapter *folder* that contains it.")
    config_path = folder / "adapter_config.json"
    if not config_path.is_file():
        raise FileNotFoundError(
            f"{folder} has no adapter_config.json; a peft adapter folder is written by "
            "peft_model.save_pretrained(folder)."
        )
    weights = folder / "adapter_model.safetensors"
    if weights.is_file():
        return config_path, weights
    pickled = folder / "adapter_model.bin"
    if pickled.is_file():
        if not allow_pickle:
            raise ValueError(
                f"{pickled} is a pickle file, and unpickling can run arbitrary code, so emlens only "
                "reads adapter_model.safetensors. Convert it once where you trust the file "
                "(peft_model.save_pretrained(folder, safe_serialization=True)), or pass "
                "allow_pickle=True to load it with torch.load(weights_only=True)."
            )
        return config_path, pickled
    raise FileNotFoundError(f"{folder} has adapter_config.json but no adapter_model.safetensors.")


def _pattern_value(patterns: dict[str, Any], path: str, default: Any) -> Any:
    # peft.utils.other.get_pattern_key: the first pattern that matches a suffix of the path.
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", path):
            return value
    return default


def _targets(config: dict[str, Any], path: str, layer: int) -> bool:
    target = config.get("target_modules")
    if isinstance(target, str):
        ok = target == "all-linear" or re.fullmatch(target, path) is not None
    elif target:
        ok = any(path == t or path.endswith("." + t) for t in target)
    else:
        ok = True
    layers = config.get("layers_to_transform")
    if layers is not None:
        ok = ok and layer in ([layers] if isinstance(layers, int) else list(layers))
    return ok


def _check_config(config: dict[str, Any], source: str) -> None:
    if config.get("peft_type", "LORA") != "LORA":
        raise ValueError(
            f"{source} is a {config.get('peft_type')} adapter; emlens reads LoRA adapters only."
        )
    used = [
        f"{k}={config[k]!r} ({why})" for k, why in _UNSUPPORTED_OPTIONS.items() if config.get(k)
    ]
    if used:
        raise ValueError(
            f"{source} uses peft options emlens does not support: "
            + "; ".join(used)
            + ". Train the adapter without them, or merge it in peft (merge_and_unload) and load "
            "the merged model with emlens.load_model."
        )
    if config.get("fan_in_fan_out"):
        # peft itself turns fan_in_fan_out off for nn.Linear targets (all Llama/Qwen2 projections).
        warnings.warn(
            f"{source}: fan_in_fan_out=True is ignored for nn.Linear projections, as peft does.",
            stacklevel=3,
        )


def load_adapter(
    source: AdapterLike,
    *,
    allow_pickle: bool = False,
    revision: str | None = None,
) -> LoraAdapter:
    """Read a peft LoRA adapter folder (local path or hub id) into a :class:`LoraAdapter`.

    Args:
        source: a folder with ``adapter_config.json`` + ``adapter_model.safetensors``, a hub id
            (``"owner/name"``, downloaded with huggingface_hub), or an already loaded adapter
            (returned as is).
        allow_pickle: also accept ``adapter_model.bin`` (loaded with ``weights_only=True``).
        revision: hub revision.

    Honours ``r``, ``lora_alpha``, ``use_rslora``, ``rank_pattern``, ``alpha_pattern``,
    ``target_modules``, ``layers_to_transform``, ``bias`` and ``lora_bias``; refuses DoRA,
    ``modules_to_save`` and other options that change the computation, naming them.
    """
    if isinstance(source, LoraAdapter):
        return source
    config_path, weights_path = _resolve_files(source, allow_pickle, revision)
    src = str(source)
    try:
        config = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(
            f"{config_path} is not valid JSON ({err}); a peft adapter_config.json is written by "
            "peft_model.save_pretrained(folder). Re-save or re-download the adapter."
        ) from err
    if not isinstance(config, dict):
        raise ValueError(
            f"{config_path} holds a JSON {type(config).__name__}, not an object; it is not a peft "
            "adapter_config.json."
        )
    _check_config(config, src)
    try:
        if weights_path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(weights_path))
        else:
            state = torch.load(str(weights_path), map_location="cpu", weights_only=True)
    except Exception as err:  # safetensors' SafetensorError, pickle and zip errors
        raise ValueError(
            f"Cannot read the adapter weights {weights_path} ({type(err).__name__}: {err}). The "
            "file is truncated or corrupt: re-save or re-download the adapter."
        ) from err

    parts: dict[str, dict[str, Any]] = {}
    base_biases: dict[tuple[int, str], Tensor] = {}
    unsupported: list[str] = []
    for key, tensor in state.items():
        short = key.removeprefix("base_model.model.")
        m = _KEY_RE.match(short)
        r = _REST_RE.match(m.group("rest")) if m else None
        if m is None or r is None or m.group("module") not in TARGET_MODULES:
            unsupported.append(key)
            continue
        path, layer, module = m.group("path"), int(m.group("layer")), m.group("module")
        if r.group("ab") is None:  # a base-layer bias (peft bias="all" / "lora_only")
            base_biases[(layer, module)] = tensor.float()
            continue
        entry = parts.setdefault(path, {"layer": layer, "module": module})
        entry[f"{r.group('ab')}.{r.group('wb')}"] = tensor.float()
    if unsupported:
        hint = ""
        if any("lora_magnitude_vector" in k for k in unsupported):
            hint = " (lora_magnitude_vector: a DoRA adapter)"
        elif any("lora_embedding" in k for k in unsupported):
            hint = " (lora_embedding_A/B: LoRA on embeddings)"
        raise ValueError(
            f"{src} has weights emlens cannot place{hint}: {unsupported[:6]}"
            f"{' ...' if len(unsupported) > 6 else ''}. emlens supports LoRA on the Llama/Qwen2 "
            f"projections {sorted(TARGET_MODULES)}."
        )

    modules: list[LoraModule] = []
    problems: list[str] = []
    for path, e in parts.items():
        if "A.weight" not in e or "B.weight" not in e:
            problems.append(
                f"{path}: has {sorted(k for k in e if '.' in k)}, needs lora_A and lora_B"
            )
            continue
        A, B = e["A.weight"], e["B.weight"]
        bad = [k for k, v in e.items() if isinstance(v, Tensor) and not torch.isfinite(v).all()]
        if bad:
            problems.append(f"{path}: {', '.join(sorted(bad))} hold NaN or infinite values")
            continue
        rank = A.shape[0]
        if B.shape[1] != rank:
            problems.append(f"{path}: lora_A is {tuple(A.shape)} but lora_B is {tuple(B.shape)}")
            continue
        r_cfg = _pattern_value(config.get("rank_pattern") or {}, path, config.get("r", rank))
        if r_cfg != rank:
            problems.append(f"{path}: weights have rank {rank}, config says r={r_cfg}")
            continue
        if not _targets(config, path, e["layer"]):
            problems.append(
                f"{path}: not in target_modules={config.get('target_modules')!r} / "
                f"layers_to_transform={config.get('layers_to_transform')!r}"
            )
            continue
        alpha = _pattern_value(
            config.get("alpha_pattern") or {}, path, config.get("lora_alpha", rank)
        )
        scaling = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
        modules.append(
            LoraModule(
                layer=e["layer"],
                module=e["module"],
                A=A,
                B=B,
                scaling=float(scaling),
                lora_bias=e.get("B.bias"),
                path=path,
            )
        )
    if problems:
        raise ValueError(
            f"{src} is inconsistent with its adapter_config.json:\n  " + "\n  ".join(problems)
        )
    if not modules and not base_biases:
        raise ValueError(f"{src} contains no LoRA weights.")
    order = list(TARGET_MODULES)
    modules.sort(key=lambda m: (m.layer, order.index(m.module)))
    return LoraAdapter(modules=tuple(modules), base_biases=base_biases, config=config, source=src)


# --------------------------------------------------------------------------------------------
# Checking an adapter against a model


def _shapes(model: HookedTransformer) -> dict[str, tuple[int, int]]:
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
    shapes = _shapes(model)
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
        if processing != "none" and m.module in _NORMED_INPUT:
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


# --------------------------------------------------------------------------------------------
# Attach


class LoraHookedModule(nn.Module):
    """One adapter: ``A``, ``B`` and the hook point carrying ``A . h``.

    The model calls :meth:`read` with the base map's input and :meth:`add` with the base map's
    output (through hooks that :func:`attach_lora` registers). Between the two calls the
    activation is held on this instance; it never outlives one forward pass.

    With ``trainable=True`` ``A`` and ``B`` are ``nn.Parameter``s (copies of the given values, in
    ``dtype``), so an optimiser over :meth:`parameters` trains the attached adapter, and its
    ``hook_scalar`` / ``hook_acts`` fire during training as they do at analysis time
    (:class:`emlens.training.TrainableLora` is a list of these). Otherwise they are buffers.
    """

    def __init__(
        self,
        lora: LoraModule,
        *,
        dtype: torch.dtype,
        device: str | torch.device,
        n_out_heads: int | None,
        trainable: bool = False,
    ):
        super().__init__()
        self.adapter_name = lora.name
        self.layer = lora.layer
        self.module = lora.module
        self.rank = lora.rank
        self.scaling = lora.scaling
        self.path = lora.path or _peft_path(lora.layer, lora.module)
        self.n_out_heads = n_out_heads  # head count of the output hook point (q/k/v), else None
        for key, value in (("A", lora.A), ("B", lora.B)):
            value = value.detach().to(device=device, dtype=dtype)
            if trainable:
                self.register_parameter(key, nn.Parameter(value.clone()))
            else:
                self.register_buffer(key, value, persistent=False)
        bias = None if lora.lora_bias is None else lora.scaling * lora.lora_bias
        self.register_buffer(
            "bias", None if bias is None else bias.to(device=device, dtype=dtype), persistent=False
        )
        if self.rank == 1:
            self.hook_scalar = HookPoint()  # [batch, pos]
        else:
            self.hook_acts = HookPoint()  # [batch, pos, r]
        self._acts: Tensor | None = None

    @property
    def hook(self) -> HookPoint:
        return self.hook_scalar if self.rank == 1 else self.hook_acts

    def to_lora_module(self) -> LoraModule:
        """The current weights as a :class:`LoraModule` (float32 copies on the CPU)."""
        bias = None if self.bias is None else self.bias.detach().float().cpu() / self.scaling
        return LoraModule(
            layer=self.layer,
            module=self.module,
            A=self.A.detach().float().cpu().clone(),
            B=self.B.detach().float().cpu().clone(),
            scaling=self.scaling,
            lora_bias=bias,
            path=self.path,
        )

    def read(self, x: Float[Tensor, "batch pos ..."]) -> None:
        if self.module == "o_proj":
            x = einops.rearrange(x, "batch pos head d_head -> batch pos (head d_head)")
        acts = x.to(self.A.dtype) @ self.A.T  # [batch, pos, r]
        self._acts = self.hook(acts[..., 0] if self.rank == 1 else acts)

    def add(self, out: Float[Tensor, "batch pos ..."]) -> Tensor:
        acts, self._acts = self._acts, None
        if acts is None:
            raise RuntimeError(
                f"{self.adapter_name}: the adapter's output point ran before its input point. Is the "
                "model's forward pass unusual (split qkv input, a custom block)?"
            )
        if self.rank == 1:
            acts = acts[..., None]
        delta = self.scaling * (acts @ self.B.T)
        if self.bias is not None:
            delta = delta + self.bias
        if self.n_out_heads is not None:
            delta = einops.rearrange(
                delta,
                "batch pos (head d_head) -> batch pos head d_head",
                head=delta.shape[-1] // out.shape[-1],
            )
            if delta.shape[2] != out.shape[2]:  # ungroup_grouped_query_attention
                delta = delta.repeat_interleave(out.shape[2] // delta.shape[2], dim=2)
        return out + delta.to(out.dtype)


@dataclass
class _Registration:
    handles: tuple[torch.utils.hooks.RemovableHandle, ...]

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def _add_wiring_hook(point: HookPoint, fn: HookFn, *, last: bool) -> _Registration:
    """A forward hook on ``point`` that stays last (``last``) or first among the point's hooks.

    It is a plain torch hook, not a TransformerLens one, so ``model.reset_hooks()`` (with or
    without ``including_permanent=True``) cannot remove half of an adapter's wiring: only
    :meth:`AttachedLora.remove` does. PyTorch runs forward hooks in insertion order; a forward
    pre-hook moves ours to the end (or the front) before every call, so hooks added later by
    ``model.hooks()`` still run before a read and after an add.
    """
    handle = point.register_forward_hook(
        lambda module, _inputs, output: fn(output, hook=module), prepend=not last
    )

    hook_id = handle.id  # the pre-hook closes over numbers only (see emlens.fingerprint)

    def reorder(module: nn.Module, args: Any) -> None:
        if hook_id in module._forward_hooks:
            module._forward_hooks.move_to_end(hook_id, last=last)

    return _Registration((handle, point.register_forward_pre_hook(reorder)))


def _wire(model: HookedTransformer, mod: LoraHookedModule) -> list[_Registration]:
    block = model.blocks[mod.layer]
    regs: list[_Registration] = []

    def read_hook(act: Tensor, hook: HookPoint) -> None:
        mod.read(act)

    def add_hook(act: Tensor, hook: HookPoint) -> Tensor:
        return mod.add(act)

    if mod.module in ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"):
        norm = block.ln1 if mod.module in ("q_proj", "k_proj", "v_proj") else block.ln2
        # The norm module's output (normalised input times its weight) is exactly the map's input.
        regs.append(_Registration((norm.register_forward_hook(lambda _m, _i, out: mod.read(out)),)))
    elif mod.module == "o_proj":
        regs.append(_add_wiring_hook(block.attn.hook_z, read_hook, last=True))
    else:
        regs.append(_add_wiring_hook(block.mlp.hook_post, read_hook, last=True))
    out_point = {
        "q_proj": block.attn.hook_q,
        "k_proj": block.attn.hook_k,
        "v_proj": block.attn.hook_v,
        "o_proj": block.hook_attn_out,
        "gate_proj": block.mlp.hook_pre,
        "up_proj": block.mlp.hook_pre_linear,
        "down_proj": block.hook_mlp_out,
    }[mod.module]
    regs.append(_add_wiring_hook(out_point, add_hook, last=False))
    return regs


def scale_hook(factor: float | Tensor) -> HookFn:
    """Hook function multiplying an adapter activation by ``factor`` (0 ablates the adapter)."""

    def hook_fn(acts: Tensor, hook: HookPoint) -> Tensor:
        return acts * factor

    return hook_fn


def set_hook(value: float | Tensor) -> HookFn:
    """Hook function replacing an adapter activation with ``value`` (broadcast to its shape)."""

    def hook_fn(acts: Tensor, hook: HookPoint) -> Tensor:
        return torch.as_tensor(value).to(acts).expand_as(acts).clone()

    return hook_fn


class AttachedLora:
    """Handle of an attached adapter: its modules, hook names, steering knobs and ``remove()``.

    Use as a context manager (``with attach_lora(model, adapter) as lora:``) or keep it and call
    :meth:`remove`. Adapter names are TransformerLens module names (``"blocks.21.mlp.lora_down"``);
    :attr:`hook_names` are their activation hook points.
    """

    def __init__(
        self,
        model: HookedTransformer,
        adapter: LoraAdapter,
        modules: dict[str, LoraHookedModule],
        registrations: list[_Registration],
    ):
        self.model = model
        self.adapter = adapter
        self.modules = modules
        self._registrations = registrations
        self._hook_set = frozenset(self.hook_names)
        self.attached = True

    # names -----------------------------------------------------------------------------------
    @property
    def names(self) -> list[str]:
        """Adapter module names, e.g. ``["blocks.9.mlp.lora_down", ...]``."""
        return list(self.modules)

    @property
    def hook_names(self) -> list[str]:
        """Activation hook-point names (``hook_scalar`` for rank 1, ``hook_acts`` for rank r)."""
        return [m.hook.name for m in self.modules.values()]

    @property
    def scalar_names(self) -> list[str]:
        """``hook_scalar`` names; raises if any adapter has rank > 1, explaining its activation."""
        rank_r = [(n, m.rank) for n, m in self.modules.items() if m.rank != 1]
        if rank_r:
            n, r = rank_r[0]
            raise ValueError(
                f"{len(rank_r)} of {len(self.modules)} adapters have rank > 1 (e.g. {n}: rank {r}). A "
                f"rank-{r} adapter has no single scalar: its activation A.h is an r-vector at "
                f"{n}.hook_acts with shape [batch, pos, {r}]. Read lora.hook_names, or project the "
                "r-vector onto a direction of your choice."
            )
        return self.hook_names

    def names_filter(self, name: str) -> bool:
        """``names_filter`` for ``run_with_cache`` selecting every adapter activation."""
        return name in self._hook_set

    def select(self, which: Selection = None) -> list[str]:
        """Adapter names matching ``which``: None (all), a layer, a name, a glob, or a list of them.

        Raises ValueError naming the attached adapters when an item matches none.
        """
        if which is None:
            return self.names
        items = [which] if isinstance(which, (int, str)) else list(which)
        chosen: list[str] = []
        for item in items:
            if isinstance(item, int):
                hits = [n for n, m in self.modules.items() if m.layer == item]
            else:
                stem = item.removesuffix(".hook_scalar").removesuffix(".hook_acts")
                hits = [n for n in self.modules if n == stem or fnmatch.fnmatchcase(n, stem)]
            if not hits:
                raise ValueError(f"No attached adapter matches {item!r}; attached: {self.names}.")
            chosen += [h for h in hits if h not in chosen]
        return chosen

    def to_adapter(self) -> LoraAdapter:
        """The adapters' current weights (trained ones included) as a :class:`LoraAdapter`."""
        return replace(
            self.adapter, modules=tuple(m.to_lora_module() for m in self.modules.values())
        )

    def scalars(self, cache) -> Float[Tensor, "batch pos n_adapters"]:
        """Stack the rank-1 activations from a cache (``run_with_cache(names_filter=lora.names_filter)``)."""
        return torch.stack([cache[n] for n in self.scalar_names], dim=-1)

    # steering --------------------------------------------------------------------------------
    def hooks(
        self,
        which: Selection = None,
        *,
        scale: float | dict[str, float] | None = None,
        value: float | Tensor | dict[str, Any] | None = None,
    ) -> Hooks:
        """``(hook_name, fn)`` pairs scaling or setting the selected adapters' activations.

        ``scale=0.0`` zeroes adapters; ``scale={"blocks.21.mlp.lora_down": 3.0}`` scales one;
        ``value=5.0`` sets rank-1 scalars (a ``[batch, pos]`` tensor sets them per token). Give
        exactly one of ``scale`` / ``value``. Use with ``model.run_with_hooks(fwd_hooks=...)``,
        ``model.hooks(...)`` or :meth:`steer`.
        """
        if (scale is None) == (value is None):
            raise ValueError("Give exactly one of scale= or value=.")
        knob, factory = (scale, scale_hook) if scale is not None else (value, set_hook)
        if isinstance(knob, dict):
            targets = {n: v for key, v in knob.items() for n in self.select(key)}
        else:
            targets = {n: knob for n in self.select(which)}
        kind = "scale" if scale is not None else "value"
        for n, v in targets.items():
            if isinstance(v, Tensor) and v.numel() != 1:
                if not torch.isfinite(v).all():
                    raise ValueError(f"{kind} for {n} holds NaN or infinite values.")
            else:
                targets[n] = check_scale(v, f"{kind} for {n}")
        return [(self.modules[n].hook.name, factory(v)) for n, v in targets.items()]

    @contextmanager
    def steer(
        self,
        which: Selection = None,
        *,
        scale: float | dict[str, float] | None = None,
        value: float | Tensor | dict[str, Any] | None = None,
    ) -> Iterator[AttachedLora]:
        """Context manager applying :meth:`hooks` with ``model.hooks`` (removed on exit)."""
        with self.model.hooks(fwd_hooks=self.hooks(which, scale=scale, value=value)):
            yield self

    # lifetime --------------------------------------------------------------------------------
    def remove(self) -> None:
        """Take every adapter out of the model; the model is as before :func:`attach_lora`."""
        if not self.attached:
            return
        try:
            for reg in self._registrations:
                reg.remove()
            for mod in self.modules.values():
                parent = (
                    self.model.blocks[mod.layer].attn
                    if mod.module in ("q_proj", "k_proj", "v_proj", "o_proj")
                    else self.model.blocks[mod.layer].mlp
                )
                delattr(parent, TARGET_MODULES[mod.module][1])
        finally:
            self.model.setup()
            self.attached = False

    def __enter__(self) -> AttachedLora:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    def __repr__(self) -> str:
        ranks = sorted({m.rank for m in self.modules.values()})
        return (
            f"AttachedLora({len(self.modules)} adapters, rank {ranks}, "
            f"{'attached' if self.attached else 'removed'}, source={self.adapter.source!r})"
        )


def attach_lora(
    model: HookedTransformer, adapter: AdapterLike, *, trainable: bool = False
) -> AttachedLora:
    """Attach a LoRA adapter unmerged, each adapter a submodule with its activation hook point.

    Base weights are untouched. Returns an :class:`AttachedLora` handle, usable as a context
    manager (adapters removed on exit, also on exceptions) or kept (``handle.remove()``). See the
    module docstring for names and the data path.

    With ``trainable=True`` each adapter's ``A`` and ``B`` are float32 ``nn.Parameter`` copies
    (the base model's dtype may be lower): train them (``handle.parameters()``), and write the
    result with ``save_peft(handle.to_adapter(), folder)``.
    """
    adapter = check_compatible(model, adapter, attach=True)
    dtype = torch.float32 if trainable else model.cfg.dtype
    modules = {
        lm.name: LoraHookedModule(
            lm, dtype=dtype, device=model.W_E.device, n_out_heads=_out_heads(model, lm.module),
            trainable=trainable,
        )
        for lm in adapter.modules
    }
    return attach_modules(model, adapter, modules)


def _out_heads(model: HookedTransformer, module: str) -> int | None:
    if module == "q_proj":
        return model.cfg.n_heads
    if module in ("k_proj", "v_proj"):
        return model.cfg.n_key_value_heads or model.cfg.n_heads
    return None


def attach_modules(
    model: HookedTransformer, adapter: LoraAdapter, modules: dict[str, LoraHookedModule]
) -> AttachedLora:
    """Add ready-made adapter modules to ``model`` and wire them (the one attach path).

    ``adapter`` must already have passed :func:`check_compatible`; ``modules`` maps each of its
    module names to the :class:`LoraHookedModule` to attach (built by :func:`attach_lora`, or the
    trainable modules of :class:`emlens.training.TrainableLora`, which stay theirs).
    """
    taken = [name for name in modules if name in model.mod_dict]
    if taken:
        raise ValueError(
            f"{taken[:3]} {'...' if len(taken) > 3 else ''}are already attached to this model; remove "
            "the other adapter first (handle.remove()) or merge one of them with merge_lora."
        )
    attached: dict[str, LoraHookedModule] = {}
    registrations: list[_Registration] = []
    try:
        for name, mod in modules.items():
            if mod.n_out_heads != _out_heads(model, mod.module):
                raise ValueError(f"{name}: built for {mod.n_out_heads} output heads, the model "
                                 f"has {_out_heads(model, mod.module)}.")
            component, short = TARGET_MODULES[mod.module]
            getattr(model.blocks[mod.layer], component).add_module(short, mod)
            attached[name] = mod
            registrations += _wire(model, mod)
        model.setup()
    except BaseException:
        AttachedLora(model, adapter, attached, registrations).remove()
        raise
    return AttachedLora(model, adapter, attached, registrations)


# --------------------------------------------------------------------------------------------
# Write peft folders


def init_adapter(
    model: HookedTransformer,
    target_modules: Iterable[str],
    layers: Iterable[int] | None = None,
    *,
    r: int = 1,
    lora_alpha: float = 1.0,
    use_rslora: bool = False,
) -> LoraAdapter:
    """A fresh adapter for ``model`` as peft initialises one: ``A`` Kaiming-uniform, ``B`` zero.

    One adapter per peft module name in ``target_modules`` at each of ``layers`` (None: every
    layer), scaling ``lora_alpha / r`` (``lora_alpha / sqrt(r)`` with rsLoRA); the model is
    unchanged until it trains. Draws from torch's global RNG. Train it attached with
    ``attach_lora(model, init_adapter(...), trainable=True)``.
    """
    target_modules = list(target_modules)
    unknown = [m for m in target_modules if m not in TARGET_MODULES]
    if unknown:
        raise ValueError(f"target_modules {unknown} are not among {sorted(TARGET_MODULES)}.")
    if r < 1:
        raise ValueError(f"r must be >= 1, got {r}.")
    shapes = _shapes(model)
    scaling = lora_alpha / (math.sqrt(r) if use_rslora else r)
    order = list(TARGET_MODULES)
    modules = []
    for layer in sorted(range(model.cfg.n_layers) if layers is None else layers):
        for module in sorted(target_modules, key=order.index):
            d_out, d_in = shapes[module]
            A = torch.empty(r, d_in)
            nn.init.kaiming_uniform_(A, a=math.sqrt(5))  # peft's init for lora_A
            modules.append(LoraModule(layer=layer, module=module, A=A, B=torch.zeros(d_out, r),
                                      scaling=scaling))
    return LoraAdapter(modules=tuple(modules), source="(init_adapter)")


def _peft_path(layer: int, module: str) -> str:
    component = "self_attn" if TARGET_MODULES[module][0] == "attn" else "mlp"
    return f"model.layers.{layer}.{component}.{module}"


def save_peft(
    adapter: LoraAdapter,
    folder: str | Path,
    *,
    base_model_name_or_path: str | None = None,
    config: dict[str, Any] | None = None,
) -> Path:
    """Write ``adapter`` as a peft LoRA folder (``adapter_config.json`` + safetensors weights).

    The one writer of peft folders in emlens (trained :class:`~emlens.training.TrainableLora`s,
    organisms, checkpoints): keys follow peft's naming for ``LlamaForCausalLM`` / ``Qwen2ForCausalLM``
    (``base_model.model.model.layers.L.mlp.down_proj.lora_A.weight``), so :func:`load_adapter` and
    peft's ``PeftModel.from_pretrained`` read it. The config is derived from the modules (one
    rank and one scaling for all of them, else ValueError; ``target_modules`` and
    ``layers_to_transform`` from the modules present); ``config`` entries override it (e.g.
    ``use_rslora`` with the matching ``lora_alpha``, or ``layers_to_transform=None`` for every layer).
    """
    from safetensors.torch import save_file

    if not adapter.modules:
        raise ValueError("The adapter has no modules to write.")
    if adapter.base_biases or any(m.lora_bias is not None for m in adapter.modules):
        raise ValueError("save_peft writes plain LoRA weights; this adapter has biases.")
    ranks = {m.rank for m in adapter.modules}
    scalings = {m.scaling for m in adapter.modules}
    if len(ranks) != 1 or len(scalings) != 1:
        raise ValueError(f"save_peft needs one rank and one scaling; got ranks {sorted(ranks)}, "
                         f"scalings {sorted(scalings)}.")
    (rank,), (scaling,) = ranks, scalings
    modules = sorted({m.module for m in adapter.modules}, key=list(TARGET_MODULES).index)
    layers = sorted({m.layer for m in adapter.modules})
    if len(adapter.modules) != len(modules) * len(layers):
        raise ValueError("save_peft needs the same modules at every adapted layer.")
    cfg: dict[str, Any] = {
        "base_model_name_or_path": base_model_name_or_path
        or adapter.config.get("base_model_name_or_path"),
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "init_lora_weights": True,
        "layers_to_transform": layers,
        "lora_alpha": scaling * rank,
        "lora_bias": False,
        "lora_dropout": 0.0,
        "peft_type": "LORA",
        "r": rank,
        "target_modules": modules,
        "task_type": "CAUSAL_LM",
        "use_dora": False,
        "use_rslora": False,
    }
    cfg.update(config or {})
    alpha = cfg["lora_alpha"]
    implied = alpha / math.sqrt(rank) if cfg["use_rslora"] else alpha / rank
    if not math.isclose(implied, scaling, rel_tol=1e-6):
        raise ValueError(f"config lora_alpha={alpha} (use_rslora={cfg['use_rslora']}) gives scaling "
                         f"{implied}, the modules have {scaling}.")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, Tensor] = {}
    for m in adapter.modules:
        prefix = f"base_model.model.{m.path or _peft_path(m.layer, m.module)}"
        tensors[f"{prefix}.lora_A.weight"] = m.A.detach().float().cpu().contiguous()
        tensors[f"{prefix}.lora_B.weight"] = m.B.detach().float().cpu().contiguous()
    save_file(tensors, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
    (folder / "adapter_config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True))
    return folder


__all__ = [
    "AttachedLora",
    "LoraAdapter",
    "LoraHookedModule",
    "LoraModule",
    "TARGET_MODULES",
    "attach_lora",
    "attach_modules",
    "check_compatible",
    "init_adapter",
    "load_adapter",
    "merge_lora",
    "save_peft",
    "scale_hook",
    "set_hook",
    "unmerge_lora",
]
