"""The demo's read-verdicts section: the seed claims decided by blind reading on a model, shipped
on its card and drawn with the same findings machinery as the run's judged verdicts."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from emlens.cards import DEFAULT_CARD, QWEN_CODER_CARD, ModelCard
from emlens.demo import read_verdicts
from emlens.findings import validate_findings
from emlens.report import Report

ROOT = Path(__file__).parents[1]
RESULTS = ROOT / "results" / "coder" / "findings.json"
CLAIMS = {"steering", "ablation", "transfer", "convergence", "adapters", "narrow_general_kl",
          "narrow_general_kl_steering", "screening", "efficiency", "stability", "drift",
          "dynamics", "dynamics_read"}


def _ctx(card):
    return SimpleNamespace(card=card, judge=SimpleNamespace(name="the judge"))


def test_the_package_copy_is_the_results_file():
    """The demo shows exactly what results/coder/findings.json says (analyse.py writes both)."""
    assert QWEN_CODER_CARD.read_findings.read_text() == RESULTS.read_text()


def test_the_coder_demo_shows_every_read_verdict_beside_the_judged_ones(tmp_path):
    shipped = {e["id"]: e for e in json.loads(RESULTS.read_text())["findings"]}
    assert CLAIMS <= set(shipped)
    result = read_verdicts.measure(_ctx(QWEN_CODER_CARD))
    rep = Report("t")
    read_verdicts.render(result, rep)
    html_path = rep.write(tmp_path)
    page = html_path.read_text()
    table = read_verdicts.table(result.entries).set_index("claim")
    for cid, e in shipped.items():
        assert table.loc[cid, "verdict"] == e["verdict"]
        assert f"{e['effect']:+.3f} [{e['low']:+.3f}, {e['high']:+.3f}]" in page
        typed = next(f for f in rep.findings if f.id == f"read_{cid}")
        # the same machinery: the typed finding's lens verdicts are the rule's, recomputed
        assert typed.verdict == e["typed"]["verdict"]
    out = json.loads((tmp_path / "results.json").read_text())
    assert [f["id"] for f in out["findings"]] == [f"read_{cid}" for cid in shipped]
    validate_findings(out["findings"])
    assert {e["id"] for e in out["read_findings"]["findings"]} == set(shipped)
    assert "the judge" in page and "the read one stands" in page
    how = dict(zip(table.index, table["instrument"], strict=True))
    assert how["steering"] == "read blind" and how["efficiency"] == "answer-token cross-entropy"


def test_each_read_claim_s_verdict_follows_its_typed_lenses():
    entries = {e["id"]: e for e in read_verdicts.read_findings_for(QWEN_CODER_CARD)}
    # every one-lens claim: the report's typed verdict (what the demo's table shows) is the
    # entry's, so a plan rule with its own bounds must be typed with a matching null
    single = [cid for cid, e in entries.items() if len(e["typed"]["lenses"]) == 1]
    assert {"steering", "ablation", "transfer", "convergence", "dynamics", "dynamics_read",
            "screening"} <= set(
        single)
    for cid in single:
        (lens,) = validate_findings([entries[cid]["typed"]])[0].comparisons
        assert lens.verdict.value == entries[cid]["verdict"]
        assert (lens.effect.value, lens.effect.low, lens.effect.high) == pytest.approx(
            (entries[cid]["effect"], entries[cid]["low"], entries[cid]["high"]), abs=0)
    adapters = entries["adapters"]
    typed = validate_findings([adapters["typed"]])[0]
    for row in adapters["adapters"]:
        layer = row["adapter"].split(".")[1]
        general = next(c for c in typed.comparisons
                       if c.short == f"read, adapter {layer} alone, general")
        assert general.effect.value == pytest.approx(row["general_minus_chat"]["effect"], abs=0)
        # the plan's label "general" is exactly the general lens reproducing
        assert (row["label"] == "general") == (general.verdict.value == "reproduced")


def test_a_model_without_read_findings_says_so():
    for card in (DEFAULT_CARD, ModelCard(key="Qwen/Qwen2.5-7B-Instruct")):
        result = read_verdicts.measure(_ctx(card))
        assert result.entries is None and result.findings == ()
        rep = Report("t")
        read_verdicts.render(result, rep)
        assert rep.results["read_findings"] is None and not rep.findings
        assert any("No claim has been decided before this run" in p for p in rep.parts)


def test_a_missing_or_broken_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="not installed"):
        read_verdicts.read_findings_for(ModelCard(key="m", read_findings=tmp_path / "no.json"))
    entry = dict(json.loads(RESULTS.read_text())["findings"][0])
    del entry["n_required"]
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"findings": [entry]}))
    with pytest.raises(ValueError, match=r"lacks \['n_required'\]"):
        read_verdicts.read_findings_for(ModelCard(key="m", read_findings=bad))
    entry = dict(json.loads(RESULTS.read_text())["findings"][0])
    entry["typed"] = {**entry["typed"], "lenses": []}
    bad.write_text(json.dumps({"findings": [entry]}))
    with pytest.raises(ValueError):
        read_verdicts.read_findings_for(ModelCard(key="m", read_findings=bad))
