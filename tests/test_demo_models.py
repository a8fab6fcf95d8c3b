"""The demo's model: any name of an embedded model gives exactly that model's demo."""

from __future__ import annotations

import pytest

import emlens
import emlens.organisms
from emlens.demo import run as demo_run
from emlens.demo.common import model_key


@pytest.mark.parametrize("name", [None, "smollm2-135m", "SmolLM2", "smollm2-135m-instruct"])
def test_every_name_of_the_default_model_is_the_default(name):
    assert model_key(name) is None


@pytest.mark.parametrize("name", ["qwen2.5-coder-1.5b", "Qwen-Coder-1.5B",
                                  "qwen2.5-coder-1.5b-instruct"])
def test_every_alias_of_the_coder_is_its_registry_key(name):
    assert model_key(name) == "qwen2.5-coder-1.5b"


def test_other_models_keep_their_name(tmp_path):
    assert model_key("Qwen/Qwen2.5-14B-Instruct") == "Qwen/Qwen2.5-14B-Instruct"
    assert model_key(str(tmp_path)) == str(tmp_path)


class _Stop(Exception):
    pass


def _settings_seen(monkeypatch, tmp_path, name):
    """What run_demo decides for ``name`` before loading anything: the name it loads, the
    temperature and the organism."""
    seen = {}

    def spy_temperature(model_name, measured):
        seen["temperature_for"] = model_name
        return real_temperature(model_name, measured)

    def spy_organism(model_name):
        seen["organism"] = real_organism(model_name)
        return seen["organism"]

    def stop(model_name, **kwargs):
        seen["loaded"] = model_name
        raise _Stop

    real_temperature, real_organism = demo_run.choose_temperature, emlens.organisms.default_organism
    monkeypatch.setattr(demo_run, "choose_temperature", spy_temperature)
    monkeypatch.setattr(emlens.organisms, "default_organism", spy_organism)
    monkeypatch.setattr(emlens, "load_model", stop)
    with pytest.raises(_Stop):
        demo_run.run_demo(model_name=name, quick=True, out=tmp_path / str(name), progress=False)
    return seen


def test_the_default_model_s_own_key_gives_the_default_demo(monkeypatch, tmp_path):
    default = _settings_seen(monkeypatch, tmp_path, None)
    for alias in ("smollm2-135m", "SmolLM2"):
        assert _settings_seen(monkeypatch, tmp_path, alias) == default
    assert default["loaded"] is None and default["organism"] == "rank1-down-medical"
