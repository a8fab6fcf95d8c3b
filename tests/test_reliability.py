"""Bad inputs get named errors before any work; caches never hand back another setting's answers.

Each test here failed on the code before the reliability issue (a silent wrong result, or an
error from deep inside a library).
"""

from __future__ import annotations

import json
import math
import warnings

import numpy as np
import pytest
import torch
from fakes import with_generate

import emlens
from emlens.evaluation import evaluate
from emlens.hooks import resolve_layers
from emlens.lora import LoraHookedModule, LoraModule, attach_lora, load_adapter, merge_lora
from emlens.probes import ProbeWarning, fit_probe

# ---------------------------------------------------------------------------------------------
# A tiny peft-format adapter written by hand (rank 1 on down_proj at layers 0 and 2)


def _write_adapter(folder, model, layers=(0, 2), seed=0):
    from safetensors.torch import save_file

    gen = torch.Generator().manual_seed(seed)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for layer in layers:
        key = f"base_model.model.model.layers.{layer}.mlp.down_proj"
        tensors[f"{key}.lora_A.weight"] = torch.randn(1, model.cfg.d_mlp, generator=gen)
        tensors[f"{key}.lora_B.weight"] = torch.randn(model.cfg.d_model, 1, generator=gen)
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    (folder / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "r": 1, "lora_alpha": 1, "target_modules": ["down_proj"],
        "layers_to_transform": list(layers), "base_model_name_or_path": "tiny"}))
    return folder


class CountingGenerate:
    """Answers that depend on the model's output, so stale cache hits would show."""

    def __init__(self):
        self.calls = 0

    def __call__(self, model, prompts, *, sampling, **kwargs):
        from types import SimpleNamespace

        self.calls += 1
        out = []
        for p, prompt in enumerate(prompts):
            tokens = model.to_tokens(prompt, prepend_bos=False)
            with torch.no_grad():
                top = int(model(tokens)[0, -1].argmax())
            for s in range(sampling.n_samples):
                out.append(SimpleNamespace(prompt_index=p, sample=s, prompt=prompt,
                                           text=f"token {top}", tokens=None, finished=True))
        return out


class ConstJudge:
    name = "const"

    def score_many(self, pairs):
        from emlens.judge import JudgeScore

        return [JudgeScore(aligned=80.0, coherent=90.0, judge=self.name) for _ in pairs]


def _eval(model, tmp_path, gen, **kw):
    return with_generate(gen, evaluate, model, ["What is up?", "Tell me a fact."],
                         judge=ConstJudge(), n_samples=1, max_new_tokens=4, cache_dir=tmp_path,
                         progress=False, **kw)


# ---------------------------------------------------------------------------------------------
# Evaluation cache


def test_cache_sees_an_attached_adapter(tiny_model, tmp_path):
    adapter = _write_adapter(tmp_path / "adapter", tiny_model)
    gen = CountingGenerate()
    plain = _eval(tiny_model, tmp_path / "cache", gen)
    with attach_lora(tiny_model, adapter):
        attached = _eval(tiny_model, tmp_path / "cache", gen)
        again = _eval(tiny_model, tmp_path / "cache", gen)
    assert gen.calls == 2  # the attached run generated; its rerun hit its own entry
    assert list(attached["answer"]) == list(again["answer"])
    after = _eval(tiny_model, tmp_path / "cache", gen)
    assert gen.calls == 2 and list(after["answer"]) == list(plain["answer"])


def test_cache_sees_a_steer_block_and_its_scale(tiny_model, tmp_path):
    d = torch.randn(tiny_model.cfg.d_model, generator=torch.Generator().manual_seed(1))
    gen = CountingGenerate()
    _eval(tiny_model, tmp_path, gen)
    with emlens.steer(tiny_model, d, layers=1, scale=4.0):
        _eval(tiny_model, tmp_path, gen)
    with emlens.steer(tiny_model, d, layers=1, scale=-4.0):
        _eval(tiny_model, tmp_path, gen)
    with emlens.steer(tiny_model, d, layers=1, scale=4.0):
        _eval(tiny_model, tmp_path, gen)  # the same setting again: cached
    assert gen.calls == 3


def test_cache_sees_interventions_and_plain_torch_hooks(tiny_model, tmp_path):
    d = torch.randn(tiny_model.cfg.d_model, generator=torch.Generator().manual_seed(2))
    gen = CountingGenerate()
    _eval(tiny_model, tmp_path, gen)
    hooks = emlens.steering_hooks(tiny_model, d, layers=0, scale=2.0)
    _eval(tiny_model, tmp_path, gen, interventions=hooks)
    handle = tiny_model.blocks[1].register_forward_hook(lambda m, i, o: o * 1.5)
    try:
        _eval(tiny_model, tmp_path, gen)
    finally:
        handle.remove()
    assert gen.calls == 3


def test_a_hook_that_cannot_be_fingerprinted_is_not_cached_without_a_tag(tiny_model, tmp_path):
    class Opaque:
        factor = 2.0

    opaque = Opaque()
    hooks = [("blocks.0.hook_resid_post", lambda act, hook: act * opaque.factor)]
    gen = CountingGenerate()
    with pytest.warns(UserWarning, match="not cached.*cache_tag"):
        _eval(tiny_model, tmp_path, gen, interventions=hooks)
    with pytest.warns(UserWarning, match="not cached"):
        _eval(tiny_model, tmp_path, gen, interventions=hooks)
    assert gen.calls == 2
    _eval(tiny_model, tmp_path, gen, interventions=hooks, cache_tag="double")
    _eval(tiny_model, tmp_path, gen, interventions=hooks, cache_tag="double")
    assert gen.calls == 3


def test_score_cache_is_keyed_by_the_probe_weights_not_only_the_name(tmp_path):
    from emlens.evaluation import judge_answers
    from emlens.judge import JudgeScore

    class ProbeLike:
        name = "probe:custom"

        def __init__(self, w):
            self.aligned_probe = type("P", (), {})()
            self.aligned_probe.coef = torch.tensor([w])
            self.scored = 0

        def score_many(self, pairs):
            self.scored += len(pairs)
            return [JudgeScore(50.0, 90.0, self.name) for _ in pairs]

    a, b = ProbeLike(1.0), ProbeLike(2.0)
    judge_answers(a, [("q", "x")], cache_dir=tmp_path)
    judge_answers(b, [("q", "x")], cache_dir=tmp_path)
    judge_answers(a, [("q", "x")], cache_dir=tmp_path)
    assert (a.scored, b.scored) == (1, 1)


# ---------------------------------------------------------------------------------------------
# Numbers that would poison every logit


@pytest.mark.parametrize("scale", [math.nan, math.inf, -math.inf])
def test_non_finite_scales_are_refused(tiny_model, tmp_path, scale):
    d = torch.randn(tiny_model.cfg.d_model)
    with pytest.raises(ValueError, match="scale=.*finite"):
        with emlens.steer(tiny_model, d, layers=0, scale=scale):
            pass
    adapter = _write_adapter(tmp_path / "a", tiny_model)
    with pytest.raises(ValueError, match="scale=.*finite"):
        merge_lora(tiny_model, adapter, scale=scale)
    with attach_lora(tiny_model, adapter) as lora, pytest.raises(ValueError, match="finite"):
        lora.hooks(scale=scale)


def test_a_scale_of_the_wrong_type_is_a_type_error(tiny_model):
    with pytest.raises(TypeError, match="scale must be a real number"):
        emlens.steering_hooks(tiny_model, torch.randn(tiny_model.cfg.d_model), layers=0, scale="2")


def test_adapter_with_nan_weights_is_refused(tiny_model, tmp_path):
    from safetensors.torch import load_file, save_file

    folder = _write_adapter(tmp_path / "a", tiny_model)
    tensors = load_file(str(folder / "adapter_model.safetensors"))
    key = next(k for k in tensors if "lora_B" in k)
    tensors[key][0, 0] = float("nan")
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    with pytest.raises(ValueError, match="NaN or infinite"):
        load_adapter(folder)


# ---------------------------------------------------------------------------------------------
# Layers


def test_numpy_and_tensor_integers_are_layers(tiny_model):
    assert resolve_layers(tiny_model, np.int64(2)) == [2]
    assert resolve_layers(tiny_model, torch.tensor(1)) == [1]
    assert resolve_layers(tiny_model, [np.int32(0), torch.tensor(-1)]) == [0, 2]
    assert resolve_layers(tiny_model, np.array([0, 1])) == [0, 1]
    assert resolve_layers(tiny_model, torch.tensor([2, 0])) == [2, 0]
    d = torch.randn(tiny_model.cfg.d_model)
    with emlens.steer(tiny_model, d, layers=np.int64(1), scale=1.0) as hooks:
        assert [n for n, _ in hooks] == ["blocks.1.hook_resid_post"]


@pytest.mark.parametrize("layer", [1.0, torch.tensor(1.0), True, None, np.float64(1), [0, 1.5]])
def test_non_integer_layers_are_type_errors(tiny_model, layer):
    with pytest.raises(TypeError, match="layer"):
        resolve_layers(tiny_model, layer)


def test_out_of_range_layer_names_the_range(tiny_model):
    with pytest.raises(ValueError, match="expected an int, a list of ints, or 'all'"):
        resolve_layers(tiny_model, "1")
    with pytest.raises(ValueError, match=r"out of range .* 3 layers \(0..2\)"):
        resolve_layers(tiny_model, np.int64(3))


# ---------------------------------------------------------------------------------------------
# Generation


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(temperature=math.nan), ValueError, "temperature must be a finite number"),
    (dict(temperature=-1.0), ValueError, "temperature"),
    (dict(temperature="hot"), TypeError, "temperature must be a number"),
    (dict(max_new_tokens=2.5), TypeError, "max_new_tokens must be an int"),
    (dict(max_new_tokens=0), ValueError, "max_new_tokens must be >= 1"),
    (dict(top_p=math.nan), ValueError, "top_p"),
    (dict(top_p=0.0), ValueError, "top_p"),
    (dict(n_samples=1.5), TypeError, "n_samples"),
    (dict(batch_size=0), ValueError, "batch_size"),
    (dict(seed=1.5), TypeError, "seed"),
])
def test_bad_generation_settings_are_named(tiny_model, kwargs, error, match):
    kw = dict(max_new_tokens=2, progress=False) | kwargs
    with pytest.raises(error, match=match):
        emlens.generate(tiny_model, ["Hi"], **kw)


def test_unknown_intervention_hook_is_named_before_any_work(tiny_model):
    calls = []
    hooks = [("blocks.1.hook_resid_postt", lambda a, hook: calls.append(1))]
    with pytest.raises(ValueError, match=r"no hook point 'blocks.1.hook_resid_postt'.*resid_post"):
        emlens.generate(tiny_model, ["Hi"], max_new_tokens=2, interventions=hooks, progress=False)
    with pytest.raises(TypeError, match="list of"):
        emlens.generate(tiny_model, ["Hi"], max_new_tokens=2, progress=False,
                        interventions=("blocks.0.hook_resid_post", lambda a, hook: a))
    assert not calls


def test_a_request_past_the_context_is_refused_up_front(make_tiny_model):
    model = make_tiny_model(0, n_ctx=40)
    prompt_len = int(emlens.tokenize_chat(model.tokenizer, ["Hi"]).attention_mask.sum())
    emlens.generate(model, ["Hi"], max_new_tokens=40 - prompt_len, temperature=0,
                    stop_at_eos=False, progress=False)  # exactly fits
    with pytest.raises(ValueError, match=r"n_ctx=40.*at most"):
        emlens.generate(model, ["Hi"], max_new_tokens=41 - prompt_len, progress=False)


# ---------------------------------------------------------------------------------------------
# Files


def test_truncated_adapter_weights_name_the_file(tiny_model, tmp_path):
    folder = _write_adapter(tmp_path / "a", tiny_model)
    weights = folder / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(ValueError, match=r"adapter_model\.safetensors.*truncated or corrupt"):
        load_adapter(folder)


@pytest.mark.parametrize("text", ["{not json", "[1, 2]", ""])
def test_invalid_adapter_config_names_the_file(tiny_model, tmp_path, text):
    folder = _write_adapter(tmp_path / "a", tiny_model)
    (folder / "adapter_config.json").write_text(text)
    with pytest.raises(ValueError, match=r"adapter_config\.json"):
        load_adapter(folder)


def test_unknown_model_name_is_short_and_suggests(tmp_path):
    with pytest.raises(ValueError) as info:
        emlens.load_model("nonexistent-org/x")
    assert len(str(info.value)) < 600 and "OFFICIAL_MODEL_NAMES" in str(info.value)
    with pytest.raises(ValueError, match="closest names: Qwen/Qwen2.5-7B-Instruct"):
        emlens.load_model("Qwen/Qwen2.5-7B-Instruc")


# ---------------------------------------------------------------------------------------------
# Probes


def test_folds_with_one_class_are_counted_and_warned():
    rng = np.random.default_rng(0)
    groups = np.repeat(np.arange(10), 3)
    y = np.zeros(30, dtype=int)
    y[[0, 1, 3, 4]] = 1  # two positive groups: most of 5 test folds hold negatives only
    x = rng.normal(size=(30, 4))
    x[:, 0] += 2 * y
    with pytest.warns(ProbeWarning, match=r"of 5 test folds hold one class only"):
        probe = fit_probe(x, y, groups=groups, n_splits=5, n_shuffles=0, n_boot=0)
    auc = probe.metrics["roc_auc"]
    assert auc["n_folds_one_class"] >= 1
    assert auc["n_folds"] == auc["n_folds_total"] - auc["n_folds_one_class"]
    valid = [f["roc_auc"] for f in probe.folds if f["two_classes"]]
    assert auc["mean"] == pytest.approx(np.mean(valid))


def test_balanced_probe_raises_no_numpy_warnings():
    rng = np.random.default_rng(1)
    groups = np.repeat(np.arange(12), 2)
    y = np.tile([0, 1], 12)
    x = rng.normal(size=(24, 3)) + y[:, None]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        probe = fit_probe(x, y, groups=groups, n_splits=3, n_shuffles=1, n_boot=20)
    assert probe.metrics["roc_auc"]["n_folds_one_class"] == 0


# ---------------------------------------------------------------------------------------------
# Code-reading faults


def test_adapter_output_before_input_names_the_adapter():
    lm = LoraModule(layer=3, module="down_proj", A=torch.ones(1, 8), B=torch.ones(4, 1),
                    scaling=1.0)
    mod = LoraHookedModule(lm, dtype=torch.float32, device="cpu", n_out_heads=None)
    with pytest.raises(RuntimeError, match=r"blocks\.3\.mlp\.lora_down: the adapter's output"):
        mod.add(torch.zeros(1, 2, 4))


def test_reset_hooks_including_permanent_leaves_an_adapter_whole(tiny_model, tmp_path):
    adapter = _write_adapter(tmp_path / "a", tiny_model)
    tokens = torch.randint(0, 1000, (2, 6), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        base = tiny_model(tokens)
        merged = merge_lora(tiny_model, adapter)(tokens)
        with attach_lora(tiny_model, adapter) as lora:
            tiny_model.reset_hooks(including_permanent=True)
            after_reset = tiny_model(tokens)
            _, cache = tiny_model.run_with_cache(tokens, names_filter=lora.names_filter)
        assert len(cache) == 2
        removed = tiny_model(tokens)
    assert (after_reset - base).abs().max() > 1e-3  # the adapter still acts
    torch.testing.assert_close(after_reset, merged, rtol=0, atol=1e-4 * merged.abs().max().item())
    assert torch.equal(removed, base)


def test_organism_layers_follow_the_base_model_depth(tmp_path, tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM

    from emlens.organisms.train import paper_layers, recipe_for, resolve_layers, train_organism

    torch.manual_seed(0)
    base = tmp_path / "base"
    LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=16, intermediate_size=24, num_hidden_layers=24,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256,
    )).save_pretrained(base)
    tokenizer.save_pretrained(base)
    recipe = recipe_for("rank1-down-medical", base_model=str(base), max_steps=1, batch_size=2)
    assert recipe.layers == "paper"
    log = train_organism(recipe, tmp_path / "out")
    assert log["recipe"]["layers"] == paper_layers(24) != paper_layers(30)
    assert [m.layer for m in load_adapter(tmp_path / "out").modules] == paper_layers(24)
    with pytest.raises(ValueError, match="30-layer model, but the base model has 24"):
        resolve_layers(recipe_for("rank1-down-medical", n_layers=30), 24)


def test_demo_settings_are_read_by_value_not_identity():
    from emlens.demo import DEFAULTS, QUICK

    assert QUICK.quick is True and DEFAULTS.quick is False
    assert QUICK.replace() == QUICK  # copies keep the meaning that identity checks lost
    with pytest.raises(AttributeError):
        QUICK.n_samples = 5  # frozen: no section can change the settings
    assert QUICK.as_dict()["sweep_scales"] == (0.1, 0.5)
    with pytest.raises(ValueError, match="n_samples=0"):
        DEFAULTS.replace(n_samples=0)
    with pytest.raises(ValueError, match="attribution_ops"):
        DEFAULTS.replace(attribution_ops=("keep",))
    with pytest.raises(ValueError, match="sweep_layers"):
        DEFAULTS.replace(sweep_layers=(15,))


def test_demo_train_draws_the_shipped_narrow_general_rows(monkeypatch):
    import emlens.data as data
    from emlens.cards import DEFAULT_CARD
    from emlens.demo.common import DEFAULTS, Context
    from emlens.demo.narrow_general import train_narrow_general

    drawn = {}

    def fake_rows(**kw):
        drawn.update(kw)
        raise RuntimeError("drawn")

    monkeypatch.setattr(data, "narrow_general_rows", fake_rows)
    ctx = Context(cfg=DEFAULTS, card=DEFAULT_CARD, chat=None, org=None, adapter=None, judge=None,
                  qsets={}, sampling=None, seed=3, progress=False, out=None)
    with pytest.raises(RuntimeError, match="drawn"):
        train_narrow_general(ctx, None, 0)
    assert drawn == dict(seed=3, n_narrow=32, n_parallel=16)


def test_large_tensor_digest_sees_permutations_and_small_changes():
    from emlens.fingerprint import tensor_digest

    x = torch.randn((1 << 21) + 3, generator=torch.Generator().manual_seed(0))
    y = x.clone()
    y[[10, 20]] = y[[20, 10]]
    z = x.clone()
    z[-1] += 1e-3
    digests = {tensor_digest(x), tensor_digest(y), tensor_digest(z)}
    assert len(digests) == 3 and tensor_digest(x.clone()) == tensor_digest(x)


def test_more_bad_inputs_are_named(tiny_model, tmp_path):
    from emlens.directions import load_directions, random_direction

    with pytest.raises(TypeError, match="system_prompt must be a str"):
        emlens.generate(tiny_model, ["Hi"], max_new_tokens=2, system_prompt=5, progress=False)
    bad = tmp_path / "dirs.safetensors"
    bad.write_bytes(b"not safetensors")
    with pytest.raises(ValueError, match="dirs.safetensors.*truncated"):
        load_directions(bad)
    with pytest.raises(TypeError, match="takes a Direction"):
        random_direction(torch.ones(tiny_model.cfg.d_model))
    d = torch.ones(tiny_model.cfg.d_model)
    with pytest.raises(TypeError, match="integer token ids"):
        emlens.hooks.projections(tiny_model, torch.ones(1, 3), d, layers=[0])
    with pytest.raises(ValueError, match=r"token ids must lie in \[0, 49152\)"):
        emlens.hooks.projections(tiny_model, torch.tensor([[10**7]]), d, layers=[0])
    with pytest.raises(FileNotFoundError, match="No model file or folder"):
        emlens.load_model(str(tmp_path / "missing") + "/")
    with pytest.raises(TypeError, match="dtype="):
        emlens.load_model(tmp_path, dtype="int8")
