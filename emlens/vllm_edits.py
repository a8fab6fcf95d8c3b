"""emlens's interventions inside a vLLM engine: steering and ``resid_post`` ablation as forward
hooks on the engine's decoder layers, and emlens hook lists translated into engine keywords.

vLLM has no hook API. Steering (``scale * vector`` added to ``resid_post`` of a layer, every
position) and projecting a direction out of ``resid_post`` are :class:`ResidualEdit` s, installed by
:func:`editing` as forward hooks on the worker's decoder layers through the public
``LLM.apply_model`` for one generate call. vLLM's decoder layers return the residual stream split
as ``(hidden, residual)``; the hook adds to ``hidden``, so the next layer's fused add-norm sees
``resid_post + scale * vector``. :func:`from_hooks` reads what an emlens hook list does (the
``emlens_op`` each steering and ablation hook carries) as :meth:`emlens.vllm.VLLMSampler.generate`
keywords. Nothing here imports vLLM; the sampler is :mod:`emlens.vllm`, which re-exports
everything here.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from emlens.hooks import as_vector
from emlens.lora.export import unit_direction


@dataclass(frozen=True)
class Steer:
    """Add ``scale * vector`` to ``resid_post`` of ``layer`` at every position (as
    ``emlens.steer(model, vector, layers=layer, scale=scale)``)."""

    vector: Float[Tensor, " d_model"]
    layer: int
    scale: float = 1.0
    positions: str = "all"


@dataclass(frozen=True)
class ResidualEdit:
    """One change to ``resid_post`` of ``layer`` inside the engine: ``"add"`` the vector, or
    ``"project"`` the unit vector out of the residual stream."""

    layer: int
    kind: str
    vector: Tensor


def residual_edits(steer, ablate_resid, *, n_layers: int, d_model: int) -> list[ResidualEdit]:
    """The edits of :meth:`~emlens.vllm.VLLMSampler.generate`'s ``steer`` (a :class:`Steer`, a
    ``(vector, layer, scale)`` tuple or a list of them) and ``ablate_resid`` (``(direction,
    layers)``), checked against a model of ``n_layers`` blocks and width ``d_model``."""
    edits = []
    items = [] if steer is None else [steer] if isinstance(steer, Steer | tuple) else list(steer)
    for item in items:
        st = item if isinstance(item, Steer) else Steer(*item)
        _check_positions(st.positions, "steer")
        edits.append(ResidualEdit(int(st.layer), "add", float(st.scale) * _finite(st.vector, d_model)))
    if ablate_resid is not None:
        direction, layers = ablate_resid
        unit = unit_direction(direction, d_model).float()
        for layer in (range(n_layers) if layers == "all" else [layers] if isinstance(layers, int)
                      else layers):
            edits.append(ResidualEdit(int(layer), "project", unit))
    for e in edits:
        if not 0 <= e.layer < n_layers:
            raise ValueError(f"layer {e.layer} is out of range for a model with {n_layers} layers.")
    return edits


def _finite(vector, d_model: int | None = None) -> Tensor:
    vec = as_vector(vector).detach().cpu()
    if d_model is not None and vec.shape != (d_model,):
        raise ValueError(f"vector has shape {tuple(vec.shape)}; the model's residual stream has "
                         f"d_model={d_model}. Was it extracted from another model?")
    if not torch.isfinite(vec).all():
        raise ValueError("the vector holds NaN or infinite values.")
    return vec


def _check_positions(positions, what: str) -> None:
    if not (isinstance(positions, str) and positions == "all"):
        raise ValueError(f"{what} positions={positions!r} cannot be honoured inside vLLM (a batch "
                         "mixes prompt and decode tokens of many requests); only 'all' is "
                         "supported. Use emlens.generate for other position rules.")


class editing:
    """Install the residual edits as forward hooks on the engine's decoder layers for one block
    (removed on exit, also on exceptions); raise if a hook never ran (a compiled model)."""

    def __init__(self, llm, edits: list[ResidualEdit]) -> None:
        self.llm, self.edits = llm, edits

    def __enter__(self):
        if self.edits:
            self.llm.reset_prefix_cache()
            counts = self.llm.apply_model(_install(self.edits))
            if not all(c == len(self.edits) for c in counts):
                self.llm.apply_model(_remove)
                raise RuntimeError(f"residual hooks installed on {counts} layers of "
                                   f"{len(self.edits)} asked for.")
        return self

    def __exit__(self, exc_type, *_):
        if not self.edits:
            return
        calls = self.llm.apply_model(_remove)
        self.llm.reset_prefix_cache()
        if exc_type is None and not all(c > 0 for c in calls):
            raise RuntimeError("the residual hooks never ran: the engine executes a compiled "
                               "graph. Build the sampler with enforce_eager=True.")


def _decoder_layers(model) -> Sequence[torch.nn.Module]:
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if layers is None:
        raise ValueError(f"{type(model).__name__} has no .model.layers; editing the residual "
                         "stream inside vLLM supports Llama / Qwen2-style decoder stacks.")
    return layers


def _install(edits: list[ResidualEdit]):
    def fn(model) -> int:
        layers = _decoder_layers(model)
        model._emlens_edits = state = {"handles": [], "calls": 0}
        param = next(model.parameters())
        for e in edits:
            vec = e.vector.to(device=param.device, dtype=param.dtype)

            def hook(module, args, output, vec=vec, kind=e.kind):
                state["calls"] += 1
                split = isinstance(output, tuple)  # (hidden, residual): resid_post is their sum
                hidden = output[0] if split else output
                if kind == "add":
                    hidden = hidden + vec
                else:
                    resid = hidden + output[1] if split else hidden
                    hidden = hidden - (resid @ vec)[..., None] * vec
                return (hidden, *output[1:]) if split else hidden

            state["handles"].append(layers[e.layer].register_forward_hook(hook))
        return len(state["handles"])

    return fn


def _remove(model) -> int:
    state = getattr(model, "_emlens_edits", None)
    if state is None:
        return 0
    for h in state["handles"]:
        h.remove()
    del model._emlens_edits
    return state["calls"]


# ------------------------------------------------------------------------------------------------
# emlens hook lists -> engine interventions (for evaluate / compare_conditions / sweep)


def from_hooks(hooks, n_layers: int) -> dict[str, Any]:
    """The :meth:`VLLMSampler.generate` keywords that do what an emlens hook list does.

    Understood: ``steering_hooks`` at ``resid_post`` (-> ``steer``), ``ablation_hooks`` at
    ``resid_post`` (-> ``ablate_resid``) and ``ablation_hooks(..., hook="writers",
    layers="all")`` (-> ``ablate``, the LoRA form), every position. Anything else raises
    ValueError naming the hook point: run that condition with ``engine=None``.
    """
    steer, project, writers = [], {}, {}
    for name, fn in hooks or ():
        op = getattr(fn, "emlens_op", None)
        if not isinstance(name, str) or op is None:
            raise ValueError(f"the intervention on {name!r} is not an emlens steering or ablation "
                             "hook; vLLM cannot run arbitrary hooks. Use engine=None for it.")
        _check_positions(op[-1], f"the hook on {name}")
        parts = name.split(".")
        if op[0] == "add" and len(parts) == 3 and parts[2] == "hook_resid_post":
            steer.append(Steer(op[1], int(parts[1]), float(op[2])))
        elif op[0] == "ablate" and len(parts) == 3 and parts[2] == "hook_resid_post":
            project.setdefault(id(op[1]), (op[1], []))[1].append(int(parts[1]))
        elif op[0] == "ablate" and (name == "hook_embed" or (len(parts) == 3 and parts[2] in (
                "hook_attn_out", "hook_mlp_out"))):
            writers.setdefault(id(op[1]), (op[1], set()))[1].add(name)
        else:
            raise ValueError(f"vLLM cannot carry the {op[0]!r} hook on {name!r}: it supports "
                             "steering and ablation at resid_post and ablation from every "
                             "residual writer. Use engine=None for this condition.")
    out: dict[str, Any] = {}
    if steer:
        out["steer"] = steer
    if len(project) > 1 or len(writers) > 1:
        raise ValueError("the hooks ablate more than one direction; vLLM takes one per condition.")
    if project:
        (unit, layers), = project.values()
        out["ablate_resid"] = (unit, sorted(layers))
    if writers:
        (unit, names), = writers.values()
        every = {"hook_embed"} | {f"blocks.{L}.hook_{k}_out" for L in range(n_layers)
                                  for k in ("attn", "mlp")}
        if names != every:
            raise ValueError("a writers ablation inside vLLM must cover every layer "
                             "(layers='all'); use engine=None for a partial one.")
        out["ablate"] = unit
    return out


def check_no_hooks(model) -> None:
    """Refuse a model with hooks on it (a ``steer`` block, an attached adapter): the engine
    would not see them. Pass them as ``interventions=`` / ``adapter=`` instead."""
    from emlens.fingerprint import _module_hooks

    active = sorted({path for path, _, _ in _module_hooks(model)})
    if active:
        raise ValueError(f"the model has hooks on {active[:4]}{' ...' if len(active) > 4 else ''}"
                         "; a vLLM engine does not see hooks on the HookedTransformer. Remove "
                         "them (leave the steer/ablate/attach_lora block) and pass the hooks as "
                         "interventions= and the adapter as adapter=.")


__all__ = [
    "ResidualEdit",
    "Steer",
    "check_no_hooks",
    "editing",
    "from_hooks",
    "residual_edits",
]
