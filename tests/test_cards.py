"""Model cards: one per embedded model, resolved from any of its names, naming files that ship."""

from __future__ import annotations

import json
from dataclasses import FrozenInstanceError
from pathlib import Path

import pytest

from emlens.cards import DEFAULT_CARD, MODEL_CARDS, ModelCard, model_card
from emlens.embedded import DEFAULT_EMBEDDED, EMBEDDED_MODELS


def test_every_embedded_model_has_one_card():
    assert set(MODEL_CARDS) == set(EMBEDDED_MODELS)
    for key, card in MODEL_CARDS.items():
        assert card.key == key and card.embedded is EMBEDDED_MODELS[key]
        assert card.aliases == card.embedded.aliases
    assert DEFAULT_CARD.key == DEFAULT_EMBEDDED and model_card(None) is DEFAULT_CARD


@pytest.mark.parametrize("card", MODEL_CARDS.values(), ids=list(MODEL_CARDS))
def test_every_name_of_an_embedded_model_resolves_to_its_card(card):
    for name in (card.key, card.name, *card.aliases):
        for spelling in (name, name.upper(), f"  {name.title()} "):
            assert model_card(spelling) is card, spelling
    assert model_card(card) is card  # resolving a card again changes nothing


def test_a_local_path_or_hub_id_gets_a_generic_card_with_no_shipped_facts(tmp_path):
    folder = tmp_path / "smollm2"  # an existing folder wins over an embedded model's name
    folder.mkdir()
    for source, key in ((str(folder), str(folder)), (Path("smollm2"), "smollm2"),
                        ("Qwen/Qwen2.5-7B-Instruct", "Qwen/Qwen2.5-7B-Instruct")):
        card = model_card(source)
        assert card == ModelCard(key=key) and card.source == key and card.name == key
        assert card.embedded is None and card.files() == [] and card.names == (key,)
        assert None is card.organism is card.transfer_organism is card.labelled_generations
        assert None is card.judge_check is card.validated_judge is card.narrow_vs_general


def test_a_card_is_frozen():
    with pytest.raises(FrozenInstanceError):
        DEFAULT_CARD.organism = "another"


@pytest.mark.parametrize("card", MODEL_CARDS.values(), ids=list(MODEL_CARDS))
def test_every_embedded_model_s_card_names_files_and_data_that_ship(card):
    from emlens.data import load_dataset
    from emlens.judge.probe import VALIDATED_JUDGES, ProbeJudge
    from emlens.organisms import ORGANISM_BASES, ORGANISMS_DIR, list_organisms

    assert card.files() and all(f.is_file() for f in card.files()), card.files()
    # the organism ships and was trained on this model
    assert card.organism in list_organisms() and ORGANISM_BASES[card.organism] == card.key
    if card.transfer_organism is not None:
        assert (ORGANISMS_DIR / card.transfer_organism / "adapter_config.json").is_file()
    if card.narrow_vs_general is not None:
        assert (ORGANISMS_DIR / card.narrow_vs_general / "summary.json").is_file()
    labelled = load_dataset(card.labelled_generations)
    assert {r.model for r in labelled} >= {"chat", "organism"}
    # the check was measured for the judge the card validates, on the labelled sets it names
    check = json.loads(card.judge_check.read_text())
    assert check["judge"] == ProbeJudge.load(card.validated_judge).name
    assert VALIDATED_JUDGES[card.key] == card.validated_judge
    for name in check["labelled_sets"]:
        assert len(load_dataset(name))
