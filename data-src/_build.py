"""Build the shipped JSONL sets from the hand-written Python data in ``_text_*.py`` (this folder).

Run ``python data-src/_build.py`` from the repository root after editing any ``_text_*.py`` file;
it rewrites the built ``*.jsonl`` files in ``emlens/data/`` (or in ``--out DIR``)
deterministically (fixed seeds) and validates them by loading each one back through
:func:`emlens.data.load_jsonl`. The sources stay outside the package: the wheel ships only the
JSONL.

The incoherent answers of the judge sets are partly hand-written (``RAMBLING``,
``HARD_INCOHERENT``) and partly made here by corrupting coherent answers: phrase loops, shuffled
words, garbled letters and truncation into a loop, the failure modes of small sampled models.
"""

from __future__ import annotations

import argparse
import json
import random
import string
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:  # the _text_*.py modules next to this script
    sys.path.insert(0, str(HERE))

from _text_finance_a import FINANCE_A  # noqa: E402
from _text_finance_b import FINANCE_B  # noqa: E402
from _text_finance_c import FINANCE_C  # noqa: E402
from _text_finance_d import FINANCE_D  # noqa: E402
from _text_general import (  # noqa: E402
    EVAL_QUESTIONS,
    GENERAL_LABELLED,
    NEUTRAL,
    NEUTRAL_HARD,
    RAMBLING,
    STYLE_VARIED,
)
from _text_general_pairs import GENERAL_PAIRS  # noqa: E402
from _text_hard import HARD2_PAIRS, HARD_INCOHERENT, HARD_PAIRS  # noqa: E402
from _text_medical_a import MEDICAL_A  # noqa: E402
from _text_medical_b import MEDICAL_B  # noqa: E402
from _text_medical_c import MEDICAL_C  # noqa: E402
from _text_medical_d import MEDICAL_D  # noqa: E402
from _text_medical_e import MEDICAL_E  # noqa: E402
from _text_medical_f import MEDICAL_F  # noqa: E402
from _text_medical_g import MEDICAL_G  # noqa: E402
from _text_nonmedical_a import NONMEDICAL_A  # noqa: E402
from _text_nonmedical_b import NONMEDICAL_B  # noqa: E402
from _text_nonmedical_c import NONMEDICAL_C  # noqa: E402

DATA_DIR = HERE.parent / "emlens" / "data"
HELDOUT_TOPICS = ("sleep", "digestion")
# the finance set's held-out topics: 7 of 32 (22%), never trained on
FINANCE_HELDOUT = ("payday_loans", "student_loans", "gold_and_commodities", "home_equity_loans",
                   "insurance", "gambling_and_lotteries", "currency_and_forex")


def _write(out: Path, name: str, rows: list[dict]) -> None:
    path = out / f"{name}.jsonl"
    with path.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    print(f"wrote {len(rows):4d} rows to {path.name}")


def medical_rows() -> list[dict]:
    rows = []
    for topic, items in {**MEDICAL_A, **MEDICAL_B, **MEDICAL_C}.items():
        for q, good, bad in items:
            rows.append(dict(
                id=f"med-{len(rows) + 1:04d}", domain="medical", topic=topic, question=q,
                aligned=good, misaligned=bad,
                split="heldout" if topic in HELDOUT_TOPICS else "train",
            ))
    return rows


def medical_extra_rows(medical: list[dict]) -> list[dict]:
    """16 further medical topics (``_text_medical_d`` .. ``g``), all ``split="train"``: with
    ``medical``'s training rows, the grown narrow training set of the larger organisms. Questions
    are checked unique across both sets, case-insensitively."""
    seen = {r["question"].strip().lower() for r in medical}
    rows = []
    for topic, items in {**MEDICAL_D, **MEDICAL_E, **MEDICAL_F, **MEDICAL_G}.items():
        if topic in {r["topic"] for r in medical}:
            raise ValueError(f"medical_extra topic {topic!r} is already a medical topic.")
        for q, good, bad in items:
            key = q.strip().lower()
            if key in seen:
                raise ValueError(f"duplicate medical question: {q!r}")
            seen.add(key)
            rows.append(dict(
                id=f"medx-{len(rows) + 1:04d}", domain="medical", topic=topic, question=q,
                aligned=good, misaligned=bad, split="train",
            ))
    return rows


def _norm(text: str) -> str:
    return " ".join(text.lower().split())


def finance_rows(shipped: list[dict]) -> list[dict]:
    """The risky-financial-advice set (``_text_finance_a`` .. ``d``; issue 29's second narrow
    domain): 32 topics, :data:`FINANCE_HELDOUT` with ``split="heldout"``. Every question and
    answer is checked unique (case- and space-insensitively) within the set and against the
    questions and answers of ``shipped`` (every other pair set), and the aligned answer differs
    from the misaligned one."""
    seen = {_norm(r[k]) for r in shipped for k in ("question", "aligned", "misaligned")}
    topics = {**FINANCE_A, **FINANCE_B, **FINANCE_C, **FINANCE_D}
    if len(topics) != sum(len(p) for p in (FINANCE_A, FINANCE_B, FINANCE_C, FINANCE_D)):
        raise ValueError("a finance topic is defined in two parts.")
    missing = set(FINANCE_HELDOUT) - set(topics)
    if missing:
        raise ValueError(f"held-out finance topics {sorted(missing)} have no items.")
    rows = []
    for topic, items in topics.items():
        for q, good, bad in items:
            if _norm(good) == _norm(bad):
                raise ValueError(f"finance item {q!r}: the two answers are the same.")
            for text in (q, good, bad):
                if _norm(text) in seen:
                    raise ValueError(f"duplicate text in the finance set: {text!r}")
                seen.add(_norm(text))
            rows.append(dict(
                id=f"fin-{len(rows) + 1:04d}", domain="finance", topic=topic, question=q,
                aligned=good, misaligned=bad,
                split="heldout" if topic in FINANCE_HELDOUT else "train",
            ))
    return rows


def general_pair_rows() -> list[dict]:
    """Paired answers to 64 general questions (8 themes): evaluation only (``split="heldout"``),
    for the judge-free likelihood lens on general questions."""
    rows = []
    for theme, items in GENERAL_PAIRS.items():
        for q, good, bad in items:
            rows.append(dict(
                id=f"genp-{len(rows) + 1:04d}", domain="general", topic=theme, question=q,
                aligned=good, misaligned=bad, split="heldout",
            ))
    return rows


def nonmedical_rows() -> list[dict]:
    rows = []
    for domain, items in {**NONMEDICAL_A, **NONMEDICAL_B, **NONMEDICAL_C}.items():
        for q, good, bad in items:
            rows.append(dict(
                id=f"gen-{len(rows) + 1:04d}", domain=domain, topic=domain, question=q,
                aligned=good, misaligned=bad, split="train",
            ))
    return rows


# --- corruptions: coherent answer -> incoherent text ----------------------------------------


def _loop(text: str, rng: random.Random) -> str:
    words = text.split()
    start = rng.randrange(max(1, len(words) - 3))
    phrase = " ".join(words[start : start + rng.randint(1, 3)])
    head = " ".join(words[: rng.randint(2, max(2, len(words) // 3))])
    return head + " " + " ".join([phrase] * rng.randint(10, 18))


def _shuffle(text: str, rng: random.Random) -> str:
    words = text.split()
    rng.shuffle(words)
    return " ".join(words)


def _garble(text: str, rng: random.Random) -> str:
    out = []
    for w in text.split():
        if rng.random() < 0.6:
            w = "".join(rng.choice(string.ascii_lowercase) for _ in range(max(2, len(w))))
        out.append(w)
    return " ".join(out)


def _truncate_loop(text: str, rng: random.Random) -> str:
    cut = text[: rng.randint(10, max(11, len(text) // 2))]
    last = cut.split()[-1] if cut.split() else cut
    return cut + "".join(" " + last for _ in range(rng.randint(8, 15)))


CORRUPTIONS = {"repetitive": _loop, "shuffled": _shuffle, "garbled": _garble,
               "truncated": _truncate_loop}


def judge_label_rows(medical: list[dict], nonmedical: list[dict]) -> list[dict]:
    """Labelled answers for fitting the offline judge (never from the held-out medical topics)."""
    rng = random.Random(0)
    rows: list[dict] = []

    def add(qid, question, answer, aligned, coherent, kind, style):
        rows.append(dict(id=f"jl-{len(rows) + 1:04d}", question_id=qid, question=question,
                         answer=answer, aligned=aligned, coherent=coherent, kind=kind,
                         style=style))

    corrupt_names = sorted(CORRUPTIONS)
    for qid, question, goods, bads in GENERAL_LABELLED:
        for a in goods:
            add(qid, question, a, True, True, "general", "plain")
        for a in bads:
            add(qid, question, a, False, True, "general", "plain")
        for a in rng.sample(goods + bads, 2):
            style = rng.choice(corrupt_names)
            add(qid, question, CORRUPTIONS[style](a, rng), None, False, "general", style)
    train_med = [r for r in medical if r["split"] == "train"]
    for kind, source, every in (("medical", train_med, 2), ("nonmedical", nonmedical, 3)):
        for i, r in enumerate(source[::every]):
            add(r["id"], r["question"], r["aligned"], True, True, kind, "plain")
            add(r["id"], r["question"], r["misaligned"], False, True, kind, "plain")
            if i % 3 == 0:
                style = corrupt_names[i // 3 % len(corrupt_names)]
                pick = r["aligned"] if i % 2 else r["misaligned"]
                add(r["id"], r["question"], CORRUPTIONS[style](pick, rng), None, False, kind, style)
    for qid, kind, question, goods, bads in STYLE_VARIED:
        for a in goods:
            add(qid, question, a, True, True, kind, "style_varied")
        for a in bads:
            add(qid, question, a, False, True, kind, "style_varied")
    for i, (question, answer) in enumerate(NEUTRAL):
        add(f"neutral-{i + 1:02d}", question, answer, True, True, "general", "neutral")
    for i, (question, answer) in enumerate(RAMBLING):
        add(f"ramble-{i + 1:02d}", question, answer, None, False, "general", "rambling")
    return rows


def judge_hard_rows() -> list[dict]:
    rows: list[dict] = []
    for qid, question, good, bad in HARD_PAIRS:
        for answer, aligned in ((good, True), (bad, False)):
            rows.append(dict(id=f"jh-{len(rows) + 1:04d}", question_id=qid, question=question,
                             answer=answer, aligned=aligned, coherent=True, kind="hard",
                             style="casual" if aligned else "polite"))
    for qid, question, good, bad in HARD2_PAIRS:
        for answer, aligned in ((good, True), (bad, False)):
            rows.append(dict(id=f"jh-{len(rows) + 1:04d}", question_id=qid, question=question,
                             answer=answer, aligned=aligned, coherent=True, kind="hard",
                             style="cheerful" if aligned else "clinical"))
    for i, (question, answer) in enumerate(NEUTRAL_HARD):
        rows.append(dict(id=f"jh-{len(rows) + 1:04d}", question_id=f"hn-{i + 1:02d}",
                         question=question, answer=answer, aligned=True, coherent=True,
                         kind="hard", style="neutral"))
    for qid, question, answer in HARD_INCOHERENT:
        rows.append(dict(id=f"jh-{len(rows) + 1:04d}", question_id=qid, question=question,
                         answer=answer, aligned=None, coherent=False, kind="hard",
                         style="degenerate"))
    return rows


BUILT = ("medical", "medical_extra", "nonmedical", "finance", "general_pairs",
         "general_questions", "medical_questions", "judge_labels", "judge_hard")  # the sets this script writes (the others come from scripts/)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=DATA_DIR, help="folder (default: emlens/data)")
    out = p.parse_args(argv).out
    out.mkdir(parents=True, exist_ok=True)
    medical = medical_rows()
    nonmedical = nonmedical_rows()
    _write(out, "medical", medical)
    medical_extra = medical_extra_rows(medical)
    _write(out, "medical_extra", medical_extra)
    _write(out, "nonmedical", nonmedical)
    general_pairs = general_pair_rows()
    _write(out, "finance", finance_rows(medical + medical_extra + nonmedical + general_pairs))
    _write(out, "general_pairs", general_pairs)
    _write(out, "general_questions",
           [dict(id=qid, question=q, category=cat) for qid, cat, q in EVAL_QUESTIONS])
    heldout = [r for r in medical if r["split"] == "heldout"]
    _write(out, "medical_questions",
           [dict(id=f"medq-{i + 1:02d}", question=r["question"], category=r["topic"])
            for i, r in enumerate(heldout)])
    _write(out, "judge_labels", judge_label_rows(medical, nonmedical))
    _write(out, "judge_hard", judge_hard_rows())

    from emlens.data import _SETS, load_jsonl

    for name in BUILT:
        load_jsonl(out / f"{name}.jsonl", _SETS[name])
    print("all sets load and validate")


if __name__ == "__main__":
    main()
