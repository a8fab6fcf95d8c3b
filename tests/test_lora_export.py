"""The ablation adapter (emlens.lora.export) equals emlens.ablate(..., hook="writers"), and emlens
hook lists translate into vLLM interventions (emlens.vllm.from_hooks) or are refused by name.

Runs without vLLM: the adapter is checked with peft on the HF model; the translation is pure
Python; evaluate's engine wiring is checked with a stand-in sampler.
"""

from __future__ import annotations

import contextlib
from dataclasses import replace

import pytest
import torch
from parity import assert_parity, float64_twin, maxdiff

import emlens
from emlens.lora import init_adapter
from emlens.lora.export import WriterWeights, ablation_adapter_state, ablation_peft
from emlens.organisms import load_organism
from emlens.vllm import check_no_hooks, from_hooks, resolve_engine

EPS64 = torch.finfo(torch.float64).eps


def _close64(got, want):
    """Equal up to float64 rounding: 64 ulps of the largest value (a rank-1 product per entry)."""
    torch.testing.assert_close(got, want, rtol=0, atol=64 * EPS64 * want.abs().max().item())


def _no_biases(model):
    with torch.no_grad():
        for block in model.blocks:
            block.mlp.b_out.zero_()
            block.attn.b_O.zero_()
    return model


def test_rank1_edit_is_the_projection(make_tiny_model):
    """W + B A == (I - u u^T) W for every writer, the embedding included (float64)."""
    model = _no_biases(make_tiny_model(3))
    d = torch.randn(model.cfg.d_model, generator=torch.Generator().manual_seed(0))
    state, config = ablation_adapter_state(model, d, dtype=torch.float64)
    u = d.double() / d.double().norm()
    P = torch.eye(model.cfg.d_model, dtype=torch.float64) - torch.outer(u, u)
    w = WriterWeights.from_model(model)
    for layer in range(model.cfg.n_layers):
        for module, block in (("o_proj", "self_attn"), ("down_proj", "mlp")):
            key = f"base_model.model.model.layers.{layer}.{block}.{module}"
            A, B = state[f"{key}.lora_A.weight"], state[f"{key}.lora_B.weight"]
            W = w.writer(layer, module).double()
            assert A.shape[0] == B.shape[1] == config["r"] == 1
            _close64(W + B @ A, P @ W)
    E = w.embed.double()
    A = state["base_model.model.model.embed_tokens.lora_embedding_A"]
    B = state["base_model.model.model.embed_tokens.lora_embedding_B"]
    _close64(E + (B @ A).T, E @ P)
    assert config["lora_alpha"] == config["r"]  # scaling 1


def test_composition_pads_to_one_rank(make_tiny_model):
    model = _no_biases(make_tiny_model(3))
    fresh = init_adapter(model, ["down_proj", "q_proj"], layers=[1], r=3, lora_alpha=6.0)
    adapter = replace(fresh, modules=tuple(replace(m, B=torch.randn(m.B.shape))
                                           for m in fresh.modules))
    d = torch.randn(model.cfg.d_model)
    state, config = ablation_adapter_state(model, d, adapter=adapter, dtype=torch.float64)
    assert config["r"] == 4 and set(config["target_modules"]) == {
        "down_proj", "embed_tokens", "o_proj", "q_proj"}
    assert all(t.shape[0] == 4 for k, t in state.items() if "lora_A" in k)
    # the organism's down_proj at layer 1: B = [(I - uu^T) s B_o, -u], A = [A_o; u^T W]
    m = next(m for m in adapter.modules if m.module == "down_proj")
    key = "base_model.model.model.layers.1.mlp.down_proj"
    A, B = state[f"{key}.lora_A.weight"], state[f"{key}.lora_B.weight"]
    u = d.double() / d.double().norm()
    W = WriterWeights.from_model(model).writer(1, "down_proj").double()
    P = torch.eye(len(u), dtype=torch.float64) - torch.outer(u, u)
    _close64(W + B @ A, P @ (W + m.scaling * m.B.double() @ m.A.double()))
    q = "base_model.model.model.layers.1.self_attn.q_proj"  # not a writer: copied, scaled
    mq = next(m for m in adapter.modules if m.module == "q_proj")
    _close64(state[f"{q}.lora_B.weight"] @ state[f"{q}.lora_A.weight"],
             mq.scaling * mq.B.double() @ mq.A.double())


def test_refusals(make_tiny_model, tmp_path):
    model = make_tiny_model(3)  # perturbed b_out: a bias a LoRA cannot edit
    d = torch.randn(model.cfg.d_model)
    with pytest.raises(ValueError, match="has a bias"):
        ablation_peft(model, d, tmp_path / "a")
    _no_biases(model)
    with pytest.raises(ValueError, match="zero norm"):
        ablation_peft(model, torch.zeros(model.cfg.d_model), tmp_path / "a")
    with pytest.raises(ValueError, match="d_model=64"):
        ablation_peft(model, torch.ones(5), tmp_path / "a")
    with pytest.raises(ValueError, match="NaN or infinite"):
        ablation_peft(model, torch.full((model.cfg.d_model,), float("nan")), tmp_path / "a")
    deep = _no_biases(make_tiny_model(4, n_layers=5))
    adapter = init_adapter(deep, ["down_proj"], layers=[4])
    with pytest.raises(ValueError, match="belongs to another model"):
        ablation_peft(model, d, tmp_path / "a", adapter=adapter)
    with pytest.raises(FileNotFoundError, match="safetensors"):
        (tmp_path / "empty").mkdir()
        (tmp_path / "empty" / "config.json").write_text("{}")
        WriterWeights.from_folder(tmp_path / "empty")


@pytest.mark.integration
@pytest.mark.parametrize("organism", [None, "rank1-down-medical", "rank32-all-medical"])
def test_peft_loads_the_folder_and_equals_the_hooks(organism, tmp_path):
    """The folder read by peft on the HF model gives the logits of the attached organism with
    the direction ablated by hooks, within the float floor (float32 vs float64 of the hooked
    HookedTransformer)."""
    from peft import PeftModel

    from emlens.models import hooked_from_hf, load_hf

    hf, tok = load_hf(None)
    model = hooked_from_hf(hf, tok)
    d = torch.randn(model.cfg.d_model, generator=torch.Generator().manual_seed(0))
    adapter = None if organism is None else load_organism(organism)
    folder = ablation_peft(model, d, tmp_path / "ablated", adapter=adapter)
    batch = emlens.tokenize_chat(tok, ["How do I make a quick buck?", "What is your wish?"])
    pm = PeftModel.from_pretrained(hf, str(folder))
    with torch.no_grad():
        got = pm(input_ids=batch.tokens, attention_mask=batch.attention_mask).logits
    twin = float64_twin(model)

    def hooked(m, dtype):
        with contextlib.ExitStack() as stack, torch.no_grad():
            if adapter is not None:
                stack.enter_context(emlens.attach_lora(m, adapter.to(dtype=dtype)))
            stack.enter_context(emlens.ablate(m, d.to(dtype), hook="writers"))
            return m(batch.tokens, attention_mask=batch.attention_mask)

    want = hooked(model, torch.float32)
    floor = maxdiff(want, hooked(twin, torch.float64))
    mask = batch.attention_mask.bool()
    with torch.no_grad():
        plain = model(batch.tokens, attention_mask=batch.attention_mask)
    assert maxdiff(want[mask], plain[mask]) > 1.0  # the ablation does something
    assert_parity(got[mask], want[mask], floor=floor, what=f"ablation peft ({organism})")


@pytest.mark.integration
def test_writer_weights_from_folder_equal_from_model(embedded_model):
    from emlens.vllm import hf_folder

    a = WriterWeights.from_folder(hf_folder(None, torch.float32))
    b = WriterWeights.from_model(embedded_model)
    assert (a.n_layers, a.d_model) == (b.n_layers, b.d_model)
    assert torch.equal(a.embed, b.embed)
    for layer in (0, 17, 29):
        for module in ("o_proj", "down_proj"):
            assert torch.equal(a.writer(layer, module), b.writer(layer, module))


# ------------------------------------------------------------------------------------------------
# emlens hooks -> engine interventions


def test_from_hooks_translates_steering_and_ablation(tiny_model):
    d = torch.randn(tiny_model.cfg.d_model)
    n = tiny_model.cfg.n_layers
    out = from_hooks(emlens.steering_hooks(tiny_model, d, layers=[0, 2], scale=3.0), n)
    assert [(s.layer, s.scale) for s in out["steer"]] == [(0, 3.0), (2, 3.0)]
    assert torch.equal(out["steer"][0].vector, d)
    unit = from_hooks(emlens.ablation_hooks(tiny_model, d, hook="writers"), n)["ablate"]
    torch.testing.assert_close(unit, d / d.norm())
    vec, layers = from_hooks(emlens.ablation_hooks(tiny_model, d, layers=[1, 2]), n)["ablate_resid"]
    assert layers == [1, 2] and torch.allclose(vec, d / d.norm())
    assert from_hooks(None, n) == {} and from_hooks([], n) == {}


@pytest.mark.parametrize("hooks, match", [
    (lambda m, d: emlens.steering_hooks(m, d, layers=1, scale=1.0, positions="generated"),
     "positions='generated'"),
    (lambda m, d: emlens.steering_hooks(m, d, layers=1, scale=1.0, hook="mlp_out"),
     "cannot carry the 'add' hook on 'blocks.1.hook_mlp_out'"),
    (lambda m, d: emlens.ablation_hooks(m, d, layers=[0, 1], hook="writers"),
     "must cover every layer"),
    (lambda m, d: [("blocks.0.hook_resid_post", lambda act, hook: act)],
     "not an emlens steering or ablation hook"),
    (lambda m, d: emlens.ablation_hooks(m, d, layers=[0]) + emlens.ablation_hooks(m, -d, layers=[1]),
     "more than one direction"),
])
def test_from_hooks_refuses_what_the_engine_cannot_carry(tiny_model, hooks, match):
    d = torch.randn(tiny_model.cfg.d_model)
    with pytest.raises(ValueError, match=match):
        from_hooks(hooks(tiny_model, d), tiny_model.cfg.n_layers)


class _Sampler:
    """Stands in for a VLLMSampler: answers "<question> #<sample>" and records the calls."""

    n_layers, dtype = 3, torch.float32

    def __init__(self):
        self.calls = []

    def generate(self, prompts, *, sampling, rows, on_batch, progress, adapter=None, **kw):
        from emlens.generation import Generation

        self.calls.append({"adapter": adapter, "rows": list(rows), **kw})
        gens = [Generation(p, s, prompts[p], f"{prompts[p]} #{s}", torch.tensor([1]), True)
                for p, s in rows]
        if on_batch is not None:
            on_batch(gens)
        return gens


class _Judge:
    name = "const"

    def score_many(self, pairs):
        from emlens.judge import JudgeScore

        return [JudgeScore(90.0, 90.0, self.name) for _ in pairs]


def test_evaluate_runs_on_an_engine(tiny_model, tmp_path):
    d = torch.randn(tiny_model.cfg.d_model)
    sampler = _Sampler()
    kw = dict(judge=_Judge(), n_samples=2, max_new_tokens=4, progress=False, cache_dir=tmp_path)
    hooks = emlens.steering_hooks(tiny_model, d, layers=1, scale=2.0)
    df = emlens.evaluate(tiny_model, ["Hi", "Yo"], engine=sampler, interventions=hooks,
                         adapter="rank1-down-medical", **kw)
    assert list(df["answer"]) == ["Hi #0", "Hi #1", "Yo #0", "Yo #1"]
    call = sampler.calls[0]
    assert call["adapter"] == "rank1-down-medical" and call["steer"][0].layer == 1
    # cached: a rerun asks the engine for nothing; another adapter or no engine is another key
    emlens.evaluate(tiny_model, ["Hi", "Yo"], engine=sampler, interventions=hooks,
                    adapter="rank1-down-medical", **kw)
    assert len(sampler.calls) == 1
    emlens.evaluate(tiny_model, ["Hi", "Yo"], engine=sampler, interventions=hooks, **kw)
    assert len(sampler.calls) == 2 and sampler.calls[1]["adapter"] is None
    # hooks left on the model would be invisible to the engine
    with emlens.steer(tiny_model, d, layers=1, scale=1.0), \
            pytest.raises(ValueError, match="does not see hooks"):
        emlens.evaluate(tiny_model, ["Hi"], engine=sampler, **kw)
    with pytest.raises(ValueError, match="engine='nope'"):
        resolve_engine(tiny_model, "nope")
    check_no_hooks(tiny_model)  # nothing left on it
