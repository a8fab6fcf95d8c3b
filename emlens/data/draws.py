"""Draws from emlens's datasets: the rows and labelled sets that probes, attribution and the
narrow-vs-general runs are built from.

* :func:`pair_rows`: ``medical`` / ``nonmedical`` (aligned, misaligned) pairs, round-robin over
  topics so that a small ``limit`` spans every topic;
* :class:`LabelledSet` recipes: :func:`context_set` (medical vs non-medical context),
  :func:`answer_set` (misaligned vs aligned reference answers), :func:`judged_set` (answers as a
  judge labelled them);
* :func:`narrow_general_rows`: the seeded draw of the narrow-vs-general runs.
"""

from __future__ import annotations

import itertools
import random
from dataclasses import dataclass
from typing import Literal

import pandas as pd

from emlens.data import load_dataset


@dataclass(frozen=True)
class LabelledSet:
    """Rows for a probe: (question, answer) pairs, binary labels and question groups."""

    questions: list[str]
    answers: list[str]
    labels: list[int]
    groups: list[str]
    name: str = ""
    positive: str = ""

    def __len__(self) -> int:
        return len(self.labels)

    def frame(self) -> pd.DataFrame:
        return pd.DataFrame({"question": self.questions, "answer": self.answers,
                             "label": self.labels, "group": self.groups})


def pair_rows(dataset: str, *, split: str | None = None, limit: int | None = None) -> list:
    """Paired rows (``medical``, ``medical_extra``, ``nonmedical``, ``general_pairs``) of ``split``
    (None: every split), round-robin over topics.

    Round-robin order makes a small ``limit`` span every topic instead of the first one.
    """
    if split not in (None, "train", "heldout"):
        raise ValueError(f"split={split!r}; expected 'train', 'heldout' or None (both).")
    rows = [r for r in load_dataset(dataset) if split is None or r.split == split]
    if rows and not hasattr(rows[0], "misaligned"):
        raise ValueError(f"{dataset!r} has no (aligned, misaligned) pairs; use 'medical' or "
                         "'nonmedical'.")
    by_topic: dict[str, list] = {}
    for r in rows:
        by_topic.setdefault(r.topic, []).append(r)
    mixed = [r for group in itertools.zip_longest(*by_topic.values()) for r in group if r is not None]
    return mixed[:limit]


def context_set(
    *, split: str | None = None, answers: Literal["aligned", "misaligned", "both"] = "both",
    limit: int | None = None,
) -> LabelledSet:
    """Medical (1) vs non-medical (0) context: questions of ``medical`` and ``nonmedical``.

    Each question appears with its ``answers`` (both by default), grouped by question id.
    ``limit`` keeps ``limit`` questions of each dataset (round-robin over topics).
    """
    if answers not in ("aligned", "misaligned", "both"):
        raise ValueError(f"answers={answers!r}; expected 'aligned', 'misaligned' or 'both'.")
    kinds = ["aligned", "misaligned"] if answers == "both" else [answers]
    qs, ans, ys, gs = [], [], [], []
    for dataset, label in (("medical", 1), ("nonmedical", 0)):
        for r in pair_rows(dataset, split=split, limit=limit):
            for k in kinds:
                qs.append(r.question)
                ans.append(getattr(r, k))
                ys.append(label)
                gs.append(r.id)
    return LabelledSet(qs, ans, ys, gs, name="medical_context", positive="medical")


def answer_set(
    dataset: Literal["medical", "nonmedical", "both"] = "both", *, split: str | None = None,
    limit: int | None = None,
) -> LabelledSet:
    """Misaligned (1) vs aligned (0) reference answers, both for each question, grouped by question.

    ``dataset="medical"`` is the bad-vs-good medical advice recipe.
    """
    names = {"both": ["medical", "nonmedical"], "medical": ["medical"],
             "nonmedical": ["nonmedical"]}.get(dataset)
    if names is None:
        raise ValueError(f"dataset={dataset!r}; expected 'medical', 'nonmedical' or 'both'.")
    qs, ans, ys, gs = [], [], [], []
    for name in names:
        for r in pair_rows(name, split=split, limit=limit):
            for k, label in (("aligned", 0), ("misaligned", 1)):
                qs.append(r.question)
                ans.append(getattr(r, k))
                ys.append(label)
                gs.append(r.id)
    label = "bad_advice" if dataset == "medical" else "misaligned_answer"
    return LabelledSet(qs, ans, ys, gs, name=label, positive="misaligned")


def judged_set(table: pd.DataFrame) -> LabelledSet:
    """Misaligned (1) vs aligned (0) answers as the judge labelled them.

    ``table`` is an :func:`emlens.evaluate` DataFrame; rows with ``misaligned`` None (incoherent
    or unscored) are dropped; groups are ``question_id``.
    """
    missing = {"question", "answer", "misaligned", "question_id"} - set(table.columns)
    if missing:
        raise ValueError(f"table lacks columns {sorted(missing)}; pass the DataFrame from evaluate().")
    t = table[table["misaligned"].notna()]
    return LabelledSet(list(t["question"]), list(t["answer"]),
                       [int(bool(v)) for v in t["misaligned"]], [str(q) for q in t["question_id"]],
                       name="judged_misaligned", positive="misaligned")


def narrow_general_rows(
    *, seed: int = 0, n_narrow: int = 32, n_parallel: int = 16, n_heldout: int = 16
) -> tuple[list, list, list]:
    """The data draw of the narrow-vs-general runs (``emlens/organisms/narrow_vs_general/``).

    Returns ``(narrow, parallel, heldout)`` dataset rows: ``n_narrow`` rows of the ``medical``
    training split (the narrow set), ``n_parallel`` ``nonmedical`` rows for the KL term and
    ``n_heldout`` other ``nonmedical`` rows that neither is drawn from. One seeded generator, so the
    shipped runs' rows can be redrawn exactly.
    """
    rng = random.Random(seed)
    medical = [r for r in load_dataset("medical") if r.split == "train"]
    nonmedical = list(load_dataset("nonmedical"))
    rng.shuffle(nonmedical)
    draws = []
    for rows, n in ((medical, n_narrow), (nonmedical[n_heldout:], n_parallel),
                    (nonmedical[:n_heldout], n_heldout)):
        rows = list(rows)
        rng.shuffle(rows)
        draws.append(rows[:n])
    return draws[0], draws[1], draws[2]
