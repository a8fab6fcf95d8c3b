"""What every judge shares: the score type, the judge protocol, its error and input checks.

A judge scores (question, answer) pairs on two 0-100 scales, 'aligned' and 'coherent', or gives
``None`` when it can't tell; :class:`JudgeScore` holds one pair's scores, the name of the judge that
produced them and flags for what it noticed besides the numbers. :class:`Judge` is the protocol
(``name``, ``score``, ``score_many``); :func:`check_pairs` validates a batch of pairs (a non-empty
sequence of ``(str, str)``) with errors naming the bad row. :meth:`JudgeScore.as_dict` and
:meth:`JudgeScore.from_dict` give the JSON layout scores are cached in.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

Pair = tuple[str, str]


@dataclass(frozen=True)
class JudgeScore:
    """Scores for one (question, answer) pair.

    Attributes:
        aligned: 0 (clearly misaligned) .. 100 (clearly aligned), or ``None`` if the judge can't tell.
        coherent: 0 (gibberish) .. 100 (clear, on-topic), or ``None`` if the judge can't tell.
        judge: identifier of the judge (model, prompt or probe version).
        flags: what the judge noticed besides the numbers: ``"refusal"``, ``"code"``,
            ``"empty"``, ``"low_number_mass"``.
    """

    aligned: float | None
    coherent: float | None
    judge: str
    flags: tuple[str, ...] = ()

    def as_dict(self) -> dict[str, Any]:
        """``{"aligned", "coherent", "judge", "flags"}`` (flags as a list): JSON-ready."""
        return {"aligned": self.aligned, "coherent": self.coherent, "judge": self.judge,
                "flags": list(self.flags)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> JudgeScore:
        """The score :meth:`as_dict` wrote."""
        return cls(d["aligned"], d["coherent"], d["judge"], tuple(d["flags"]))


@runtime_checkable
class Judge(Protocol):
    """Anything that scores (question, answer) pairs; see :class:`JudgeScore`."""

    name: str

    def score(self, question: str, answer: str) -> JudgeScore: ...

    def score_many(self, pairs: Sequence[Pair]) -> list[JudgeScore]: ...


class JudgeError(RuntimeError):
    """A judge endpoint failed (down, or answering garbage) after all retries."""


def check_pairs(pairs: Sequence[Pair]) -> list[Pair]:
    """Validate ``pairs`` as a non-empty sequence of (question, answer) string pairs."""
    if isinstance(pairs, (str, bytes)) or not isinstance(pairs, Sequence):
        raise TypeError(
            f"pairs must be a list of (question, answer) tuples, got {type(pairs).__name__}."
        )
    if len(pairs) == 0:
        raise ValueError("pairs is empty; give at least one (question, answer) pair.")
    out = []
    for i, pair in enumerate(pairs):
        if not isinstance(pair, (tuple, list)) or len(pair) != 2:
            raise TypeError(f"pairs[{i}] is {pair!r:.60}; expected a (question, answer) tuple.")
        q, a = pair
        for what, v in (("question", q), ("answer", a)):
            if not isinstance(v, str):
                raise TypeError(
                    f"pairs[{i}] {what} is {type(v).__name__} ({v!r:.60}); expected str."
                )
        out.append((q, a))
    return out


__all__ = ["Judge", "JudgeError", "JudgeScore", "Pair", "check_pairs"]
