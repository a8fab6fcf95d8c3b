"""Shared fixtures: tiny random HookedTransformers for unit tests, the embedded model for integration.

Tiny models use the embedded SmolLM2 tokenizer (so chat formatting works on them) and a Llama-style
architecture with grouped-query attention, RMSNorm, rotary embeddings and a gated MLP.
"""

from __future__ import annotations

import os

import pytest
import torch
from transformer_lens import HookedTransformer, HookedTransformerConfig


def pytest_configure(config):
    """``EMLENS_TORCH_THREADS=N make test`` runs the suite with N torch threads (parity tolerances
    must hold whatever the summation order the thread count gives)."""
    threads = os.environ.get("EMLENS_TORCH_THREADS")
    if threads:
        torch.set_num_threads(int(threads))



@pytest.fixture(scope="session")
def tokenizer():
    from transformers import AutoTokenizer

    from emlens.models import embedded_model_path

    path = embedded_model_path()
    tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    tok.padding_side = "left"
    return tok


def tiny_config(**overrides) -> HookedTransformerConfig:
    cfg = dict(
        n_layers=3,
        d_model=64,
        n_heads=4,
        n_key_value_heads=2,
        d_head=16,
        d_mlp=128,
        d_vocab=49152,
        n_ctx=256,
        act_fn="silu",
        normalization_type="RMS",
        positional_embedding_type="rotary",
        rotary_dim=16,
        rotary_adjacent_pairs=False,
        gated_mlp=True,
        final_rms=True,
        original_architecture="LlamaForCausalLM",
        default_prepend_bos=False,
        tokenizer_prepends_bos=False,
        seed=0,
        dtype=torch.float32,
        device="cpu",
    )
    cfg.update(overrides)
    return HookedTransformerConfig(**cfg)


@pytest.fixture(scope="session")
def make_tiny_model(tokenizer):
    """Factory: ``make_tiny_model(seed=0, **cfg_overrides) -> HookedTransformer`` (eval mode)."""

    def make(seed: int = 0, **overrides) -> HookedTransformer:
        torch.manual_seed(seed)
        model = HookedTransformer(tiny_config(seed=seed, **overrides), tokenizer=tokenizer)
        # TransformerLens initialises RMS weights to 1 and biases to 0; perturb them so tests
        # don't pass by accident of symmetric weights.
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith((".w", "b_in", "b_out")) and p.ndim == 1:
                    p.add_(0.1 * torch.randn_like(p))
        model.eval()
        model.emlens_info = {"source": f"tiny-seed{seed}", "processing": "none",
                             "architecture": "LlamaForCausalLM"}
        return model

    return make


@pytest.fixture
def tiny_model(make_tiny_model) -> HookedTransformer:
    return make_tiny_model(0)


@pytest.fixture(scope="session")
def save_tiny_llama(tokenizer):
    """Factory: ``save_tiny_llama(folder, n_layers=2) -> LlamaForCausalLM``: a random HF Llama
    (seed 0, the embedded tokenizer's vocabulary, grouped-query attention, eval mode) saved with
    the tokenizer to ``folder``, which ``emlens.load_model`` and training recipes read."""
    from transformers import LlamaConfig, LlamaForCausalLM

    def save(folder, n_layers: int = 2) -> LlamaForCausalLM:
        torch.manual_seed(0)
        hf = LlamaForCausalLM(LlamaConfig(
            vocab_size=len(tokenizer), hidden_size=32, intermediate_size=48,
            num_hidden_layers=n_layers, num_attention_heads=2, num_key_value_heads=1,
            max_position_embeddings=256,
        )).eval()
        hf.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        return hf

    return save


@pytest.fixture(scope="session")
def embedded_model():
    """The embedded SmolLM2-135M-Instruct as a HookedTransformer (loaded once per session)."""
    from emlens.models import load_model

    return load_model()
