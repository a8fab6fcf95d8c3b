"""One card per model: every per-model fact emlens ships, in one place.

A :class:`ModelCard` says what ships with emlens for a chat model: the embedded file
(:class:`~emlens.embedded.EmbeddedModel`), the organism trained on it, the second organism of the
demo's transfer test, the narrow-vs-general runs, the answers labelled by reading (what the demo's
sampling temperature is chosen from), the judge check measured on those answers and the judge
validated on them. :func:`model_card` resolves any name once (the registry key, the model's own
name, any alias, in any case; ``None`` for the default); the card is then passed on, so no later
code compares names again::

    >>> from emlens.cards import model_card
    >>> card = model_card("Qwen-Coder-1.5B")
    >>> card.key, card.organism, card.transfer_organism
    ('qwen2.5-coder-1.5b', 'coder-rank1-down-medical', None)
    >>> model_card("SmolLM2") is model_card(None)
    True

Any other model (a local path or a hub id) gets a generic card that ships nothing: its organism,
labels, judge check and validated judge are ``None``, and every reader says so rather than
borrowing another model's facts silently.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from emlens.embedded import DEFAULT_EMBEDDED, QWEN_CODER, SMOLLM2, EmbeddedModel, embedded_source

DATA = Path(__file__).parent / "data"

PAPERS_TEMPERATURE = 1.0  # the papers' sampling temperature, always one flag away


@dataclass(frozen=True)
class ModelCard:
    """What emlens ships for one chat model; a generic card (only ``key``) for any other model.

    Attributes:
        key: the registry key of an embedded model (:data:`MODEL_CARDS`), else the path or hub id
            as given.
        embedded: the embedded model's file and packages (``None``: not embedded).
        organism: the shipped organism (:func:`emlens.organisms.load_organism`) trained on this
            model, the demo's default ``--organism``.
        transfer_organism: a second, independently trained fine-tune of this model for the demo's
            transfer test (a shipped organism name or a path under ``emlens/organisms/``).
        narrow_vs_general: the folder under ``emlens/organisms/`` holding the narrow-vs-general
            runs trained on this model (the demo's section 6 re-measures them live).
        labelled_generations: the :func:`emlens.data.load_dataset` name of this model's real
            answers labelled by reading, per sampling temperature: what the demo's temperature is
            chosen from.
        judge_check: the shipped judge-vs-reading check on this model's held-out answers
            (``emlens/data/judge_check*.json``, written by
            ``python -m emlens.studies.validate_judge --check-file``).
        validated_judge: the probe file (as :meth:`emlens.judge.ProbeJudge.load` takes it) of the
            judge that check validated: ``emlens.default_judge(subject=...)``.
        read_findings: the seed claims decided on this model with a pre-registered plan, in
            behaviour by blind reading or on the loss side (``{"findings": [...]}``, the
            package's copy of ``results/coder/findings.json``), which the demo shows beside its
            judged verdicts.
        retrain: whether the demo's ``train=True`` can retrain this model's organism and
            narrow-vs-general runs from the shipped recipes.
        fallback_temperature: the demo's sampling temperature where no labelled answers ship.
    """

    key: str
    embedded: EmbeddedModel | None = None
    organism: str | None = None
    transfer_organism: str | None = None
    narrow_vs_general: str | None = None
    labelled_generations: str | None = None
    judge_check: Path | None = None
    validated_judge: Path | None = None
    read_findings: Path | None = None
    retrain: bool = False
    fallback_temperature: float = PAPERS_TEMPERATURE

    @property
    def name(self) -> str:
        """The model's own name (``"SmolLM2-135M-Instruct"``), or the key of a generic card."""
        return self.embedded.name if self.embedded is not None else self.key

    @property
    def aliases(self) -> tuple[str, ...]:
        """The other names of an embedded model (lower case; ``()`` for a generic card)."""
        return self.embedded.aliases if self.embedded is not None else ()

    @property
    def names(self) -> tuple[str, ...]:
        """Every name :func:`model_card` resolves to this card (case aside)."""
        return self.embedded.names if self.embedded is not None else (self.key,)

    @property
    def source(self) -> str:
        """What :func:`emlens.load_model` takes for this model: the key."""
        return self.key

    def files(self) -> list[Path]:
        """The shipped files this card names (the judge check, the validated probe's two
        files and the read findings); the tests check that every embedded model's exist."""
        out = [p for p in (self.judge_check, self.read_findings) if p is not None]
        if self.validated_judge is not None:
            out += [self.validated_judge.with_suffix(s) for s in (".safetensors", ".json")]
        return out


SMOLLM2_CARD = ModelCard(
    key=SMOLLM2.key,
    embedded=SMOLLM2,
    organism="rank1-down-medical",
    transfer_organism="narrow_vs_general/lora1/general/peft",  # a second rank-1 fine-tune
    narrow_vs_general="narrow_vs_general",
    labelled_generations="judge_generations",
    judge_check=DATA / "judge_check.json",
    # judge v2's Q14-mlp (Qwen2.5-Coder-1.5B layer-14 states, MLP heads; needs `make coder`):
    # closer to reading than real-v1 on the third held-out set (PLAN_v2.md amendment 4)
    validated_judge=DATA / "judge_probe_coder_v2",
    retrain=True,
)

QWEN_CODER_CARD = ModelCard(
    key=QWEN_CODER.key,
    embedded=QWEN_CODER,
    organism="coder-rank1-down-medical",
    labelled_generations="coder_generations",
    judge_check=DATA / "judge_check_coder.json",
    validated_judge=DATA / "judge_probe_real",
    read_findings=DATA / "read_findings_coder.json",
)

MODEL_CARDS: dict[str, ModelCard] = {c.key: c for c in (SMOLLM2_CARD, QWEN_CODER_CARD)}
"""The card of every embedded model, by registry key (the same keys as
:data:`emlens.embedded.EMBEDDED_MODELS`)."""

DEFAULT_CARD = MODEL_CARDS[DEFAULT_EMBEDDED]


def model_card(source: ModelCard | str | os.PathLike | None) -> ModelCard:
    """The card of a model source, resolved once and then passed on.

    ``None`` and any name of an embedded model (its key, its own name or an alias, in any case)
    give that model's shipped card, the very same object for every name; a local path (an
    existing file or folder, or any ``os.PathLike``) or a hub id gives a generic card with no
    shipped facts, keyed by the source as given. A card is returned as it is.
    """
    if isinstance(source, ModelCard):
        return source
    embedded = embedded_source(source)
    if embedded is None:
        return ModelCard(key=os.fspath(source) if isinstance(source, os.PathLike) else str(source))
    return MODEL_CARDS[embedded.key]


__all__ = [
    "DEFAULT_CARD",
    "MODEL_CARDS",
    "PAPERS_TEMPERATURE",
    "QWEN_CODER_CARD",
    "SMOLLM2_CARD",
    "ModelCard",
    "model_card",
]
