"""The demo's model: any name of an embedded model gives exactly that model's demo."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

import emlens
import emlens.judge
import emlens.lora
from emlens.cards import DEFAULT_CARD, MODEL_CARDS, QWEN_CODER_CARD, model_card
from emlens.demo import lenses
from emlens.demo import run as demo_run

SECTIONS = ("rates", "judge_check", "read_verdicts", "steering", "ablation", "probes",
            "attribution", "narrow_general")


def _spellings(card) -> list[str]:
    """Every name of an embedded model, as written and in upper and mixed case."""
    names = [card.key, card.name, *card.aliases]
    return sorted({n for name in names for n in (name, name.upper(), name.title())})


@pytest.mark.parametrize("name", [None, "smollm2-135m", "SmolLM2", "smollm2-135m-instruct"])
def test_every_name_of_the_default_model_is_the_default(name):
    assert model_card(name) is DEFAULT_CARD


@pytest.mark.parametrize("name", ["qwen2.5-coder-1.5b", "Qwen-Coder-1.5B",
                                  "qwen2.5-coder-1.5b-instruct"])
def test_every_alias_of_the_coder_is_its_registry_key(name):
    assert model_card(name) is QWEN_CODER_CARD and model_card(name).key == "qwen2.5-coder-1.5b"


def test_other_models_keep_their_name(tmp_path):
    assert model_card("Qwen/Qwen2.5-14B-Instruct").key == "Qwen/Qwen2.5-14B-Instruct"
    assert model_card(str(tmp_path)).key == model_card(tmp_path).key == str(tmp_path)


class _Stop(Exception):
    pass


def _demo_seen(monkeypatch, tmp_path, name, **kwargs):
    """What run_demo decides for ``name`` and hands every section, without loading a model or
    running a section: the model it loads, the organism, the judge's subject, the report's title
    and settings, the temperature and why, and per section its arguments (other than earlier
    sections' results) and the Context's card, settings, sampling and question sets."""
    seen = {"sections": []}

    def load_model(source, **kw):
        seen["loaded"] = source
        return SimpleNamespace(name="chat")

    def resolve_adapter(organism):
        seen["adapter"] = organism
        return SimpleNamespace(name="adapter")

    def default_judge(*, subject=None, progress=False):
        seen["judge_subject"] = subject
        return SimpleNamespace(name="judge")

    def spy(section):
        def measure(ctx, *args):
            plain = tuple(a for a in args if not isinstance(a, SimpleNamespace))
            seen["sections"].append((section, plain, ctx.card,
                                     ctx.card.narrow_vs_general is not None, ctx.cfg,
                                     ctx.sampling, dict(ctx.qsets), ctx.seed, ctx.temperature_why))
            return SimpleNamespace(answers=None, findings=())
        return measure

    def stop(result, rep):
        temperature = rep.results["temperature"]
        measured = temperature["measured"]
        seen.update(title=rep.title, settings=rep.results["settings"],
                    temperature=(temperature["value"], temperature["why"],
                                 None if measured is None else measured.to_dict("records")))
        raise _Stop

    monkeypatch.setattr(emlens, "load_model", load_model)
    monkeypatch.setattr(demo_run, "resolve_adapter", resolve_adapter)
    monkeypatch.setattr(emlens.lora, "merge_lora", lambda chat, adapter: SimpleNamespace())
    monkeypatch.setattr(emlens.judge, "default_judge", default_judge)
    for section in SECTIONS:
        monkeypatch.setattr(getattr(demo_run, section), "measure", spy(section))
        monkeypatch.setattr(getattr(demo_run, section), "render", lambda result, rep: None)
    monkeypatch.setattr(lenses, "measure_power", lambda *args: None)
    monkeypatch.setattr(lenses, "render_power", stop)
    with pytest.raises(_Stop):
        demo_run.run_demo(model_name=name, quick=True, out=tmp_path / "report", progress=False,
                          **kwargs)
    return seen


@pytest.mark.parametrize("card", MODEL_CARDS.values(), ids=list(MODEL_CARDS))
def test_every_name_of_an_embedded_model_gives_the_same_demo(monkeypatch, tmp_path, card):
    reference = _demo_seen(monkeypatch, tmp_path, card.key)
    assert [s[0] for s in reference["sections"]] == list(SECTIONS)
    assert all(s[2] is card for s in reference["sections"])  # every section reads the card
    assert reference["loaded"] == card.key and reference["adapter"] == card.organism
    assert reference["judge_subject"] is card and reference["settings"]["model"] == card.key
    assert reference["title"].endswith(card.name)
    for name in _spellings(card) + ([None] if card is DEFAULT_CARD else []):
        assert model_card(name) is card, name
        assert _demo_seen(monkeypatch, tmp_path, name) == reference, name


def test_the_default_model_s_demo_has_its_shipped_facts(monkeypatch, tmp_path):
    seen = _demo_seen(monkeypatch, tmp_path, None)
    settings = seen["settings"]
    assert settings["organism"] == "rank1-down-medical" == DEFAULT_CARD.organism
    assert settings["transfer_organism"] == DEFAULT_CARD.transfer_organism is not None
    assert settings["temperature"] == 0.7 and seen["temperature"][2] is not None
    ablation = next(s for s in seen["sections"] if s[0] == "ablation")
    assert ablation[1] == (DEFAULT_CARD.transfer_organism,)
    assert all(s[3] for s in seen["sections"])  # the shipped narrow/general runs fit


def test_the_coder_s_demo_has_its_own_facts_and_no_borrowed_ones(monkeypatch, tmp_path):
    seen = _demo_seen(monkeypatch, tmp_path, "Qwen-Coder-1.5B")
    settings = seen["settings"]
    assert settings["organism"] == "coder-rank1-down-medical"
    assert settings["transfer_organism"] is None  # SmolLM2's second fine-tune does not fit it
    assert seen["temperature"][2] is not None  # chosen from its own labelled answers
    assert not any(s[3] for s in seen["sections"])  # the narrow/general runs are SmolLM2's
    with pytest.raises(ValueError, match="train=True.*--organism"):
        _demo_seen(monkeypatch, tmp_path, "qwen2.5-coder-1.5b", train=True)


def test_a_model_without_a_card_gets_a_generic_one(monkeypatch, tmp_path):
    hub = "Qwen/Qwen2.5-7B-Instruct"
    with pytest.raises(ValueError, match="No shipped organism.*--organism"):
        _demo_seen(monkeypatch, tmp_path, hub)
    seen = _demo_seen(monkeypatch, tmp_path, hub, organism="my-adapter")
    card = seen["sections"][0][2]
    assert card == model_card(hub) and card.embedded is None and card.organism is None
    assert seen["loaded"] == hub and seen["adapter"] == "my-adapter"
    assert seen["judge_subject"] is None  # the general default judge: none validated on it
    assert seen["settings"]["transfer_organism"] is None
    assert seen["settings"]["temperature"] == 1.0 and seen["temperature"][2] is None
    kept = _demo_seen(monkeypatch, tmp_path, hub, organism="a", transfer_organism="b")
    assert kept["settings"]["transfer_organism"] == "b"  # given explicitly: kept
