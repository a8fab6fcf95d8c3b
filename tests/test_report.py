"""`emlens demo --quick` end to end: the report exists and says what it measured."""

from __future__ import annotations

import json
import re

import pytest

from emlens.cli import main

SECTIONS = ("Which seed findings reproduced", "1. Judged answers", "Judge check",
            "Decided before this run",
            "2. A mean-difference",
            "3. Ablating the direction", "4. Probes on the organism", "5. Which adapters",
            "6. Narrow vs general")


def _check_rate(r):  # every rate comes with its interval (or n = 0 and no rate)
    assert r["n"] == 0 or r["low"] <= r["rate"] <= r["high"]


@pytest.mark.integration
def test_demo_quick_writes_a_complete_report(tmp_path):
    out = tmp_path / "report"
    assert main(["demo", "--quick", "--out", str(out)]) == 0
    page = (out / "index.html").read_text()
    results = json.loads((out / "results.json").read_text())
    for heading in SECTIONS:
        assert heading in page, heading
    assert page.count("data:image/png;base64,") >= 5
    # circuitsvis views: standalone files with the JavaScript inlined, embedded as iframes
    views = re.findall(r'<iframe src="(views/[\w-]+\.html)"', page)
    assert len(views) >= 3
    for v in views:
        src = (out / v).read_text()
        assert "CircuitsVis.render" in src and "unpkg.com" not in src

    assert results["settings"]["quick"] is True
    assert set(results["seconds_by_section"]) == {
        "load", "1_rates", "judge_check", "read_verdicts", "2_steering", "3_ablation",
        "4_probes", "5_attribution", "6_narrow_vs_general"}
    # SmolLM2 ships no verdict decided before the run: the section says so
    assert results["read_findings"] is None and "No claim has been decided before this run" in page
    check = results["judge_check"]
    assert check["shipped"]["n"] >= 600 and 0 <= check["shipped"]["coherence_auc"] <= 1
    assert {r["model_role"] for r in check["least_sure"]} == {"chat", "organism"}
    rates = {(r["model"], r["questions"]): r for r in results["rates"]}
    assert set(rates) == {("chat", "general"), ("chat", "medical"),
                          ("organism", "general"), ("organism", "medical")}
    assert all(r["n_answers"] == 3 for r in rates.values())
    for r in rates.values():
        _check_rate(r)
    assert {int(k) for k in results["directions"]} == {15}

    # the temperature comes from the shipped reading labels (0.7 has the most coherent answers)
    temp = results["temperature"]
    assert temp["value"] == results["settings"]["temperature"] == 0.7
    assert "coherent share by reading" in temp["why"] and len(temp["measured"]) >= 4

    # 2: the lens reads every cell of the grid; only the chosen cell is judged, and the sweep's
    # unsteered row is section 1's chat model on general questions, not a re-run
    grid = results["lens_sweep"]
    assert len(grid) == 2 and {r["scale"] for r in grid} == {0.1, 0.5}
    assert all(r["n"] == 2 and r["gap_low"] <= r["gap_change"] <= r["gap_high"] for r in grid)
    judged_cells = {(r["layer"], r["scale"]) for r in results["sweep"] if r["kind"] != "none"}
    assert len(judged_cells) == 1 and next(iter(judged_cells))[1] in {0.1, 0.5}
    base = next(r for r in results["sweep"] if r["kind"] == "none")
    assert (base["n"], base["k"]) == (rates[("chat", "general")]["n"], rates[("chat", "general")]["k"])
    both = results["directions_both_ways"]
    assert [r["layer"] for r in both] == [15] and abs(both[0]["cosine"]) <= 1 + 1e-6

    # 3: the organism and the second organism, each with a random-direction control
    abl = results["ablation"]
    conditions = {(r["model"], r["condition"], r["question_set"]) for r in abl}
    for q in ("general", "medical"):
        assert {("organism", "none", q), ("organism", "ablate direction", q),
                ("organism", "ablate random", q), ("second organism", "none", q),
                ("second organism", "ablate organism direction", q),
                ("second organism", "ablate random", q)} <= conditions
        none = next(r for r in abl if (r["model"], r["condition"], r["question_set"])
                    == ("organism", "none", q))
        assert (none["n"], none["k"]) == (rates[("organism", q)]["n"], rates[("organism", q)]["k"])
    for r in abl:
        _check_rate(r)
    assert "organism vs chat model, same answers" in {c["pair"] for c in results["cosines"]}
    assert all(-1 <= c["cosine"] <= 1 for c in results["cosines"])

    # 4: probes on the 9 scalars next to a residual-stream probe and a shuffled-label baseline
    probes = results["probes"]
    assert {"medical context", "misaligned reference answer"} <= {p["probe"] for p in probes}
    for p in probes:
        assert 0 <= p["auc"] <= 1 and p["shuffled_auc"] is not None and p["rows"] >= 8
    assert any("LoRA" in p["features"] for p in probes) and any("resid" in p["features"] for p in probes)

    # 5: nine adapters ranked; gradient attribution checked against real ablation
    assert len(results["ranking"]) == 9
    assert {r["label"] for r in results["ranking"]} <= {"general", "domain-specific", "inactive"}
    assert -1 <= results["gradient_check"]["pearson"] <= 1

    # 6: shipped runs and the live re-measurement
    live = results["narrow_vs_general_live"]
    assert live["origin"] == "shipped 120-step runs" and live["rows"] == 2
    assert {r["solution"] for r in live["efficiency"]} == {"general", "narrow"}
    assert any(r["measure"].startswith("stability") for r in results["narrow_vs_general_shipped"])

    claims = [f["claim"] for f in results["findings"]]
    for needle in ("raises the misaligned rate", "Adding the mean-difference", "Ablating",
                   "transfer", "converge", "Probes on the LoRA scalars", "adapters mediate",
                   "Gradient attribution", "more efficient", "more stable", "drifts back"):
        assert any(needle in c for c in claims), needle
    assert all(f["verdict"] for f in results["findings"])
    # results.json is the typed findings' serialisation: every finding, probes, attribution and
    # narrow vs general included, carries lenses with effect, interval, n and control
    from emlens.findings import Verdict, validate_findings

    typed = validate_findings(results["findings"])
    assert {f.id for f in typed} >= {"em_general", "em_medical", "steering", "ablation_general",
                                     "transfer_general", "convergence", "adapter_specialisation",
                                     "gradient_check", "efficiency", "stability", "drift"}
    assert any(f.id.startswith("probe_") for f in typed)
    conv_f = next(f for f in typed if f.id == "convergence")
    conv = conv_f.comparisons[0]
    if conv.effect.n:  # both organisms' judged answers gave a direction: a bootstrap interval
        assert conv.effect.has_interval and -1 <= conv.effect.low <= conv.effect.high <= 1
    else:  # at quick n the judge may find too few answers of a class for the second organism's
        # own direction (with SmolLM2's validated judge it does): said so, and not decided
        assert conv_f.verdicts == (Verdict.CANNOT_DECIDE,) and not conv.effect.has_interval
        assert "not measured" in conv_f.evidence
        assert "no direction from the second organism's own answers" in conv_f.evidence
    assert "Which seed findings reproduced" in page and "<details>" in page

    # both lenses beside the core findings, each with its random control where it has one
    by_claim = {f["claim"]: f for f in results["findings"]}
    core = [c for c in by_claim if "raises the misaligned rate" in c or "Adding the mean" in c
            or c.startswith("Ablating")]
    assert len(core) == 7
    for claim in core:
        kinds = {x["lens"].split(" (")[0] for x in by_claim[claim]["lenses"]}
        assert kinds == {"judged misaligned rate", "likelihood gap"}, claim
        for lens in by_claim[claim]["lenses"]:
            assert {"lens", "effect", "low", "high", "n", "control"} <= set(lens)
            assert lens["verdict"] in {"reproduced", "not reproduced", "cannot decide",
                                       "opposite sign"}
            if lens["lens"].startswith("likelihood"):
                assert lens["low"] <= lens["effect"] <= lens["high"] and lens["n"] == 2
                assert lens["control"]["kind"].startswith("same-norm random")
        # the verdict names each lens
        verdict = by_claim[claim]["verdict"]
        assert verdict.startswith("judged: ") and "; likelihood: " in verdict, verdict
    # directions both ways: the reference direction is read beside the judged one
    assert any(x.get("direction") == "reference"
               for x in by_claim[next(c for c in core if "Adding" in c)]["lenses"])
    gaps = {(r["model"], r["questions"]) for r in results["likelihood_gaps"]}
    assert gaps == {(m, q) for m in ("chat", "organism", "random adapter")
                    for q in ("general", "medical")}
    power = results["power"]
    assert (power["delta"], power["power"]) == (0.15, 0.8) and power["statement"]
    names = [c["comparison"] for c in power["comparisons"]]
    assert "chat vs organism (general)" in names and any("steering" in n for n in names)
    assert sum("ablation vs random" in n for n in names) == 4
    for c in power["comparisons"]:
        assert c["n_needed_per_arm"] > 0 and c["enough"] == (c["n_used_per_arm"] >= c["n_needed_per_arm"])
    assert power["lens_delta"] == 0.1 and len(power["lens_comparisons"]) >= 7
    for c in power["lens_comparisons"]:
        assert c["n_needed"] > 0 and c["enough"] == (c["n_used"] >= c["n_needed"])


@pytest.mark.integration
def test_demo_train_retrains_instead_of_using_shipped_artefacts(tmp_path):
    from emlens.cards import DEFAULT_CARD
    from emlens.demo.common import QUICK, Context
    from emlens.demo.narrow_general import train_narrow_general
    from emlens.demo.run import train_organism_now
    from emlens.lora import load_adapter
    from emlens.training import load_trainable

    folder = train_organism_now("rank1-down-medical", tmp_path / "organisms", QUICK)
    adapter = load_adapter(folder)
    assert len(adapter.modules) == 9 and set(adapter.ranks.values()) == {1}
    log = json.loads((tmp_path / "organisms" / "rank1-down-medical" / "train_log.json").read_text())
    assert log["steps"] == QUICK.organism_steps

    import emlens

    ctx = Context(cfg=QUICK, card=DEFAULT_CARD, chat=emlens.load_model(), org=None,
                  adapter=adapter, judge=None, qsets={}, sampling=None, seed=0, progress=False,
                  out=tmp_path)
    nvg = train_narrow_general(ctx, tmp_path / "nvg", layer=15)
    params = {n: load_trainable(nvg / n / "final.safetensors") for n in ("general", "narrow")}
    assert all(p.layer == 15 and p.effective_norm() > 0 for p in params.values())
    assert params["general"].effective_norm() != params["narrow"].effective_norm()
    with pytest.raises(ValueError, match="not one of"):
        train_organism_now("no-such-recipe", tmp_path, QUICK)


def _tiny_qwen_with_adapters(tmp_path, tokenizer):
    """A tiny random Qwen2 (the embedded tokenizer's vocabulary) and two rank-1 down_proj peft
    adapters: the shape of `--model Qwen/... --organism <published adapter>`, offline."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=96,
                      num_hidden_layers=6, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=1024, tie_word_embeddings=False)
    hf = Qwen2ForCausalLM(cfg).eval()
    hf.save_pretrained(tmp_path / "base")
    tokenizer.save_pretrained(tmp_path / "base")
    for name, seed in (("organism", 1), ("second", 2)):
        torch.manual_seed(seed)
        peft = get_peft_model(Qwen2ForCausalLM(cfg).eval(), LoraConfig(
            r=1, lora_alpha=1, target_modules=["down_proj"], layers_to_transform=[1, 2, 4],
            init_lora_weights=False))
        peft.save_pretrained(tmp_path / name)
    return tmp_path / "base", tmp_path / "organism", tmp_path / "second"


@pytest.mark.integration
def test_demo_runs_on_another_model_with_its_own_adapters(tmp_path, tokenizer):
    base, organism, second = _tiny_qwen_with_adapters(tmp_path, tokenizer)
    out = tmp_path / "report"
    assert main(["demo", "--quick", "--out", str(out), "--model", str(base), "--organism",
                 str(organism), "--transfer-organism", str(second)]) == 0
    results = json.loads((out / "results.json").read_text())
    page = (out / "index.html").read_text()
    assert {int(k) for k in results["directions"]} == {3}  # half of 6 layers
    assert len(results["ranking"]) == 3  # the 3 adapters of this organism
    assert "second organism" in {r["model"] for r in results["ablation"]}
    # the shipped SmolLM2 narrow/general vectors are shown, not re-measured on this model
    assert "narrow_vs_general_live" not in results and "needs that model" in page
    assert not any("more efficient" in f["claim"] for f in results["findings"])


def test_report_writes_views_offline_and_refuses_unsafe_names(tmp_path):
    from circuitsvis.tokens import colored_tokens

    from emlens.demo.common import fmt_rate
    from emlens.findings import Comparison, Effect, Finding
    from emlens.report import Report

    rep = Report(title="t")
    rep.view(colored_tokens(["a", "b"], [0.1, 0.5]), "tokens_1", "caption")
    with pytest.raises(ValueError, match="letters, digits"):
        rep.view(colored_tokens(["a"], [0.1]), "../escape")
    rep.finding(Finding("claim", "claim", (Comparison("judged misaligned rate",
                                                      Effect(0.2, 0.1, 0.3, n=40)),), "evidence"))
    with pytest.raises(ValueError, match="already"):
        rep.finding(Finding("claim", "again", (Comparison("x", Effect(0.2, 0.1, 0.3, n=4)),)))
    with pytest.raises(TypeError, match="emlens.findings.Finding"):
        rep.finding({"claim": "claim", "verdict": "reproduced"})
    rep.write(tmp_path)
    view = (tmp_path / "views" / "tokens_1.html").read_text()
    assert "CircuitsVis.render" in view and "unpkg.com" not in view
    assert 'src="views/tokens_1.html"' in (tmp_path / "index.html").read_text()
    assert json.loads((tmp_path / "results.json").read_text())["findings"][0]["verdict"] == \
        "judged misaligned rate: reproduced"
    assert fmt_rate({"n": 0, "n_answers": 3}) == "no coherent answers (n=0 of 3)"
    assert fmt_rate({"n": 4, "k": 1, "rate": 0.25, "low": 0.05, "high": 0.7}) == \
        "0.25 [0.05, 0.70] (k=1, n=4)"


def test_least_sure_answers_sit_nearest_a_threshold():
    import pandas as pd

    from emlens.demo import least_sure

    df = pd.DataFrame({
        "model_role": ["chat"] * 4 + ["organism"] * 2,
        "question_set": ["general"] * 6,
        "question": ["q"] * 6,
        "answer": ["far", "near coherent", "near aligned", "unscored", "a", "b"],
        "aligned": [90.0, 80.0, 31.0, None, 10.0, 60.0],
        "coherent": [95.0, 52.0, 90.0, 70.0, 99.0, 45.0],
    })
    out = least_sure(df, k=2)
    chat = out[out["model_role"] == "chat"]
    assert list(chat["answer"]) == ["near aligned", "near coherent"]
    assert list(chat["margin"]) == [1.0, 2.0]
    assert len(out[out["model_role"] == "organism"]) == 2


def test_judged_lens_supports_a_claim_only_beyond_zero_and_beyond_its_control():
    from emlens.demo.lenses import judged
    from emlens.report import lens_text

    base = {"k": 13, "n": 21}
    # steering cell 4/4 vs a random control that breaks the model (1/11): separated from the
    # control, but the effect's own interval still includes zero -> does not support
    small = judged(base, {"k": 4, "n": 4}, {"k": 1, "n": 11}, "random").as_dict()
    assert small["separated"] and small["low"] < 0 and not small["supports_claim"]
    big = judged({"k": 2, "n": 60}, {"k": 40, "n": 60}, {"k": 3, "n": 60}, "random").as_dict()
    assert big["supports_claim"] and lens_text(big).endswith(": reproduced")
    down = judged({"k": 40, "n": 60}, {"k": 2, "n": 60}, {"k": 39, "n": 60}, "random", expect=-1).as_dict()
    assert down["supports_claim"] and down["expected"] == "decrease"
    wrong_way = judged({"k": 2, "n": 60}, {"k": 40, "n": 60}, {"k": 3, "n": 60}, "random",
                       expect=-1).as_dict()
    assert wrong_way["separated"] and not wrong_way["supports_claim"]
    assert wrong_way["verdict"] == "opposite sign" and "opposite sign" in lens_text(wrong_way)
    empty = judged(base, {"k": 0, "n": 0}).as_dict()
    assert not empty["supports_claim"] and empty["control"] is None
    assert empty["verdict"] == "cannot decide"
    # small n: a 15-point rise is still inside the interval -> cannot decide; large n with no
    # change: the interval excludes a 15-point rise -> not reproduced
    assert small["verdict"] == "cannot decide" and big["verdict"] == "reproduced"
    flat = judged({"k": 30, "n": 300}, {"k": 31, "n": 300}, {"k": 30, "n": 300}, "random").as_dict()
    assert flat["high"] < 0.15 and flat["verdict"] == "not reproduced"


def test_finding_verdict_names_each_lens_and_lens_power_follows_the_interval():
    from emlens.demo.lenses import LENS_DELTA, lens_power
    from emlens.findings import Comparison, Effect, Finding

    # an interval of +-1.96 * sd / sqrt(n) with sd = 0.26 and n = 64
    half = 1.959964 * 0.26 / 8
    gap = Comparison("likelihood gap (general pairs)", Effect(0.2, 0.2 - half, 0.2 + half, n=64),
                     Effect(0.0, -0.05, 0.05, n=64), "random", delta=0.1, short="likelihood")
    ref = Comparison("likelihood gap (general pairs)", Effect(-0.3, -0.4, -0.2, n=64),
                     Effect(0.0, -0.05, 0.05, n=64), "random", delta=0.1, short="likelihood",
                     direction="reference")
    judged = Comparison("judged misaligned rate", Effect(0.1, -0.1, 0.3, n=9), short="judged")
    f = Finding("steering", "claim", (judged, gap, ref))
    assert f.verdict == ("judged: cannot decide; likelihood: reproduced; "
                         "likelihood (reference direction): opposite sign")
    rows = lens_power([f])
    assert len(rows) == 2  # the likelihood lenses only
    row = rows.iloc[0]
    assert abs(row["sd_per_question"] - 0.26) < 1e-6
    # (z_0.975 + z_0.8)^2 * 0.26^2 / 0.1^2 = 53.06 -> 54 pairs; 64 are enough
    assert row["n_needed"] == 54 and row["enough"]
    assert abs(row["mde_at_n_used"] - 2.8015852 * 0.26 / 8) < 1e-6 and LENS_DELTA == 0.1


def test_demo_temperature_is_chosen_from_the_shipped_reading_labels():
    from emlens.demo.common import PAPERS_TEMPERATURE, choose_temperature, measured_coherence

    table = measured_coherence(None).set_index(["model", "temperature"])
    # SmolLM2: reading finds far more coherent answers at 0.7 than at 1.0, for both models
    for who in ("chat", "organism"):
        assert table.loc[(who, 0.7), "share"] > table.loc[(who, 1.0), "high"]
        assert table.loc[(who, 0.7), "n"] == 36 and table.loc[(who, 1.0), "n"] == 72
    assert table["low"].le(table["share"]).all() and table["share"].le(table["high"]).all()
    value, why = choose_temperature(None)
    assert value == 0.7 and "chat T=0.7: 0.47" in why
    assert choose_temperature("qwen2.5-coder-1.5b")[0] == 0.7
    value, why = choose_temperature("some/other-model")
    assert value == PAPERS_TEMPERATURE == 1.0 and "no answers" in why


def test_the_judge_check_describes_the_model_the_demo_runs_on():
    from emlens.data import load_dataset
    from emlens.demo.judge_check import judge_check_for
    from emlens.judge import default_judge

    # each embedded model's check: the judge validated for that model on its held-out answers
    # (the three sets of questions written for the checks, never used to fit or tune a judge)
    smol, own = judge_check_for(None)
    assert own and smol["labelled_sets"] == [f"judge_fresh{k}_smollm2" for k in ("", "2", "3")]
    assert smol["n"] == sum(len(load_dataset(n)) for n in smol["labelled_sets"])
    coder, own = judge_check_for("Qwen2.5-Coder-1.5B")
    assert own and coder["labelled_sets"] == [f"judge_fresh{k}_coder" for k in ("", "2", "3")]
    assert coder["n"] == sum(len(load_dataset(n)) for n in coder["labelled_sets"])
    for check, subject in ((smol, "smollm2"), (coder, "qwen2.5-coder-1.5b")):
        assert check["judge"] == default_judge(subject=subject).name
        assert all(c["condition"].split(": ")[0] in check["labelled_sets"]
                   for c in check["conditions"])
        assert {"coherence_auc", "misaligned_auc", "passes", "least_sure"} <= set(check)
    other, own = judge_check_for("Qwen/Qwen2.5-7B-Instruct")  # no labels of its own: said so
    assert not own and other == smol
