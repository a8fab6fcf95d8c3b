"""Typed hook functions and the ``steer`` / ``ablate`` context managers.

Every intervention is a TransformerLens hook: a function ``fn(activation, *, hook)`` attached to a
hook-point name. The factories here return such functions (usable directly in
``model.run_with_hooks(fwd_hooks=[(name, fn)])`` and ``model.hooks(...)``) or whole lists of
``(name, fn)`` pairs (``steering_hooks``, ``ablation_hooks``) that ``steer``/``ablate`` attach with
``model.hooks`` and that ``emlens.generate(interventions=...)`` accepts.

Positions. ``positions`` selects the sequence positions an intervention touches:

* ``"all"``: every position (default);
* ``"prompt"``: only prompt positions. Inside :func:`emlens.generate` these are the positions
  before the first generated token; in a plain forward pass every position is a prompt position;
* ``"generated"``: only generated positions (inside ``generate``). In a plain forward pass there
  are none, so the hook does nothing and warns once;
* a boolean mask ``[batch, pos]`` or ``[pos]``, indexed by *absolute* position. In a plain forward
  its length must equal the sequence length; during generation, positions beyond its length are
  not touched.

With a KV cache each decode step runs the model on one new token, so a hook sees ``pos == 1``.
``generate`` therefore publishes the absolute position of the current chunk (``PositionState``)
and the hooks build their masks from it: position rules hold with and without the cache.

Default hook point: ``resid_post`` of the given layer (the residual stream after block ``L``), the
papers' choice for mean-difference directions.
"""

from __future__ import annotations

import math
import numbers
import operator
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Literal, Union

import torch
from jaxtyping import Bool, Float
from torch import Tensor
from transformer_lens import HookedTransformer
from transformer_lens.hook_points import HookPoint

HookFn = Callable[..., Union[Tensor, None]]
Hooks = list[tuple[str, HookFn]]
Positions = Union[Literal["all", "prompt", "generated"], Bool[Tensor, "batch pos"], Bool[Tensor, " pos"]]
Layers = Union[int, Sequence[int], Literal["all"]]

RESIDUAL_HOOKS = ("resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out")
WRITER_HOOKS = "writers"  # hook_embed + every attn_out and mlp_out: standard directional ablation


# --------------------------------------------------------------------------------------------
# Absolute positions during generation


@dataclass
class PositionState:
    """Where the current forward pass sits in a generation.

    ``prompt_len`` is the (left-padded) prompt width; ``offset`` the absolute position of the
    first token of the chunk being run (0 for the prompt, then ``prompt_len + step - 1`` with a KV
    cache, or 0 again without one).
    """

    prompt_len: int
    offset: int = 0


_STATE: ContextVar[PositionState | None] = ContextVar("emlens_position_state", default=None)


@contextmanager
def generation_positions(prompt_len: int) -> Iterator[PositionState]:
    """Publish a :class:`PositionState` to position-aware hooks for the duration of the block.

    ``generate`` uses this; call it yourself only when driving your own decode loop (update
    ``state.offset`` before each forward pass).
    """
    state = PositionState(prompt_len=prompt_len)
    token = _STATE.set(state)
    try:
        yield state
    finally:
        _STATE.reset(token)


class _WarnOnce:
    """A hook's "already warned" flag; not part of what the hook computes (see emlens.fingerprint)."""

    def __init__(self) -> None:
        self.done = False

    def __emlens_fingerprint__(self) -> str:
        return "warn-once"


def _position_mask(
    positions: Positions, act: Tensor, warned: _WarnOnce
) -> Bool[Tensor, "batch pos"] | None:
    """Boolean mask ``[batch, pos]`` of the positions to touch, or None for every position."""
    state = _STATE.get()
    batch, seq = act.shape[0], act.shape[1]
    if isinstance(positions, str):
        if positions == "all":
            return None
        if state is None:
            if positions == "prompt":
                return None
            if not warned.done:
                warnings.warn(
                    "positions='generated' outside emlens.generate touches no position; use an "
                    "explicit boolean mask (e.g. batch.answer_mask) for teacher-forced answers.",
                    stacklevel=2,
                )
                warned.done = True
            return torch.zeros(batch, seq, dtype=torch.bool, device=act.device)
        absolute = torch.arange(state.offset, state.offset + seq, device=act.device)
        is_prompt = absolute < state.prompt_len
        mask = is_prompt if positions == "prompt" else ~is_prompt
        return mask.expand(batch, seq)
    mask = positions.to(act.device)
    if mask.ndim == 1:
        mask = mask[None].expand(batch, -1)
    if mask.shape[0] != batch:
        raise ValueError(
            f"positions mask has batch size {mask.shape[0]} but the activation has {batch}; "
            "give a [batch, pos] mask matching the input or a [pos] mask shared by all rows."
        )
    offset = 0 if state is None else state.offset
    if state is None and mask.shape[1] != seq:
        raise ValueError(
            f"positions mask has {mask.shape[1]} positions but the input has {seq}; they must match."
        )
    out = torch.zeros(batch, seq, dtype=torch.bool, device=act.device)
    lo, hi = offset, min(offset + seq, mask.shape[1])
    if hi > lo:
        out[:, : hi - lo] = mask[:, lo:hi]
    return out


def _check_positions(positions: Positions) -> None:
    if isinstance(positions, str):
        if positions not in ("all", "prompt", "generated"):
            raise ValueError(
                f"positions={positions!r}; expected 'all', 'prompt', 'generated' or a bool mask."
            )
        return
    if not isinstance(positions, Tensor) or positions.dtype != torch.bool or positions.ndim not in (1, 2):
        raise ValueError(
            "positions mask must be a torch.bool tensor of shape [batch, pos] or [pos]; got "
            f"{type(positions).__name__} {getattr(positions, 'dtype', '')} "
            f"{tuple(getattr(positions, 'shape', ()))}."
        )


# --------------------------------------------------------------------------------------------
# Validation


def as_vector(direction) -> Tensor:
    """The raw vector of a direction: a tensor, or any object with a ``.vector`` tensor."""
    vec = getattr(direction, "vector", direction)
    if not isinstance(vec, Tensor):
        raise ValueError(
            f"direction must be a torch.Tensor of shape [d_model] (or have a .vector), got "
            f"{type(direction).__name__}."
        )
    return vec


def check_direction(
    model: HookedTransformer, direction, *, unit: bool = False
) -> Float[Tensor, " d_model"]:
    """Validate a direction against ``model`` and return it (unit-normalised if ``unit``).

    Raises ValueError on a wrong shape, a NaN/inf or zero norm, or a dtype/device that differs
    from the model's.
    """
    vec = as_vector(direction)
    d_model = model.cfg.d_model
    if vec.shape != (d_model,):
        raise ValueError(
            f"direction has shape {tuple(vec.shape)} but this model's residual stream has "
            f"d_model={d_model}; expected shape ({d_model},). Was it extracted from another model?"
        )
    if not vec.is_floating_point():
        raise ValueError(f"direction dtype is {vec.dtype}; expected a floating dtype.")
    if vec.dtype != model.cfg.dtype:
        raise ValueError(
            f"direction dtype is {vec.dtype} but the model's is {model.cfg.dtype}; "
            f"pass direction.to({model.cfg.dtype})."
        )
    model_device = next(model.parameters()).device
    if vec.device != model_device:
        raise ValueError(
            f"direction is on {vec.device} but the model is on {model_device}; "
            f"pass direction.to('{model_device}')."
        )
    norm = vec.detach().float().norm()
    if not torch.isfinite(norm):
        raise ValueError("direction has a NaN or infinite norm; check how it was computed.")
    if norm == 0:
        raise ValueError("direction has zero norm; there is nothing to steer along or ablate.")
    return vec / norm.to(vec.dtype) if unit else vec


def _as_int(value) -> int | None:
    """``value`` as a Python int when it is an integer scalar (int, numpy integer, 0-d integer
    tensor or array), else None. Booleans are not integers here."""
    if isinstance(value, bool) or type(value).__name__ == "bool_":
        return None
    if isinstance(value, Tensor):
        integer = not (value.is_floating_point() or value.is_complex() or value.dtype == torch.bool)
        return int(value.item()) if value.ndim == 0 and integer else None
    if type(value).__name__ == "ndarray":
        return int(value.item()) if value.ndim == 0 and value.dtype.kind in "iu" else None
    try:
        return operator.index(value)
    except TypeError:
        return None


def check_scale(scale, name: str = "scale") -> float:
    """``scale`` as a finite float; raises TypeError/ValueError naming ``name`` otherwise."""
    if isinstance(scale, Tensor):
        if scale.numel() != 1:
            raise TypeError(f"{name} must be a number, got a tensor of shape {tuple(scale.shape)}.")
        scale = scale.item()
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(scale).__name__} ({scale!r:.40}).")
    value = float(scale)
    if not math.isfinite(value):
        raise ValueError(f"{name}={value}; it must be a finite number (NaN or inf would make every "
                         "logit NaN).")
    return value


def check_tokens(model: HookedTransformer, tokens) -> None:
    """Raise TypeError/ValueError unless ``tokens`` is an integer ``[batch, pos]`` tensor of ids
    in the model's vocabulary."""
    if not isinstance(tokens, Tensor):
        raise TypeError(f"tokens must be a torch integer tensor [batch, pos], got "
                        f"{type(tokens).__name__}; use emlens.tokenize_chat(...).tokens.")
    if tokens.is_floating_point() or tokens.is_complex() or tokens.dtype == torch.bool:
        raise TypeError(f"tokens must hold integer token ids, got dtype {tokens.dtype}.")
    if tokens.ndim != 2:
        raise ValueError(f"tokens must have shape [batch, pos], got {tuple(tokens.shape)}.")
    if tokens.numel() and (int(tokens.min()) < 0 or int(tokens.max()) >= model.cfg.d_vocab):
        raise ValueError(f"token ids must lie in [0, {model.cfg.d_vocab}); got "
                         f"{int(tokens.min())}..{int(tokens.max())}.")


def resolve_layers(model: HookedTransformer, layers: Layers) -> list[int]:
    """Normalise ``layers`` (int, list of ints, or "all"; negative ints count from the end).

    Integers may be Python ints, numpy integers or 0-d integer tensors; a 1-d integer tensor or
    array is a list of layers.
    """
    n = model.cfg.n_layers
    if isinstance(layers, str):
        if layers != "all":
            raise ValueError(f"layers={layers!r}; expected an int, a list of ints, or 'all'.")
        return list(range(n))
    single = _as_int(layers)
    if single is not None:
        items = [single]
    elif isinstance(layers, Sequence) or (
        (isinstance(layers, Tensor) or type(layers).__name__ == "ndarray") and layers.ndim == 1
    ):
        items = list(layers)
    else:
        raise TypeError(
            f"layers={layers!r} ({type(layers).__name__}); expected an int, a list of ints, or 'all'."
        )
    if not items:
        raise ValueError("layers is empty; give at least one layer.")
    out = []
    for item in items:
        layer = _as_int(item)
        if layer is None:
            raise TypeError(f"layer {item!r} ({type(item).__name__}) is not an integer.")
        if not -n <= layer < n:
            raise ValueError(f"layer {layer} is out of range for a model with {n} layers (0..{n - 1}).")
        out.append(layer % n)
    return out


def hook_names(model: HookedTransformer, layers: Layers, hook: str = "resid_post") -> list[str]:
    """Hook-point names for ``hook`` at each layer.

    ``hook`` is a short residual name (``resid_pre``, ``resid_mid``, ``resid_post``, ``attn_out``,
    ``mlp_out``), ``"writers"`` (``hook_embed`` when every layer is selected, plus each selected
    layer's ``attn_out`` and ``mlp_out``), or a template with ``{layer}`` such as
    ``"blocks.{layer}.ln2.hook_normalized"``.
    """
    layer_list = resolve_layers(model, layers)
    if hook == WRITER_HOOKS:
        names = ["hook_embed"] if len(layer_list) == model.cfg.n_layers else []
        for layer in layer_list:
            names += [f"blocks.{layer}.hook_attn_out", f"blocks.{layer}.hook_mlp_out"]
    elif "{layer}" in hook:
        names = [hook.format(layer=layer) for layer in layer_list]
    elif hook in RESIDUAL_HOOKS:
        names = [f"blocks.{layer}.hook_{hook}" for layer in layer_list]
    else:
        raise ValueError(
            f"Unknown hook {hook!r}; expected one of {RESIDUAL_HOOKS}, 'writers', or a template "
            "containing '{layer}' (e.g. 'blocks.{layer}.hook_resid_pre')."
        )
    for name in names:
        if name not in model.hook_dict:
            raise ValueError(f"Hook point {name!r} does not exist in this model.")
    return names


# --------------------------------------------------------------------------------------------
# Hook functions


def add_hook(
    vector: Float[Tensor, " d_model"], scale: float = 1.0, positions: Positions = "all"
) -> HookFn:
    """Hook adding ``scale * vector`` to an activation ``[batch, pos, d_model]`` at ``positions``."""
    scale = check_scale(scale)
    _check_positions(positions)
    warned = _WarnOnce()

    def hook_fn(act: Float[Tensor, "batch pos d_model"], hook: HookPoint) -> Tensor:
        delta = (scale * vector).to(act.dtype)
        mask = _position_mask(positions, act, warned)
        if mask is None:
            return act + delta
        return act + mask[..., None].to(act.dtype) * delta

    hook_fn.emlens_op = ("add", vector, scale, positions)  # what it does, for other engines
    return hook_fn


def ablate_hook(unit: Float[Tensor, " d_model"], positions: Positions = "all") -> HookFn:
    """Hook projecting a unit direction out of an activation: ``x - (x . d) d`` at ``positions``."""
    _check_positions(positions)
    warned = _WarnOnce()

    def hook_fn(act: Float[Tensor, "batch pos d_model"], hook: HookPoint) -> Tensor:
        d = unit.to(act.dtype)
        removed = (act @ d)[..., None] * d
        mask = _position_mask(positions, act, warned)
        if mask is not None:
            removed = removed * mask[..., None].to(act.dtype)
        return act - removed

    hook_fn.emlens_op = ("ablate", unit, positions)  # what it does, for other engines
    return hook_fn


def projection_hook(
    unit: Float[Tensor, " d_model"], store: dict[str, list[Tensor]]
) -> HookFn:
    """Hook that records ``act . unit`` (shape ``[batch, pos]``) in ``store[hook.name]``."""

    def hook_fn(act: Float[Tensor, "batch pos d_model"], hook: HookPoint) -> None:
        store.setdefault(hook.name, []).append((act @ unit.to(act.dtype)).detach())

    return hook_fn


# --------------------------------------------------------------------------------------------
# Hook lists and context managers


def steering_hooks(
    model: HookedTransformer,
    direction,
    *,
    layers: Layers,
    scale: float,
    positions: Positions = "all",
    hook: str = "resid_post",
    normalize: bool = False,
) -> Hooks:
    """``(name, fn)`` pairs adding ``scale * direction`` at ``hook`` of each of ``layers`` (an int,
    a list of ints, or ``"all"``).

    The raw (unnormalised) vector is added, as in the papers, unless ``normalize=True``, in which
    case ``scale`` is in units of the residual stream (``scale * direction / |direction|``).
    """
    scale = check_scale(scale)
    vec = check_direction(model, direction, unit=normalize)
    _check_positions(positions)
    return [(name, add_hook(vec, scale, positions)) for name in hook_names(model, layers, hook)]


def ablation_hooks(
    model: HookedTransformer,
    direction,
    *,
    layers: Layers = "all",
    hook: str = "resid_post",
    positions: Positions = "all",
) -> Hooks:
    """``(name, fn)`` pairs removing ``direction`` from ``hook`` at each layer.

    ``hook="writers"`` with ``layers="all"`` is the standard directional ablation: the direction is
    projected out of the embedding and of every attention and MLP output, so no component can
    write it to the residual stream.
    """
    unit = check_direction(model, direction, unit=True)
    _check_positions(positions)
    return [(name, ablate_hook(unit, positions)) for name in hook_names(model, layers, hook)]


@contextmanager
def steer(
    model: HookedTransformer,
    direction,
    *,
    layers: Layers,
    scale: float,
    positions: Positions = "all",
    hook: str = "resid_post",
    normalize: bool = False,
) -> Iterator[Hooks]:
    """Add ``scale * direction`` to the residual stream inside the block.

    Composes with other ``steer``/``ablate`` blocks and ``model.hooks``; its hooks are removed on
    exit, also when the block raises. Yields the attached ``(name, fn)`` pairs.

    Example::

        with emlens.steer(model, direction, layers=12, scale=8.0):
            answers = emlens.generate(model, questions, max_new_tokens=64)
    """
    hooks = steering_hooks(
        model, direction, layers=layers, scale=scale, positions=positions, hook=hook,
        normalize=normalize,
    )
    with model.hooks(fwd_hooks=hooks):
        yield hooks


@contextmanager
def ablate(
    model: HookedTransformer,
    direction,
    *,
    layers: Layers = "all",
    hook: str = "resid_post",
    positions: Positions = "all",
) -> Iterator[Hooks]:
    """Project ``direction`` out of ``hook`` at ``layers`` inside the block (see ``ablation_hooks``)."""
    hooks = ablation_hooks(model, direction, layers=layers, hook=hook, positions=positions)
    with model.hooks(fwd_hooks=hooks):
        yield hooks


@torch.no_grad()
def projections(
    model: HookedTransformer,
    tokens: Tensor,
    direction,
    *,
    layers: Layers = "all",
    hook: str = "resid_post",
    attention_mask: Tensor | None = None,
) -> Float[Tensor, "layer batch pos"]:
    """Projection of the activation at ``hook`` of each layer onto the unit ``direction``."""
    unit = check_direction(model, direction, unit=True)
    check_tokens(model, tokens)
    names = hook_names(model, layers, hook)
    store: dict[str, list[Tensor]] = {}
    fn = projection_hook(unit, store)
    model.run_with_hooks(
        tokens, attention_mask=attention_mask, return_type=None,
        fwd_hooks=[(name, fn) for name in names],
    )
    return torch.stack([store[name][0] for name in names])
