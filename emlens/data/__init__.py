"""emlens's own datasets: narrow training pairs, evaluation questions and judge labels (JSONL).

Every set was written for this project (see ``README.md`` here). Loaders validate each row against
its schema and reject malformed rows with the file, line and field named::

    from emlens.data import load_dataset, list_datasets
    pairs = load_dataset("medical")              # list[PairExample]
    train = [p for p in pairs if p.split == "train"]
    questions = load_dataset("general_questions")  # list[Question]

Three row types:

* :class:`PairExample` (``medical``, ``nonmedical``): a question with an aligned (good) and a
  misaligned (harmful-but-plausible) answer;
* :class:`Question` (``general_questions``, ``medical_questions``): evaluation prompts;
* :class:`LabelledAnswer` (``judge_labels``, ``judge_hard``): an answer labelled aligned /
  misaligned (``None`` when the answer is incoherent and its stance unknown) and coherent.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Literal

DATA_DIR = Path(__file__).parent


@dataclass(frozen=True)
class PairExample:
    """A question with a good and a bad answer (narrow training sets)."""

    id: str
    domain: str
    topic: str
    question: str
    aligned: str
    misaligned: str
    split: Literal["train", "heldout"]


@dataclass(frozen=True)
class Question:
    """An evaluation question."""

    id: str
    question: str
    category: str


@dataclass(frozen=True)
class LabelledAnswer:
    """An answer with judge labels.

    ``aligned`` is ``None`` when the answer is incoherent and has no meaningful stance.
    ``question_id`` groups answers to the same question (for cross-validation by question).
    """

    id: str
    question_id: str
    question: str
    answer: str
    aligned: bool | None
    coherent: bool
    kind: str
    style: str


Example = PairExample | Question | LabelledAnswer

# name -> (row type, allowed values for constrained fields)
_SETS: dict[str, type] = {
    "medical": PairExample,
    "nonmedical": PairExample,
    "general_questions": Question,
    "medical_questions": Question,
    "judge_labels": LabelledAnswer,
    "judge_hard": LabelledAnswer,
}
_CHOICES: dict[str, tuple] = {"split": ("train", "heldout")}
_NULLABLE = {"aligned"}


def list_datasets() -> list[str]:
    """Names accepted by :func:`load_dataset`."""
    return sorted(_SETS)


def dataset_path(name: str) -> Path:
    """Path of the shipped JSONL file of dataset ``name``."""
    _check_name(name)
    return DATA_DIR / f"{name}.jsonl"


def _check_name(name: object) -> None:
    if not isinstance(name, str) or name not in _SETS:
        raise ValueError(
            f"Unknown dataset {name!r}. Valid names: {', '.join(list_datasets())}. "
            "To load your own file use emlens.data.load_jsonl(path, row_type)."
        )


def load_dataset(name: str) -> list[Example]:
    """Load and validate a shipped dataset by name (see :func:`list_datasets`).

    Returns frozen dataclasses: :class:`PairExample`, :class:`Question` or
    :class:`LabelledAnswer` depending on the set.
    """
    _check_name(name)
    return load_jsonl(dataset_path(name), _SETS[name])


def _type_ok(value: object, annotation: str, field_name: str) -> bool:
    if field_name in _NULLABLE and value is None:
        return True
    if annotation.startswith("bool"):
        return isinstance(value, bool)
    return isinstance(value, str)


def load_jsonl(path: str | os.PathLike, row_type: type) -> list[Example]:
    """Load a JSONL file of ``row_type`` rows, validating every field.

    Raises:
        ValueError: naming the file, the 1-based line and the field for a line that is not JSON,
            a missing or unexpected field, a value of the wrong type, an empty string, a value
            outside its allowed set, or a duplicate id.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"No dataset file at {path}.")
    schema = {f.name: str(f.type) for f in fields(row_type)}
    rows: list[Example] = []
    seen: dict[str, int] = {}
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path.name}:{lineno}"
            try:
                raw = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}: not valid JSON ({e.msg}).") from None
            if not isinstance(raw, dict):
                raise ValueError(f"{where}: expected a JSON object, got {type(raw).__name__}.")
            missing = [k for k in schema if k not in raw]
            if missing:
                raise ValueError(
                    f"{where}: missing field {missing[0]!r}; a {row_type.__name__} row needs "
                    f"{list(schema)}."
                )
            extra = [k for k in raw if k not in schema]
            if extra:
                raise ValueError(
                    f"{where}: unexpected field {extra[0]!r}; allowed fields are {list(schema)}."
                )
            for key, annotation in schema.items():
                value = raw[key]
                if not _type_ok(value, annotation, key):
                    raise ValueError(
                        f"{where}: field {key!r} is {type(value).__name__} ({value!r:.40}); "
                        f"expected {annotation}."
                    )
                if isinstance(value, str) and not value.strip():
                    raise ValueError(f"{where}: field {key!r} is empty.")
                if key in _CHOICES and value not in _CHOICES[key]:
                    raise ValueError(
                        f"{where}: field {key!r} is {value!r}; expected one of {_CHOICES[key]}."
                    )
            if raw["id"] in seen:
                raise ValueError(
                    f"{where}: field 'id' value {raw['id']!r} duplicates line {seen[raw['id']]}."
                )
            seen[raw["id"]] = lineno
            rows.append(row_type(**raw))
    if not rows:
        raise ValueError(f"{path.name}: no rows.")
    return rows


__all__ = [
    "DATA_DIR",
    "Example",
    "LabelledAnswer",
    "PairExample",
    "Question",
    "dataset_path",
    "list_datasets",
    "load_dataset",
    "load_jsonl",
]
