"""What the demo's sections share: settings, the story's state, rate formatting, adapters."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from emlens.report import Report
from emlens.sampling import SamplingConfig

DEFAULTS = dict(n_samples=3, max_new_tokens=48, n_general=8, n_medical=10,
                sweep_layers=(1 / 3, 1 / 2), sweep_scales=(0.25, 0.5), probe_limit=24,
                attribution_pairs=8, live_rows=8, stability_seeds=3,
                train_steps=30, organism_steps=None, lens_pairs=64, quick=False)


QUICK = dict(n_samples=1, max_new_tokens=12, n_general=3, n_medical=3,
             sweep_layers=(1 / 2,), sweep_scales=(0.5,), probe_limit=6,
             attribution_pairs=2, live_rows=2, stability_seeds=2,
             train_steps=3, organism_steps=2, lens_pairs=8, quick=True)


NARROW_VS_GENERAL = "narrow_vs_general"  # shipped runs, under emlens/organisms/


TRANSFER_ORGANISM = "narrow_vs_general/lora1/general/peft"  # a second rank-1 fine-tune


@dataclass
class Story:
    """What the sections share: models, judge, question sets, settings and earlier results."""

    cfg: dict
    rep: Report
    chat: Any
    org: Any
    adapter: Any
    judge: Any
    qsets: dict[str, list[str]]
    sampling: SamplingConfig  # how every judged answer is sampled
    seed: int
    progress: bool
    out: Path
    answers: pd.DataFrame | None = None
    dirs: dict | None = None
    chat_dirs: dict | None = None
    layer: int | None = None
    embedded: bool = True  # the embedded SmolLM2 (the shipped narrow/general runs fit only it)
    bad: list | None = None  # (question, answer) pairs the direction was extracted from
    good: list | None = None
    # likelihood gaps per (model key, question set), shared by the sections' lenses
    gap_cache: dict = field(default_factory=dict)


def fmt_rate(row) -> str:
    if not row["n"]:
        return f"no coherent answers (n=0 of {int(row.get('n_answers', 0))})"
    return f"{row['rate']:.2f} [{row['low']:.2f}, {row['high']:.2f}] (k={int(row['k'])}, n={int(row['n'])})"


def clearly_lower(a, b) -> bool:
    """Rate ``a`` is below rate ``b``: their Wilson intervals do not overlap."""
    return bool(a["n"] and b["n"] and a["high"] < b["low"])


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
