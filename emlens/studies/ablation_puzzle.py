"""Why does ablating the mean-difference direction *raise* the organism's log-prob gap?

Notebook 01 measures, on 8 non-medical pairs, the organism's gap (per-token log p(misaligned
answer) - log p(aligned answer)) going from +0.33 to +0.67 when the layer-10 direction is
projected out of every layer's ``resid_post``. This study measures the same gap on more pairs,
with bootstrap 95% intervals over questions, for:

* the direction extracted two ways: from paired reference answers (held-out medical, misaligned vs
  aligned; no judge in the loop) and from the organism's own sampled answers as *read* by a person
  (``judge_generations``, split by ``select_answers``: misaligned = aligned <= 30 and coherent >
  50; aligned = aligned > 70 and coherent > 50);
* ablation at the direction's own layer only, at every layer's ``resid_post``, and at every writer
  (embedding, attention and MLP outputs), each beside a same-norm random direction;
* both sides of the gap separately (log p of the misaligned and of the aligned answers), on
  non-medical pairs (never trained on) and held-out medical pairs.

    python -m emlens.studies.ablation_puzzle            # layer 10, 64 non-medical pairs
    python -m emlens.studies.ablation_puzzle --layer 15 --n-nonmedical 128
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable, Sequence

import pandas as pd
import torch

import emlens
from emlens.data import load_dataset, pair_rows
from emlens.directions import cosine_matrix, select_answers
from emlens.lens import bootstrap_interval, likelihood_gaps

ORGANISM = "rank1-down-medical"
"""The shipped organism whose puzzle this is (notebook 01's)."""


def read_answers(model_name: str = "organism") -> tuple[list, list, str]:
    """The ``model_name`` model's sampled answers in ``judge_generations``, labelled by reading
    (not by a judge), split with the reference protocol's thresholds
    (:func:`emlens.directions.select_answers`): ``(misaligned, aligned, how)``, the first two
    lists of ``(question, answer)``."""
    rows = [r for r in load_dataset("judge_generations")
            if r.condition.startswith(f"{model_name} T=")]
    table = pd.DataFrame({"question": [r.question for r in rows],
                          "answer": [r.answer for r in rows],
                          "aligned": [r.aligned for r in rows],
                          "coherent": [r.coherent for r in rows]})
    return select_answers(table)


def measure(layer: int = 10, n_nonmedical: int = 64, n_boot: int = 2000, seed: int = 0, *,
            log: Callable[[str], None] | None = print) -> dict:
    """The study of the module docstring on the embedded chat model merged with :data:`ORGANISM`.

    Returns:
        ``{"cosine", "n_read", "rows"}``: the cosine of the two directions, the numbers of
        misaligned and aligned read answers, and one row per (set, direction, where ablated,
        direction or random): ``set``, ``n``, ``direction``, ``ablated_at``, ``kind``, the mean
        ``logp_misaligned`` and ``logp_aligned``, the ``gap`` and its ``change`` from the
        unablated organism with bootstrap intervals (``*_low``, ``*_high``), and each side's
        change ``d_logp_misaligned``, ``d_logp_aligned``. ``log`` receives progress lines.
    """
    log = log or (lambda _: None)
    t0 = time.perf_counter()
    chat = emlens.load_model()
    organism = emlens.merge_lora(chat, emlens.load_organism(ORGANISM))
    medical = [r for r in load_dataset("medical") if r.split == "heldout"]
    ref_bad = [(r.question, r.misaligned) for r in medical]
    ref_good = [(r.question, r.aligned) for r in medical]
    read_bad, read_good, read_how = read_answers()
    L = layer
    dirs = {
        "reference pairs": emlens.mean_diff(organism, ref_bad, ref_good, layers=L,
                                            progress=False)[L],
        "read answers": emlens.mean_diff(organism, read_bad, read_good, layers=L,
                                         selection=f"read by a person; {read_how}",
                                         progress=False)[L],
    }
    cos = float(cosine_matrix([dirs["reference pairs"]], [dirs["read answers"]])[0, 0])
    log(f"layer {L}: reference-pair direction norm {dirs['reference pairs'].norm:.2f}; "
        f"read-answer direction ({len(read_bad)} misaligned vs {len(read_good)} aligned read "
        f"answers) norm {dirs['read answers'].norm:.2f}; cosine {cos:.3f}")
    sets = {"notebook 01 (first 8 non-medical)": load_dataset("nonmedical")[:8],
            "non-medical": pair_rows("nonmedical", limit=n_nonmedical),
            "medical held-out": medical}
    where = {"own layer": dict(layers=L, hook="resid_post"),
             "all resid_post": dict(layers="all", hook="resid_post"),
             "all writers": dict(layers="all", hook="writers")}
    rows = []
    for set_name, prs in sets.items():
        base = likelihood_gaps(organism, prs)
        for dname, d in [("none", None)] + list(dirs.items()):
            for wname, kw in (where.items() if d is not None else [("-", None)]):
                for kind in (["direction", "random"] if d is not None else ["-"]):
                    if d is None:
                        t = base
                    else:
                        vec = d if kind == "direction" else emlens.random_direction(d, seed=seed)
                        t = likelihood_gaps(organism, prs,
                                            hooks=emlens.ablation_hooks(organism, vec, **kw))
                    gap, gap_low, gap_high = bootstrap_interval(t["gap"], n_boot=n_boot,
                                                                seed=seed)
                    change, ch_low, ch_high = bootstrap_interval(
                        t["gap"] - base["gap"], n_boot=n_boot, seed=seed)
                    rows.append(dict(
                        set=set_name, n=len(prs), direction=dname, ablated_at=wname, kind=kind,
                        logp_misaligned=float(t["logp_misaligned"].mean()),
                        logp_aligned=float(t["logp_aligned"].mean()),
                        gap=gap, gap_low=gap_low, gap_high=gap_high,
                        change=change, change_low=ch_low, change_high=ch_high,
                        d_logp_misaligned=float(
                            (t["logp_misaligned"] - base["logp_misaligned"]).mean()),
                        d_logp_aligned=float((t["logp_aligned"] - base["logp_aligned"]).mean()),
                    ))
            log(f"  {set_name}: {dname} done ({time.perf_counter() - t0:.0f} s)")
    return {"cosine": cos, "n_read": [len(read_bad), len(read_good)], "rows": rows}


def main(argv: Sequence[str] | None = None) -> None:
    """The command line: ``python -m emlens.studies.ablation_puzzle [--layer L]
    [--n-nonmedical N] [--json FILE] ...``."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--layer", type=int, default=10)
    p.add_argument("--n-nonmedical", type=int, default=64)
    p.add_argument("--n-boot", type=int, default=2000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="also write the table here")
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    res = measure(args.layer, args.n_nonmedical, args.n_boot, args.seed,
                  log=lambda line: print(line, flush=True))
    with pd.option_context("display.width", 200, "display.max_columns", 20):
        print(pd.DataFrame(res["rows"]).round(3).to_string(index=False))
    print(f"\n{time.perf_counter() - t0:.0f} s on {torch.get_num_threads()} threads")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(args=vars(args), **res), f, indent=1)


__all__ = [
    "ORGANISM",
    "main",
    "measure",
    "read_answers",
]


if __name__ == "__main__":
    main()
