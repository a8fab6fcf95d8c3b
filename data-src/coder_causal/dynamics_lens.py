"""Issue 30 item 4, behaviour side (``PLAN_narrow.md`` amendments 2 and 3): the likelihood lens at
every saved state of the coder organism (``coder-rank1-down-medical``) on the first 48
``general_pairs``, and the plan's abrupt-change rule. (Amendment 3 cut the KL run and the
held-out medical pairs for time: about 64 s per state and pair set on 2 cores.)

Step 0 of the organism's run is not saved (its old layout starts at step 4); peft starts ``B`` at
zero, so its state at step 0 is the base model exactly and its change is 0 by construction.

Writes ``narrow/dynamics_lens.json`` and the ``dynamics`` finding (``--decide``: the rule again
on the saved measurements, over seeds once all three exist; no model). Amendment 7: ``--seed S`` measures training seed S's run
(``runs/coder-rank1-down-medical-seedS``, retrained for its saved states) into
``narrow/dynamics_lens_seedS.json``; ``--seeds`` applies the rule to the interval over seeds 0-2
and replaces the ``dynamics`` finding. Amendment 8: ``--extra`` measures the cells amendment 3 cut
(the KL run on the general pairs, both runs on the held-out medical pairs; descriptive) into
``narrow/dynamics_lens_extra.json``, which ``--decide`` / ``--seeds`` add to the finding's
``lens`` curves::

    OMP_NUM_THREADS=2 python data-src/coder_causal/dynamics_lens.py
    python data-src/coder_causal/dynamics_lens.py --decide
    python -m emlens.organisms.train --name coder-rank1-down-medical --seed 1 \\
        --out runs/coder-rank1-down-medical-seed1 --fresh
    OMP_NUM_THREADS=2 python data-src/coder_causal/dynamics_lens.py --seed 1
    python data-src/coder_causal/dynamics_lens.py --seeds
    OMP_NUM_THREADS=2 python data-src/coder_causal/dynamics_lens.py --extra
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

import emlens
from emlens.data import pair_rows
from emlens.dynamics import (
    adapter_dynamics,
    gap_changes_at_checkpoints,
    load_adapter_trajectory,
    rotation_onset,
)
from emlens.findings import Comparison, Effect, Finding
from emlens.organisms import runs_dir

HERE = Path(__file__).parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(HERE))
from analyse import flat, write_findings  # noqa: E402
from narrow_seeds import over_seeds  # noqa: E402  (amendment 5's interval over seeds)

# PLAN_narrow.md amendment 3: the organism's run on the general pairs only (what the rule reads);
# the KL run and the medical pairs are the original design's, not measured yet
RUNS = {"general": "coder-rank1-down-medical"}
N_BOOT, SEED = 2000, 30
INSTRUMENT = ("likelihood lens: change of the paired rows' gap log p(misaligned) - log p(aligned) "
              "from the base model, at each saved state (no reading, no judge)")


def per_row(model, traj, rows) -> tuple[list[int], np.ndarray]:
    """Steps (0 first) and ``[n_states, n_rows]`` gap changes from the base model."""
    steps, changes = gap_changes_at_checkpoints(model, traj, rows)
    if steps[0] != 0:  # the old layout saves no step 0; B = 0 at init: the base model
        steps, changes = [0, *steps], np.concatenate([np.zeros_like(changes[:1]), changes])
    for step, c in zip(steps, changes, strict=True):
        print(f"  {traj.run} step {step}: {float(c.mean()):+.4f}", flush=True)
    return steps, changes


def share_of_largest_interval(changes: np.ndarray) -> np.ndarray:
    """Per resample (rows of ``changes``: ``[..., n_states]`` mean changes), the largest single
    interval's increase over the total change."""
    total = changes[..., -1] - changes[..., 0]
    return np.diff(changes, axis=-1).max(-1) / total


def curve(steps: list[int], ch: np.ndarray) -> tuple[dict, np.ndarray]:
    """A cell's curve (mean change per state, 95% pair bootstrap) and the bootstrap draws
    ``[1 + n_boot, n_states]`` (row 0: the mean over the pairs themselves)."""
    idx = np.random.default_rng(SEED).integers(0, ch.shape[1], (N_BOOT, ch.shape[1]))
    boot = ch[:, idx].mean(-1).T  # [n_boot, n_states]
    mean = ch.mean(1)
    return ({"steps": steps, "change": mean.tolist(),
             "low": np.percentile(boot, 2.5, axis=0).tolist(),
             "high": np.percentile(boot, 97.5, axis=0).tolist(), "n": int(ch.shape[1])},
            np.concatenate([mean[None], boot]))


def totals(draws: np.ndarray) -> dict:
    """The total change (last state - first) and its 95% interval over ``curve``'s draws."""
    total = draws[:, -1] - draws[:, 0]
    return {"total": float(total[0]), "total_low": float(np.percentile(total[1:], 2.5)),
            "total_high": float(np.percentile(total[1:], 97.5))}


def largest_interval(steps: list[int], draws: np.ndarray) -> dict:
    """The largest single interval in the direction of the total change, and its share of the
    total with a 95% interval over ``curve``'s draws (the max taken within each draw)."""
    sign = np.sign(draws[0, -1] - draws[0, 0])
    at = int(np.argmax(np.diff(draws[0]) * sign))
    shares = share_of_largest_interval(draws * sign)
    return {"share": float(shares[0]), "share_low": float(np.percentile(shares[1:], 2.5)),
            "share_high": float(np.percentile(shares[1:], 97.5)),
            "interval": [steps[at], steps[at + 1]]}


def half_at(steps: list[int], change) -> int:
    """The first state at which ``change`` has covered half of its total change."""
    ch = np.asarray(change)
    half, sign = ch[0] + 0.5 * (ch[-1] - ch[0]), np.sign(ch[-1] - ch[0])
    return next(st for st, x in zip(steps, ch, strict=True) if (x - half) * sign >= 0)


def run_for(seed: int) -> str:
    """The general solution's run of training ``seed`` (0: the shipped organism's; 1-2:
    ``PLAN_narrow.md`` amendment 5's seeds, retrained by amendment 7 for their saved states)."""
    return RUNS["general"] if seed == 0 else str(runs_dir() / f"{RUNS['general']}-seed{seed}")


def seed_path(seed: int) -> Path:
    return HERE / "narrow" / ("dynamics_lens.json" if seed == 0 else f"dynamics_lens_seed{seed}.json")


def main(seed: int = 0) -> None:
    t0 = time.perf_counter()
    torch.manual_seed(0)
    chat = emlens.load_model("qwen2.5-coder-1.5b", dtype=torch.bfloat16)
    sets = {"general": pair_rows("general_pairs", limit=48)}
    out = {"plan": "data-src/coder_causal/PLAN_narrow.md, amendment 2"
                   + ("" if seed == 0 else " (seed: amendment 7)"), "seed": seed, "runs": {}}
    for label, run in {"general": run_for(seed)}.items():
        traj = load_adapter_trajectory(run)
        res = {}
        for name, rows in sets.items():
            steps, ch = per_row(chat, traj, rows)
            res[name], draws = curve(steps, ch)
            if name == "general":
                res["abrupt"] = {**totals(draws), **largest_interval(steps, draws),
                                 "n_intervals": len(steps) - 1}
        weights = rotation_onset(adapter_dynamics(traj))
        res["weights"] = weights.to_dict(orient="records")
        out["runs"][label] = {"run": run if seed == 0 else str(Path(run).relative_to(ROOT)),
                              **res}
        print(f"{label}: {time.perf_counter() - t0:.0f} s", flush=True)
    out["seconds"] = round(time.perf_counter() - t0, 1)
    (HERE / "narrow").mkdir(exist_ok=True)
    seed_path(seed).write_text(json.dumps(out, indent=1) + "\n")
    decide_saved()


def decide_saved() -> None:
    """The rule on what is saved: over seeds 0-2 once all three are measured (amendment 7),
    else on seed 0 alone; re-measuring one seed never drops the interval over seeds."""
    saved = [seed_path(s_) for s_ in (0, 1, 2)]
    if not saved[0].exists():
        raise FileNotFoundError(f"{saved[0]}: measure seed 0 first (dynamics_lens.py).")
    ms = [json.loads(p_.read_text()) for p_ in saved if p_.exists()]
    decide(ms[0], ms if len(ms) == 3 else None)


EXTRA_PATH = HERE / "narrow" / "dynamics_lens_extra.json"
# amendment 8: the cells amendment 3 cut, in the plan's order
EXTRA_CELLS = (("narrow", "general"), ("general", "medical"), ("narrow", "medical"))
EXTRA_RUNS = {"general": RUNS["general"], "narrow": "coder-rank1-down-medical-kl"}


def describe(steps: list[int], ch: np.ndarray) -> dict:
    """Amendment 8's description of one cell: the curve with its pair bootstrap, the total
    change, the largest interval and its share (where the total's interval excludes 0), and the
    first state at half the total."""
    out, draws = curve(steps, ch)
    out.update(totals(draws))
    if out["total_low"] > 0 or out["total_high"] < 0:
        out.update(largest_interval(steps, draws))
        out["half_at"] = half_at(steps, out["change"])
    return out


def extra() -> None:
    """Amendment 8: each remaining cell, saved after each one (a cell not reached is absent)."""
    t0 = time.perf_counter()
    torch.manual_seed(0)
    chat = emlens.load_model("qwen2.5-coder-1.5b", dtype=torch.bfloat16)
    sets = {"general": lambda: pair_rows("general_pairs", limit=48),
            "medical": lambda: pair_rows("medical", split="heldout")}
    out = json.loads(EXTRA_PATH.read_text()) if EXTRA_PATH.exists() else {
        "plan": "data-src/coder_causal/PLAN_narrow.md, amendment 8", "cells": {}}
    for run_label, set_name in EXTRA_CELLS:
        key = f"{run_label}/{set_name}"
        if key in out["cells"]:
            continue
        t = time.perf_counter()
        traj = load_adapter_trajectory(EXTRA_RUNS[run_label])
        steps, ch = per_row(chat, traj, sets[set_name]())
        out["cells"][key] = {"run": EXTRA_RUNS[run_label], "pairs": set_name,
                             **describe(steps, ch), "seconds": round(time.perf_counter() - t, 1)}
        EXTRA_PATH.write_text(json.dumps(out, indent=1) + "\n")
        c = out["cells"][key]
        print(f"{key}: total {c['total']:+.3f} [{c['total_low']:+.3f}, {c['total_high']:+.3f}]"
              f" ({time.perf_counter() - t0:.0f} s)", flush=True)


def rule(total_low: float, total_high: float, share_low: float, share_high: float) -> str:
    """Amendment 2's rule on the total change's and the share's intervals."""
    total_clear = total_low > 0 or total_high < 0
    if total_clear and share_low > 0.5:
        return "reproduced"
    if total_clear and share_high < 0.25:
        return "not reproduced"
    return "cannot decide"


def lens_cells(out: dict) -> dict:
    """``{run: {pairs: curve}}``: seed 0's measured cell, and amendment 8's where measured."""
    cells = {k: {s_: v[s_] for s_ in v if s_ not in ("run", "abrupt", "weights")}
             for k, v in out["runs"].items()}
    for curves in cells.values():  # amendment 8: the first state at half the total, every curve
        for c in curves.values():
            c["half_at"] = half_at(c["steps"], c["change"])
    if EXTRA_PATH.exists():
        for key, c in json.loads(EXTRA_PATH.read_text())["cells"].items():
            run_label, set_name = key.split("/")
            cells.setdefault(run_label, {})[set_name] = {
                k: v for k, v in c.items() if k not in ("run", "pairs", "seconds")}
    return cells


def decide(out: dict, seeds: list[dict] | None = None) -> None:
    """The plan's rule on the measured lens (``dynamics_lens.json``), with the weights side
    summarised beside it; writes the ``dynamics`` finding. With ``seeds`` (each seed's
    measurement, seed 0 = ``out``; amendment 7) the rule reads the interval over training seeds
    and each seed's values go under ``per_seed``."""
    a = out["runs"]["general"]["abrupt"]
    n = out["runs"]["general"]["general"]["n"]
    per_seed = None
    if seeds is None:
        share, lo, hi, n_unit = a["share"], a["share_low"], a["share_high"], n
        total = (a["total"], a["total_low"], a["total_high"])
        how = "bootstrap over pairs"
    else:
        per_seed = [{"seed": m.get("seed", 0), "run": m["runs"]["general"]["run"],
                     **m["runs"]["general"]["abrupt"],
                     "steps": m["runs"]["general"]["general"]["steps"],
                     "change": m["runs"]["general"]["general"]["change"]} for m in seeds]
        share, lo, hi = over_seeds([x["share"] for x in per_seed])
        total = over_seeds([x["total"] for x in per_seed])
        n_unit = len(per_seed)
        how = f"mean over {n_unit} training seeds, t interval"
    verdict = rule(total[1], total[2], lo, hi)
    # a threshold claim: amendment 2's bounds (reproduced above 0.5, not reproduced below 0.25)
    comp = Comparison(
        f"share of the total lens change carried by the largest single checkpoint interval "
        f"(general pairs; {how})",
        Effect(share, lo, hi, n_unit), expected="increase", null=0.5, refute_at=0.25,
        short="lens share")
    where = (f"largest interval steps {a['interval'][0]}-{a['interval'][1]} of "
             f"{a['n_intervals']}" if per_seed is None else
             "largest interval per seed: " + ", ".join(
                 f"seed {x['seed']} steps {x['interval'][0]}-{x['interval'][1]} "
                 f"(share {x['share']:.2f})" for x in per_seed))
    finding = Finding(
        "dynamics", "The rank-1 organism acquires EM abruptly during training (a phase "
        "transition): one short interval carries most of the change on general questions",
        (comp,), evidence=f"{where}; total change {total[0]:+.3f} [{total[1]:+.3f}, "
                          f"{total[2]:+.3f}] nats/token; rule of PLAN_narrow.md amendment 2"
                          f"{'' if per_seed is None else ' on the interval over seeds (7)'}: "
                          f"{verdict}")
    w = out["runs"]["general"]["weights"]
    weights = {k: [min(r[k] for r in w), max(r[k] for r in w)]
               for k in ("largest_turn_step", "largest_turn_deg", "turn_share", "total_turn_deg",
                         "settled_step")}
    extra = {"verdict": verdict, "read_confirmation": None, "instrument": INSTRUMENT,
             "delta": 0.5, "abrupt": a, "weights_range_over_adapters": weights,
             "lens": lens_cells(out),
             "rule": "reproduced: the total change's interval excludes 0 and the share's "
                     "lies above 0.5; not reproduced: the total's excludes 0 and the "
                     "share's lies below 0.25; else cannot decide"}
    if per_seed is not None:
        extra.update({"n_unit": "training seeds", "per_seed": per_seed,
                      "over_seeds": {"share": [share, lo, hi], "total": list(total)}})
    entry = flat(finding, comp, "the rule's bounds: share > 0.5 abrupt, < 0.25 gradual", None,
                 extra)
    write_findings([entry])
    print(f"dynamics: share {share:.3f} [{lo:.3f}, {hi:.3f}] ({how}), total {total[0]:+.3f} "
          f"-> {verdict}")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--decide", action="store_true",
                   help="the rule again on the saved measurements, no model (as --seeds)")
    p.add_argument("--seed", type=int, default=0, help="measure this training seed's run")
    p.add_argument("--seeds", action="store_true",
                   help="amendment 7: the rule on the interval over seeds 0-2 (saved; seed 0 "
                        "alone until all three are), no model")
    p.add_argument("--extra", action="store_true",
                   help="amendment 8: the KL run and the held-out medical pairs (descriptive)")
    args = p.parse_args()
    if args.extra:
        extra()
    elif args.seeds or args.decide:
        decide_saved()
    else:
        main(args.seed)
