"""emlens.viz: circuitsvis token views (HTML with the tokens) and matplotlib figures."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from emlens.lora import LoraAdapter, LoraModule, attach_lora  # noqa: E402
from emlens.probes import fit_probe  # noqa: E402
from emlens.scalars import collect_scalars  # noqa: E402
from emlens.viz import (  # noqa: E402
    plot_adapter_scales,
    plot_attribution,
    plot_probe_coefficients,
    projection_view,
    save_html,
    scalars_heatmap,
    token_scalars_view,
)

QS = ["Which animal is striped?"]
ANS = ["The zebra is striped."]


@pytest.fixture(scope="module")
def scalars(make_tiny_model):
    model = make_tiny_model(6)
    g = torch.Generator().manual_seed(0)
    adapter = LoraAdapter(tuple(
        LoraModule(layer=layer, module="down_proj", A=torch.randn(1, model.cfg.d_mlp, generator=g),
                   B=0.1 * torch.randn(model.cfg.d_model, 1, generator=g), scaling=1.0)
        for layer in (0, 2)
    ))
    with attach_lora(model, adapter) as lora:
        return collect_scalars(model, lora, QS, ANS, progress=False)


def test_token_view_html_contains_the_answer_tokens_and_adapter_labels(scalars, tmp_path):
    view = token_scalars_view(scalars, 0)
    html = str(view)
    assert "zebra" in html and "striped" in html
    assert "L0 down" in html and "L2 down" in html
    assert "Which" not in html  # answer tokens only by default
    assert "Which" in str(token_scalars_view(scalars, 0, part="all"))
    path = save_html(view, tmp_path / "view.html")
    assert "zebra" in path.read_text() and path.read_text().startswith("<!DOCTYPE html>")
    assert hasattr(view, "_repr_html_")  # renders in notebooks


def test_token_view_shows_the_values_of_each_adapter(scalars):
    view = token_scalars_view(scalars, 0, adapters=["blocks.2.mlp.lora_down"])
    _, values = scalars.row(0, "answer")
    assert repr(float(values[0, 1])) in str(view)  # the exact value of the kept adapter
    assert repr(float(values[0, 0])) not in str(view)
    assert "L0 down" not in str(view)
    with pytest.raises(ValueError, match="row=4"):
        token_scalars_view(scalars, 4)


def test_projection_view_has_the_tokens_and_checks_the_direction(tiny_model):
    direction = torch.randn(tiny_model.cfg.d_model)
    html = str(projection_view(tiny_model, QS[0], ANS[0], direction, layer=1))
    assert "zebra" in html
    with pytest.raises(ValueError, match="layer="):
        projection_view(tiny_model, QS[0], ANS[0], direction)
    with pytest.raises(ValueError, match=r"\[64\]"):
        projection_view(tiny_model, QS[0], ANS[0], torch.randn(5), layer=1)


def test_probe_coefficient_figure_is_returned_and_saved(tmp_path):
    rng = np.random.default_rng(0)
    y = np.tile([0, 1], 40)
    x = pd.DataFrame(rng.normal(size=(80, 3)) + np.outer(y, [0, 2, 0]),
                     columns=["blocks.9.mlp.lora_down", "blocks.10.mlp.lora_down", "other"])
    probe = fit_probe(x, y, groups=np.repeat(np.arange(40), 2), n_shuffles=0, n_boot=0)
    fig = plot_probe_coefficients(probe, path=tmp_path / "coef.png")
    assert isinstance(fig, Figure)
    assert (tmp_path / "coef.png").stat().st_size > 1000
    labels = [t.get_text() for t in fig.axes[0].get_yticklabels()]
    assert labels[-1] == "L10 down"  # largest on top


def test_attribution_and_sweep_figures():
    ranking = pd.DataFrame({"adapter": ["blocks.1.mlp.lora_down", "blocks.2.mlp.lora_down"],
                            "share_general": [0.6, 0.1], "share_specific": [0.5, 0.7],
                            "label": ["general", "domain-specific"]})
    fig = plot_attribution(ranking)
    assert isinstance(fig, Figure) and "general" in fig.axes[0].get_xticklabels()[0].get_text()
    with pytest.raises(ValueError, match="lacks"):
        plot_attribution(ranking.drop(columns=["label"]))
    rows = [dict(condition="all", kind="all", target="", k=np.nan, metric="logprob_gap",
                 domain="medical", value=1.0)]
    rows += [dict(condition=f"scale{k:g}:a", kind="scale", target="a", k=k, metric="logprob_gap",
                  domain="medical", value=k) for k in (0.0, 2.0)]
    fig = plot_adapter_scales(pd.DataFrame(rows))
    xs = list(fig.axes[0].get_lines()[0].get_xdata())
    assert xs == [0.0, 1.0, 2.0]
    with pytest.raises(ValueError, match="scale"):
        plot_adapter_scales(pd.DataFrame(rows[:1]))


def test_heatmap(scalars, tmp_path):
    tokens, values = scalars.row(0, "answer")
    fig = scalars_heatmap(values, tokens, scalars.adapters, path=tmp_path / "h.png")
    assert isinstance(fig, Figure) and (tmp_path / "h.png").exists()
