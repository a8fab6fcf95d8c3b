"""`emlens demo --quick` end to end: the report exists and says what it measured."""

from __future__ import annotations

import json

import pytest

from emlens.cli import main


@pytest.mark.integration
def test_demo_quick_writes_a_complete_report(tmp_path):
    out = tmp_path / "report"
    assert main(["demo", "--quick", "--out", str(out)]) == 0
    page = (out / "index.html").read_text()
    results = json.loads((out / "results.json").read_text())
    for heading in ("Which seed findings reproduced", "1. Judged answers", "2. A mean-difference",
                    "3. Ablating the direction"):
        assert heading in page
    assert "data:image/png;base64," in page
    assert results["settings"]["quick"] is True
    rates = {(r["model"], r["questions"]): r for r in results["rates"]}
    assert set(rates) == {("chat", "general"), ("chat", "medical"),
                          ("organism", "general"), ("organism", "medical")}
    assert all(r["n_answers"] == 3 for r in rates.values())
    for r in rates.values():  # every rate comes with its interval (or n = 0 and no rate)
        assert r["n"] == 0 or r["low"] <= r["rate"] <= r["high"]
    claims = [f["claim"] for f in results["findings"]]
    assert any("Ablating" in c for c in claims) and any("steers" in c or "Adding" in c for c in claims)
    assert all(f["verdict"] for f in results["findings"])
    assert {int(k) for k in results["directions"]} == {15}
