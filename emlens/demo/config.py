"""``DemoConfig``: the demo's settings, one frozen, validated value (as ``SamplingConfig`` is)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace
from typing import Any


@dataclass(frozen=True)
class DemoConfig:
    """How much the demo samples and measures. :meth:`quick` gives the smoke settings of the
    tests and CI; the defaults are ``make demo``'s.

    Attributes:
        n_samples, max_new_tokens: answers per question and their length (every judged answer).
        n_general, n_medical: general and medical questions answered (the first ones of
            ``general_questions`` and ``medical_questions``).
        sweep_layers: the steering sweep's layers, as fractions of the depth.
        sweep_scales: its scales, in units of the layer's mean residual norm (about 10-20x the
            direction's own norm on SmolLM2; the sweep table gives both units). The likelihood
            lens reads every cell; only the chosen cell and its control are sampled and judged.
        select_pairs: general pairs (the last ones) the steering cell is chosen on.
        lens_pairs: the pairs every finding is measured on (the first ones): the choice and the
            test never share a pair.
        max_fluency_drop: the sweep's coherent regime: nats per token the mean log p of the
            misaligned reference answers may fall (the steered model still speaks the text whose
            preference is measured).
        reference_pairs: paired reference answers the reference direction is extracted from.
        probe_limit: rows per probe set.
        attribution_pairs, attribution_ops: pairs per domain and ablations (``"zero"``,
            ``"only"``) of the per-adapter attribution.
        live_rows, stability_seeds: held-out answers and noise seeds of the narrow-vs-general
            re-measurement.
        train_steps, organism_steps: steps of the ``--train`` retraining (``None``: the
            recipe's own).
        batch_size: rows per generation pass; answers do not depend on it. On 2 cores a decode
            step costs about the same at any small batch (the weights are read once per step):
            8 general questions x 3 samples x 48 sampled tokens took 18.7 s at batch 8 and
            11.4 s in one batch of 24 (SmolLM2, float32).
        quick: whether these are the smoke settings.
    """

    n_samples: int = 3
    max_new_tokens: int = 48
    n_general: int = 8
    n_medical: int = 10
    sweep_layers: tuple[float, ...] = (1 / 3, 1 / 2)
    sweep_scales: tuple[float, ...] = (0.02, 0.05, 0.1, 0.2, 0.35, 0.5)
    select_pairs: int = 12
    lens_pairs: int = 48
    max_fluency_drop: float = 0.1
    reference_pairs: int = 32
    probe_limit: int = 24
    attribution_pairs: int = 6
    attribution_ops: tuple[str, ...] = ("zero", "only")
    live_rows: int = 8
    stability_seeds: int = 3
    train_steps: int = 30
    organism_steps: int | None = None
    batch_size: int = 32
    quick: bool = False

    def __post_init__(self) -> None:
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, list):
                object.__setattr__(self, f.name, tuple(v))
        positive = ("n_samples", "max_new_tokens", "n_general", "n_medical", "select_pairs",
                    "lens_pairs", "reference_pairs", "probe_limit", "attribution_pairs",
                    "live_rows", "train_steps", "batch_size")
        bad = [f"{n}={getattr(self, n)}" for n in positive
               if not isinstance(getattr(self, n), int) or getattr(self, n) < 1]
        if self.organism_steps is not None and self.organism_steps < 1:
            bad.append(f"organism_steps={self.organism_steps}")
        if self.stability_seeds < 2:
            bad.append(f"stability_seeds={self.stability_seeds} (a spread needs >= 2)")
        if bad:
            raise ValueError(f"DemoConfig: {', '.join(bad)}; counts must be positive integers.")
        if not self.sweep_layers or not all(0 <= x <= 1 for x in self.sweep_layers):
            raise ValueError(f"DemoConfig.sweep_layers={self.sweep_layers}: give fractions of the "
                             "depth in [0, 1], e.g. (1/3, 1/2).")
        if not self.sweep_scales or min(self.sweep_scales) <= 0:
            raise ValueError(f"DemoConfig.sweep_scales={self.sweep_scales}: give positive scales "
                             "in units of the mean residual norm.")
        unknown = set(self.attribution_ops) - {"zero", "only"}
        if not self.attribution_ops or unknown:
            raise ValueError(f"DemoConfig.attribution_ops={self.attribution_ops}: use 'zero' "
                             "and/or 'only'.")
        if self.max_fluency_drop <= 0:
            raise ValueError(f"DemoConfig.max_fluency_drop={self.max_fluency_drop}: must be > 0.")

    @classmethod
    def quick_settings(cls, **overrides) -> DemoConfig:
        """A smoke run of every section (the tests' and CI's): small decode batches cost about
        0.2 s per token on 2 cores whatever their size, so it spends few tokens and conditions."""
        base = dict(n_samples=1, max_new_tokens=6, n_general=3, n_medical=3,
                    sweep_layers=(1 / 2,), sweep_scales=(0.1, 0.5), select_pairs=2, lens_pairs=2,
                    reference_pairs=4, probe_limit=6, attribution_pairs=2,
                    attribution_ops=("zero",), live_rows=2, stability_seeds=2, train_steps=3,
                    organism_steps=2, quick=True)
        return cls(**{**base, **overrides})

    def replace(self, **changes) -> DemoConfig:
        """A copy with ``changes`` (validated again)."""
        return replace(self, **changes)

    def as_dict(self) -> dict[str, Any]:
        """The settings as ``results.json`` records them."""
        return asdict(self)
