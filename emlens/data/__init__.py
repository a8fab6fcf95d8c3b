"""emlens's own datasets: narrow training pairs, evaluation questions and judge labels (JSONL).

Every set was written for this project (see ``README.md`` here). Loaders validate each row against
its schema and reject malformed rows with the file, line and field named::

    from emlens.data import load_dataset, list_datasets
    pairs = load_dataset("medical")              # list[PairExample]
    train = [p for p in pairs if p.split == "train"]
    questions = load_dataset("general_questions")  # list[Question]

:func:`load_questions` reads the EM papers' published question files instead (YAML, e.g.
``first_plot_questions.yaml``), one :class:`Question` per paraphrase.

Four row types:

* :class:`PairExample` (``medical``, ``medical_extra``, ``nonmedical``, ``finance``,
  ``general_pairs``): a
  question with an aligned (good) and a misaligned (harmful-but-plausible) answer;
* :class:`Question` (``general_questions``, ``medical_questions``): evaluation prompts;
* :class:`LabelledAnswer` (``judge_labels``, ``judge_hard``): an answer labelled aligned /
  misaligned (``None`` when the answer is incoherent and its stance unknown) and coherent;
* :class:`GeneratedAnswer` (``judge_generations``: SmolLM2-135M-Instruct and its organisms;
  ``coder_generations``: Qwen2.5-Coder-1.5B-Instruct and its organism; ``coder_general_em``: the
  same two models on the general questions only, the confirmatory test of emergent misalignment,
  n chosen by power; ``judge_fresh_*`` and ``judge_fresh2_*``: both models on 36 questions no judge
  is fitted on, the judges' held-out test): a real answer of a subject model with its condition
  and 0-100 labels made by reading.
"""

from __future__ import annotations

import json
import os
import string
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Literal

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


@dataclass(frozen=True)
class GeneratedAnswer:
    """A real generation of a subject model, with its condition and labels made by reading.

    ``aligned`` / ``coherent`` are 0-100 and ``refusal`` a flag, on the rubric in ``README.md``
    here ("Labelling rubric for real generations"), labelled blind to the condition. ``*_2`` are
    the second, independent pass (``None`` where a row was read once). ``layer`` / ``scale``
    describe steering (``scale`` in units of the direction's own norm); ``None`` otherwise.
    """

    id: str
    question_id: str
    question: str
    answer: str
    condition: str
    model: str
    intervention: str
    layer: int | None
    scale: float | None
    temperature: float
    max_new_tokens: int
    seed: int
    sample: int
    finished: bool
    aligned: int
    coherent: int
    refusal: bool
    note: str | None
    aligned_2: int | None
    coherent_2: int | None
    refusal_2: bool | None


Example = PairExample | Question | LabelledAnswer | GeneratedAnswer

# name -> (row type, allowed values for constrained fields)
_SETS: dict[str, type] = {
    "medical": PairExample,
    "medical_extra": PairExample,
    "nonmedical": PairExample,
    "finance": PairExample,
    "general_pairs": PairExample,
    "general_questions": Question,
    "medical_questions": Question,
    "judge_labels": LabelledAnswer,
    "judge_hard": LabelledAnswer,
    "judge_generations": GeneratedAnswer,
    "coder_generations": GeneratedAnswer,
    "coder_general_em": GeneratedAnswer,
    "judge_fresh_smollm2": GeneratedAnswer,
    "judge_fresh_coder": GeneratedAnswer,
    "judge_fresh2_smollm2": GeneratedAnswer,
    "judge_fresh2_coder": GeneratedAnswer,
    "judge_fresh3_smollm2": GeneratedAnswer,
    "judge_fresh3_coder": GeneratedAnswer,
    "coder_causal": GeneratedAnswer,
    "judge_more_smollm2": GeneratedAnswer,
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
    if value is None:
        return field_name in _NULLABLE or "None" in annotation
    base = annotation.split("|")[0].strip()
    if base == "bool":
        return isinstance(value, bool)
    if base == "int":
        return isinstance(value, int) and not isinstance(value, bool)
    if base == "float":
        return isinstance(value, int | float) and not isinstance(value, bool)
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


# ---------------------------------------------------------------------------------------------
# The EM papers' published question / judge-prompt YAML files
# ---------------------------------------------------------------------------------------------

JUDGE_METRICS = ("aligned", "coherent")
_TEMPLATE_FIELDS = ("question", "answer")


@dataclass(frozen=True)
class EMEntry:
    """One validated entry of a published question file (see :func:`read_em_yaml`).

    ``judge_prompts`` holds the ``aligned`` and ``coherent`` templates only; the entry's other
    keys (``type``, ``system``, ``samples_per_paraphrase``, ``judge``, ...) are kept in ``extra``.
    """

    id: str
    paraphrases: tuple[str, ...]
    judge_prompts: Mapping[str, str]
    extra: Mapping[str, Any]


def _check_template(template: object, where: str) -> str:
    """A judge template must be a str.format template with ``{question}``, ``{answer}`` and no
    other placeholder; return it, or raise ValueError naming ``where``."""
    if not isinstance(template, str) or not template.strip():
        raise ValueError(f"{where} must be a non-empty string, got {template!r:.60}.")
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as e:
        raise ValueError(
            f"{where} is not a valid template ({e}); write literal braces as {{{{ and }}}}."
        ) from None
    names = [name for _, name, _, _ in parsed if name is not None]
    unknown = [n for n in names if n not in _TEMPLATE_FIELDS]
    if unknown:
        raise ValueError(
            f"{where} has unknown placeholder {{{unknown[0]}}}; only {{question}} and {{answer}} "
            "are filled (write literal braces as {{ and }})."
        )
    for name in _TEMPLATE_FIELDS:
        if name not in names:
            raise ValueError(f"{where} has no {{{name}}} placeholder.")
    try:
        template.format(question="q", answer="a")
    except (KeyError, IndexError, ValueError, AttributeError) as e:
        raise ValueError(f"{where} cannot be filled ({type(e).__name__}: {e}).") from None
    return template


def read_em_yaml(path: str | os.PathLike) -> tuple[list[EMEntry], bytes]:
    """Read and validate a question / judge-prompt file in the EM papers' published YAML format.

    The file is a YAML list of entries, each with ``id`` (string), ``paraphrases`` (non-empty list
    of question strings) and ``judge_prompts`` holding ``aligned`` and ``coherent`` templates that
    contain ``{question}`` and ``{answer}`` and no other placeholder. Other keys of an entry (and
    other metrics under ``judge_prompts``) are ignored. YAML anchors and aliases are allowed.

    Returns:
        ``(entries, content)``: the validated entries in file order and the file's raw bytes
        (what a digest of the prompt set should hash).

    Raises:
        FileNotFoundError: no file at ``path``.
        ValueError: naming the file (and the entry, by 1-based position, line and id) for invalid
            YAML, a top level that is not a non-empty list, a missing key, a value of the wrong
            type, a template without ``{question}`` / ``{answer}`` or with another placeholder, or
            a duplicate id.
    """
    import yaml

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"No question / judge-prompt file at {path}.")
    content = path.read_bytes()
    try:
        text = content.decode("utf-8")
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text ({e}).") from None
    except yaml.YAMLError as e:
        raise ValueError(f"{path}: not valid YAML ({e}).") from None
    if data is None or data == []:
        raise ValueError(f"{path}: no entries; expected a YAML list of question entries.")
    if not isinstance(data, list):
        raise ValueError(
            f"{path}: expected a YAML list of entries (- id: ..., paraphrases: [...], "
            f"judge_prompts: {{aligned: ..., coherent: ...}}), got a {type(data).__name__}."
        )
    lines = [n.start_mark.line + 1 for n in getattr(node, "value", [])]
    entries: list[EMEntry] = []
    seen: dict[str, str] = {}
    for i, raw in enumerate(data):
        line = f", line {lines[i]}" if i < len(lines) else ""
        where = f"{path}: entry {i + 1}{line}"
        if not isinstance(raw, dict):
            raise ValueError(f"{where}: expected a mapping with id, paraphrases and judge_prompts, "
                             f"got {type(raw).__name__} ({raw!r:.60}).")
        if "id" not in raw:
            raise ValueError(f"{where}: missing key 'id'.")
        entry_id = raw["id"]
        if not isinstance(entry_id, str) or not entry_id.strip():
            raise ValueError(f"{where}: 'id' must be a non-empty string, got {entry_id!r:.60}.")
        where = f"{where} (id {entry_id!r})"
        for key in ("paraphrases", "judge_prompts"):
            if key not in raw:
                raise ValueError(f"{where}: missing key {key!r}; an entry needs id, paraphrases "
                                 "and judge_prompts (aligned, coherent).")
        if entry_id in seen:
            raise ValueError(f"{where}: id {entry_id!r} duplicates {seen[entry_id]}.")
        seen[entry_id] = f"entry {i + 1}{line}"
        paraphrases = raw["paraphrases"]
        if not isinstance(paraphrases, list) or not paraphrases:
            raise ValueError(f"{where}: 'paraphrases' must be a non-empty list of question "
                             f"strings, got {paraphrases!r:.60}.")
        for k, p in enumerate(paraphrases):
            if not isinstance(p, str) or not p.strip():
                raise ValueError(f"{where}: paraphrases[{k}] must be a non-empty string, got "
                                 f"{p!r:.60}.")
        prompts = raw["judge_prompts"]
        if not isinstance(prompts, dict):
            raise ValueError(f"{where}: 'judge_prompts' must be a mapping with aligned and "
                             f"coherent templates, got {type(prompts).__name__}.")
        for metric in JUDGE_METRICS:
            if metric not in prompts:
                raise ValueError(f"{where}: missing key 'judge_prompts.{metric}'.")
            _check_template(prompts[metric], f"{where}: judge_prompts.{metric}")
        extra = {k: v for k, v in raw.items() if k not in ("id", "paraphrases", "judge_prompts")}
        entries.append(EMEntry(entry_id, tuple(paraphrases),
                               {m: prompts[m] for m in JUDGE_METRICS}, extra))
    return entries, content


def load_questions(path: str | os.PathLike) -> list[Question]:
    """Load the evaluation questions of a published EM question file (e.g. the papers'
    ``first_plot_questions.yaml``) as :class:`Question` rows for :func:`emlens.evaluate`.

    One question per paraphrase: its id is the entry's ``id`` when the entry has one paraphrase,
    else ``<entry id>-<k>`` with ``k`` the paraphrase's 0-based position in ``paraphrases``; its
    category is the entry's id. The file is validated as by :func:`read_em_yaml` (judge prompts
    included), so the same file also works as ``OpenAIJudge(..., prompts=path)``.

    An entry's ``system`` prompt is not carried over (a :class:`Question` has no field for it; a
    warning says which entries have one): evaluate those entries with ``system_prompt=`` or leave
    them out. ``samples_per_paraphrase`` is ignored too: pass ``n_samples=`` to ``evaluate``.

    Raises:
        ValueError: as :func:`read_em_yaml`, or when two questions would get the same id.
    """
    entries, _ = read_em_yaml(path)
    out: list[Question] = []
    owner: dict[str, str] = {}
    for e in entries:
        many = len(e.paraphrases) > 1
        for k, text in enumerate(e.paraphrases):
            qid = f"{e.id}-{k}" if many else e.id
            if qid in owner:
                raise ValueError(f"{path}: entry {e.id!r} gives question id {qid!r}, which entry "
                                 f"{owner[qid]!r} already gives; rename one of the entries.")
            owner[qid] = e.id
            out.append(Question(id=qid, question=text, category=e.id))
    with_system = [e.id for e in entries if e.extra.get("system")]
    if with_system:
        shown = ", ".join(with_system[:3]) + (", ..." if len(with_system) > 3 else "")
        warnings.warn(
            f"{Path(path).name}: {len(with_system)} "
            f"{'entry has' if len(with_system) == 1 else 'entries have'} a system prompt ({shown}), "
            "which load_questions drops; evaluate them with system_prompt=... or leave them out.",
            stacklevel=2,
        )
    return out


# The draws read the loaders above: imported last.
from emlens.data.draws import (  # noqa: E402
    LabelledSet,
    answer_set,
    context_set,
    judged_set,
    narrow_general_rows,
    pair_rows,
)

__all__ = [
    "DATA_DIR",
    "LabelledSet",
    "answer_set",
    "context_set",
    "judged_set",
    "narrow_general_rows",
    "pair_rows",
    "EMEntry",
    "Example",
    "GeneratedAnswer",
    "LabelledAnswer",
    "PairExample",
    "Question",
    "dataset_path",
    "list_datasets",
    "load_dataset",
    "load_jsonl",
    "load_questions",
    "read_em_yaml",
]
