"""emlens.lens: the likelihood gap, its bootstrap interval and the effect vs a control."""

import numpy as np
import pandas as pd
import pytest
import torch
from parity import assert_parity, float64_twin, maxdiff

import emlens
from emlens.data import pair_rows
from emlens.lens import bootstrap_interval, gap_effect, likelihood_gaps


def test_gaps_are_the_per_row_difference_of_answer_logprobs(tiny_model):
    rows = pair_rows("nonmedical", limit=5)
    table = likelihood_gaps(tiny_model, rows, batch_size=5)
    exact = likelihood_gaps(float64_twin(tiny_model), rows, batch_size=5)
    cols = ["logp_misaligned", "logp_aligned"]
    floor = maxdiff(torch.tensor(table[cols].values), torch.tensor(exact[cols].values))
    assert list(table["id"]) == [r.id for r in rows]
    with torch.no_grad():
        for side in ("misaligned", "aligned"):
            batch = emlens.tokenize_chat(tiny_model.tokenizer, [r.question for r in rows],
                                         [getattr(r, side) for r in rows])
            logits = tiny_model(batch.tokens, attention_mask=batch.attention_mask)
            ref = emlens.answer_logprobs(logits, batch, reduce="mean").double()
            # only the answer positions are unembedded: the same numbers up to float rounding
            assert_parity(torch.tensor(table[f"logp_{side}"].values), ref, floor=floor,
                          what=f"likelihood_gaps vs answer_logprobs ({side})")
    np.testing.assert_array_equal(table["gap"], table["logp_misaligned"] - table["logp_aligned"])
    # Batches of 2 pad differently: equal within float32 rounding, floor from the float64 twin.
    small = likelihood_gaps(tiny_model, rows, batch_size=2)
    assert_parity(torch.tensor(small[cols].values), torch.tensor(table[cols].values),
                  floor=floor, what="likelihood gaps, batch 2 vs 5")


def test_hooks_apply_for_the_call_only(tiny_model):
    rows = pair_rows("medical", split="heldout", limit=3)
    d = torch.randn(tiny_model.cfg.d_model)
    base = likelihood_gaps(tiny_model, rows)
    steered = likelihood_gaps(tiny_model, rows,
                              hooks=emlens.steering_hooks(tiny_model, d, layers=1, scale=5.0))
    again = likelihood_gaps(tiny_model, rows)
    assert not np.allclose(steered["gap"], base["gap"])
    pd.testing.assert_frame_equal(base, again)


def test_bootstrap_interval_brackets_the_mean_and_narrows_with_n():
    rng = np.random.default_rng(0)
    small, large = rng.normal(1.0, 1.0, 20), rng.normal(1.0, 1.0, 2000)
    m, lo, hi = bootstrap_interval(small)
    assert lo < m < hi
    _, lo2, hi2 = bootstrap_interval(large)
    assert hi2 - lo2 < (hi - lo) / 5 and lo2 < 1.0 < hi2
    with pytest.raises(ValueError, match="non-empty"):
        bootstrap_interval([])
    with pytest.raises(ValueError, match="NaN"):
        bootstrap_interval([1.0, float("nan")])


def test_gap_effect_is_paired_and_compares_with_the_control():
    ids = list(range(30))
    rng = np.random.default_rng(1)
    base_gap = rng.normal(0, 1, 30)  # large spread between questions...
    base = pd.DataFrame({"id": ids, "gap": base_gap})
    treated = pd.DataFrame({"id": ids, "gap": base_gap + 0.5 + rng.normal(0, 0.05, 30)})
    control = pd.DataFrame({"id": ids, "gap": base_gap + rng.normal(0, 0.05, 30)})
    eff = gap_effect(base, treated, control)
    # ...but the per-question change is tight, so pairing separates it from the control
    assert eff.separated and 0.45 < eff.low < eff.effect < eff.high < 0.55 and eff.n == 30
    assert eff.as_dict()["control"]["low"] < 0 < eff.as_dict()["control"]["high"]
    null = gap_effect(base, control, control)
    assert not null.separated
    with pytest.raises(ValueError, match="same rows"):
        gap_effect(base, treated.iloc[::-1], control)


def test_rows_without_pairs_are_refused(tiny_model):
    with pytest.raises(TypeError, match="lacks"):
        likelihood_gaps(tiny_model, emlens.load_dataset("general_questions")[:2])
    with pytest.raises(ValueError, match="empty"):
        likelihood_gaps(tiny_model, [])
