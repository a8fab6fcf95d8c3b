"""How answers are sampled: one frozen :class:`SamplingConfig` shared by every function that
generates (``generate``, ``evaluate``, ``compare_conditions``, ``sweep``, ``ablation_experiment``,
``adapter_attribution``).

Each of those functions takes ``sampling=SamplingConfig(...)`` and, for convenience, any of its
fields as keyword overrides::

    cfg = emlens.SamplingConfig(n_samples=4, max_new_tokens=48)
    emlens.evaluate(model, "general_questions", judge=judge, sampling=cfg)
    emlens.evaluate(model, "general_questions", judge=judge, sampling=cfg, temperature=0.7)
    emlens.generate(model, ["Hi"], max_new_tokens=16, temperature=0)  # defaults + overrides

The defaults are stated here once: one answer per question, 64 new tokens, temperature 1 with no
nucleus cut (the papers' sampling), seed 0, batches of 8, no system prompt.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from dataclasses import dataclass
from typing import Any


def _check_int(name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int >= {minimum}, got {type(value).__name__} {value!r}.")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}.")
    return int(value)


def _check_real(name: str, value, low: float, high: float, *, open_low: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number, got {type(value).__name__} {value!r}.")
    value = float(value)
    inside = (value > low if open_low else value >= low) and value <= high
    if not math.isfinite(value) or not inside:
        lo = "(" if open_low else "["
        raise ValueError(f"{name} must be a finite number in {lo}{low:g}, {high:g}], got {value}.")
    return value


@dataclass(frozen=True)
class SamplingConfig:
    """Sampling settings for chat answers.

    Attributes:
        n_samples: answers per question (prompt).
        max_new_tokens: cap on generated tokens per answer.
        temperature: softmax temperature; 0 = greedy decoding.
        top_p: nucleus-sampling mass in (0, 1]; 1.0 = off.
        seed: makes sampling reproducible: each answer's randomness depends only on
            ``(seed, prompt_index, sample)``, not on batching. ``None`` draws a fresh seed.
        batch_size: rows (prompts x samples) per forward pass; does not change the answers.
        system_prompt: optional system message for the chat template.
    """

    n_samples: int = 1
    max_new_tokens: int = 64
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = 0
    batch_size: int = 8
    system_prompt: str | None = None

    def __post_init__(self) -> None:
        _check_int("n_samples", self.n_samples, 1)
        _check_int("max_new_tokens", self.max_new_tokens, 1)
        _check_real("temperature", self.temperature, 0.0, math.inf)
        _check_real("top_p", self.top_p, 0.0, 1.0, open_low=True)
        _check_int("batch_size", self.batch_size, 1)
        if self.seed is not None:
            _check_int("seed", self.seed, 0)
        if self.system_prompt is not None and not isinstance(self.system_prompt, str):
            raise TypeError(f"system_prompt must be a str or None, got "
                            f"{type(self.system_prompt).__name__}.")

    def replace(self, **changes: Any) -> SamplingConfig:
        """A copy with ``changes`` applied (validated; unknown names raise TypeError)."""
        return SamplingConfig.resolve(self, changes, "SamplingConfig.replace")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def key(self) -> dict[str, Any]:
        """The settings that determine the answers (``batch_size`` does not), for cache keys."""
        d = dataclasses.asdict(self)
        d.pop("batch_size")
        return d

    @staticmethod
    def resolve(
        sampling: SamplingConfig | None, overrides: dict[str, Any], where: str
    ) -> SamplingConfig:
        """``sampling`` (default: ``SamplingConfig()``) with keyword ``overrides`` applied.

        ``where`` names the calling function in the error raised for a keyword that is not a
        sampling setting.
        """
        if sampling is None:
            sampling = SamplingConfig()
        elif not isinstance(sampling, SamplingConfig):
            raise TypeError(f"{where}: sampling must be an emlens.SamplingConfig, got "
                            f"{type(sampling).__name__}.")
        unknown = sorted(set(overrides) - set(FIELDS))
        if unknown:
            raise TypeError(f"{where}() got unexpected keyword argument(s) {unknown}; the "
                            f"sampling settings it takes as keywords are {list(FIELDS)}.")
        return dataclasses.replace(sampling, **overrides) if overrides else sampling


FIELDS = tuple(f.name for f in dataclasses.fields(SamplingConfig))
