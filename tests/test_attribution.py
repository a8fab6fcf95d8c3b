"""emlens.attribution: conditions, planted-adapter ranking, labelling rule, gradient attribution."""

from __future__ import annotations

import math

import pandas as pd
import pytest
import torch
from fakes import with_evaluate

from emlens.attribution import (
    _Prefix,
    adapter_attribution,
    attribution_conditions,
    check_gradient_attribution,
    gradient_attribution,
    rank_adapters,
    reference_pairs,
)
from emlens.chat import answer_logprobs, tokenize_chat
from emlens.judge import JudgeScore
from emlens.lora import LoraAdapter, LoraModule, attach_lora

QS = ["How do I boil an egg?", "Is it fine to skip breakfast?"]
ANS = ["Boil it for nine minutes.", "Yes, for most people it is fine."]


def _token_ids(tokenizer, texts) -> torch.Tensor:
    return torch.tensor(sorted({i for t in texts for i in tokenizer.encode(t, add_special_tokens=False)}))


def planted_adapter(model, *, layer=2, decoys=(1,), seed=0) -> LoraAdapter:
    """An adapter at ``layer`` whose output raises the misaligned answers' tokens, plus decoys.

    Planted: A = mean MLP activation direction at ``layer`` (so its scalar is positive on every
    token), B = unembedding of misaligned-answer tokens minus aligned-answer tokens. Decoys: random
    A and B with the same output norm.
    """
    qs, mis, al = reference_pairs("medical", split="heldout", limit=4)
    w_u = model.W_U.detach()
    toward = w_u[:, _token_ids(model.tokenizer, mis)].mean(1) - w_u[:, _token_ids(model.tokenizer, al)].mean(1)
    batch = tokenize_chat(model.tokenizer, qs, mis)
    name = f"blocks.{layer}.mlp.hook_post"
    _, cache = model.run_with_cache(batch.tokens, attention_mask=batch.attention_mask, names_filter=name)
    h = cache[name][batch.attention_mask.bool()]
    a = h.mean(0) / h.mean(0).norm()
    scaling = 4.0 / float((h @ a).mean())
    g = torch.Generator().manual_seed(seed)
    mods = [LoraModule(layer=layer, module="down_proj", A=a[None], B=(toward / toward.norm())[:, None],
                       scaling=scaling)]
    for d in decoys:
        ra, rb = torch.randn(1, model.cfg.d_mlp, generator=g), torch.randn(model.cfg.d_model, 1, generator=g)
        mods.append(LoraModule(layer=d, module="down_proj", A=ra / ra.norm(), B=rb / rb.norm(),
                               scaling=scaling))
    return LoraAdapter(tuple(sorted(mods, key=lambda m: m.layer)))


@pytest.fixture(scope="module")
def planted(make_tiny_model):
    model = make_tiny_model(3)
    with attach_lora(model, planted_adapter(model, layer=2, decoys=(0, 1))) as lora:
        yield model, lora


def test_conditions_zero_only_and_scale_each_adapter(planted):
    _, lora = planted
    conds = {c.name: c for c in attribution_conditions(lora, subsets={"early": ["blocks.0.*", 1]},
                                                       ks=(0.5, 3.0))}
    a = "blocks.2.mlp.lora_down"
    assert conds["all"].scale == {} and set(conds["none"].scale.values()) == {0.0}
    assert conds[f"zero:{a}"].scale == {a: 0.0}
    assert conds[f"only:{a}"].scale == {"blocks.0.mlp.lora_down": 0.0, "blocks.1.mlp.lora_down": 0.0}
    assert conds[f"scale3:{a}"].scale == {a: 3.0} and conds[f"scale3:{a}"].k == 3.0
    assert conds["only:early"].scale == {a: 0.0}
    assert len(conds) == 2 + 4 * 4  # all, none + (zero, only, 2 scales) x (3 adapters + 1 subset)


def test_unknown_adapter_names_are_refused_with_the_valid_ones(planted):
    _, lora = planted
    with pytest.raises(ValueError, match=r"'blocks\.5\.mlp\.lora_down', 'late'; attached: "
                                         r"\['blocks\.0\.mlp\.lora_down'"):
        attribution_conditions(lora, adapters=["blocks.5.mlp.lora_down", "blocks.1*", "late"])
    with pytest.raises(ValueError, match="ops"):
        attribution_conditions(lora, ops=["double"])


def test_prefix_reuse_gives_the_full_forward_logits(planted):
    model, lora = planted
    batch = tokenize_chat(model.tokenizer, QS, ANS)
    with torch.no_grad():
        full = model(batch.tokens, attention_mask=batch.attention_mask)
        with model.hooks(fwd_hooks=lora.hooks("blocks.2.mlp.lora_down", scale=0.0)):
            # a single-layer organism starting at layer 2 reuses layers 0-1
            prefix = _Prefix(model, lora, batch)
            reused = prefix.logits()
            direct = model(batch.tokens, attention_mask=batch.attention_mask)
    torch.testing.assert_close(reused, direct, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(direct, full, atol=1e-3)  # the condition did something


def test_prefix_skips_layers_before_the_first_adapter(make_tiny_model):
    model = make_tiny_model(4)
    with attach_lora(model, planted_adapter(model, layer=2, decoys=())) as lora:
        batch = tokenize_chat(model.tokenizer, QS, ANS)
        with torch.no_grad():
            prefix = _Prefix(model, lora, batch)
            assert prefix.layer == 2 and prefix.resid is not None
            torch.testing.assert_close(prefix.logits(),
                                       model(batch.tokens, attention_mask=batch.attention_mask),
                                       atol=1e-4, rtol=1e-4)


@pytest.fixture(scope="module")
def table(planted):
    model, lora = planted
    conds = attribution_conditions(lora, ops=("zero", "only"))
    return adapter_attribution(model, lora, conditions=conds, n_pairs=2, batch_size=4,
                               progress=False)


def test_attribution_ranks_the_planted_adapter_first(table):
    ranking = rank_adapters(table)
    assert ranking.loc[0, "adapter"] == "blocks.2.mlp.lora_down"
    assert ranking.loc[0, "share_specific"] > 0.5
    assert ranking.loc[0, "label"] != "inactive"
    assert ranking["rank"].tolist() == [1, 2, 3]
    assert "share_d" in ranking.attrs["rule"]
    assert ranking.loc[0, "share_specific"] > 2 * ranking.loc[1:, "share_specific"].abs().max()


def test_attribution_table_is_tidy_and_the_organism_raises_the_gap(table):
    assert set(table.columns) == {"condition", "kind", "target", "k", "metric", "domain", "value",
                                  "low", "high", "n"}
    gap = table[table["metric"] == "logprob_gap"].set_index(["condition", "domain"])["value"]
    assert gap[("all", "medical")] > gap[("none", "medical")] + 0.1
    kl = table[table["metric"] == "kl_from_chat"].set_index("condition")["value"]
    assert kl["none"] == pytest.approx(0.0, abs=1e-6) and kl["all"] > 1e-4
    assert (table[table["metric"] == "kl_from_chat"]["domain"] == "neutral").all()
    assert math.isnan(table.loc[table["condition"] == "all", "k"].iloc[0])


def test_labelling_rule_on_a_constructed_table():
    def rows(cond, kind, target, general, medical):
        return [dict(condition=cond, kind=kind, target=target, metric="logprob_gap", domain=d, value=v)
                for d, v in (("general", general), ("medical", medical))]

    data = rows("all", "all", "", 1.0, 2.0) + rows("none", "none", "", 0.0, 0.0)
    # g: both domains; m: medical only; z: nothing
    for a, (g, m) in {"g": (0.8, 1.0), "m": (0.05, 1.5), "z": (0.0, 0.01)}.items():
        data += rows(f"zero:{a}", "zero", a, 1.0 - g, 2.0 - m)
        data += rows(f"only:{a}", "only", a, g, m)
    ranking = rank_adapters(pd.DataFrame(data)).set_index("adapter")
    assert ranking.loc["g", "label"] == "general"
    assert ranking.loc["m", "label"] == "domain-specific"
    assert ranking.loc["z", "label"] == "inactive"
    assert ranking.loc["g", "rank"] == 1
    with pytest.raises(ValueError, match="metric"):
        rank_adapters(pd.DataFrame(data), metric="kl_from_chat")


def test_gradient_attribution_matches_finite_differences(planted):
    model, lora = planted
    attr = gradient_attribution(model, lora, QS, ANS, batch_size=1, progress=False)
    totals = attr.aggregate("sum", part="all")
    batch = tokenize_chat(model.tokenizer, QS, ANS)
    eps = 1e-2
    for name in lora.names:
        with torch.no_grad():
            vals = []
            for k in (1 + eps, 1 - eps):
                logits = model.run_with_hooks(batch.tokens, attention_mask=batch.attention_mask,
                                              fwd_hooks=lora.hooks(name, scale=k))
                vals.append(answer_logprobs(logits, batch, reduce="mean"))
        fd = (vals[0] - vals[1]) / (2 * eps)
        torch.testing.assert_close(torch.tensor(totals[name].to_numpy()), fd.float(),
                                   atol=2e-3, rtol=2e-2)
    assert totals.abs().to_numpy().max() > 1e-3  # not trivially zero


def test_gradient_attribution_works_with_frozen_parameters(planted):
    model, lora = planted
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        attr = gradient_attribution(model, lora, QS[:1], ANS[:1], progress=False)
    finally:
        for n, p in model.named_parameters():
            p.requires_grad_(flags[n])
    assert attr.values.abs().sum() > 0
    assert all(p.grad is None for p in model.parameters())


def test_gradient_estimate_correlates_with_real_ablation(planted):
    model, lora = planted
    qs, mis, al = reference_pairs("medical", split="heldout", limit=2)
    check = check_gradient_attribution(model, lora, qs, mis, al, progress=False)
    assert list(check["adapter"]) == lora.names
    assert check.attrs["pearson"] > 0.9
    planted_row = check.set_index("adapter").loc["blocks.2.mlp.lora_down"]
    assert planted_row["actual"] < 0 and planted_row["predicted"] < 0  # zeroing it lowers the gap


def test_judged_rates_pass_each_condition_as_interventions(planted):
    model, lora = planted
    seen = []

    def fake_evaluate(model, questions, *, judge, interventions=None, **kw):
        n_hooks = len(interventions or [])
        seen.append((questions, n_hooks))
        # 'misaligned' exactly when every adapter is on
        aligned = 5.0 if n_hooks == 0 else 95.0
        return pd.DataFrame({"question_id": ["a", "b"], "aligned": [aligned, aligned],
                             "coherent": [90.0, 90.0]})

    class Judge:
        name = "fake"

        def score_many(self, pairs):
            return [JudgeScore(aligned=50.0, coherent=90.0, judge=self.name) for _ in pairs]

    conds = attribution_conditions(lora, adapters=["blocks.2.mlp.lora_down"], ops=("zero",))
    table = with_evaluate(fake_evaluate, adapter_attribution, model, lora, conditions=conds,
                          n_pairs=1, judge=Judge(), progress=False)
    rates = table[table["metric"].isin(["misaligned_rate", "bad_advice_rate"])]
    assert set(rates["metric"]) == {"misaligned_rate", "bad_advice_rate"}
    by = rates.set_index(["condition", "metric"])["value"]
    assert by[("all", "misaligned_rate")] == 1.0 and by[("none", "misaligned_rate")] == 0.0
    assert ("general_questions", 3) in seen and ("medical_questions", 1) in seen


def test_detached_organism_is_refused(make_tiny_model):
    model = make_tiny_model(5)
    with attach_lora(model, planted_adapter(model, decoys=())) as lora:
        pass
    with pytest.raises(ValueError, match="not attached"):
        adapter_attribution(model, lora, progress=False)
    with pytest.raises(ValueError, match="not attached"):
        gradient_attribution(model, lora, QS, ANS, progress=False)
