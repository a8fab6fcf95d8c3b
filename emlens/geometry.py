"""Efficiency, stability and trajectory analyses of narrow vs general solutions.

The seed paper's two measures of why the general solution is preferred:

* **Efficiency** (:func:`efficiency_curve`): the training-set loss as the trained parameters are
  scaled by ``alpha`` (x axis: the effective norm ``alpha * |delta|``). A more efficient solution
  reaches a lower loss at a smaller norm; we report each curve's minimum and the norm there.
* **Stability** (:func:`stability_curve`): replace a parameter tensor ``x`` by
  ``x' = sqrt(1 - e^2) x + e y``, ``y`` a random vector orthogonal to ``x`` with ``|y| = |x|``
  (so ``|x'| = |x|`` and ``cos(x, x') = sqrt(1 - e^2)``), and measure the relative loss increase
  ``(L(x') - L(x)) / (L(base) - L(x))``: 0 is no damage, 1 is back to the base model. Mean and std
  over seeds; for the steering vector (``target="vector"``) and for LoRA ``A`` and ``B``.

Trajectories: cosine of each checkpoint to a reference (the final general solution) over training
(:func:`trajectory_cosines`), and a PCA of steering-vector trajectories (:func:`trajectory_pca`).

Each analysis has a ``plot_*`` function returning a matplotlib ``Figure`` (saved when ``path`` is
given) and a ``*_table`` function returning a pandas ``DataFrame``. Losses are computed with
:func:`emlens.training.evaluate_loss` on :func:`emlens.training.prepare`-d batches.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
import torch
from jaxtyping import Float
from torch import Tensor
from transformer_lens import HookedTransformer

from emlens.trainable import LoraTrainable
from emlens.training import (
    PreparedSet,
    Trainable,
    TrainableSteeringVector,
    Trajectory,
    evaluate_loss,
)

Target = Literal["vector", "A", "B"]

# --------------------------------------------------------------------------------------------
# Efficiency


@dataclass(frozen=True)
class EfficiencyCurve:
    """Loss against effective norm as the parameters are scaled by ``alphas``.

    Attributes:
        alphas: scale factors.
        norms: effective norms ``alpha * |delta|``.
        losses: training-set loss at each alpha.
        base_loss: loss of the base model (alpha = 0).
    """

    alphas: list[float]
    norms: list[float]
    losses: list[float]
    base_loss: float

    @property
    def argmin(self) -> int:
        return int(np.argmin(self.losses))

    @property
    def min_loss(self) -> float:
        return self.losses[self.argmin]

    @property
    def norm_at_min(self) -> float:
        return self.norms[self.argmin]

    @property
    def alpha_at_min(self) -> float:
        return self.alphas[self.argmin]

    def loss_at_norm(self, norm: float) -> float:
        """Loss interpolated linearly at effective norm ``norm`` (within the curve's range)."""
        if not min(self.norms) <= norm <= max(self.norms):
            raise ValueError(
                f"norm={norm:.4g} is outside this curve's range [{min(self.norms):.4g}, "
                f"{max(self.norms):.4g}]; widen the alphas."
            )
        order = np.argsort(self.norms)
        return float(np.interp(norm, np.asarray(self.norms)[order], np.asarray(self.losses)[order]))

    def to_dict(self) -> dict:
        return dict(
            alphas=self.alphas, norms=self.norms, losses=self.losses, base_loss=self.base_loss,
            min_loss=self.min_loss, norm_at_min=self.norm_at_min, alpha_at_min=self.alpha_at_min,
        )


def efficiency_curve(
    model: HookedTransformer,
    params: Trainable,
    data: PreparedSet,
    alphas: Sequence[float] = tuple(np.linspace(0.0, 2.0, 11)),
    *,
    base_loss: float | None = None,
) -> EfficiencyCurve:
    """Training-set CE of ``params.scaled(alpha)`` for each alpha (the x axis: effective norm)."""
    alphas = [float(a) for a in alphas]
    if not alphas:
        raise ValueError("alphas is empty; give the scale factors to evaluate, e.g. [0, 0.5, 1].")
    norm = params.effective_norm()
    if base_loss is None:
        base_loss = evaluate_loss(model, None, data)
    losses = [
        base_loss if a == 0 else evaluate_loss(model, params.scaled(a), data) for a in alphas
    ]
    return EfficiencyCurve(
        alphas=alphas, norms=[abs(a) * norm for a in alphas], losses=losses, base_loss=base_loss
    )


# --------------------------------------------------------------------------------------------
# Stability


def orthogonal_noise(
    x: Float[Tensor, "..."], eps: float, generator: torch.Generator | None = None
) -> Float[Tensor, "..."]:
    """``sqrt(1 - eps^2) x + eps y`` with ``y`` random, orthogonal to ``x`` and ``|y| = |x|``.

    ``x`` is treated as one flat vector (a matrix is flattened); the result has ``x``'s shape and
    norm, and cosine ``sqrt(1 - eps^2)`` to ``x``.
    """
    if not 0.0 <= eps <= 1.0:
        raise ValueError(f"eps={eps}; expected 0 <= eps <= 1 (the sine of the rotation angle).")
    flat = x.detach().flatten().double()
    norm = flat.norm()
    if norm == 0:
        raise ValueError("x is zero; orthogonal noise of the same norm is undefined.")
    g = torch.randn(flat.shape, generator=generator, dtype=torch.float64, device="cpu").to(flat.device)
    unit = flat / norm
    y = g - (g @ unit) * unit
    y = y / y.norm() * norm
    out = (1.0 - eps**2) ** 0.5 * flat + eps * y
    return out.reshape(x.shape).to(x.dtype)


def perturb(params: Trainable, eps: float, target: Target, generator: torch.Generator) -> Trainable:
    """A copy of ``params`` with orthogonal noise on ``target`` (each adapter's tensor separately)."""
    out = params.clone()
    with torch.no_grad():
        if isinstance(out, TrainableSteeringVector):
            if target != "vector":
                raise ValueError(f"target={target!r} for a steering vector; use target='vector'.")
            out.vector.copy_(orthogonal_noise(out.vector, eps, generator))
        elif isinstance(out, LoraTrainable):  # TrainableLora and TrainableAdapter (organisms)
            if target not in ("A", "B"):
                raise ValueError(f"target={target!r} for a LoRA; use 'A' or 'B'.")
            for adapter in out.adapters:
                tensor = adapter.A if target == "A" else adapter.B
                tensor.copy_(orthogonal_noise(tensor, eps, generator))
        else:
            raise TypeError(f"Cannot perturb {type(params).__name__}.")
    return out


@dataclass(frozen=True)
class StabilityCurve:
    """Relative loss increase under orthogonal noise of size ``epsilons``, over seeds.

    Attributes:
        epsilons: noise sizes.
        relative: ``[n_seeds, n_eps]`` values of ``(L(perturbed) - L(trained)) / (L(base) - L(trained))``.
        trained_loss, base_loss: the two reference losses.
        target: which tensor was perturbed (``"vector"``, ``"A"`` or ``"B"``).
        seeds: the generator seeds.
    """

    epsilons: list[float]
    relative: list[list[float]]
    trained_loss: float
    base_loss: float
    target: str
    seeds: list[int] = field(default_factory=list)

    @property
    def mean(self) -> list[float]:
        return np.asarray(self.relative).mean(0).tolist()

    @property
    def std(self) -> list[float]:
        return np.asarray(self.relative).std(0, ddof=1 if len(self.relative) > 1 else 0).tolist()

    def to_dict(self) -> dict:
        return dict(
            epsilons=self.epsilons, relative=self.relative, mean=self.mean, std=self.std,
            trained_loss=self.trained_loss, base_loss=self.base_loss, target=self.target,
            seeds=self.seeds,
        )


def stability_curve(
    model: HookedTransformer,
    params: Trainable,
    data: PreparedSet,
    epsilons: Sequence[float] = (0.1, 0.3, 0.5, 0.7),
    *,
    target: Target = "vector",
    seeds: Sequence[int] = range(5),
    base_loss: float | None = None,
    trained_loss: float | None = None,
) -> StabilityCurve:
    """Relative loss increase vs noise size ``eps``, one row per seed (use >= 5 seeds)."""
    seeds = list(seeds)
    if not seeds:
        raise ValueError("seeds is empty; give at least one (>= 5 for a mean and std).")
    if base_loss is None:
        base_loss = evaluate_loss(model, None, data)
    if trained_loss is None:
        trained_loss = evaluate_loss(model, params, data)
    gap = base_loss - trained_loss
    if gap <= 0:
        raise ValueError(
            f"The trained loss ({trained_loss:.4f}) is not below the base loss ({base_loss:.4f}); "
            "the relative increase is undefined. Evaluate on the set the parameters were trained on."
        )
    rows = []
    for seed in seeds:
        gen = torch.Generator().manual_seed(seed)
        row = []
        for eps in epsilons:
            loss = evaluate_loss(model, perturb(params, float(eps), target, gen), data)
            row.append((loss - trained_loss) / gap)
        rows.append(row)
    return StabilityCurve(
        epsilons=[float(e) for e in epsilons], relative=rows, trained_loss=trained_loss,
        base_loss=base_loss, target=target, seeds=seeds,
    )


# --------------------------------------------------------------------------------------------
# Trajectories


def trajectory_cosines(trajectory: Trajectory, reference: Trainable) -> list[float]:
    """Cosine of each checkpoint's :meth:`~Trainable.delta` to ``reference``'s (0 for a zero delta)."""
    ref = reference.delta().detach().flatten().double()
    out = []
    for p in trajectory.params:
        d = p.delta().detach().flatten().double()
        if d.shape != ref.shape:
            raise ValueError(
                f"checkpoint delta has {d.numel()} entries, the reference {ref.numel()}; compare "
                "runs of the same parameterisation (same layers and kind)."
            )
        denom = d.norm() * ref.norm()
        out.append(0.0 if denom == 0 else float(d @ ref / denom))
    return out


@dataclass(frozen=True)
class TrajectoryPCA:
    """PCA of stacked trajectories.

    Attributes:
        explained: fraction of variance explained by each component.
        projections: run name -> ``[n_checkpoints, n_components]`` coordinates.
        steps: run name -> checkpoint steps.
    """

    explained: list[float]
    projections: dict[str, list[list[float]]]
    steps: dict[str, list[int]]

    def to_dict(self) -> dict:
        return dict(explained=self.explained, projections=self.projections, steps=self.steps)


def trajectory_pca(trajectories: dict[str, Trajectory], n_components: int = 3) -> TrajectoryPCA:
    """PCA (centred SVD) of every checkpoint of every run, e.g. narrow, general and continued."""
    if not trajectories:
        raise ValueError("trajectories is empty; give {name: Trajectory}.")
    mats = {k: t.deltas().double() for k, t in trajectories.items()}
    widths = {k: m.shape[1] for k, m in mats.items()}
    if len(set(widths.values())) != 1:
        raise ValueError(f"runs differ in parameter size {widths}; PCA needs one parameterisation.")
    X = torch.cat(list(mats.values()))
    mean = X.mean(0)
    _, S, Vh = torch.linalg.svd(X - mean, full_matrices=False)
    var = S**2
    k = min(n_components, Vh.shape[0])
    explained = (var / var.sum())[:k].tolist()
    projections = {name: ((m - mean) @ Vh[:k].T).tolist() for name, m in mats.items()}
    return TrajectoryPCA(
        explained=explained, projections=projections,
        steps={k_: t.steps for k_, t in trajectories.items()},
    )


# --------------------------------------------------------------------------------------------
# Tables and plots


def efficiency_table(
    curves: dict[str, EfficiencyCurve], at_norms: Sequence[float] = ()
) -> pd.DataFrame:
    """One row per solution: trained loss (alpha 1), its norm, the curve's minimum and its norm.

    ``at_norms`` adds columns ``loss@norm=x``: each curve's loss interpolated at that effective
    norm (the matched-norm comparison; NaN where outside a curve's range).
    """
    rows = []
    for name, c in curves.items():
        one = c.alphas.index(1.0) if 1.0 in c.alphas else None
        matched = {}
        for x in at_norms:
            try:
                matched[f"loss@norm={x:.3g}"] = c.loss_at_norm(x)
            except ValueError:
                matched[f"loss@norm={x:.3g}"] = float("nan")
        rows.append(dict(
            solution=name, base_loss=c.base_loss,
            trained_loss=None if one is None else c.losses[one],
            trained_norm=None if one is None else c.norms[one],
            min_loss=c.min_loss, norm_at_min=c.norm_at_min, alpha_at_min=c.alpha_at_min,
            **matched,
        ))
    return pd.DataFrame(rows)


def stability_table(curves: dict[str, StabilityCurve]) -> pd.DataFrame:
    """One row per (solution, eps): mean and std of the relative loss increase."""
    rows = []
    for name, c in curves.items():
        for eps, m, s in zip(c.epsilons, c.mean, c.std, strict=True):
            rows.append(dict(solution=name, target=c.target, eps=eps, mean=m, std=s,
                             n_seeds=len(c.relative)))
    return pd.DataFrame(rows)


def _figure(draw: Callable[[Any], None], *, xlabel: str, ylabel: str, title: str,
            path: str | Path | None, figsize: tuple[float, float] = (5.5, 4)):
    """One axes: ``draw(ax)`` its lines, then labels, title and legend; saved when ``path``."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=figsize)
    draw(ax)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    if path is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=120, bbox_inches="tight")
    return fig


def plot_efficiency(curves: dict[str, EfficiencyCurve], *, path: str | Path | None = None,
                    title: str | None = None):
    """Loss vs effective norm, one line per solution, minima marked."""

    def draw(ax) -> None:
        for name, c in curves.items():
            (line,) = ax.plot(c.norms, c.losses, marker="o", ms=3, label=name)
            ax.scatter([c.norm_at_min], [c.min_loss], color=line.get_color(), s=60, marker="*",
                       zorder=3)

    return _figure(draw, xlabel="effective norm (alpha x |delta|)",
                   ylabel="training-set loss (answer CE)", title=title or "Efficiency", path=path)


def plot_stability(curves: dict[str, StabilityCurve], *, path: str | Path | None = None,
                   title: str | None = None):
    """Relative loss increase vs eps, mean +/- std over seeds."""

    def draw(ax) -> None:
        for name, c in curves.items():
            ax.errorbar(c.epsilons, c.mean, yerr=c.std, marker="o", ms=3, capsize=3, label=name)

    return _figure(draw, xlabel="orthogonal noise eps",
                   ylabel="(L_perturbed - L_trained) / (L_base - L_trained)",
                   title=title or "Stability", path=path)


def plot_trajectory_cosines(series: dict[str, tuple[Sequence[int], Sequence[float]]], *,
                            path: str | Path | None = None, title: str | None = None):
    """Cosine to the reference solution vs training step, one line per run."""

    def draw(ax) -> None:
        for name, (steps, cos) in series.items():
            ax.plot(steps, cos, marker="o", ms=3, label=name)

    return _figure(draw, xlabel="training step", ylabel="cosine to final general solution",
                   title=title or "Trajectories", path=path)


def plot_pca(pca: TrajectoryPCA, *, path: str | Path | None = None, title: str | None = None):
    """Trajectories on the first two principal components (start marked with a circle)."""

    def draw(ax) -> None:
        for name, pts in pca.projections.items():
            arr = np.asarray(pts)
            y = arr[:, 1] if arr.shape[1] > 1 else np.zeros(len(arr))
            (line,) = ax.plot(arr[:, 0], y, marker=".", label=name)
            ax.scatter(arr[0, 0], y[0], color=line.get_color(), marker="o", facecolors="none", s=60)

    ev = pca.explained + [0.0]
    return _figure(draw, xlabel=f"PC1 ({100 * ev[0]:.1f}% var)",
                   ylabel=f"PC2 ({100 * ev[1]:.1f}% var)",
                   title=title or "PCA of steering-vector trajectories", path=path,
                   figsize=(5.5, 4.5))


__all__ = [
    "EfficiencyCurve",
    "StabilityCurve",
    "TrajectoryPCA",
    "efficiency_curve",
    "efficiency_table",
    "orthogonal_noise",
    "perturb",
    "plot_efficiency",
    "plot_pca",
    "plot_stability",
    "plot_trajectory_cosines",
    "stability_curve",
    "stability_table",
    "trajectory_cosines",
    "trajectory_pca",
]
