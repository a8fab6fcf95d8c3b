"""LoRA adapters in and out: read from peft folders (:func:`load_adapter`), initialised as peft
does (:func:`init_adapter`), a same-norm random control (:func:`random_like`), and written as peft
folders (:func:`save_peft`, the one writer of peft folders in emlens).

The adapters themselves (:class:`LoraModule`, :class:`LoraAdapter`, :data:`TARGET_MODULES`) are
:mod:`emlens.lora.types`, importable from here.
"""

from __future__ import annotations

import json
import math
import re
import warnings
from collections.abc import Iterable
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from transformer_lens import HookedTransformer

from emlens.lora.types import (
    NORMED_INPUT,
    TARGET_MODULES,
    AdapterLike,
    LoraAdapter,
    LoraModule,
    Selection,
    module_shapes,
    peft_module_path,
)

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
# Read peft folders


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
# New adapters, and peft folders written


def random_like(adapter: LoraAdapter, *, seed: int = 0) -> LoraAdapter:
    """The same-norm random control for an adapter (e.g. a model organism).

    Same modules, ranks and scalings; each module's ``A`` and ``B`` are Gaussian, rescaled so
    that its weight change ``scaling * B @ A`` has exactly the Frobenius norm of the original's
    (and a ``lora_bias``, if any, the original's norm). What a fine-tune does beyond "any change
    of that size in those places" shows as a difference from this control. ``base_biases`` and the
    config are kept as they are.
    """
    g = torch.Generator().manual_seed(int(seed))
    modules = []
    for m in adapter.modules:
        a = torch.randn(m.A.shape, generator=g, dtype=torch.float64)
        b = torch.randn(m.B.shape, generator=g, dtype=torch.float64)
        target = torch.linalg.matrix_norm(m.delta_weight().double())
        got = torch.linalg.matrix_norm(m.scaling * (b @ a))
        if target == 0:
            raise ValueError(f"{m.name} changes nothing (B @ A = 0): there is no norm to match; "
                             "a freshly initialised adapter has B = 0.")
        c = (target / got).sqrt()
        bias = None
        if m.lora_bias is not None:
            r = torch.randn(m.lora_bias.shape, generator=g, dtype=torch.float64)
            bias = (r * m.lora_bias.double().norm() / r.norm()).to(m.lora_bias.dtype)
        modules.append(replace(m, A=(a * c).to(m.A.dtype), B=(b * c).to(m.B.dtype),
                               lora_bias=bias))
    return replace(adapter, modules=tuple(modules), source=f"random_like({adapter.source}, "
                   f"seed={seed})")


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
    shapes = module_shapes(model)
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
        prefix = f"base_model.model.{m.path or peft_module_path(m.layer, m.module)}"
        tensors[f"{prefix}.lora_A.weight"] = m.A.detach().float().cpu().contiguous()
        tensors[f"{prefix}.lora_B.weight"] = m.B.detach().float().cpu().contiguous()
    save_file(tensors, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
    (folder / "adapter_config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True))
    return folder


__all__ = [
    "NORMED_INPUT",
    "TARGET_MODULES",
    "AdapterLike",
    "LoraAdapter",
    "LoraModule",
    "Selection",
    "init_adapter",
    "load_adapter",
    "module_shapes",
    "peft_module_path",
    "random_like",
    "save_peft",
]
