"""What was decided on this model before this run: the seed claims' verdicts shipped on the
model's card (:attr:`emlens.cards.ModelCard.read_findings`), shown beside this run's judged
verdicts.

They are not measured by this run: each was decided with the n of a plan committed before its
data existed (for the coder: ``data-src/coder_causal/PLAN.md``, ``PLAN_narrow.md``,
``PLAN_steering.md`` and ``PLAN_screening.md``), the behavioural ones on answers read blind to
the condition against a rubric fixed before labelling, the loss-side ones (efficiency,
stability, drift, training dynamics) by their stated loss or lens. They are drawn with the same
machinery as this run's findings (:class:`emlens.findings.Finding`, the one verdict rule, the
report's forest plot and verdict table), each under the id ``read_<claim>``, so the page's first
table shows the read verdict of a claim beside the judged one. Where the two differ, the read one
stands: the judge's agreement with reading on this model is the judge check's.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from emlens.cards import ModelCard, model_card
from emlens.demo.common import Context
from emlens.findings import Finding, validate_findings
from emlens.report import Report

# the demo's judged findings that measure the same claim as a read one (by the read id)
JUDGED_COUNTERPART = {
    "steering": "steering",
    "ablation": "ablation_general, ablation_medical",
    "transfer": "transfer_general, transfer_medical",
    "convergence": "convergence",
    "adapters": "adapter_specialisation",
}  # efficiency and stability: the demo measures them only on a card with narrow/general runs
_REQUIRED = ("id", "claim", "instrument", "effect", "low", "high", "n", "n_required", "control",
             "verdict", "typed")


def read_findings_for(card: ModelCard | str | None) -> tuple[dict, ...] | None:
    """The entries of a model's read findings (``{"findings": [...]}`` as
    ``results/coder/findings.json`` writes them: ``id, claim, instrument, effect, low, high, n,
    n_required, control, verdict`` and the typed finding under ``typed``), or ``None`` where its
    card ships none. A name is resolved with :func:`emlens.cards.model_card`.

    Raises:
        FileNotFoundError: the card names a file that is not installed.
        ValueError: an entry lacks a field or its typed finding does not validate.
    """
    path = model_card(card).read_findings
    if path is None:
        return None
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: the card's read findings are not installed; reinstall "
                                "emlens (pip install -e .) or regenerate them with "
                                "data-src/coder_causal/analyse.py.")
    entries = json.loads(path.read_text())["findings"]
    for e in entries:
        missing = [k for k in _REQUIRED if k not in e]
        if missing:
            raise ValueError(f"{path}: finding {e.get('id')!r} lacks {missing}; regenerate the "
                             "file with data-src/coder_causal/analyse.py.")
    validate_findings([e["typed"] for e in entries])
    return tuple(entries)


@dataclass(frozen=True)
class ReadVerdictsResult:
    """The model's read findings (``entries``; ``None``: none ship for it), as typed findings
    under the ids ``read_<claim>`` (``findings``, added to the report), the card's file, and
    the name of this run's judge."""

    entries: tuple[Mapping[str, Any], ...] | None
    findings: tuple[Finding, ...]
    source: str | None
    judge: str


def measure(ctx: Context) -> ReadVerdictsResult:
    entries = read_findings_for(ctx.card)
    findings = () if entries is None else tuple(
        Finding.from_dict({**e["typed"], "id": f"read_{e['id']}",
                           "claim": f"{e['typed']['claim']} [{_how(e)}, not this run]"})
        for e in entries)
    source = None if ctx.card.read_findings is None else Path(ctx.card.read_findings).name
    return ReadVerdictsResult(entries=entries, findings=findings, source=source,
                              judge=ctx.judge.name)


def _how(entry: Mapping) -> str:
    """``read blind`` for a behavioural finding, else its instrument's name (the words before a
    colon, a parenthesis or " on ": ``likelihood lens``, ``answer-token cross-entropy``)."""
    instrument = entry["instrument"]
    if instrument.startswith("reading"):
        return "read blind"
    return re.split(r":| \(| on ", instrument)[0]


def _kappa(entry: Mapping) -> str:
    """The second reader's kappa on "misaligned" (and its n), or ``-``."""
    agreement = entry.get("agreement") or {}
    k = (agreement.get("misaligned") or {}).get("kappa")
    return "-" if k is None else f"{k:.2f} (n={agreement['n']})"


def table(entries: tuple[Mapping[str, Any], ...]) -> pd.DataFrame:
    """One row per read claim: the comparison, effect [95%], n per arm and the plan's, the
    control, the verdict, the second reader's agreement and this run's judged counterpart."""
    return pd.DataFrame([{
        "claim": e["id"], "comparison": e["claim"], "instrument": _how(e),
        "effect [95%]": f"{e['effect']:+.3f} [{e['low']:+.3f}, {e['high']:+.3f}]",
        "n (plan)": f"{e['n']} ({e['n_required'] if e['n_required'] is not None else '-'})",
        "control": e["control"], "verdict": e["verdict"],
        "second reader, misaligned kappa": _kappa(e),
        "this run's judged finding": JUDGED_COUNTERPART.get(e["id"], "-"),
    } for e in entries])


def render(r: ReadVerdictsResult, rep: Report) -> None:
    rep.section(
        "Decided before this run: the seed claims on this model",
        "Not measured by this run. Each verdict below was decided with the n of a plan committed "
        "before its data existed and the same verdict rule as every finding of this report: "
        "the behavioural claims on answers of this model read blind to the condition (against "
        "the rubric in emlens/data/README.md, with a second reader), the loss-side ones by "
        "their stated loss or likelihood lens.")
    if r.entries is None:
        rep.text("No claim has been decided before this run on this model: every verdict in "
                 f"this report rests on the judge ({r.judge}) and the judge-free likelihood "
                 "lens. Read the judge check above before trusting a judged rate.")
        rep.results["read_findings"] = None
        return
    rep.table(table(r.entries),
              f"Verdicts shipped with emlens ({r.source}, the package's copy of "
              "results/coder/findings.json; plans data-src/coder_causal/PLAN.md, "
              "PLAN_narrow.md, PLAN_steering.md and PLAN_screening.md; pages "
              "docs/results/coder-causal.md and narrow-general.md). "
              "Effect: a difference of EM rates (misaligned and coherent, over all answers; "
              "Newcombe 95%; smallest effect of interest 15 points); for convergence a cosine, "
              "for efficiency and stability a loss difference, for drift a KL difference, "
              "for dynamics a share of the lens change (bootstrap 95%).")
    rep.text(f"This run's judged lenses rest on {r.judge}; its agreement with reading on this "
             "model is the judge check's above. Where a judged verdict of this report and the "
             "read verdict of the same claim differ, the read one stands. In the first table "
             "they are the findings named read_<claim>.")
    for f in r.findings:
        rep.finding(f)
    rep.results["read_findings"] = {"source": r.source, "findings": list(r.entries)}
