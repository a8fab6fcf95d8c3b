"""A decode forward for HookedTransformer generation that does not redo work, with every hook intact.

TransformerLens's cached decode step re-applies rotary embeddings to every cached key, repeats
grouped key/value heads for every query head, concatenates a new cache tensor at every step,
and unembeds every prompt position although sampling reads only the last. :func:`decode_forward`
computes the same forward pass (same formulas, same weights, TransformerLens's own modules and
hook points) without that work:

- :class:`FastKVCache` keeps keys *after* rotary in preallocated storage; a step rotates and
  writes only its new keys and attends with ``scaled_dot_product_attention`` over grouped heads
  (no repeated heads materialised);
- weights are used in place (views; nothing is copied per step), biases that are all zero are
  skipped;
- the final norm and unembedding run on the last position only, when no hook can see the others.

What a user can observe is unchanged. Every hook point that has a hook (``model.hooks``,
``steer``/``ablate``, ``run_with_cache``-style caching hooks, attached LoRA wiring, a plain torch
hook) fires with the tensor TransformerLens's own cached forward gives it, at the same call in
the same order: ``hook_rot_k`` gets every key so far (a hook's return value changes this step's
attention only, as in TransformerLens, whose cache holds keys before rotary); a layer whose
``hook_attn_scores`` or ``hook_pattern`` has a hook computes scores and pattern explicitly, as
TransformerLens does; a norm or MLP module with its own torch hooks runs as the module itself.
Hook points without hooks are not called (calling them is the identity). Values equal
TransformerLens's within float rounding (attention sums in a different order):
``tests/test_decode.py`` checks tokens, logits and every hook's tensors against the plain and the
cached TransformerLens forward, with left padding, for Llama and Qwen2 shapes.

Models this does not reproduce (:func:`fast_decode_blocker` names the reason) decode through
TransformerLens's own cache, unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor, nn
from torch.nn.modules import module as _torch_module
from transformer_lens import HookedTransformer
from transformer_lens.components import RMSNorm, RMSNormPre
from transformer_lens.components.mlps.gated_mlp import GatedMLP
from transformer_lens.hook_points import HookPoint
from transformer_lens.utilities import get_offset_position_ids

_ARCHITECTURES = ("LlamaForCausalLM", "Qwen2ForCausalLM", "MistralForCausalLM")


def _has_hooks(module: nn.Module) -> bool:
    return bool(module._forward_hooks or module._forward_pre_hooks)


def fast_decode_blocker(model: HookedTransformer) -> str | None:
    """Why :func:`decode_forward` cannot reproduce ``model`` (None when it can).

    Supported: Llama / Qwen2 / Mistral-style models (rotary, causal, global attention, RMS norms,
    gated MLP) on one device, without TransformerLens's optional attention inputs, and without
    torch hooks on modules whose computation the fast path inlines (blocks, attention, embed,
    unembed). Hooks on hook points are always supported.
    """
    cfg = model.cfg
    checks = {
        "architecture": cfg.original_architecture in _ARCHITECTURES,
        "rotary positions": cfg.positional_embedding_type == "rotary"
        and not cfg.rotary_adjacent_pairs,
        "causal attention": cfg.attention_dir == "causal",
        "plain q/k/v inputs": not (cfg.use_attn_in or cfg.use_split_qkv_input or cfg.use_qk_norm),
        "unquantised weights": not cfg.load_in_4bit,
        "no attention extras": not (cfg.use_logn_attn or cfg.use_dynamic_ntk_rope
                                    or cfg.use_attention_sinks or cfg.clip_qkv is not None)
        and cfg.attn_scores_soft_cap <= 0 and cfg.output_logits_soft_cap <= 0,
        "one device": cfg.n_devices == 1,
        "sequential pre-norm blocks": not (cfg.parallel_attn_mlp or cfg.attn_only
                                           or cfg.use_normalization_before_and_after
                                           or cfg.post_embedding_ln),
        "global attention": all(b.attn.attn_type == "global" for b in model.blocks),
        "RMS norms": all(isinstance(m, RMSNorm | RMSNormPre)
                         for b in model.blocks for m in (b.ln1, b.ln2))
        and isinstance(model.ln_final, RMSNorm | RMSNormPre),
        "gated MLP": all(type(b.mlp) is GatedMLP for b in model.blocks)
        and not cfg.is_layer_norm_activation(),
    }
    for what, ok in checks.items():
        if not ok:
            return f"needs {what}"
    inlined = [model, model.embed, model.unembed]
    for b in model.blocks:
        inlined += [b, b.attn]
    for m in inlined:
        if _has_hooks(m):
            return f"a torch hook on the module {type(m).__name__} (not a hook point)"
    if _torch_module._global_forward_hooks or _torch_module._global_forward_pre_hooks:
        return "a global torch module hook"
    return None


@dataclass
class _LayerWeights:
    """One block's weights as ``F.linear`` takes them (views of the model's parameters)."""

    wq: Tensor
    bq: Tensor | None
    wk: Tensor
    bk: Tensor | None
    wv: Tensor
    bv: Tensor | None
    wo: Tensor
    bo: Tensor | None
    wg: Tensor
    wi: Tensor
    b_in: Tensor | None
    wout: Tensor
    b_out: Tensor | None


def _nonzero(b: Tensor) -> Tensor | None:
    return b if bool(b.any()) else None


def _qkv(w: Tensor, b: Tensor) -> tuple[Tensor, Tensor | None]:
    """``[heads, d_model, d_head]`` -> ``[heads * d_head, d_model]`` (TransformerLens's order)."""
    return w.permute(0, 2, 1).reshape(-1, w.shape[1]), _nonzero(b.reshape(-1))


def _layer_weights(block) -> _LayerWeights:
    attn, mlp = block.attn, block.mlp
    grouped = hasattr(attn, "_W_K") and not attn.cfg.ungroup_grouped_query_attention
    wq, bq = _qkv(attn.W_Q, attn.b_Q)
    wk, bk = _qkv(attn._W_K, attn._b_K) if grouped else _qkv(attn.W_K, attn.b_K)
    wv, bv = _qkv(attn._W_V, attn._b_V) if grouped else _qkv(attn.W_V, attn.b_V)
    return _LayerWeights(
        wq=wq, bq=bq, wk=wk, bk=bk, wv=wv, bv=bv,
        wo=attn.W_O.permute(2, 0, 1).reshape(attn.W_O.shape[2], -1), bo=_nonzero(attn.b_O),
        wg=mlp.W_gate.T, wi=mlp.W_in.T, b_in=_nonzero(mlp.b_in), wout=mlp.W_out.T,
        b_out=_nonzero(mlp.b_out),
    )


class FastKVCache:
    """Preallocated rotated keys and values for :func:`decode_forward`.

    ``keys[layer]`` and ``values[layer]`` are ``[batch, n_kv_heads, max_len, d_head]``;
    ``attention_mask`` is ``[batch, length]`` (the prompt's mask, then one column per step).
    Feed the (left-padded) prompt first, then one token per step, as with TransformerLens's
    ``TransformerLensKeyValueCache``. Weight views are taken once, at creation.
    """

    def __init__(self, model: HookedTransformer, batch: int, max_len: int) -> None:
        blocker = fast_decode_blocker(model)
        if blocker is not None:
            raise ValueError(f"decode_forward cannot run this model: it {blocker}.")
        cfg = model.cfg
        with torch.no_grad():
            self.weights = [_layer_weights(b) for b in model.blocks]
        n_kv = self.weights[0].wk.shape[0] // cfg.d_head  # n_heads when TL ungroups K/V
        shape = (batch, n_kv, max_len, cfg.d_head)
        device, dtype = model.W_E.device, model.W_E.dtype
        self.keys = [torch.empty(shape, dtype=dtype, device=device) for _ in model.blocks]
        self.values = [torch.empty(shape, dtype=dtype, device=device) for _ in model.blocks]
        self.attention_mask = torch.empty(batch, 0, dtype=torch.long, device=device)
        self.length = 0
        self.max_len = max_len
        for b in model.blocks:  # rotary tables long enough for the whole sequence, as TL grows them
            if max_len > b.attn.rotary_cos.shape[0]:
                b.attn._extend_rotary_embeddings(min(cfg.n_ctx, max(max_len, 2 * b.attn.rotary_cos.shape[0])))
        first = model.blocks[0].attn
        # One cos/sin lookup per step serves every layer when their tables are equal (they are
        # for every supported architecture; checked, not assumed).
        self.shared_rotary = all(
            torch.equal(b.attn.rotary_cos, first.rotary_cos)
            and torch.equal(b.attn.rotary_sin, first.rotary_sin) for b in model.blocks
        )


def _hooked_points(model: HookedTransformer) -> set[HookPoint]:
    return {hp for hp in model.hook_dict.values() if hp._forward_hooks or hp._forward_pre_hooks}


def _norm(ln: nn.Module, x: Tensor, hooked: set) -> Tensor:
    """TransformerLens's RMSNorm / RMSNormPre forward (the module itself when it has torch hooks)."""
    if _has_hooks(ln):
        return ln(x)
    dtype = ln.cfg.dtype
    if dtype not in (torch.float32, torch.float64):
        x = x.to(torch.float32)
    scale = (x.pow(2).mean(-1, keepdim=True) + ln.eps).sqrt()
    if ln.hook_scale in hooked:
        scale = ln.hook_scale(scale)
    x = x / scale
    if ln.hook_normalized in hooked:
        x = ln.hook_normalized(x)
    x = x.to(dtype)
    return x * ln.w if isinstance(ln, RMSNorm) else x


def _rotate(x: Tensor, cos: Tensor, sin: Tensor, rotary_dim: int) -> Tensor:
    """TransformerLens's ``apply_rotary`` (GPT-NeoX pairs) with the position's cos/sin given."""
    x_rot, x_pass = x[..., :rotary_dim], x[..., rotary_dim:]
    half = rotary_dim // 2
    x_flip = torch.cat([-x_rot[..., half:], x_rot[..., :half]], dim=-1)
    x_rotated = x_rot * cos + x_flip * sin
    return x_rotated if x_pass.shape[-1] == 0 else torch.cat([x_rotated, x_pass], dim=-1)


def _attention(attn, w: _LayerWeights, hq: Tensor, hk: Tensor, hv: Tensor, cache: FastKVCache,
               layer: int, positions: Tensor, rotary: tuple[Tensor, Tensor] | None,
               sdpa_mask: Tensor | None, hooked: set) -> Tensor:
    cfg = attn.cfg
    batch, n_new, _ = hq.shape
    offset = cache.length
    q = F.linear(hq, w.wq, w.bq).reshape(batch, n_new, -1, cfg.d_head)
    k = F.linear(hk, w.wk, w.bk).reshape(batch, n_new, -1, cfg.d_head)
    v = F.linear(hv, w.wv, w.bv).reshape(batch, n_new, -1, cfg.d_head)
    if attn.hook_q in hooked:
        q = attn.hook_q(q)
    if attn.hook_k in hooked:
        k = attn.hook_k(k)
    if attn.hook_v in hooked:
        v = attn.hook_v(v)
    cos, sin = rotary or (attn.rotary_cos[positions, None, :], attn.rotary_sin[positions, None, :])
    q = _rotate(q, cos, sin, cfg.rotary_dim)
    if attn.hook_rot_q in hooked:
        q = attn.hook_rot_q(q)
    end = offset + n_new
    cache.keys[layer][:, :, offset:end] = _rotate(k, cos, sin, cfg.rotary_dim).transpose(1, 2)
    cache.values[layer][:, :, offset:end] = v.transpose(1, 2)
    keys, values = cache.keys[layer][:, :, :end], cache.values[layer][:, :, :end]
    if attn.hook_rot_k in hooked:
        # TL gives hook_rot_k every key so far; the clone keeps in-place edits out of the cache.
        keys = attn.hook_rot_k(keys.transpose(1, 2).clone()).transpose(1, 2)
    group = cfg.n_heads // keys.shape[1]
    if attn.hook_attn_scores in hooked or attn.hook_pattern in hooked:
        k_all, v_all = keys.transpose(1, 2), values.transpose(1, 2)
        if group > 1:
            k_all = torch.repeat_interleave(k_all, dim=2, repeats=group)
            v_all = torch.repeat_interleave(v_all, dim=2, repeats=group)
        scores = q.transpose(1, 2) @ k_all.permute(0, 2, 3, 1) / attn.attn_scale
        scores = attn.apply_causal_mask(scores, offset, cache.attention_mask)
        if attn.hook_attn_scores in hooked:
            scores = attn.hook_attn_scores(scores)
        pattern = F.softmax(scores, dim=-1)
        pattern = torch.where(torch.isnan(pattern), torch.zeros_like(pattern), pattern)
        if attn.hook_pattern in hooked:
            pattern = attn.hook_pattern(pattern)
        z = (pattern.to(v_all.dtype) @ v_all.transpose(1, 2)).transpose(1, 2)
    elif n_new == 1 and group > 1:
        # One new token: the `group` query heads sharing a key/value head attend over the same
        # keys with the same mask, so they go in as `group` query rows of that head (no GQA
        # expansion; on CPU much faster than enable_gqa in bfloat16: numbers in the README).
        z = F.scaled_dot_product_attention(
            q.reshape(batch, keys.shape[1], group, cfg.d_head), keys, values, attn_mask=sdpa_mask,
            scale=1.0 / attn.attn_scale,
        ).reshape(batch, 1, cfg.n_heads, cfg.d_head)
    else:
        z = F.scaled_dot_product_attention(
            q.transpose(1, 2), keys, values, attn_mask=sdpa_mask, scale=1.0 / attn.attn_scale,
            enable_gqa=group > 1,
        ).transpose(1, 2)
        if n_new > 1:  # a left-pad query attends to nothing: z = 0, as TL's NaN -> 0 pattern
            z = torch.nan_to_num(z, nan=0.0)
    if attn.hook_z in hooked:
        z = attn.hook_z(z)
    if cfg.use_attn_result:
        result = (z[..., None] * attn.W_O[None, None]).sum(-2)  # [batch, pos, head, d_model]
        if attn.hook_result in hooked:
            result = attn.hook_result(result)
        return result.sum(-2) + attn.b_O
    return F.linear(z.reshape(batch, n_new, -1), w.wo, w.bo)


def _mlp(mlp: GatedMLP, w: _LayerWeights, h: Tensor, hooked: set) -> Tensor:
    """TransformerLens's GatedMLP forward (the module itself when it has torch hooks)."""
    if _has_hooks(mlp):
        return mlp(h)
    pre = F.linear(h, w.wg)
    if mlp.hook_pre in hooked:
        pre = mlp.hook_pre(pre)
    pre_linear = F.linear(h, w.wi)
    if mlp.hook_pre_linear in hooked:
        pre_linear = mlp.hook_pre_linear(pre_linear)
    post = mlp.act_fn(pre) * pre_linear
    if w.b_in is not None:
        post = post + w.b_in
    if mlp.hook_post in hooked:
        post = mlp.hook_post(post)
    return F.linear(post, w.wout, w.b_out)


@torch.no_grad()
def decode_forward(
    model: HookedTransformer,
    tokens: Int[Tensor, "batch new"],
    cache: FastKVCache,
    attention_mask: Int[Tensor, "batch new"],
) -> Float[Tensor, "batch n_out d_vocab"]:
    """One cached forward step: TransformerLens's forward pass, without the redundant work.

    Args:
        model: a model :func:`fast_decode_blocker` accepts (the same one ``cache`` was made for).
        tokens: the new tokens (the whole left-padded prompt first, then one per step).
        cache: the :class:`FastKVCache`; extended in place.
        attention_mask: ``1`` for real tokens, ``0`` for padding, for the new tokens.

    Returns:
        Logits ``[batch, n_out, d_vocab]``: every new position when a hook on ``ln_final`` or
        ``unembed`` can see them, else only the last (``n_out = 1``).
    """
    batch, n_new = tokens.shape
    if batch != cache.keys[0].shape[0] or attention_mask.shape != tokens.shape:
        raise ValueError(
            f"tokens {tuple(tokens.shape)} and attention_mask {tuple(attention_mask.shape)} must have "
            f"one shape, with the cache's batch size {cache.keys[0].shape[0]}."
        )
    if cache.length + n_new > cache.max_len:
        raise ValueError(
            f"FastKVCache holds {cache.max_len} positions; this step needs {cache.length + n_new}."
            " Create it with max_len >= prompt length + new tokens."
        )
    hooked = _hooked_points(model)
    cache.attention_mask = torch.cat([cache.attention_mask, attention_mask.to(cache.attention_mask)], 1)
    mask = cache.attention_mask
    offset, end = cache.length, cache.length + n_new
    positions = get_offset_position_ids(offset, mask)
    key_ok = mask.bool()[:, None, None, :]
    if n_new > 1:
        causal = torch.ones(n_new, end, dtype=torch.bool, device=mask.device).tril(offset)
        key_ok = key_ok & causal
    # one additive mask per step for every layer (none when nothing is masked)
    sdpa_mask = None
    if not bool(key_ok.all()):
        sdpa_mask = torch.zeros(key_ok.shape, dtype=model.W_E.dtype, device=mask.device)
        sdpa_mask = sdpa_mask.masked_fill(~key_ok, float("-inf"))
    rotary = None
    if cache.shared_rotary:
        first = model.blocks[0].attn
        rotary = (first.rotary_cos[positions, None, :], first.rotary_sin[positions, None, :])
    if model.cfg.use_hook_tokens and model.hook_tokens in hooked:
        tokens = model.hook_tokens(tokens)
    x = model.embed.W_E[tokens, :]
    if model.hook_embed in hooked:
        x = model.hook_embed(x)
    for layer, (block, w) in enumerate(zip(model.blocks, cache.weights, strict=True)):
        if block.hook_resid_pre in hooked:
            x = block.hook_resid_pre(x)
        ln1 = block.ln1
        if _has_hooks(ln1) or ln1.hook_scale in hooked or ln1.hook_normalized in hooked:
            # TL normalises the query, key and value inputs in three calls: hooks see three
            hq, hk, hv = _norm(ln1, x, hooked), _norm(ln1, x, hooked), _norm(ln1, x, hooked)
        else:
            hq = hk = hv = _norm(ln1, x, hooked)
        attn_out = _attention(block.attn, w, hq, hk, hv, cache, layer, positions, rotary,
                              sdpa_mask, hooked)
        if block.hook_attn_out in hooked:
            attn_out = block.hook_attn_out(attn_out)
        x = x + attn_out
        if block.hook_resid_mid in hooked:
            x = block.hook_resid_mid(x)
        mlp_in = x
        if model.cfg.use_hook_mlp_in:
            mlp_in = block.hook_mlp_in(x.clone())
        mlp_out = _mlp(block.mlp, w, _norm(block.ln2, mlp_in, hooked), hooked)
        if block.hook_mlp_out in hooked:
            mlp_out = block.hook_mlp_out(mlp_out)
        x = x + mlp_out
        if block.hook_resid_post in hooked:
            x = block.hook_resid_post(x)
    cache.length = end
    final = model.ln_final
    unembed = model.unembed
    if not (_has_hooks(final) or {final.hook_scale, final.hook_normalized, unembed.hook_in,
                                  unembed.hook_out} & hooked):
        x = x[:, -1:]
    x = _norm(final, x, hooked)
    if unembed.hook_in in hooked:
        x = unembed.hook_in(x)
    logits = F.linear(x, unembed.W_U.T, _nonzero(unembed.b_U))
    if unembed.hook_out in hooked:
        logits = unembed.hook_out(logits)
    return logits
