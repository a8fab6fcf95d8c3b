"""emlens.geometry: orthogonal noise, efficiency and stability curves, trajectories, plots."""

from __future__ import annotations

import math

import matplotlib
import pytest
import torch

from emlens.chat import tokenize_chat
from emlens.geometry import (
    efficiency_curve,
    efficiency_table,
    orthogonal_noise,
    perturb,
    plot_efficiency,
    plot_pca,
    plot_stability,
    stability_curve,
    stability_table,
    trajectory_cosines,
    trajectory_pca,
)
from emlens.training import (
    TrainableLora,
    TrainableSteeringVector,
    TrainConfig,
    Trajectory,
    evaluate_loss,
    load_trajectory,
    prepare,
    train,
)

matplotlib.use("Agg")


@pytest.mark.parametrize("eps", [0.0, 0.1, 0.5, 0.9, 1.0])
@pytest.mark.parametrize("shape", [(64,), (3, 5, 7)])
def test_orthogonal_noise_keeps_the_norm_and_angle(eps, shape):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(shape, generator=gen, dtype=torch.float64) * 3.0
    x2 = orthogonal_noise(x, eps, gen)
    assert x2.shape == x.shape
    torch.testing.assert_close(x2.norm(), x.norm())
    cos = float((x2.flatten() @ x.flatten()) / x.norm() ** 2)
    assert cos == pytest.approx((1 - eps**2) ** 0.5, abs=1e-9)
    noise = (x2 - (1 - eps**2) ** 0.5 * x).flatten()  # = eps * y
    assert abs(float(noise @ x.flatten())) < 1e-8 * float(x.norm() ** 2)
    if eps > 0:
        torch.testing.assert_close(noise.norm() / eps, x.norm())


def test_orthogonal_noise_rejects_bad_input():
    with pytest.raises(ValueError, match="eps"):
        orthogonal_noise(torch.ones(3), 1.5)
    with pytest.raises(ValueError, match="zero"):
        orthogonal_noise(torch.zeros(3), 0.5)


def test_perturb_lora_touches_only_the_target_tensor(tiny_model):
    lora = TrainableLora.for_model(tiny_model, [0, 1])
    with torch.no_grad():
        for adapter in lora.adapters:  # lora.B is the adapters' B stacked: set them
            adapter.B.normal_()
    gen = torch.Generator().manual_seed(0)
    a = perturb(lora, 0.5, "A", gen)
    assert torch.equal(a.B, lora.B) and not torch.equal(a.A, lora.A)
    torch.testing.assert_close(a.A[1].norm(), lora.A[1].norm())  # per adapter
    b = perturb(lora, 0.5, "B", gen)
    assert torch.equal(b.A, lora.A) and not torch.equal(b.B, lora.B)
    with pytest.raises(ValueError, match="'A' or 'B'"):
        perturb(lora, 0.5, "vector", gen)


def test_perturb_reaches_an_organism_s_adapters_on_any_target_module(tiny_model):
    """The shipped organisms load as TrainableAdapter (any peft target): perturb treats each
    module's A and B as TrainableLora's, keeping each tensor's norm at cosine sqrt(1 - e^2)."""
    from emlens.trainable_adapter import TrainableAdapter

    adapter = TrainableAdapter.for_model(tiny_model, ["down_proj", "q_proj"], [0, 1], r=2)
    with torch.no_grad():
        for m in adapter.adapters:
            m.B.normal_()
    gen = torch.Generator().manual_seed(0)
    for target in ("A", "B"):
        out = perturb(adapter, 0.6, target, gen)
        assert isinstance(out, TrainableAdapter) and len(out.adapters) == len(adapter.adapters)
        for old, new in zip(adapter.adapters, out.adapters, strict=True):
            x, y = getattr(old, target).flatten(), getattr(new, target).flatten()
            other = "B" if target == "A" else "A"
            assert torch.equal(getattr(old, other), getattr(new, other))
            torch.testing.assert_close(y.norm(), x.norm())
            torch.testing.assert_close(torch.dot(x, y) / x.norm() ** 2, torch.tensor(0.8),
                                       atol=1e-5, rtol=0)


@pytest.fixture
def trained(tiny_model, tokenizer, tmp_path):
    batch = tokenize_chat(tokenizer, ["Is it safe?", "Should I go?"], ["Yes, always.", "No."])
    data = prepare(tiny_model, [batch], start_layer=1)
    init = TrainableSteeringVector.for_model(tiny_model, 1)
    res = train(tiny_model, init, data, None,
                TrainConfig(steps=12, lr=5e-2, save_every=4, progress=False), out=tmp_path)
    return res, data, tmp_path


def test_efficiency_curve_scales_norm_and_finds_minimum(tiny_model, trained):
    res, data, _ = trained
    curve = efficiency_curve(tiny_model, res.params, data, [0.0, 0.5, 1.0, 2.0])
    norm = res.params.effective_norm()
    assert curve.norms == pytest.approx([0.0, 0.5 * norm, norm, 2 * norm])
    assert curve.losses[0] == pytest.approx(evaluate_loss(tiny_model, None, data))
    assert curve.losses[2] == pytest.approx(evaluate_loss(tiny_model, res.params, data), rel=1e-5)
    assert curve.min_loss == min(curve.losses) < curve.base_loss
    table = efficiency_table({"sv": curve}, at_norms=[norm, 10 * norm])
    assert table.loc[0, "trained_norm"] == pytest.approx(norm)
    assert table.loc[0, f"loss@norm={norm:.3g}"] == pytest.approx(curve.losses[2])
    assert math.isnan(table.loc[0, f"loss@norm={10 * norm:.3g}"])  # outside the curve's range
    assert curve.loss_at_norm(0.75 * norm) == pytest.approx((curve.losses[1] + curve.losses[2]) / 2)


def test_stability_curve_is_zero_without_noise_and_grows_with_it(tiny_model, trained):
    res, data, _ = trained
    curve = stability_curve(tiny_model, res.params, data, (0.0, 0.5, 1.0), target="vector",
                            seeds=range(5))
    assert len(curve.relative) == 5
    assert curve.mean[0] == pytest.approx(0.0, abs=1e-5)
    assert curve.mean[2] > curve.mean[1] > 0
    assert curve.std[1] > 0  # seeds differ
    assert len(stability_table({"sv": curve})) == 3


def test_stability_refuses_untrained_params(tiny_model, trained):
    _, data, _ = trained
    zero = TrainableSteeringVector.for_model(tiny_model, 1)
    with pytest.raises(ValueError, match="not below the base loss"):
        stability_curve(tiny_model, zero, data, (0.5,), seeds=[0])


def test_trajectory_cosines_and_pca(tiny_model, trained, tmp_path):
    res, _, out = trained
    traj = load_trajectory(out)
    cos = trajectory_cosines(traj, res.params)
    assert cos[0] == 0.0  # the zero initial vector
    assert cos[-1] == pytest.approx(1.0, abs=1e-6)  # last checkpoint vs final: same vector
    rev = Trajectory(steps=traj.steps, params=[p.scaled(-1.0) for p in traj.params])
    pca = trajectory_pca({"a": traj, "b": rev}, n_components=2)
    assert sum(pca.explained) <= 1.0 + 1e-9 and pca.explained[0] >= pca.explained[1]
    assert len(pca.projections["a"]) == len(traj.steps)
    fig = plot_pca(pca, path=tmp_path / "pca.png")
    assert (tmp_path / "pca.png").stat().st_size > 0 and fig.axes
    curve = efficiency_curve(tiny_model, res.params, trained[1], [0.0, 1.0])
    plot_efficiency({"sv": curve}, path=tmp_path / "eff.png")
    stab = stability_curve(tiny_model, res.params, trained[1], (0.5,), seeds=range(2))
    plot_stability({"sv": stab}, path=tmp_path / "stab.png")
    assert (tmp_path / "eff.png").is_file() and (tmp_path / "stab.png").is_file()
