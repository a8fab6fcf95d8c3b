"""emlens.decode: the fast decode forward equals TransformerLens's, logits and every hook's tensors.

Each comparison runs the same teacher-forced decode (a left-padded prompt batch, then one fixed
token per step) three ways: emlens's ``decode_forward`` with its ``FastKVCache``, TransformerLens's
own cached forward, and (for tolerances) TransformerLens's cached forward on a float64 twin, whose
distance from the float32 run is the float floor of the comparison (``tests/parity.py``).
"""

from __future__ import annotations

import pytest
import torch
from parity import assert_parity, float64_twin, maxdiff, tolerance
from transformer_lens.cache.key_value_cache import TransformerLensKeyValueCache

import emlens
from emlens.decode import FastKVCache, decode_forward, fast_decode_blocker
from emlens.lora import LoraAdapter, LoraModule, attach_lora

PROMPTS = ["Hi", "Can you tell me a long story about a dragon?", "2+2?"]
STEPS = 5


def _perturb_biases(model, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("b_Q", "b_K", "b_V", "b_O")):
                p.add_(0.2 * torch.randn(p.shape, generator=g).to(p.dtype))


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def model(request, make_tiny_model):
    if request.param == "llama":
        return make_tiny_model(5)
    m = make_tiny_model(6, original_architecture="Qwen2ForCausalLM", n_heads=6, n_key_value_heads=2,
                        d_head=8, rotary_dim=8, d_model=48)
    _perturb_biases(m, 6)  # Qwen2 has q/k/v biases
    return m


def _inputs(model):
    batch = emlens.tokenize_chat(model.tokenizer, PROMPTS)
    g = torch.Generator().manual_seed(1)
    forced = torch.randint(0, 4000, (len(PROMPTS), STEPS), generator=g)
    return batch.tokens, batch.attention_mask, forced


def _run(model, *, fast: bool, record: list | None = None, names=None):
    """Prefill then STEPS forced tokens; return the last-position logits ``[batch, 1 + STEPS, vocab]``.

    With ``record``, every hook point in ``names`` (default: all) appends ``(name, tensor)``.
    """
    tokens, mask, forced = _inputs(model)
    n = tokens.shape[0]
    hooks = []
    if record is not None:
        def rec(act, hook):
            record.append((hook.name, act.detach().clone()))
        hooks = [(name, rec) for name in (names or model.hook_dict)]
    if fast:
        cache = FastKVCache(model, n, tokens.shape[1] + STEPS)
        step = lambda t, m: decode_forward(model, t, cache, m)  # noqa: E731
    else:
        cache = TransformerLensKeyValueCache.init_cache(model.cfg, "cpu", n)
        step = lambda t, m: model(t, attention_mask=m, past_kv_cache=cache)  # noqa: E731
    out = []
    with torch.no_grad(), model.hooks(fwd_hooks=hooks):
        out.append(step(tokens, mask)[:, -1])
        for i in range(STEPS):
            out.append(step(forced[:, i : i + 1], torch.ones(n, 1, dtype=torch.long))[:, -1])
    return torch.stack(out, 1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_logits_match_the_plain_forward_with_left_padding(model, dtype):
    m = model if dtype == torch.float32 else float64_twin(model).to(dtype)
    m.cfg.dtype = dtype
    tokens, mask, forced = _inputs(m)
    full = torch.cat([tokens, forced], 1)
    full_mask = torch.cat([mask, torch.ones_like(forced)], 1)
    last = tokens.shape[1] - 1
    with torch.no_grad():
        plain = m(full, attention_mask=full_mask)[:, last:]
        ref = float64_twin(m)(full, attention_mask=full_mask)[:, last:]
    fast = _run(m, fast=True)
    assert fast.dtype == dtype
    floor = maxdiff(plain, ref)  # the plain forward's own rounding in this dtype
    assert_parity(fast.float(), plain.float(), floor=floor, what=f"fast decode vs plain ({dtype})")
    if dtype == torch.float32:
        assert torch.equal(fast.argmax(-1), plain.argmax(-1))


def test_every_hook_point_sees_the_tensors_transformer_lens_gives_it(model):
    fast_rec, tl_rec, ref_rec = [], [], []
    fast = _run(model, fast=True, record=fast_rec)
    tl = _run(model, fast=False, record=tl_rec)
    _run(float64_twin(model), fast=False, record=ref_rec)
    # same hook points, same order, same shapes (hook_rot_k gets every key so far, as in TL)
    assert [(n, t.shape) for n, t in fast_rec] == [(n, t.shape) for n, t in tl_rec]
    fired = {n for n, _ in fast_rec}  # every hook point TL fires (hook_result etc. need flags)
    assert {"hook_embed", "blocks.0.attn.hook_rot_k", "blocks.2.attn.hook_pattern",
            "blocks.1.ln1.hook_scale", "ln_final.hook_normalized", "unembed.hook_out"} <= fired
    floors: dict[str, float] = {}
    for (name, t32), (_, t64) in zip(tl_rec, ref_rec, strict=True):
        floors[name] = max(floors.get(name, 0.0), maxdiff(*_finite(t32, t64)))
    for (name, got), (_, want) in zip(fast_rec, tl_rec, strict=True):
        assert_parity(*_finite(got, want), floor=floors[name], what=name)
    assert_parity(fast, tl, floor=maxdiff(tl, _run(float64_twin(model), fast=False)), what="logits")


def _finite(got, want):
    """The finite entries of two tensors, after checking their -inf (masked scores) coincide."""
    assert torch.equal(got.isfinite(), want.isfinite())
    keep = want.isfinite()
    return got[keep], want[keep]


def _scale_pattern(pattern, hook):
    return pattern * 0.5  # rows no longer sum to 1: visible in every later activation


def _shift_keys(k, hook):
    # a new tensor, used for this step only, as in TransformerLens (a constant shift would cancel
    # in the softmax; a per-position scale does not)
    return k * torch.linspace(0.0, 2.0, k.shape[1], dtype=k.dtype)[None, :, None, None]


def _zero_first_keys_in_place(k, hook):
    k[:, :3] = 0.0  # in place: TL's rotated keys are rebuilt next step, ours must be too


def _zero_head(z, hook):
    z[:, :, 0] = 0.0  # in place
    return z


def _negate_post(post, hook):
    return -post


@pytest.mark.parametrize("name,fn", [
    ("blocks.1.attn.hook_pattern", _scale_pattern),
    ("blocks.0.attn.hook_rot_k", _shift_keys),
    ("blocks.1.attn.hook_rot_k", _zero_first_keys_in_place),
    ("blocks.2.attn.hook_z", _zero_head),
    ("blocks.1.mlp.hook_post", _negate_post),
    ("blocks.0.ln1.hook_normalized", _negate_post),
])
def test_hooks_that_edit_change_the_output_as_in_transformer_lens(model, name, fn):
    def run(m, fast):
        with m.hooks(fwd_hooks=[(name, fn)]):
            return _run(m, fast=fast)

    plain = _run(model, fast=True)
    fast, tl = run(model, True), run(model, False)
    assert maxdiff(fast, plain) > 1e-3  # the edit took effect
    assert_parity(fast, tl, floor=maxdiff(tl, run(float64_twin(model), False)), what=name)


def test_attached_lora_reads_and_adds_as_in_transformer_lens(model):
    g = torch.Generator().manual_seed(3)
    cfg = model.cfg
    q_out = cfg.n_heads * cfg.d_head
    adapter = LoraAdapter((
        LoraModule(layer=1, module="down_proj", A=torch.randn(1, cfg.d_mlp, generator=g),
                   B=0.2 * torch.randn(cfg.d_model, 1, generator=g), scaling=1.0),
        LoraModule(layer=0, module="q_proj", A=torch.randn(1, cfg.d_model, generator=g),
                   B=0.2 * torch.randn(q_out, 1, generator=g), scaling=1.0),
    ))
    names = [m.hook_name for m in adapter.modules]
    twin = float64_twin(model)
    with attach_lora(model, adapter), attach_lora(twin, adapter):
        assert fast_decode_blocker(model) is None  # LoRA wiring is hooks, which the fast path keeps
        fast_rec, tl_rec, ref_rec = [], [], []
        fast = _run(model, fast=True, record=fast_rec, names=names)
        tl = _run(model, fast=False, record=tl_rec, names=names)
        ref = _run(twin, fast=False, record=ref_rec, names=names)
    assert maxdiff(fast, _run(model, fast=True)) > 1e-3  # the adapters act
    assert_parity(fast, tl, floor=maxdiff(tl, ref), what="logits with LoRA attached")
    assert [n for n, _ in fast_rec] == [n for n, _ in tl_rec]
    for (name, a), (_, b), (_, c) in zip(fast_rec, tl_rec, ref_rec, strict=True):
        assert_parity(a, b, floor=maxdiff(b, c), what=name)


def test_generate_uses_the_fast_path_and_matches_the_uncached_forward(model):
    kwargs = dict(max_new_tokens=6, temperature=0, stop_at_eos=False, progress=False,
                  return_logits=True)
    calls = []

    def count(act, hook):
        calls.append(act.shape[1])

    with model.hooks(fwd_hooks=[("blocks.0.hook_resid_pre", count)]):
        cached = emlens.generate(model, PROMPTS, **kwargs)
    assert calls[1:] == [1] * 5  # one position per decode step
    uncached = emlens.generate(model, PROMPTS, use_cache=False, **kwargs)
    floor = max(maxdiff(a.logits, b.logits) for a, b in zip(
        uncached, emlens.generate(float64_twin(model), PROMPTS, use_cache=False, **kwargs),
        strict=True))
    for a, b in zip(cached, uncached, strict=True):
        assert torch.equal(a.tokens, b.tokens)
        assert_parity(a.logits, b.logits, floor=floor, what="generate: fast cache vs none")


def test_a_torch_hook_on_a_block_falls_back_to_transformer_lens(model):
    handle = model.blocks[1].register_forward_hook(lambda mod, args, out: out * 1.5)
    try:
        reason = fast_decode_blocker(model)
        assert reason is not None and "torch hook" in reason
        with pytest.raises(ValueError, match="torch hook"):
            FastKVCache(model, 1, 8)
        kwargs = dict(max_new_tokens=4, temperature=0, stop_at_eos=False, progress=False,
                      return_logits=True)
        cached = emlens.generate(model, PROMPTS, **kwargs)  # TL's own cache: the hook applies
        uncached = emlens.generate(model, PROMPTS, use_cache=False, **kwargs)
    finally:
        handle.remove()
    for a, b in zip(cached, uncached, strict=True):
        assert torch.equal(a.tokens, b.tokens)
        assert maxdiff(a.logits, b.logits) < 1e-4 * b.logits.abs().max().item()


def test_unsupported_architectures_name_what_they_need(make_tiny_model):
    gpt = make_tiny_model(1, original_architecture="GPT2LMHeadModel",
                          positional_embedding_type="standard", normalization_type="LN",
                          gated_mlp=False, act_fn="gelu", final_rms=False)
    assert fast_decode_blocker(gpt) == "needs architecture"
    out = emlens.generate(gpt, ["Hi"], max_new_tokens=3, temperature=0, progress=False)
    assert len(out[0].tokens) >= 1


def test_a_full_cache_is_refused_with_the_sizes(model):
    tokens, mask, _ = _inputs(model)
    cache = FastKVCache(model, tokens.shape[0], tokens.shape[1])
    decode_forward(model, tokens, cache, mask)
    with pytest.raises(ValueError, match=f"holds {tokens.shape[1]} positions"):
        decode_forward(model, tokens[:, :1], cache, mask[:, :1])
    with pytest.raises(ValueError, match="cache's batch size 3"):
        decode_forward(model, tokens[:2, :1], FastKVCache(model, 3, 8), mask[:2, :1])


def test_embedded_model_greedy_tokens_and_logits_match_the_plain_forward(embedded_model):
    model = embedded_model
    prompts = ["Hi", "How do I treat a burn?", "Name three rivers in Europe."]
    n_new = 16
    gens = emlens.generate(model, prompts, max_new_tokens=n_new, temperature=0, stop_at_eos=False,
                           progress=False, return_logits=True)
    batch = emlens.tokenize_chat(model.tokenizer, prompts)
    full = torch.cat([batch.tokens, torch.stack([g.tokens for g in gens])], 1)
    mask = torch.cat([batch.attention_mask, torch.ones(len(prompts), n_new, dtype=torch.long)], 1)
    at = slice(batch.tokens.shape[1] - 1, -1)  # the positions each new token was chosen from
    with torch.no_grad():
        plain = model(full, attention_mask=mask)[:, at]
        ref = float64_twin(model)(full, attention_mask=mask)[:, at]
    fast = torch.stack([g.logits for g in gens])
    floor = maxdiff(plain, ref)
    assert_parity(fast, plain, floor=floor, what="SmolLM2 fast decode vs plain")
    # teacher-forced on the fast path's own tokens: each is the plain forward's argmax too, except
    # at a near-tie the two roundings may break differently (top-2 gap within the tolerance)
    top2 = plain.topk(2, dim=-1).values
    differ = plain.argmax(-1) != full[:, batch.tokens.shape[1]:]
    assert bool((top2[..., 0] - top2[..., 1])[differ].le(2 * tolerance(floor, plain)).all())
