"""What the demo's sections share: the frozen Context, settings, rate formatting, adapters,
the sampling temperature chosen from reading."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from emlens.cards import DEFAULT_CARD, PAPERS_TEMPERATURE, ModelCard, model_card
from emlens.demo.config import DemoConfig
from emlens.sampling import SamplingConfig

DEFAULTS = DemoConfig()  # make demo's settings
QUICK = DemoConfig.quick_settings()  # the smoke run of the tests and CI


# Every per-model fact (default and transfer organisms, narrow-vs-general runs, labelled answers,
# judge check, validated judge) is on the model's card (emlens.cards), resolved once by run_demo
# and carried on the Context as ``ctx.card``. The default model's second fine-tune is the command
# line's default transfer organism (run_demo reads it as "the card's own").
TRANSFER_ORGANISM = DEFAULT_CARD.transfer_organism  # a second rank-1 fine-tune of SmolLM2


@dataclass(frozen=True)
class Context:
    """What every section reads and none writes: the settings, the model's card, the models,
    the judge, the question sets and how answers are sampled.

    ``gaps`` is a memo of likelihood gaps per ``(model key, question set)`` shared by the
    sections' lenses (:func:`emlens.demo.lenses.gaps`): a cache, so no result depends on which
    section filled it. ``org`` is the organism merged into a copy of the chat model, used by
    sections 1-3; ``run_demo`` drops it (``dataclasses.replace(ctx, org=None)``) afterwards.
    """

    cfg: DemoConfig
    card: ModelCard
    chat: Any  # HookedTransformer
    org: Any  # HookedTransformer with the organism merged, or None after section 3
    adapter: Any  # emlens.lora.LoraAdapter
    judge: Any  # emlens.judge.Judge
    qsets: Mapping[str, list[str]]  # {"general": [...], "medical": [...]}
    sampling: SamplingConfig  # how every judged answer is sampled
    seed: int
    progress: bool
    out: Path
    temperature_why: str = ""  # how the sampling temperature was chosen
    gaps: dict = field(default_factory=dict, compare=False)  # (key, set) -> likelihood gaps

    @property
    def gap_cache(self) -> dict:
        return self.gaps


def fmt_rate(row) -> str:
    if not row["n"]:
        return f"no coherent answers (n=0 of {int(row.get('n_answers', 0))})"
    return f"{row['rate']:.2f} [{row['low']:.2f}, {row['high']:.2f}] (k={int(row['k'])}, n={int(row['n'])})"


def resolve_adapter(name_or_path: str | Path):
    from emlens.lora import load_adapter
    from emlens.organisms import ORGANISMS, ORGANISMS_DIR, load_organism

    if str(name_or_path) in ORGANISMS:
        return load_organism(str(name_or_path))
    path = Path(name_or_path)
    if not path.exists() and (ORGANISMS_DIR / path).exists():
        path = ORGANISMS_DIR / path
    return load_adapter(path)


def all_rank1(adapter) -> bool:
    return all(r == 1 for r in adapter.ranks.values())


def measured_coherence(card: ModelCard | str | None) -> pd.DataFrame | None:
    """Coherent share by reading of a model's unsteered real answers, per model role and sampling
    temperature, from the labelled generations on its card (``None`` when none ship for the
    model; a name is resolved with :func:`emlens.cards.model_card`).

    Columns: ``model, temperature, n, coherent, share, low, high`` (Wilson 95%); coherent =
    coherence > 50 on the papers' 0-100 scale, pass-1 labels made by reading.
    """
    from emlens.data import load_dataset
    from emlens.evaluation import wilson_interval

    name = model_card(card).labelled_generations
    if name is None:
        return None
    rows = [r for r in load_dataset(name) if r.intervention == "none"]
    df = pd.DataFrame({"model": [r.model for r in rows],
                       "temperature": [r.temperature for r in rows],
                       "coherent": [r.coherent > 50 for r in rows]})
    out = df.groupby(["model", "temperature"])["coherent"].agg(["size", "sum"]).reset_index()
    out = out.rename(columns={"size": "n", "sum": "coherent"})
    out["share"] = out["coherent"] / out["n"]
    ci = [wilson_interval(int(k), int(n)) for k, n in zip(out["coherent"], out["n"], strict=True)]
    out["low"], out["high"] = [c[0] for c in ci], [c[1] for c in ci]
    return out


def choose_temperature(card: ModelCard | str | None,
                       table: pd.DataFrame | None = None) -> tuple[float, str]:
    """The sampling temperature with the highest coherent share by reading, pooled over the chat
    model and its organism (``table``, default :func:`measured_coherence` of the model), and a
    sentence saying why; the card's fallback (the papers' 1.0) where no labelled answers exist."""
    card = model_card(card)
    if table is None:
        table = measured_coherence(card)
    if table is None or table.empty:
        value = card.fallback_temperature
        whose = "the papers' temperature" if value == PAPERS_TEMPERATURE else "temperature"
        return value, (f"{whose} {value} (no answers of this model labelled by reading ship "
                       "with emlens)")
    chat_org = table[table["model"].isin(["chat", "organism"])]
    pooled = chat_org.groupby("temperature")[["coherent", "n"]].sum()
    share = pooled["coherent"] / pooled["n"]
    best = float(share.idxmax())
    parts = "; ".join(f"{r.model} T={r.temperature:g}: {r.share:.2f} [{r.low:.2f}, {r.high:.2f}] "
                      f"(n={r.n})" for r in chat_org.itertuples())
    return best, (f"temperature {best:g}, the highest coherent share by reading of this model's "
                  f"labelled answers (coherent > 50, pass 1): {parts}")
