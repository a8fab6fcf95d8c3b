"""SamplingConfig: one set of defaults, validated once, accepted by every generating function."""

import dataclasses

import pytest

import emlens
from emlens.sampling import FIELDS, SamplingConfig


def test_config_is_frozen_and_validated():
    cfg = SamplingConfig(n_samples=2)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.n_samples = 3
    with pytest.raises(ValueError, match="max_new_tokens must be >= 1"):
        cfg.replace(max_new_tokens=0)
    with pytest.raises(TypeError, match="system_prompt must be a str"):
        SamplingConfig(system_prompt=3)
    assert cfg.replace(temperature=0).greedy and not cfg.greedy


def test_unknown_keyword_names_the_function_and_the_settings(tiny_model):
    with pytest.raises(TypeError, match=r"generate\(\) got unexpected keyword argument\(s\) "
                                        r"\['max_tokens'\].*'max_new_tokens'"):
        emlens.generate(tiny_model, ["Hi"], max_tokens=3)
    with pytest.raises(TypeError, match="sampling must be an emlens.SamplingConfig"):
        emlens.generate(tiny_model, ["Hi"], sampling={"n_samples": 2})


def test_keywords_override_the_config(tiny_model):
    cfg = SamplingConfig(max_new_tokens=3, temperature=0.0, n_samples=2, seed=5)
    a = emlens.generate(tiny_model, ["Hi", "Yo"], sampling=cfg, progress=False)
    b = emlens.generate(tiny_model, ["Hi", "Yo"], max_new_tokens=3, temperature=0.0, n_samples=2,
                        seed=5, progress=False)
    c = emlens.generate(tiny_model, ["Hi", "Yo"], sampling=cfg, max_new_tokens=1, progress=False)
    assert [g.text for g in a] == [g.text for g in b] and len(a) == 4
    assert all(len(g.tokens) <= 1 for g in c) and len(c) == 4


def test_cache_key_leaves_out_batch_size():
    key = SamplingConfig(batch_size=3).key()
    assert set(key) == set(FIELDS) - {"batch_size"}
    assert key == SamplingConfig(batch_size=16).key()
