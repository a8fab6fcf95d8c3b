"""Hooks: property tests of steering and ablation on tiny random HookedTransformers."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from parity import assert_parity, float64_twin, maxdiff

import emlens
from emlens.hooks import add_hook, hook_names

PROPERTY = settings(
    max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


@pytest.fixture(scope="module")
def model(make_tiny_model):
    return make_tiny_model(3)


def _no_hooks_left(model) -> bool:
    return all(not hp.fwd_hooks and not hp.bwd_hooks for hp in model.hook_dict.values())


def _direction(seed: int, d_model: int = 64, norm: float = 3.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    v = torch.randn(d_model, generator=g)
    return v / v.norm() * norm


def _tokens(seed: int, batch: int = 2, pos: int = 6) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 5000, (batch, pos), generator=g)


def _resid(model, tokens, name):
    _, cache = model.run_with_cache(tokens, names_filter=[name])
    return cache[name]


@PROPERTY
@given(seed=st.integers(0, 10_000), layer=st.integers(0, 2))
def test_ablated_activation_is_orthogonal_to_direction(model, seed, layer):
    d = _direction(seed)
    name = f"blocks.{layer}.hook_resid_post"
    with emlens.ablate(model, d, layers=layer):
        act = _resid(model, _tokens(seed), name)
    unit = d / d.norm()
    assert (act @ unit).abs().max() < 1e-4 * act.norm(dim=-1).max()
    assert _no_hooks_left(model)


@PROPERTY
@given(seed=st.integers(0, 10_000), hook=st.sampled_from(["resid_post", "writers", "resid_pre"]))
def test_ablation_is_idempotent(model, seed, hook):
    d, tokens = _direction(seed), _tokens(seed)
    with torch.no_grad(), emlens.ablate(model, d, hook=hook):
        once = model(tokens)
        with emlens.ablate(model, d, hook=hook):
            twice = model(tokens)
    assert torch.allclose(once, twice, atol=1e-4)
    assert _no_hooks_left(model)


@PROPERTY
@given(seed=st.integers(0, 10_000), layer=st.integers(0, 2))
def test_scale_zero_is_identity(model, seed, layer):
    tokens = _tokens(seed)
    with torch.no_grad():
        plain = model(tokens)
        with emlens.steer(model, _direction(seed), layers=layer, scale=0.0):
            steered = model(tokens)
    assert torch.equal(plain, steered)


@PROPERTY
@given(
    seed=st.integers(0, 10_000),
    layer=st.integers(0, 2),
    scale=st.floats(-20, 20, allow_nan=False),
    positions=st.sampled_from(["all", "prompt"]),
)
def test_added_amount_is_linear_in_scale(model, seed, layer, scale, positions):
    d, tokens = _direction(seed), _tokens(seed)
    name = f"blocks.{layer}.hook_resid_post"
    base = _resid(model, tokens, name)
    with emlens.steer(model, d, layers=layer, scale=scale, positions=positions):
        steered = _resid(model, tokens, name)
    assert torch.allclose(steered - base, (scale * d).expand_as(base), atol=1e-4)


def test_steering_several_layers_and_explicit_mask(model):
    d, tokens = _direction(7), _tokens(7, pos=5)
    mask = torch.tensor([[0, 0, 1, 1, 0], [1, 0, 0, 0, 1]], dtype=torch.bool)
    names = [f"blocks.{layer}.hook_resid_pre" for layer in (0, 2)]
    _, base = model.run_with_cache(tokens, names_filter=names)
    with emlens.steer(model, d, layers=[0, 2], scale=2.0, hook="resid_pre", positions=mask):
        _, steered = model.run_with_cache(tokens, names_filter=names)
    diff0 = steered[names[0]] - base[names[0]]
    assert torch.allclose(diff0[mask], (2.0 * d).expand(int(mask.sum()), -1), atol=1e-5)
    assert diff0[~mask].abs().max() == 0
    assert (steered[names[1]] - base[names[1]])[mask].abs().max() > 1.0


def test_nested_blocks_compose_and_remove_only_their_hooks(model):
    d1, d2, tokens = _direction(1), _direction(2), _tokens(1)
    with torch.no_grad():
        with emlens.steer(model, d1, layers=1, scale=1.0):
            with emlens.steer(model, d2, layers=1, scale=1.0):
                both = model(tokens)
            after_inner = model(tokens)
        with emlens.steer(model, d1 + d2, layers=1, scale=1.0):
            summed = model(tokens)
            # a user's own run_with_hooks inside a block leaves the block's hooks in place
            model.run_with_hooks(tokens, fwd_hooks=[("blocks.0.hook_resid_post", lambda x, hook: x)])
            still = model(tokens)
        with emlens.steer(model, d1, layers=1, scale=1.0):
            only_d1 = model(tokens)
    assert torch.allclose(both, summed, atol=1e-4)
    assert torch.equal(after_inner, only_d1)
    assert torch.equal(still, summed)
    assert _no_hooks_left(model)


@PROPERTY
@given(which=st.sampled_from(["steer", "ablate"]))
def test_no_hook_survives_an_exception(model, which):
    d = _direction(0)
    with pytest.raises(RuntimeError, match="boom"):
        if which == "steer":
            with emlens.steer(model, d, layers=[0, 1], scale=1.0):
                assert not _no_hooks_left(model)
                raise RuntimeError("boom")
        else:
            with emlens.ablate(model, d, hook="writers"):
                assert not _no_hooks_left(model)
                raise RuntimeError("boom")
    assert _no_hooks_left(model)


def _float64_floor(model, gens, d, prompts, steer_kw, gen_kw) -> float:
    """Float32 error of ``gens``' logits: the same steered generation on a float64 twin."""
    twin = float64_twin(model)
    with emlens.steer(twin, d.double(), scale=1.0, **steer_kw):
        ref = emlens.generate(twin, prompts, **gen_kw)
    return max(maxdiff(g.logits, r.logits) for g, r in zip(gens, ref, strict=True))


def test_generated_only_steering_leaves_prompt_logits_unchanged(model):
    d = _direction(5, norm=10.0)
    prompts = ["Hello there", "What do you think about cats?"]
    plain = emlens.generate(model, prompts, max_new_tokens=6, temperature=0, stop_at_eos=False,
                            progress=False, return_logits=True)
    with emlens.steer(model, d, layers=0, scale=1.0, positions="generated"):
        steered = emlens.generate(model, prompts, max_new_tokens=6, temperature=0,
                                  stop_at_eos=False, progress=False, return_logits=True)
    for a, b in zip(plain, steered, strict=True):
        # the first token comes from the last prompt position: untouched
        # same computation on the prompt; only the generated step shapes differ
        assert_parity(b.logits[0], a.logits[0], floor=0.0, what="first token untouched")
        assert not torch.allclose(a.logits[1:], b.logits[1:], atol=1e-3)
    # Teacher-forced check: run prompt + generated tokens as one sequence with the state set.
    batch = emlens.tokenize_chat(model.tokenizer, prompts)
    full = torch.cat([batch.tokens, torch.stack([g.tokens for g in plain])], dim=1)
    mask = torch.cat([batch.attention_mask, torch.ones(2, 6, dtype=torch.long)], dim=1)
    prompt_len = batch.tokens.shape[1]
    with torch.no_grad():
        base = model(full, attention_mask=mask)
        with emlens.hooks.generation_positions(prompt_len), emlens.steer(
            model, d, layers=0, scale=1.0, positions="generated"
        ):
            hooked = model(full, attention_mask=mask)
    assert torch.equal(base[:, :prompt_len], hooked[:, :prompt_len])
    assert not torch.allclose(base[:, prompt_len:], hooked[:, prompt_len:], atol=1e-3)


def test_generated_positions_outside_generate_touch_nothing_and_warn(model):
    tokens = _tokens(9)
    with torch.no_grad():
        plain = model(tokens)
        with pytest.warns(UserWarning, match="outside emlens.generate"):
            with emlens.steer(model, _direction(9), layers=0, scale=5.0, positions="generated"):
                steered = model(tokens)
    assert torch.equal(plain, steered)


@pytest.mark.parametrize("positions", ["all", "generated", "prompt"])
def test_steered_greedy_generation_same_with_and_without_kv_cache(model, positions):
    d = _direction(11, norm=6.0)
    prompts = ["Tell me about the sea", "Hi", "Why is the sky blue?"]
    kwargs = dict(max_new_tokens=8, temperature=0, stop_at_eos=False, progress=False,
                  return_logits=True)
    with emlens.steer(model, d, layers=1, scale=1.0, positions=positions):
        cached = emlens.generate(model, prompts, use_cache=True, **kwargs)
        uncached = emlens.generate(model, prompts, use_cache=False, **kwargs)
    floor = _float64_floor(model, uncached, d, prompts, dict(layers=1, positions=positions),
                           dict(kwargs, use_cache=False))
    for a, b in zip(cached, uncached, strict=True):
        assert torch.equal(a.tokens, b.tokens)
        assert_parity(a.logits, b.logits, floor=floor, what=f"KV cache vs none ({positions})")


def test_left_padded_batch_gives_same_answers_as_one_at_a_time(model):
    d = _direction(12, norm=4.0)
    prompts = ["Hi", "Can you tell me a long story about a dragon and a knight?", "2+2?"]
    kwargs = dict(max_new_tokens=8, temperature=0, stop_at_eos=False, progress=False,
                  return_logits=True)
    with emlens.steer(model, d, layers=2, scale=1.0, positions="generated"):
        batched = emlens.generate(model, prompts, batch_size=3, **kwargs)
        single = [emlens.generate(model, [p], batch_size=1, **kwargs)[0] for p in prompts]
    floor = _float64_floor(model, single, d, prompts, dict(layers=2, positions="generated"),
                           dict(kwargs, batch_size=1))
    for a, b in zip(batched, single, strict=True):
        assert torch.equal(a.tokens, b.tokens)
        assert_parity(a.logits, b.logits, floor=floor, what="left-padded batch vs one at a time")


def test_projections_read_the_component_along_a_direction(model):
    d, tokens = _direction(13), _tokens(13)
    proj = emlens.hooks.projections(model, tokens, d, layers=[1, 2])
    act = _resid(model, tokens, "blocks.2.hook_resid_post")
    assert proj.shape == (2, *tokens.shape)
    assert torch.allclose(proj[1], act @ (d / d.norm()), atol=1e-5)


def test_hook_functions_work_in_run_with_hooks(model):
    d, tokens = _direction(14), _tokens(14)
    name = "blocks.1.hook_resid_mid"
    base = _resid(model, tokens, name)
    store = {}
    model.run_with_hooks(
        tokens,
        fwd_hooks=[(name, add_hook(d, 3.0)),
                   (name, lambda x, hook: store.setdefault("x", x.detach()))],
    )
    assert torch.allclose(store["x"] - base, 3.0 * d.expand_as(base), atol=1e-5)
    assert _no_hooks_left(model)


# ------------------------------------------------------------------------------------------
# Bad input


@pytest.mark.parametrize(
    ("direction", "kwargs", "message"),
    [
        (torch.ones(63), {}, r"shape \(63,\).*d_model=64"),
        (torch.zeros(64), {}, "zero norm"),
        (torch.full((64,), float("nan")), {}, "NaN"),
        (torch.ones(64, dtype=torch.float64), {}, "float64.*float32"),
        (torch.ones(64, device="meta"), {}, "meta.*cpu"),
        (torch.ones(64), {"layers": 3}, "out of range.*3 layers"),
        (torch.ones(64), {"layers": -4}, "out of range"),
        (torch.ones(64), {"hook": "resid_middle"}, "Unknown hook 'resid_middle'"),
        (torch.ones(64), {"positions": "answer"}, "positions='answer'"),
        ("not a tensor", {}, "torch.Tensor"),
    ],
)
def test_bad_input_raises_value_error_naming_it(model, direction, kwargs, message):
    args = {"layers": 1, "scale": 1.0} | kwargs
    with pytest.raises(ValueError, match=message):
        with emlens.steer(model, direction, **args):
            pass
    assert _no_hooks_left(model)


def test_ablate_rejects_zero_direction_and_bad_layers(model):
    with pytest.raises(ValueError, match="zero norm"):
        emlens.ablation_hooks(model, torch.zeros(64))
    with pytest.raises(ValueError, match="empty"):
        emlens.ablation_hooks(model, torch.ones(64), layers=[])
    with pytest.raises(ValueError, match="does not exist"):
        hook_names(model, 0, "blocks.{layer}.hook_nonexistent")


def test_mask_of_wrong_shape_raises(model):
    with pytest.raises(ValueError, match="positions mask has 3 positions but the input has 6"):
        with emlens.steer(model, _direction(0), layers=0, scale=1.0,
                          positions=torch.ones(3, dtype=torch.bool)):
            model(_tokens(0))
    assert _no_hooks_left(model)
