"""Adapters attached as modules with hook points (:func:`attach_lora`, :class:`AttachedLora`),
the base weights untouched; trainable with ``trainable=True``."""

from __future__ import annotations

import fnmatch
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Any

import einops
import torch
from jaxtyping import Float
from torch import Tensor, nn
from transformer_lens import HookedTransformer
from transformer_lens.hook_points import HookPoint

from emlens.hooks import HookFn, Hooks, check_scale
from emlens.lora.merge import check_compatible
from emlens.lora.types import (
    TARGET_MODULES,
    AdapterLike,
    LoraAdapter,
    LoraModule,
    Selection,
    peft_module_path,
)

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
        self.path = lora.path or peft_module_path(lora.layer, lora.module)
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

        Raises ValueError naming every item that matches none, and the attached adapters.
        """
        if which is None:
            return self.names
        items = [which] if isinstance(which, (int, str)) else list(which)
        chosen: list[str] = []
        unmatched = []
        for item in items:
            if isinstance(item, int):
                hits = [n for n, m in self.modules.items() if m.layer == item]
            else:
                stem = item.removesuffix(".hook_scalar").removesuffix(".hook_acts")
                hits = [n for n in self.modules if n == stem or fnmatch.fnmatchcase(n, stem)]
            if not hits:
                unmatched.append(item)
            chosen += [h for h in hits if h not in chosen]
        if unmatched:
            raise ValueError(
                f"No attached adapter matches {', '.join(map(repr, unmatched))}; attached: "
                f"{self.names} (select by name, layer index or a glob such as 'blocks.1*')."
            )
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
            lm, dtype=dtype, device=model.W_E.device, n_out_heads=out_heads(model, lm.module),
            trainable=trainable,
        )
        for lm in adapter.modules
    }
    return attach_modules(model, adapter, modules)


def out_heads(model: HookedTransformer, module: str) -> int | None:
    """Head count of the hook point a q/k/v adapter adds to (``hook_q`` / ``_k`` / ``_v``, whose
    last two axes are heads and ``d_head``); None for the other modules, which add to flat
    points."""
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
            if mod.n_out_heads != out_heads(model, mod.module):
                raise ValueError(f"{name}: built for {mod.n_out_heads} output heads, the model "
                                 f"has {out_heads(model, mod.module)}.")
            component, short = TARGET_MODULES[mod.module]
            getattr(model.blocks[mod.layer], component).add_module(short, mod)
            attached[name] = mod
            registrations += _wire(model, mod)
        model.setup()
    except BaseException:
        AttachedLora(model, adapter, attached, registrations).remove()
        raise
    return AttachedLora(model, adapter, attached, registrations)
