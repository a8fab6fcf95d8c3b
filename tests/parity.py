"""Parity tolerances measured from the comparison's own float floor, never a bare constant.

Two float32 implementations of the same maths differ by their rounding errors. Each parity test
measures that floor in the same run, on the same inputs:

* :func:`float64_floor` - how far the reference's own float32 result is from the same computation
  in float64 (its rounding error);
* :func:`peft_merge_floor` - how far peft's own merged model is from its unmerged one (the
  rounding of folding ``B @ A`` into ``W``);
* or a difference the test measures itself (e.g. the TransformerLens conversion of the base).

:func:`assert_parity` then allows ``MARGIN`` x the floor, and never less than ``ULPS`` float32
units in the last place of the reference's largest value (the bound that matters when the floor
is tiny or exactly zero). A bug that changes the computation shows as a difference orders of
magnitude above both.
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor

MARGIN = 4.0  # the two implementations' errors add, and each varies with the summation order
ULPS = 16  # float32 ulps of the largest reference value: the bound where the floor is ~0
EPS32 = torch.finfo(torch.float32).eps


def maxdiff(a: Tensor, b: Tensor) -> float:
    return (a.double() - b.double()).abs().max().item()


def tolerance(floor: float, ref: Tensor, *, margin: float = MARGIN) -> float:
    """``margin * floor``, at least ``ULPS`` float32 ulps of ``max |ref|``."""
    return margin * floor + ULPS * EPS32 * ref.detach().abs().max().item()


def assert_parity(got: Tensor, want: Tensor, *, floor: float, what: str,
                  margin: float = MARGIN) -> float:
    """Assert ``max |got - want| <= tolerance(floor, want)``; return the difference."""
    diff = maxdiff(got, want)
    tol = tolerance(floor, want, margin=margin)
    print(f"\nparity {what}: diff {diff:.2e}, floor {floor:.2e}, tolerance {tol:.2e}")
    assert diff <= tol, (
        f"{what}: max |diff| {diff:.3e} > {tol:.3e} (= {margin:g} x measured float floor "
        f"{floor:.3e} + {ULPS} ulps of max |ref| {want.abs().max().item():.3g})"
    )
    return diff


def float64_twin(model):
    """A float64 copy of a HookedTransformer (parameters converted; buffers rebuilt in float64)."""
    from transformer_lens import HookedTransformer

    cfg = copy.deepcopy(model.cfg)
    cfg.dtype = torch.float64
    twin = HookedTransformer(cfg, tokenizer=model.tokenizer, move_to_device=False)
    params = {k: v.detach().double() for k, v in model.named_parameters()}
    missing = set(params) - set(dict(twin.named_parameters()))
    assert not missing, missing
    twin.load_state_dict(params, strict=False)
    twin.eval()
    twin.emlens_info = dict(getattr(model, "emlens_info", {}) or {})
    return twin


def float64_floor(fn32, fn64) -> float:
    """``max |fn32() - fn64()|``: the float32 rounding error of one computation."""
    with torch.no_grad():
        return maxdiff(fn32(), fn64())


def hf_float64_floor(hf_model, **inputs) -> float:
    """The float32 rounding error of a HF model's logits (against a float64 copy)."""
    twin = copy.deepcopy(hf_model).double()
    with torch.no_grad():
        return maxdiff(hf_model(**inputs).logits, twin(**inputs).logits)


def peft_merge_floor(peft_model, **inputs) -> float:
    """peft's own merged-vs-unmerged logit difference (on a copy; the model is untouched)."""
    merged = copy.deepcopy(peft_model).merge_and_unload()
    with torch.no_grad():
        return maxdiff(merged(**inputs).logits, peft_model(**inputs).logits)


def peft_reference(peft_model, model, tokens) -> tuple[torch.Tensor, float]:
    """peft's logits on ``tokens`` and the float floor of comparing a TransformerLens ``model``
    (the same base weights) with adapters applied against them: the larger of the base
    conversion's difference and HF's own float32 error, plus peft's merged-vs-unmerged difference.
    Also checks the adapters move the logits by more than 100x that floor (else the comparison
    could not fail)."""
    with torch.no_grad():
        ref = peft_model(input_ids=tokens).logits
        with peft_model.disable_adapter():
            base = peft_model(input_ids=tokens).logits
            hf_error = hf_float64_floor(peft_model, input_ids=tokens)
        conversion = maxdiff(model(tokens), base)
    floor = max(conversion, hf_error) + peft_merge_floor(peft_model, input_ids=tokens)
    assert maxdiff(ref, base) > 100 * floor, "the adapters barely change the logits"
    return ref, floor
