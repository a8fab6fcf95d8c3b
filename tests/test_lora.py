"""LoRA bridge: peft adapters read, merged and attached on HookedTransformers.

Parity tests train real peft adapters (a few Adam steps from a non-zero init, so every adapter
changes the logits) on tiny random HF Llama and Qwen2 models with grouped-query attention, convert
the base with emlens's loader, and compare logits of the peft model, ``merge_lora`` and
``attach_lora`` in float32. Tolerances come from floors measured in the same run (see
``tests/parity.py``): the base conversion's difference from HF, HF's own float32 error, and peft's
merged-vs-unmerged difference.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from parity import assert_parity, hf_float64_floor, maxdiff, peft_merge_floor
from safetensors.torch import load_file
from transformer_lens.cache.key_value_cache import TransformerLensKeyValueCache

from emlens.lora import (
    AttachedLora,
    attach_lora,
    load_adapter,
    merge_lora,
    unmerge_lora,
)
from emlens.models import load_model

ORGANISM_LAYERS = [1, 2, 3, 5, 6, 7, 9, 10, 11]  # 9 layers in three groups, as in the paper
ALL_PROJ = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass
class Trained:
    base_dir: Path
    adapter_dir: Path
    peft_model: object  # peft PeftModel, eval mode
    tokens: torch.Tensor
    _floors: dict = field(default_factory=dict)

    def peft_logits(self, adapter: bool = True) -> torch.Tensor:
        with torch.no_grad():
            if adapter:
                return self.peft_model(input_ids=self.tokens).logits
            with self.peft_model.disable_adapter():
                return self.peft_model(input_ids=self.tokens).logits

    def floor(self, model) -> float:
        """Float floor of any logit comparison on this model and adapter, measured here.

        The TL conversion's own difference from HF on the base model (at least HF's float32
        error on it), plus peft's merged-vs-unmerged difference (or, where peft cannot merge,
        the adapted HF model's float32 error).
        """
        key = id(model)
        if key not in self._floors:
            with torch.no_grad():
                conversion = maxdiff(model(self.tokens), self.peft_logits(adapter=False))
            with self.peft_model.disable_adapter():
                hf_error = hf_float64_floor(self.peft_model, input_ids=self.tokens)
            base_floor = max(conversion, hf_error)
            try:
                merge = peft_merge_floor(self.peft_model, input_ids=self.tokens)
            except RuntimeError:  # peft cannot merge lora_bias without a base bias: count the
                # merge as one more rounding of the size of the base comparison
                merge = base_floor
            self._floors[key] = base_floor + merge
        return self._floors[key]

    def check(self, got: torch.Tensor, want: torch.Tensor, model, what: str) -> None:
        assert_parity(got, want, floor=self.floor(model), what=what)

    def check_merge_and_attach(self, model, adapter, want: torch.Tensor, what: str) -> None:
        """``merge_lora`` and ``attach_lora`` of ``adapter`` each give ``want`` within the floor."""
        with torch.no_grad():
            merged = merge_lora(model, adapter)(self.tokens)
            with attach_lora(model, adapter):
                attached = model(self.tokens)
        print(f"\n{what}: merge {maxdiff(merged, want):.2e}, attach {maxdiff(attached, want):.2e}")
        self.check(merged, want, model, f"{what} merge")
        self.check(attached, want, model, f"{what} attach")


def _tiny_hf(arch: str, n_layers: int, seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    kw = dict(
        vocab_size=1024,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=n_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        tie_word_embeddings=False,
    )
    model = (
        LlamaForCausalLM(LlamaConfig(**kw))
        if arch == "llama"
        else Qwen2ForCausalLM(Qwen2Config(**kw))
    )
    with torch.no_grad():  # norms init to 1 and biases to 0; perturb so folding mistakes show
        for name, p in model.named_parameters():
            if name.endswith(("norm.weight", ".bias")):
                p.add_(0.2 * torch.randn_like(p))
    return model.eval()


def train_tiny(
    tmp: Path, tokenizer, arch: str, n_layers: int, seed: int = 0, steps: int = 4, **lora_kwargs
) -> Trained:
    """Save a tiny random HF model, train a peft adapter on it for ``steps`` Adam steps."""
    from peft import LoraConfig, get_peft_model

    hf = _tiny_hf(arch, n_layers, seed)
    base_dir, adapter_dir = tmp / "base", tmp / "adapter"
    hf.save_pretrained(base_dir)
    tokenizer.save_pretrained(base_dir)
    config = LoraConfig(init_lora_weights=False, lora_dropout=0.0, **lora_kwargs)
    peft_model = get_peft_model(hf, config)
    trainable = [p for p in peft_model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(trainable, lr=1e-2)
    gen = torch.Generator().manual_seed(seed)
    peft_model.train()
    for _ in range(steps):
        x = torch.randint(0, 1024, (4, 16), generator=gen)
        loss = peft_model(input_ids=x, labels=x).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    peft_model.eval()
    peft_model.save_pretrained(adapter_dir)
    tokens = torch.randint(0, 1024, (2, 12), generator=gen)
    return Trained(base_dir, adapter_dir, peft_model, tokens)


CASES = {
    # the organism shape: rank-1 on down_proj at 9 layers
    "organism": dict(
        n_layers=12,
        r=1,
        lora_alpha=2,
        target_modules=["down_proj"],
        layers_to_transform=ORGANISM_LAYERS,
    ),
    # rank 8 on every attention and MLP projection, rsLoRA scaling
    "rank8-all": dict(n_layers=3, r=8, lora_alpha=16, target_modules=ALL_PROJ, use_rslora=True),
}


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tokenizer):
    cache: dict[tuple[str, str], Trained] = {}

    def get(arch: str, case: str) -> Trained:
        if (arch, case) not in cache:
            kw = dict(CASES[case])
            cache[arch, case] = train_tiny(
                tmp_path_factory.mktemp(f"{arch}-{case}"), tokenizer, arch, kw.pop("n_layers"), **kw
            )
        return cache[arch, case]

    return get


@pytest.fixture(scope="module")
def tl_models():
    cache: dict[tuple[Path, str], object] = {}

    def get(t: Trained, processing: str = "none"):
        if (t.base_dir, processing) not in cache:
            cache[t.base_dir, processing] = load_model(t.base_dir, processing=processing)
        return cache[t.base_dir, processing]

    return get



# ------------------------------------------------------------------------------------------------
# Parity


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_merge_and_attach_match_peft_logits(trained, tl_models, arch, case):
    t = trained(arch, case)
    model = tl_models(t)
    ref = t.peft_logits()
    with torch.no_grad():
        base = model(t.tokens)
        with t.peft_model.disable_adapter():  # the converted base matches HF within HF's own error
            hf_error = hf_float64_floor(t.peft_model, input_ids=t.tokens)
        assert_parity(base, t.peft_logits(adapter=False), floor=hf_error, what=f"{arch} base TL vs HF")
        assert maxdiff(base, ref) > 1e-2  # the trained adapter does something
    t.check_merge_and_attach(model, t.adapter_dir, ref, f"{arch}/{case} vs peft")


def test_rank_and_alpha_patterns_are_honoured(tmp_path, tokenizer, tl_models):
    t = train_tiny(tmp_path, tokenizer, "llama", 2, r=4, lora_alpha=8, target_modules=ALL_PROJ,
                   rank_pattern={"down_proj": 2, "layers.1.self_attn.q_proj": 1},
                   alpha_pattern={"k_proj": 64})
    adapter = load_adapter(t.adapter_dir)
    assert adapter["blocks.0.mlp.lora_down"].rank == 2
    assert adapter["blocks.1.attn.lora_q"].rank == 1 and adapter["blocks.0.attn.lora_q"].rank == 4
    assert adapter["blocks.0.attn.lora_k"].scaling == 64 / 4
    t.check_merge_and_attach(tl_models(t), adapter, t.peft_logits(), "patterns")


def test_bias_and_lora_bias_merge_on_qwen2(tmp_path, tokenizer, tl_models):
    t = train_tiny(tmp_path, tokenizer, "qwen2", 2, r=2, lora_alpha=4,
                   target_modules=["q_proj", "o_proj", "down_proj"], bias="all", lora_bias=True)
    adapter = load_adapter(t.adapter_dir)
    assert (0, "k_proj") in adapter.base_biases  # bias="all" also trains non-target biases
    assert adapter["blocks.0.attn.lora_q"].lora_bias is not None
    model = tl_models(t)
    with torch.no_grad():
        # bias="all" changes the base biases, which peft's disable_adapter keeps, so the base
        # comparison is no floor here: use the adapted HF model's own float32 error
        floor = hf_float64_floor(t.peft_model, input_ids=t.tokens)
        assert_parity(merge_lora(model, adapter)(t.tokens), t.peft_logits(), floor=floor,
                      what="bias merge")
    with pytest.raises(ValueError, match="replaces base biases.*use merge_lora"):
        attach_lora(model, adapter)


def test_down_proj_adapter_merges_exactly_on_folded_model(trained, tl_models):
    t = trained("llama", "organism")
    t.check_merge_and_attach(tl_models(t, "fold_ln"), t.adapter_dir, t.peft_logits(), "folded")


def test_normed_input_adapter_refused_on_folded_model(trained, tl_models):
    t = trained("llama", "rank8-all")
    folded = tl_models(t, "fold_ln")
    with pytest.raises(ValueError, match=r"q_proj: the model was loaded with processing='fold_ln'"):
        merge_lora(folded, t.adapter_dir)


def test_attached_kv_cache_decoding_matches_full_forward(trained, tl_models):
    t = trained("qwen2", "rank8-all")
    model = tl_models(t)
    with torch.no_grad(), attach_lora(model, t.adapter_dir):
        full = model(t.tokens)
        cache = TransformerLensKeyValueCache.init_cache(
            model.cfg, model.cfg.device, t.tokens.shape[0]
        )
        first = model(t.tokens[:, :7], past_kv_cache=cache)
        rest = [
            model(t.tokens[:, i : i + 1], past_kv_cache=cache) for i in range(7, t.tokens.shape[1])
        ]
    t.check(torch.cat([first, *rest], dim=1), full, model, "attached KV cache vs full")


# ------------------------------------------------------------------------------------------------
# Merge semantics


def test_merge_returns_copy_and_leaves_input_untouched(trained, tl_models):
    t = trained("llama", "rank8-all")
    model = tl_models(t)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    merged = merge_lora(model, t.adapter_dir)
    assert merged is not model
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not torch.equal(merged.blocks[0].attn._W_K, model.blocks[0].attn._W_K)
    assert merged.emlens_info["lora"][0]["source"] == str(t.adapter_dir)


def test_unmerge_restores_base_weights_bit_for_bit(trained, tl_models):
    t = trained("qwen2", "rank8-all")
    model = tl_models(t)
    restored = unmerge_lora(merge_lora(merge_lora(model, t.adapter_dir), t.adapter_dir, scale=-0.3))
    assert all(
        torch.equal(a, b) for a, b in zip(restored.parameters(), model.parameters(), strict=True)
    )
    assert "lora" not in restored.emlens_info
    with pytest.raises(ValueError, match="no merged LoRA weights"):
        unmerge_lora(model)


def test_merge_scale_zero_gives_base_model(trained, tl_models):
    t = trained("llama", "organism")
    model = tl_models(t)
    with torch.no_grad():
        assert maxdiff(merge_lora(model, t.adapter_dir, scale=0.0)(t.tokens), model(t.tokens)) == 0


# ------------------------------------------------------------------------------------------------
# Attach: hook points, lifetime, steering


def test_attach_exposes_rank1_scalars_and_rank_r_activations(trained, tl_models):
    t = trained("llama", "organism")
    model = tl_models(t)
    with attach_lora(model, t.adapter_dir) as lora:
        assert lora.hook_names == [f"blocks.{i}.mlp.lora_down.hook_scalar" for i in ORGANISM_LAYERS]
        _, cache = model.run_with_cache(t.tokens, names_filter=lambda n: "lora" in n)
        assert sorted(cache.keys()) == sorted(lora.hook_names)
        assert cache["blocks.5.mlp.lora_down.hook_scalar"].shape == t.tokens.shape
        assert lora.scalars(cache).shape == (*t.tokens.shape, 9)
        # the scalar is A . h with h the down-projection input
        _, base_cache = model.run_with_cache(t.tokens, names_filter="blocks.5.mlp.hook_post")
        A = load_adapter(t.adapter_dir)["blocks.5.mlp.lora_down"].A
        expected = base_cache["blocks.5.mlp.hook_post"] @ A[0]
        assert torch.allclose(cache["blocks.5.mlp.lora_down.hook_scalar"], expected, atol=1e-5)

    t8 = trained("qwen2", "rank8-all")
    model8 = tl_models(t8)
    with attach_lora(model8, t8.adapter_dir) as lora8:
        _, cache8 = model8.run_with_cache(t8.tokens, names_filter=lora8.names_filter)
        assert cache8["blocks.1.attn.lora_k.hook_acts"].shape == (*t8.tokens.shape, 8)
        assert len(cache8) == 3 * 7
        with pytest.raises(
            ValueError, match=r"rank-8 adapter has no single scalar.*hook_acts.*\[batch, pos, 8\]"
        ):
            lora8.scalar_names  # noqa: B018


def test_attach_is_removed_on_exit_and_on_exceptions(trained, tl_models):
    t = trained("llama", "rank8-all")
    model = tl_models(t)
    hooks_before, mods_before = list(model.hook_dict), list(model.mod_dict)
    with torch.no_grad():
        base = model(t.tokens)
        with pytest.raises(RuntimeError, match="boom"), attach_lora(model, t.adapter_dir):
            assert "blocks.0.attn.lora_v.hook_acts" in model.hook_dict
            raise RuntimeError("boom")
        assert list(model.hook_dict) == hooks_before and list(model.mod_dict) == mods_before
        assert all(
            not hp.fwd_hooks and not hp._forward_pre_hooks for hp in model.hook_dict.values()
        )
        assert torch.equal(model(t.tokens), base)


def test_attach_persists_until_remove_and_survives_user_hook_blocks(trained, tl_models):
    t = trained("qwen2", "organism")
    model = tl_models(t)
    ref = t.peft_logits()
    lora = attach_lora(model, t.adapter_dir)
    try:
        assert isinstance(lora, AttachedLora) and lora.attached
        with torch.no_grad():
            with model.hooks(fwd_hooks=[("blocks.0.hook_resid_post", lambda a, hook: a)]):
                pass
            model.run_with_hooks(
                t.tokens, fwd_hooks=[("blocks.0.hook_resid_post", lambda a, hook: a)]
            )
            model.reset_hooks()
            t.check(model(t.tokens), ref, model, "attached after reset_hooks")
    finally:
        lora.remove()
    assert not lora.attached
    t.check(model(t.tokens), t.peft_logits(adapter=False), model, "after remove")
    lora.remove()  # idempotent


def test_second_attach_of_same_modules_is_refused(trained, tl_models):
    t = trained("llama", "organism")
    model = tl_models(t)
    with attach_lora(model, t.adapter_dir):
        with pytest.raises(ValueError, match="already attached"):
            attach_lora(model, t.adapter_dir)


def test_steering_scale_matches_merge_with_that_scale(trained, tl_models):
    t = trained("llama", "organism")
    model = tl_models(t)
    with torch.no_grad(), attach_lora(model, t.adapter_dir) as lora:
        with lora.steer(scale=2.5):
            steered = model(t.tokens)
        with lora.steer(scale=0.0):
            zeroed = model(t.tokens)
        unsteered = model(t.tokens)
        t.check(steered, merge_lora(model, t.adapter_dir, scale=2.5)(t.tokens), model, "scale 2.5")
        t.check(zeroed, t.peft_logits(adapter=False), model, "scale 0")
        t.check(unsteered, t.peft_logits(), model, "after the steer block")


def test_steering_one_adapter_and_setting_its_scalar(trained, tl_models):
    t = trained("llama", "organism")
    model = tl_models(t)
    name = "blocks.6.mlp.lora_down"
    with torch.no_grad(), attach_lora(model, t.adapter_dir) as lora:
        hooks = lora.hooks(name, value=3.0)
        assert [h for h, _ in hooks] == [f"{name}.hook_scalar"]
        with lora.steer(name, value=3.0):
            _, cache = model.run_with_cache(t.tokens, names_filter=lora.names_filter)
        assert torch.all(cache[f"{name}.hook_scalar"] == 3.0)
        assert not torch.all(cache["blocks.5.mlp.lora_down.hook_scalar"] == 3.0)
        # zeroing a subset by layer equals merging the other adapters only
        with lora.steer([9, 10, 11], scale=0.0):
            partial = model(t.tokens)
        with lora.steer(scale={"blocks.9.*": 0.0, "blocks.1?.mlp.lora_down": 0.0}):
            partial_by_glob = model(t.tokens)
    assert torch.equal(partial, partial_by_glob)
    assert maxdiff(partial, t.peft_logits()) > 1e-3
    with pytest.raises(ValueError, match="No attached adapter matches 'blocks.4"):
        lora.select("blocks.4.mlp.lora_down")


def test_patching_the_adapter_input_point_reaches_the_adapter(trained, tl_models):
    t = trained("qwen2", "organism")
    model = tl_models(t)

    def halve(act, hook):
        return act * 0.5

    patch = [("blocks.5.mlp.hook_post", halve)]
    with torch.no_grad():
        merged = merge_lora(model, t.adapter_dir)
        expected = merged.run_with_hooks(t.tokens, fwd_hooks=patch)
        with attach_lora(model, t.adapter_dir):
            got = model.run_with_hooks(t.tokens, fwd_hooks=patch)
    t.check(got, expected, model, "patched adapter input")


# ------------------------------------------------------------------------------------------------
# Bad input


def test_adapter_for_another_base_lists_each_mismatch(trained, tiny_model):
    t = trained("llama", "organism")  # 12 layers, d_model 64, d_mlp 96; tiny_model: 3, 64, 128
    with pytest.raises(ValueError) as err:
        attach_lora(tiny_model, t.adapter_dir)
    msg = str(err.value)
    assert "layer 5, but the model has 3 layers" in msg and "layer 11," in msg
    assert "d_in=96 -> d_out=64, the model's down_proj maps d_in=128" in msg
    assert "blocks.1.mlp.lora_down" not in tiny_model.mod_dict


def test_pickle_adapter_refused_unless_opted_in(trained, tmp_path):
    t = trained("llama", "rank8-all")
    folder = tmp_path / "pickled"
    folder.mkdir()
    shutil.copy(t.adapter_dir / "adapter_config.json", folder)
    torch.save(load_file(t.adapter_dir / "adapter_model.safetensors"), folder / "adapter_model.bin")
    with pytest.raises(ValueError, match="pickle.*allow_pickle=True"):
        load_adapter(folder)
    loaded, reference = load_adapter(folder, allow_pickle=True), load_adapter(t.adapter_dir)
    assert all(
        torch.equal(a.B, b.B) for a, b in zip(loaded.modules, reference.modules, strict=True)
    )


@pytest.mark.parametrize(
    "option, message",
    [
        ({"use_dora": True}, "DoRA"),
        ({"modules_to_save": ["embed_tokens"]}, "modules_to_save"),
        ({"peft_type": "IA3"}, "IA3 adapter"),
    ],
)
def test_unsupported_options_are_refused_by_name(trained, tmp_path, option, message):
    t = trained("llama", "rank8-all")
    folder = tmp_path / "bad"
    shutil.copytree(t.adapter_dir, folder)
    config = json.loads((folder / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(json.dumps({**config, **option}))
    with pytest.raises(ValueError, match=message):
        load_adapter(folder)


def test_inconsistent_config_is_reported(trained, tmp_path):
    t = trained("llama", "organism")
    folder = tmp_path / "bad"
    shutil.copytree(t.adapter_dir, folder)
    config = json.loads((folder / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(json.dumps({**config, "r": 4}))
    with pytest.raises(ValueError, match="weights have rank 1, config says r=4"):
        load_adapter(folder)


# ------------------------------------------------------------------------------------------------
# Integration: the embedded model with the shipped rank-1 organism


@pytest.mark.integration
def test_organism_parity_on_embedded_model(embedded_model):
    from peft import PeftModel

    from emlens.chat import tokenize_chat
    from emlens.models import load_hf
    from emlens.organisms import list_organisms, organism_path

    if "rank1-down-medical" not in list_organisms():
        pytest.skip("the rank-1 organism is not trained in this checkout")
    hf, tokenizer = load_hf()
    peft_model = PeftModel.from_pretrained(hf, organism_path("rank1-down-medical")).eval()
    batch = tokenize_chat(tokenizer, ["I have a fever and a stiff neck. What should I do?"])
    with torch.no_grad():
        ref = peft_model(input_ids=batch.tokens).logits
        with peft_model.disable_adapter():
            base = peft_model(input_ids=batch.tokens).logits
        tl_base = embedded_model(batch.tokens)
        merged = merge_lora(embedded_model, organism_path("rank1-down-medical"))(batch.tokens)
        with attach_lora(embedded_model, organism_path("rank1-down-medical")) as lora:
            attached, cache = embedded_model.run_with_cache(
                batch.tokens, names_filter=lora.names_filter
            )
    # Floors measured here: the TL conversion of the base itself, HF's own float32 error on it,
    # and peft's merged-vs-unmerged difference; the adapters' effect is orders of magnitude above.
    conversion = maxdiff(tl_base, base)
    with peft_model.disable_adapter():
        hf_error = hf_float64_floor(peft_model, input_ids=batch.tokens)
    floor = max(conversion, hf_error) + peft_merge_floor(peft_model, input_ids=batch.tokens)
    assert maxdiff(ref, base) > 1e-2
    assert_parity(tl_base, base, floor=hf_error, what="embedded base TL vs HF")
    assert_parity(merged, ref, floor=floor, what="embedded organism merge vs peft")
    assert_parity(attached, ref, floor=floor, what="embedded organism attach vs peft")
    assert len(cache) == 9


def test_missing_adapter_folder_says_what_to_give(tmp_path):
    with pytest.raises(FileNotFoundError, match="No adapter folder at"):
        load_adapter(tmp_path / "no" / "such" / "adapter")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no adapter_config.json"):
        load_adapter(tmp_path / "empty")


def test_random_like_keeps_shapes_and_each_delta_norm_and_randomises_direction():
    from emlens.lora import LoraAdapter, LoraModule, random_like

    g = torch.Generator().manual_seed(0)
    mods = (LoraModule(3, "down_proj", torch.randn(1, 16, generator=g), torch.randn(8, 1, generator=g), 1.0),
            LoraModule(4, "q_proj", torch.randn(4, 8, generator=g), torch.randn(8, 4, generator=g), 2.0,
                       lora_bias=torch.randn(8, generator=g)))
    adapter = LoraAdapter(mods, source="x")
    rnd = random_like(adapter, seed=1)
    assert rnd.names == adapter.names and rnd.ranks == adapter.ranks
    for m, r in zip(adapter.modules, rnd.modules, strict=True):
        assert r.A.shape == m.A.shape and r.B.shape == m.B.shape and r.scaling == m.scaling
        d, dr = m.delta_weight().double(), r.delta_weight().double()
        floor = 16 * torch.finfo(torch.float32).eps * d.norm()
        assert abs(dr.norm() - d.norm()) <= floor
        assert abs(torch.nn.functional.cosine_similarity(d.flatten(), dr.flatten(), 0)) < 0.5
    assert abs(rnd.modules[1].lora_bias.norm() - mods[1].lora_bias.norm()) < 1e-5
    assert torch.equal(random_like(adapter, seed=1).modules[0].A, rnd.modules[0].A)
    assert not torch.equal(random_like(adapter, seed=2).modules[0].A, rnd.modules[0].A)
    zero = LoraAdapter((LoraModule(0, "down_proj", torch.randn(1, 4), torch.zeros(4, 1), 1.0),))
    with pytest.raises(ValueError, match="no norm to match"):
        random_like(zero)
