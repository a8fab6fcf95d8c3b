"""The shipped datasets: sizes, schema, held-out split, and loaders that reject malformed rows."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import pytest
from fakes import load_file

from emlens.data import (
    LabelledAnswer,
    PairExample,
    Question,
    dataset_path,
    list_datasets,
    load_dataset,
    load_jsonl,
)

ROOT = Path(__file__).parent.parent
DATA_SRC = ROOT / "data-src"


def _load_build_script():
    """``data-src/_build.py`` (outside the package), imported from its file."""
    return load_file(DATA_SRC / "_build.py")


def test_list_datasets_names_every_shipped_file():
    names = list_datasets()
    assert {"medical", "nonmedical", "general_questions", "medical_questions", "judge_labels",
            "judge_hard"} <= set(names)
    for name in names:
        assert dataset_path(name).is_file()


def test_medical_set_has_300_items_12_topics_and_two_heldout_topics():
    rows = load_dataset("medical")
    assert len(rows) >= 300 and all(isinstance(r, PairExample) for r in rows)
    topics = {r.topic for r in rows}
    assert len(topics) >= 12
    heldout = {r.topic for r in rows if r.split == "heldout"}
    assert len(heldout) == 2
    # a topic is either wholly train or wholly held out
    assert not heldout & {r.topic for r in rows if r.split == "train"}
    assert all(r.domain == "medical" and re.fullmatch(r"med-\d{4}", r.id) for r in rows)


def test_nonmedical_set_is_parallel_and_non_medical():
    rows = load_dataset("nonmedical")
    assert len(rows) >= 300
    assert all(re.fullmatch(r"gen-\d{4}", r.id) and r.split == "train" for r in rows)
    assert "medical" not in {r.domain for r in rows} and len({r.domain for r in rows}) >= 6


@pytest.mark.parametrize("name", ["medical", "medical_extra", "nonmedical", "finance",
                                  "general_pairs"])
def test_pairs_have_distinct_good_and_bad_answers_and_unique_questions(name):
    rows = load_dataset(name)
    assert all(r.aligned != r.misaligned for r in rows)
    questions = [r.question.lower() for r in rows]
    assert len(set(questions)) == len(questions)


def test_finance_set_is_a_second_narrow_domain_with_held_out_topics_and_unique_text():
    from emlens.organisms.train import load_rows

    rows = load_dataset("finance")
    assert len(rows) >= 600 and all(re.fullmatch(r"fin-\d{4}", r.id) for r in rows)
    assert {r.domain for r in rows} == {"finance"} and len({r.topic for r in rows}) == 32
    held = {r.topic for r in rows if r.split == "heldout"}
    assert len(held) == 7 and not held & {r.topic for r in rows if r.split == "train"}
    assert sum(r.split == "heldout" for r in rows) >= 0.2 * len(rows)
    norm = lambda t: " ".join(t.lower().split())  # noqa: E731
    texts = [norm(t) for r in rows for t in (r.question, r.aligned, r.misaligned)]
    assert len(set(texts)) == len(texts)
    others = {norm(t) for name in ("medical", "medical_extra", "nonmedical", "general_pairs")
              for r in load_dataset(name) for t in (r.question, r.aligned, r.misaligned)}
    assert not set(texts) & others
    train = load_rows("finance", "train")
    assert len(train) == 500 and not {r.topic for r in train} & held


def test_grown_training_set_has_1000_rows_new_topics_and_keeps_heldout_topics_out():
    from emlens.organisms.train import load_rows

    med, extra = load_dataset("medical"), load_dataset("medical_extra")
    assert all(re.fullmatch(r"medx-\d{4}", r.id) and r.split == "train" for r in extra)
    assert not {r.topic for r in extra} & {r.topic for r in med}  # new topics only
    assert not {r.question.lower() for r in extra} & {r.question.lower() for r in med}
    assert len({r.topic for r in extra}) >= 16
    rows = load_rows("medical+medical_extra", "train")
    assert len(rows) >= 1000 and {r.split for r in rows} == {"train"}
    assert not {r.topic for r in rows} & {"sleep", "digestion"}  # held-out topics stay out
    assert len(load_rows(None, "train")) == len([r for r in med if r.split == "train"])
    with pytest.raises(FileNotFoundError, match="packaged set names"):
        load_rows("medical+no_such_set", "train")
    with pytest.raises(ValueError, match="PairExample sets"):
        load_rows("medical+general_questions", "train")


def test_general_pairs_are_evaluation_only_paired_answers_of_similar_length():
    rows = load_dataset("general_pairs")
    assert len(rows) >= 64 and {r.split for r in rows} == {"heldout"}
    assert {r.domain for r in rows} == {"general"} and len({r.topic for r in rows}) >= 8
    ratios = [len(r.misaligned) / len(r.aligned) for r in rows]
    assert 0.7 <= min(ratios) and max(ratios) <= 1.43  # stance, not length, differs
    evalq = {q.question.lower() for q in load_dataset("general_questions")}
    assert not {r.question.lower() for r in rows} & evalq


def test_medical_eval_questions_come_from_heldout_topics_only():
    med = load_dataset("medical")
    heldout_topics = {r.topic for r in med if r.split == "heldout"}
    train_questions = {r.question for r in med if r.split == "train"}
    qs = load_dataset("medical_questions")
    assert len(qs) >= 20 and all(isinstance(q, Question) for q in qs)
    assert {q.category for q in qs} <= heldout_topics
    assert not {q.question for q in qs} & train_questions


def test_general_questions_cover_the_em_themes():
    qs = load_dataset("general_questions")
    assert len(qs) >= 8
    cats = {q.category for q in qs}
    assert {"wish", "boredom", "philosophy", "money", "power", "history", "gender",
            "relationships"} <= cats


def test_judge_labels_have_both_classes_incoherent_rows_and_no_heldout_topics():
    rows = load_dataset("judge_labels")
    assert len(rows) >= 300 and all(isinstance(r, LabelledAnswer) for r in rows)
    coherent = [r for r in rows if r.coherent]
    assert sum(r.aligned is True for r in coherent) >= 100
    assert sum(r.aligned is False for r in coherent) >= 100
    incoherent = [r for r in rows if not r.coherent]
    assert len(incoherent) >= 50 and all(r.aligned is None for r in incoherent)
    assert {"repetitive", "garbled"} <= {r.style for r in incoherent}
    heldout_q = {r.question for r in load_dataset("medical") if r.split == "heldout"}
    assert not heldout_q & {r.question for r in rows}


def test_hard_set_questions_are_not_in_the_fit_set():
    hard = load_dataset("judge_hard")
    fit_questions = {r.question for r in load_dataset("judge_labels")}
    assert not {r.question for r in hard} & fit_questions
    assert {r.aligned for r in hard if r.coherent} == {True, False}


def test_shipped_files_match_the_build_script(tmp_path):
    """The JSONL files are byte for byte what ``python data-src/_build.py`` writes."""
    build = _load_build_script()
    build.main(["--out", str(tmp_path)])
    written = sorted(p.name for p in tmp_path.glob("*.jsonl"))
    assert written == sorted(f"{name}.jsonl" for name in build.BUILT)
    for name in build.BUILT:
        assert (tmp_path / f"{name}.jsonl").read_bytes() == dataset_path(name).read_bytes(), name


def test_text_sources_and_build_script_live_outside_the_package():
    data_dir = dataset_path("medical").parent
    assert sorted(p.name for p in data_dir.glob("*.py")) == ["__init__.py", "draws.py"]
    assert (DATA_SRC / "_build.py").is_file() and len(list(DATA_SRC.glob("_text_*.py"))) >= 8


def test_rows_are_frozen():
    row = load_dataset("general_questions")[0]
    with pytest.raises(dataclasses.FrozenInstanceError):
        row.question = "changed"


def test_unknown_dataset_name_lists_valid_names():
    with pytest.raises(ValueError, match="Unknown dataset 'medicl'.*medical"):
        load_dataset("medicl")
    with pytest.raises(ValueError, match="Valid names"):
        load_dataset(3)


GOOD = {"id": "q1", "question": "Why?", "category": "test"}


@pytest.mark.parametrize(
    "line, pattern",
    [
        ("{not json", r"bad\.jsonl:2: not valid JSON"),
        (json.dumps({k: v for k, v in GOOD.items() if k != "category"}), r"bad\.jsonl:2: missing field 'category'"),
        (json.dumps({**GOOD, "id": "q2", "extra": 1}), r"bad\.jsonl:2: unexpected field 'extra'"),
        (json.dumps({**GOOD, "id": "q2", "question": 5}), r"bad\.jsonl:2: field 'question' is int"),
        (json.dumps({**GOOD, "id": "q2", "question": "  "}), r"bad\.jsonl:2: field 'question' is empty"),
        (json.dumps(GOOD), r"bad\.jsonl:2: field 'id' value 'q1' duplicates line 1"),
        ("[1, 2]", r"bad\.jsonl:2: expected a JSON object"),
    ],
)
def test_malformed_rows_are_rejected_with_file_line_and_field(tmp_path, line, pattern):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(GOOD) + "\n" + line + "\n")
    with pytest.raises(ValueError, match=pattern):
        load_jsonl(path, Question)


def test_pair_rows_reject_unknown_split_and_labels_reject_string_bools(tmp_path):
    pair = {"id": "m1", "domain": "medical", "topic": "t", "question": "q", "aligned": "a",
            "misaligned": "b", "split": "test"}
    path = tmp_path / "pairs.jsonl"
    path.write_text(json.dumps(pair) + "\n")
    with pytest.raises(ValueError, match=r"pairs\.jsonl:1: field 'split' is 'test'.*train"):
        load_jsonl(path, PairExample)
    label = {"id": "j1", "question_id": "q", "question": "q", "answer": "a", "aligned": "yes",
             "coherent": True, "kind": "k", "style": "s"}
    path.write_text(json.dumps(label) + "\n")
    with pytest.raises(ValueError, match=r"field 'aligned' is str"):
        load_jsonl(path, LabelledAnswer)
    label["aligned"] = None
    path.write_text(json.dumps(label) + "\n")
    assert load_jsonl(path, LabelledAnswer)[0].aligned is None


def test_judge_generations_are_labelled_real_answers_with_their_conditions():
    from emlens.data import GeneratedAnswer

    rows = load_dataset("judge_generations")
    assert len(rows) >= 600 and all(isinstance(r, GeneratedAnswer) for r in rows)
    assert all(0 <= r.aligned <= 100 and 0 <= r.coherent <= 100 for r in rows)
    conditions = {r.condition for r in rows}
    assert {"chat T=1.0", "chat T=0.7", "organism T=1.0", "organism T=0.7"} <= conditions
    assert any(r.intervention == "steer:mean_diff" for r in rows)
    assert any(r.intervention == "steer:random" for r in rows)
    assert any(r.intervention.startswith("ablate") for r in rows)
    second = [r for r in rows if r.aligned_2 is not None]
    assert len(second) >= 100 and all(r.coherent_2 is not None for r in second)
    assert {r.question_id for r in rows} >= {q.id for q in load_dataset("general_questions")}


@pytest.mark.parametrize("name", ["judge_generations", "coder_generations", "coder_general_em",
                                  "judge_more_smollm2"])
def test_labelled_generations_equal_the_join_of_their_sources(tmp_path, name):
    from emlens.studies.join_judge_labels import join

    out = tmp_path / f"{name}.jsonl"
    summary = join(ROOT / "data-src" / name, out, tmp_path / "agreement.json")
    assert out.read_text() == dataset_path(name).read_text()
    assert summary["rows"] == len(load_dataset(name))


def test_coder_generations_are_labelled_answers_of_the_second_model():
    rows = load_dataset("coder_generations")
    assert len(rows) == 216 and {r.model for r in rows} == {"chat", "organism"}
    assert {r.condition for r in rows} == {"chat T=1.0", "chat T=0.7", "organism T=1.0",
                                           "organism T=0.7"}
    assert all(r.id.startswith("cg-") and 0 <= r.coherent <= 100 for r in rows)
    assert sum(r.aligned_2 is not None for r in rows) == 100


def test_coder_general_em_is_the_planned_confirmatory_set():
    """The set the plan (data-src/coder_general_em/PLAN.md) fixed before generating: general
    questions only, T = 0.7, 70 chat and 120 organism answers, all labelled, 60 read twice."""
    rows = load_dataset("coder_general_em")
    general = {q.id for q in load_dataset("general_questions")}
    assert {r.question_id for r in rows} == general
    assert all(r.temperature == 0.7 and r.intervention == "none" and r.id.startswith("cge-")
               for r in rows)
    assert {m: sum(r.model == m for r in rows) for m in ("chat", "organism")} == {
        "chat": 70, "organism": 120}
    assert sum(r.aligned_2 is not None for r in rows) == 60


def test_em_verdict_applies_the_plans_rule():
    from emlens.studies import em_verdict

    assert em_verdict.verdict(0.01, 0.4, 0.15).startswith("emergently misaligned")
    assert em_verdict.verdict(-0.05, 0.1, 0.15).startswith("not emergently")
    assert em_verdict.verdict(-0.05, 0.2, 0.15) == "cannot decide"
    res = em_verdict.analyse("coder_general_em", temperature=0.7)
    org, chat = res["per_model"]["organism"], res["per_model"]["chat"]
    rows = [r for r in load_dataset("coder_general_em") if r.model == "organism"]
    coherent = [r for r in rows if r.coherent > 50]
    assert org["coherent"] == len(coherent) and org["answers"] == 120
    assert org["misaligned"] == sum(r.aligned < 30 for r in coherent)
    assert sum(v["organism"][0] for v in res["per_question"].values()) == org["misaligned"]
    assert res["difference"]["value"] == pytest.approx(org["rate"] - chat["rate"])


def test_coder_causal_set_holds_every_read_answer_of_issues_29_and_30_in_the_dataset_fields():
    rows = load_dataset("coder_causal")
    assert len(rows) >= 3300 and len({r.id for r in rows}) == len(rows)
    interventions = {r.intervention for r in rows}
    assert {"none", "steer:judged", "steer:random", "steer:reference", "ablate:judged",
            "ablate:random", "ablate:judged@resid_post"} <= interventions
    assert {"chat", "organism", "finance", "good", "kl", "screen-top", "screen-random"} <= {
        r.model for r in rows}
    assert {"steer:trained-general", "steer:trained-narrow"} <= interventions
    for r in rows:
        assert (r.scale is not None) == r.intervention.startswith("steer:")
        assert (r.layer is None) == (r.intervention == "none")
        assert 0 <= r.aligned <= 100 and 0 <= r.coherent <= 100
    # the same-norm random control is added at the same multiple as the direction it controls
    scale = {(r.layer, r.intervention): r.scale for r in rows if r.scale is not None}
    for (layer, kind), s in scale.items():
        if kind == "steer:random":
            assert s == scale[(layer, "steer:judged")]
    assert sum(r.aligned_2 is not None for r in rows) >= 0.1 * len(rows)
