"""emlens.scalars: per-token LoRA scalars with metadata, aggregates, residual features."""

from __future__ import annotations

import pytest
import torch

from emlens.chat import tokenize_chat
from emlens.lora import LoraAdapter, LoraModule, attach_lora
from emlens.scalars import collect_scalars, residual_features

QUESTIONS = ["How do I boil an egg?", "What is the capital of France?", "Hi"]
ANSWERS = ["Put it in boiling water for nine minutes.", "Paris.", "Hello there, friend!"]


def rank1_adapter(model, layers=(1, 2), seed=0) -> LoraAdapter:
    g = torch.Generator().manual_seed(seed)
    return LoraAdapter(tuple(
        LoraModule(layer=layer, module="down_proj", A=torch.randn(1, model.cfg.d_mlp, generator=g),
                   B=0.1 * torch.randn(model.cfg.d_model, 1, generator=g), scaling=1.0)
        for layer in layers
    ))


@pytest.fixture
def attached(tiny_model):
    with attach_lora(tiny_model, rank1_adapter(tiny_model)) as lora:
        yield tiny_model, lora


def test_scalars_equal_the_hook_points_on_real_tokens(attached):
    model, lora = attached
    ts = collect_scalars(model, lora, QUESTIONS, ANSWERS, progress=False)
    batch = tokenize_chat(model.tokenizer, QUESTIONS, ANSWERS)
    _, cache = model.run_with_cache(batch.tokens, attention_mask=batch.attention_mask,
                                    names_filter=lora.names_filter)
    real = batch.attention_mask.bool()
    expected = torch.stack([cache[h][real] for h in lora.scalar_names], dim=-1)
    assert ts.adapters == lora.names
    assert ts.values.shape == (int(real.sum()), 2)
    torch.testing.assert_close(ts.values, expected)
    # metadata: one row per real token, answer part = answer mask
    assert (ts.tokens["part"] == "answer").sum() == int(batch.answer_mask.sum())
    assert list(ts.tokens.groupby("row").size()) == real.sum(-1).tolist()
    assert ts.tokens.groupby("row")["position"].min().tolist() == [0, 0, 0]
    answer_text = "".join(ts.tokens[(ts.tokens["row"] == 1) & (ts.tokens["part"] == "answer")]["token"])
    assert answer_text.startswith("Paris.")


def test_batch_size_does_not_change_the_scalars(attached):
    model, lora = attached
    one = collect_scalars(model, lora, QUESTIONS, ANSWERS, batch_size=1, progress=False)
    all_ = collect_scalars(model, lora, QUESTIONS, ANSWERS, batch_size=3, progress=False)
    assert one.tokens.equals(all_.tokens)
    torch.testing.assert_close(one.values, all_.values, atol=1e-4, rtol=1e-4)


def test_aggregates_are_mean_max_last_of_answer_tokens(attached):
    model, lora = attached
    ts = collect_scalars(model, lora, QUESTIONS, ANSWERS, progress=False)
    agg = ts.aggregate(["mean", "max", "last", "sum"])
    frame = ts.frame()
    for row in range(3):
        sub = frame[(frame["row"] == row) & (frame["part"] == "answer")]
        for name in lora.names:
            assert agg.loc[row, f"mean:{name}"] == pytest.approx(sub[name].mean(), abs=1e-5)
            assert agg.loc[row, f"max:{name}"] == pytest.approx(sub[name].max(), abs=1e-6)
            assert agg.loc[row, f"last:{name}"] == pytest.approx(sub[name].iloc[-1], abs=1e-6)
            assert agg.loc[row, f"sum:{name}"] == pytest.approx(sub[name].sum(), abs=1e-4)
    single = ts.aggregate("mean", part="prompt")
    assert list(single.columns) == lora.names and len(single) == 3


def test_prompt_only_rows_cannot_be_aggregated_over_answers(attached):
    model, lora = attached
    ts = collect_scalars(model, lora, QUESTIONS, progress=False)
    assert set(ts.tokens["part"]) == {"prompt"}
    with pytest.raises(ValueError, match="no answer tokens"):
        ts.aggregate("mean")
    with pytest.raises(ValueError, match="how="):
        ts.aggregate("median", part="prompt")


def test_detached_organism_is_refused(tiny_model):
    with attach_lora(tiny_model, rank1_adapter(tiny_model)) as lora:
        pass
    with pytest.raises(ValueError, match="not attached"):
        collect_scalars(tiny_model, lora, QUESTIONS, ANSWERS, progress=False)
    with pytest.raises(ValueError, match="attach_lora"):
        collect_scalars(tiny_model, rank1_adapter(tiny_model), QUESTIONS, ANSWERS, progress=False)


def test_unknown_adapter_names_are_refused(attached):
    model, lora = attached
    with pytest.raises(ValueError, match=r"blocks\.7.*blocks\.1\.mlp\.lora_down"):
        collect_scalars(model, lora, QUESTIONS, ANSWERS, adapters=["blocks.7.mlp.lora_down"],
                        progress=False)
    ts = collect_scalars(model, lora, QUESTIONS, ANSWERS, adapters=["blocks.2.*"], progress=False)
    assert ts.adapters == ["blocks.2.mlp.lora_down"]
    with pytest.raises(ValueError, match="Unknown adapters"):
        ts.select(["nope"])


def test_residual_projection_is_the_mean_activation_dotted_with_the_unit_direction(tiny_model):
    direction = torch.randn(tiny_model.cfg.d_model)
    acts = residual_features(tiny_model, QUESTIONS, ANSWERS, layer=1, progress=False)
    proj = residual_features(tiny_model, QUESTIONS, ANSWERS, layer=1, direction=direction,
                             progress=False)
    assert acts.shape == (3, tiny_model.cfg.d_model) and proj.shape == (3, 1)
    torch.testing.assert_close(proj[:, 0], acts @ (direction / direction.norm()), atol=1e-4, rtol=1e-4)
    batch = tokenize_chat(tiny_model.tokenizer, QUESTIONS[:1], ANSWERS[:1])
    _, cache = tiny_model.run_with_cache(batch.tokens, names_filter="blocks.1.hook_resid_post")
    expected = cache["blocks.1.hook_resid_post"][0][batch.answer_mask[0]].mean(0)
    torch.testing.assert_close(acts[0], expected, atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="layer=9"):
        residual_features(tiny_model, QUESTIONS, ANSWERS, layer=9, progress=False)


def test_rank_r_adapters_are_refused_with_their_rank(tiny_model):
    adapter = LoraAdapter((LoraModule(layer=1, module="down_proj", A=torch.randn(2, tiny_model.cfg.d_mlp),
                                      B=torch.randn(tiny_model.cfg.d_model, 2), scaling=1.0),))
    with attach_lora(tiny_model, adapter) as lora:
        with pytest.raises(ValueError, match="rank 2"):
            collect_scalars(tiny_model, lora, QUESTIONS, ANSWERS, progress=False)
