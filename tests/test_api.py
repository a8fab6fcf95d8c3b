"""The public API: the grouped top level, parameter names, the API tour (docs/tour.md)."""

import re
from pathlib import Path

import pytest
import torch

import emlens


def test_top_level_exports_exist_and_are_few():
    assert len(emlens.__all__) == len(set(emlens.__all__)) <= 42
    for name in emlens.__all__:
        assert getattr(emlens, name) is not None
    contract = ["load_model", "steer", "ablate", "generate", "merge_lora", "attach_lora",
                "default_judge", "collect_means", "mean_diff", "sweep", "fit_probe", "Direction",
                "save_directions", "load_directions", "ablation_experiment", "SamplingConfig"]
    assert set(contract) <= set(emlens.__all__)


def test_unknown_name_is_a_plain_attribute_error():
    with pytest.raises(AttributeError, match="has no attribute 'nope'"):
        emlens.nope  # noqa: B018


def test_api_tour_names_every_export():
    tour = (Path(__file__).parents[1] / "docs" / "tour.md").read_text()
    missing = [n for n in emlens.__all__ if not re.search(rf"\b{n}\b", tour)]
    assert not missing, f"the API tour (docs/tour.md) does not mention {missing}"


def test_steer_takes_layers_only(tiny_model):
    d = torch.randn(tiny_model.cfg.d_model)
    with emlens.steer(tiny_model, d, layers=1, scale=2.0) as hooks:
        assert [name for name, _ in hooks] == ["blocks.1.hook_resid_post"]
    with pytest.raises(TypeError):
        with emlens.steer(tiny_model, d, layer=3, scale=1.0):
            pass
    with pytest.raises(TypeError, match="layer"):
        emlens.steering_hooks(tiny_model, d, layer=[0, 1], scale=1.0)
    with pytest.raises(TypeError, match="layers"):
        emlens.steering_hooks(tiny_model, d, scale=1.0)


@pytest.mark.integration
def test_cli_steer_prints_both_answers(capsys):
    from emlens.cli import main

    assert main(["steer", "--max-new-tokens", "4", "--layer", "10"]) == 0
    out = capsys.readouterr().out
    assert "Mean-difference direction at layer 10: norm" in out
    assert "Chat model:" in out and "Steered (+4.0 x direction at layer 10)" in out
