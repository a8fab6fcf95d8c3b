"""Fingerprints of everything that changes a model's answers, for the evaluation cache.

A cached answer is only valid for the exact computation that produced it: the weights, the buffers
(an attached LoRA adapter keeps its ``A``/``B`` there), and every hook that runs during the forward
pass (``steer``/``ablate`` blocks, ``model.hooks``, adapter wiring, plain torch hooks, torch's global
module hooks). :func:`model_fingerprint` hashes the tensors; :func:`hooks_fingerprint` hashes each
active hook by its code and by what it closes over (tensors by value, numbers and strings by
value, functions recursively). A hook holding something else that could change its output (an
arbitrary object) cannot be fingerprinted: the fingerprint then raises :class:`Unfingerprintable`
naming the hook, and the caller decides (``evaluate`` does not cache answers then, unless given a
``cache_tag``).

Objects may take part by defining ``__emlens_fingerprint__(self) -> str``; modules inside the
model are fingerprinted by their path (their tensors are already in :func:`model_fingerprint`).
"""

from __future__ import annotations

import functools
import hashlib
import types
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn

# Tensors larger than this are hashed by summary statistics and a strided sample, not by bytes.
_FULL_HASH_NUMEL = 1 << 20
_SAMPLE = 4096
_CHUNK = 1 << 24


class Unfingerprintable(TypeError):
    """A hook closes over an object whose effect on the output cannot be hashed."""


def tensor_digest(t: Tensor) -> str:
    """A content hash of ``t`` (bytes when small; position-weighted sums and a sample when large)."""
    t = t.detach()
    h = hashlib.sha256(f"{t.dtype}:{tuple(t.shape)}".encode())
    flat = t.reshape(-1)
    if flat.numel() <= _FULL_HASH_NUMEL:
        h.update(flat.cpu().contiguous().view(torch.uint8).numpy().tobytes())
        return h.hexdigest()
    with torch.no_grad():
        n = flat.numel()
        stats = torch.zeros(4, dtype=torch.float64, device=flat.device)
        # In chunks, so a large embedding on a GPU never needs a float64 copy of itself. A weight
        # that depends on position catches permutations; sums alone would not.
        for start in range(0, n, _CHUNK):
            x = flat[start : start + _CHUNK].double()
            pos = torch.arange(start, start + x.numel(), dtype=torch.float64, device=x.device)
            stats += torch.stack([x.sum(), x.abs().sum(), (x * (1.0 + pos / n)).sum(),
                                  (x * x).sum()])
        idx = torch.arange(_SAMPLE, device=flat.device) * (n // _SAMPLE)
        sample = flat[idx]
    h.update(stats.cpu().numpy().tobytes())
    h.update(sample.cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def model_fingerprint(model: nn.Module) -> str:
    """Hash of a model's identity, parameters and buffers (names, dtypes, shapes and values)."""
    from emlens.models import model_id

    ident = model_id(model) if hasattr(model, "cfg") else type(model).__name__
    h = hashlib.sha256(ident.encode())
    for kind, items in (("param", model.named_parameters()), ("buffer", model.named_buffers())):
        for name, t in items:
            if t is None:
                continue
            h.update(f"{kind}:{name}:".encode())
            h.update(tensor_digest(t).encode())
    return h.hexdigest()[:16]


def _module_paths(model: nn.Module) -> dict[int, str]:
    return {id(m): name or "<root>" for name, m in model.named_modules()}


class _Hasher:
    def __init__(self, model: nn.Module):
        self.paths = _module_paths(model)
        self.seen: set[int] = set()

    def value(self, obj: Any, where: str) -> str:
        if obj is None or isinstance(obj, (bool, int, float, complex, str, bytes)):
            return f"{type(obj).__name__}:{obj!r}"
        if isinstance(obj, Tensor):
            return "tensor:" + tensor_digest(obj)
        if isinstance(obj, (torch.dtype, torch.device)):
            return repr(obj)
        if hasattr(obj, "__emlens_fingerprint__"):
            return "obj:" + str(obj.__emlens_fingerprint__())
        if isinstance(obj, nn.Module):
            # Its tensors are part of model_fingerprint when it is inside the model.
            if id(obj) in self.paths:
                return "module:" + self.paths[id(obj)]
            raise Unfingerprintable(f"{where} holds a module {type(obj).__name__} outside the model")
        if isinstance(obj, (list, tuple)):
            return type(obj).__name__ + "[" + ",".join(
                self.value(v, f"{where}[{i}]") for i, v in enumerate(obj)) + "]"
        if isinstance(obj, dict):
            return "dict{" + ",".join(
                f"{self.value(k, where)}:{self.value(v, f'{where}[{k!r}]')}"
                for k, v in sorted(obj.items(), key=lambda kv: repr(kv[0]))) + "}"
        if isinstance(obj, (set, frozenset)):
            return "set{" + ",".join(sorted(self.value(v, where) for v in obj)) + "}"
        if isinstance(obj, functools.partial):
            return "partial(" + ",".join([
                self.value(obj.func, where), self.value(list(obj.args), where),
                self.value(dict(obj.keywords), where)]) + ")"
        if isinstance(obj, types.MethodType):
            return "method(" + self.value(obj.__func__, where) + "," + self.value(
                obj.__self__, f"{where}.__self__") + ")"
        if isinstance(obj, types.FunctionType):
            return self.function(obj, where)
        if isinstance(obj, types.BuiltinFunctionType):
            return f"builtin:{getattr(obj, '__module__', '')}.{obj.__qualname__}"
        raise Unfingerprintable(
            f"{where} holds a {type(obj).__module__}.{type(obj).__name__}, which cannot be hashed "
            "(give it an __emlens_fingerprint__ method, or name the setting with cache_tag)"
        )

    def function(self, fn: types.FunctionType, where: str) -> str:
        key = id(fn)
        name = f"{fn.__module__}.{fn.__qualname__}"
        if key in self.seen:  # recursion through a closure cycle
            return "fn-cycle:" + name
        self.seen.add(key)
        code = fn.__code__
        parts = [name, hashlib.sha256(code.co_code + repr(code.co_consts).encode()).hexdigest()]
        for var, cell in zip(code.co_freevars, fn.__closure__ or (), strict=True):
            try:
                contents = cell.cell_contents
            except ValueError:  # an empty cell
                contents = None
            parts.append(f"{var}=" + self.value(contents, f"{where} ({name}, variable {var!r})"))
        if fn.__defaults__:
            parts.append(self.value(list(fn.__defaults__), f"{where} ({name} defaults)"))
        if fn.__kwdefaults__:
            parts.append(self.value(dict(fn.__kwdefaults__), f"{where} ({name} defaults)"))
        self.seen.discard(key)
        return "fn(" + ";".join(parts) + ")"


def _module_hooks(model: nn.Module) -> Iterable[tuple[str, str, Any]]:
    from torch.nn.modules import module as torch_module

    for kind in ("_global_forward_pre_hooks", "_global_forward_hooks", "_global_backward_hooks",
                 "_global_backward_pre_hooks"):
        for fn in getattr(torch_module, kind, {}).values():
            yield "<torch global>", kind, fn
    for path, module in model.named_modules():
        for kind in ("_forward_pre_hooks", "_forward_hooks"):
            for fn in getattr(module, kind).values():
                yield path or "<root>", kind, fn


def hooks_fingerprint(model: nn.Module, extra: Iterable[tuple[Any, Any]] = ()) -> str:
    """Hash of every forward hook active on ``model`` plus ``extra`` ``(hook_name, fn)`` pairs.

    Raises :class:`Unfingerprintable` naming a hook that closes over an object it cannot hash.
    """
    hasher = _Hasher(model)
    h = hashlib.sha256()
    for path, kind, fn in _module_hooks(model):
        h.update(f"{path}:{kind}:".encode())
        h.update(hasher.value(fn, f"the {kind.strip('_')} on {path}").encode())
    for i, (name, fn) in enumerate(extra):
        h.update(f"extra:{name if isinstance(name, str) else hasher.value(name, 'a name filter')}:"
                 .encode())
        h.update(hasher.value(fn, f"interventions[{i}] ({name})").encode())
    return h.hexdigest()[:16]


def judge_fingerprint(judge: Any) -> str:
    """The judge's name plus a hash of what makes its scores: probe weights and the feature
    extractor's LM, layers and answer length where the judge has them (so a refitted or custom
    probe never reads scores cached for another one under the same name)."""
    h = hashlib.sha256(str(judge.name).encode())
    for attr in ("aligned_probe", "coherent_probe"):
        probe = getattr(judge, attr, None)
        if probe is not None:
            for key, val in sorted(vars(probe).items()):
                h.update(f"{attr}.{key}:".encode())
                h.update((tensor_digest(val) if isinstance(val, Tensor) else repr(val)).encode())
    feats = getattr(judge, "features", None)
    for attr in ("source", "layers", "max_answer_tokens", "template"):
        if feats is not None and hasattr(feats, attr):
            h.update(f"features.{attr}:{getattr(feats, attr)!r}".encode())
    for attr in ("model", "base_url", "temperature", "prompts_digest"):
        if hasattr(judge, attr) and not callable(getattr(judge, attr)):
            h.update(f"{attr}:{getattr(judge, attr)!r}".encode())
    return h.hexdigest()[:16]


__all__ = [
    "Unfingerprintable",
    "hooks_fingerprint",
    "judge_fingerprint",
    "model_fingerprint",
    "tensor_digest",
]
