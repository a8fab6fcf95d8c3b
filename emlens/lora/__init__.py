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


The package: :mod:`emlens.lora.adapter` (adapters as data, peft folders in and out),
:mod:`emlens.lora.merge` (compatibility checks, merging), :mod:`emlens.lora.attach` (hooked
modules, trainable or not).
"""

from emlens.lora.adapter import (
    TARGET_MODULES,
    AdapterLike,
    LoraAdapter,
    LoraModule,
    Selection,
    init_adapter,
    load_adapter,
    random_like,
    save_peft,
)
from emlens.lora.attach import (
    AttachedLora,
    LoraHookedModule,
    attach_lora,
    attach_modules,
    scale_hook,
    set_hook,
)
from emlens.lora.merge import check_compatible, merge_lora, unmerge_lora

__all__ = [
    "AdapterLike",
    "AttachedLora",
    "LoraAdapter",
    "LoraHookedModule",
    "LoraModule",
    "Selection",
    "TARGET_MODULES",
    "attach_lora",
    "attach_modules",
    "check_compatible",
    "init_adapter",
    "load_adapter",
    "merge_lora",
    "random_like",
    "save_peft",
    "scale_hook",
    "set_hook",
    "unmerge_lora",
]

