"""Issue 30 item 3, ``PLAN_narrow.md`` amendment 5: efficiency and stability of narrow vs
general on the coder with an interval over training seeds.

Seed 0 is the shipped pair (``narrow/loss.json``, written by ``narrow_loss.py``); seeds 1 and 2
are trained with the same recipes and ``--seed S`` into ``runs/``::

    python -m emlens.organisms.train --name coder-rank1-down-medical --seed 1 \\
        --out runs/coder-rank1-down-medical-seed1
    python -m emlens.organisms.train --name coder-rank1-down-medical-kl --seed 1 \\
        --out runs/coder-rank1-down-medical-kl-seed1
    OMP_NUM_THREADS=2 python data-src/coder_causal/narrow_seeds.py measure --seed 1
    python data-src/coder_causal/narrow_seeds.py analyse

``measure`` measures one seed's pair exactly as ``narrow_loss.py`` measures the shipped one (its
``measure``, ``efficiency`` and ``stability``) and writes ``narrow/seeds/seedS.json``;
``analyse`` puts the seeds' effects together (mean ± t(0.975, n-1) × sd / sqrt(n)) and replaces
the findings ``efficiency`` and ``stability`` in ``results/coder/findings.json``.
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
from emlens.findings import Comparison, Effect, Finding
from emlens.lora import load_adapter
from emlens.organisms import runs_dir
from emlens.organisms.train import load_rows
from emlens.trainable_adapter import TrainableAdapter
from emlens.training import evaluate_loss, prepare

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
from analyse import flat, write_findings  # noqa: E402
from narrow_loss import (  # noqa: E402
    BOOT_SEED,
    DELTA_EFF,
    DELTA_STAB,
    INSTRUMENT,
    N_BOOT,
    SOLUTIONS,
    curve_lists,
    efficiency,
    mean_ce,
    measure,
    misaligned_batches,
    row_losses,
    stability,
)

SEEDS = (0, 1, 2)
OUT = HERE / "narrow" / "seeds"


def run_folder(kind: str, seed: int) -> Path:
    """The trained run of ``kind`` ("general" / "narrow") for a new training ``seed``."""
    return runs_dir() / f"{SOLUTIONS[kind]}-seed{seed}"


def measure_seed(seed: int) -> dict:
    """One seed's pair, measured as ``narrow_loss.py`` measures the shipped one."""
    t0 = time.perf_counter()
    params = {}
    for kind in SOLUTIONS:
        folder = run_folder(kind, seed)
        log = json.loads((folder / "train_log.json").read_text())
        if log["recipe"]["seed"] != seed or log["steps"] != 72:
            raise ValueError(f"{folder} is not a finished seed-{seed} run of the recipe "
                             f"(seed {log['recipe']['seed']}, {log['steps']} steps).")
        params[kind] = TrainableAdapter.from_adapter(load_adapter(folder))
    torch.manual_seed(0)
    chat = emlens.load_model("qwen2.5-coder-1.5b", dtype=torch.bfloat16)
    tok = chat.tokenizer
    rows = load_rows("medical", "heldout")
    start = min(p.first_layer for p in params.values())
    data = prepare(chat, misaligned_batches(tok, rows, 1), start_layer=start)
    base = row_losses(chat, None, data)
    norms = {k: p.effective_norm() for k, p in params.items()}
    sols = {k: measure(chat, data, p) for k, p in params.items()}
    print(f"seed {seed}: curves and noise done ({time.perf_counter() - t0:.0f} s)", flush=True)
    other = load_rows("nonmedical", None)
    kl_set = prepare(chat, misaligned_batches(tok, other, 8), start_layer=start, reference=True)
    kl_check = {k: evaluate_loss(chat, p, kl_set, kind="kl") for k, p in params.items()}
    del kl_set
    idx = np.random.default_rng(BOOT_SEED).integers(0, len(rows), (N_BOOT, len(rows)))
    everything = np.arange(len(rows))[None, :]
    eff_boot = efficiency(base, sols["general"], sols["narrow"], norms, idx)
    stab_boot = stability(base, sols["general"], idx) - stability(base, sols["narrow"], idx)
    stab = {k: float(stability(base, sols[k], everything)[0]) for k in SOLUTIONS}
    out = {
        "seed": seed, "plan": "data-src/coder_causal/PLAN_narrow.md (amendment 5)",
        "runs": {k: str(run_folder(k, seed).relative_to(runs_dir().parent)) for k in SOLUTIONS},
        "rows": len(rows), "base_ce": mean_ce(base), "norms": norms,
        "curves": curve_lists(base, sols, norms),
        "efficiency": {"effect": float(efficiency(base, sols["general"], sols["narrow"], norms,
                                                  everything)[0]),
                       "low": float(np.percentile(eff_boot, 2.5)),
                       "high": float(np.percentile(eff_boot, 97.5))},
        "stability": {"effect": stab["general"] - stab["narrow"],
                      "low": float(np.percentile(stab_boot, 2.5)),
                      "high": float(np.percentile(stab_boot, 97.5)), "mean": stab},
        "kl_nonmedical": kl_check,
        "seconds": round(time.perf_counter() - t0, 1), "torch_threads": torch.get_num_threads(),
        "dtype": "bfloat16",
    }
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / f"seed{seed}.json").write_text(json.dumps(out, indent=1) + "\n")
    print(json.dumps({k: out[k] for k in ("efficiency", "stability", "kl_nonmedical")}, indent=1))
    return out


def seed_zero() -> dict:
    """The shipped pair's numbers in ``measure_seed``'s shape, from ``narrow/loss.json``."""
    loss = json.loads((HERE / "narrow" / "loss.json").read_text())
    eff, stab = loss["efficiency"], loss["stability"]
    return {"seed": 0, "runs": SOLUTIONS, "norms": loss["norms"], "curves": loss["curves"],
            "efficiency": {k: eff[k] for k in ("effect", "low", "high")},
            "stability": {**{k: stab[k] for k in ("effect", "low", "high")},
                          "mean": loss["stability_mean"]},
            "kl_nonmedical": loss["kl_nonmedical"]}


def over_seeds(values: list[float]) -> tuple[float, float, float]:
    """Mean and the t interval (95%) of per-seed effects."""
    e = Effect.t_interval(values)
    return e.value, e.low, e.high


def analyse() -> list[dict]:
    per_seed = [seed_zero()] + [json.loads((OUT / f"seed{s}.json").read_text())
                                for s in SEEDS[1:]]
    caveat = ("interval over 3 training seeds (t, 2 df); seed 0's general solution was trained by "
              "an earlier emlens.training with the same recipe")
    entries = []
    for key, delta, lens, claim, control in (
        ("efficiency", DELTA_EFF,
         "CE at equal norm, general - narrow (nats per token, held-out medical answers; mean over "
         "training seeds)",
         "The general (no-KL) solution is more efficient than the narrow (KL) one: lower loss at "
         "equal parameter norm", "the narrow (KL) solution of the same seed at its own norm"),
        ("stability", DELTA_STAB,
         "relative loss increase under orthogonal noise, general - narrow (mean over e 0.3/0.6, B "
         "and A, 5 noise seeds; mean over training seeds)",
         "The general (no-KL) solution is more stable than the narrow (KL) one: smaller relative "
         "loss increase under orthogonal noise",
         "the narrow (KL) solution of the same seed under the same noise"),
    ):
        value, low, high = over_seeds([s[key]["effect"] for s in per_seed])
        cmp = Comparison(lens, Effect(value, low, high, len(per_seed)), expected="decrease",
                         delta=delta, short="loss")
        seeds_text = ", ".join(f"seed {s['seed']} {s[key]['effect']:+.3f} "
                               f"[{s[key]['low']:+.3f}, {s[key]['high']:+.3f}]" for s in per_seed)
        finding = Finding(key, claim, (cmp,), evidence=f"{seeds_text} (row bootstrap); {caveat}")
        entries.append(flat(finding, cmp, control, None, {
            "read_confirmation": None, "instrument": INSTRUMENT, "delta": delta,
            "caveat": caveat, "n_unit": "training seeds (each on the 26 held-out rows)",
            "per_seed": [{"seed": s["seed"], "runs": s["runs"], "norms": s["norms"],
                          **s[key], "kl_nonmedical": s["kl_nonmedical"],
                          "curves": s["curves"]} for s in per_seed]}))
    write_findings(entries)
    for e in entries:
        print(f"{e['id']}: {e['effect']:+.4f} [{e['low']:+.4f}, {e['high']:+.4f}] n={e['n']} -> "
              f"{e['verdict']}")
    return entries


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="stage", required=True)
    m = sub.add_parser("measure")
    m.add_argument("--seed", type=int, required=True, choices=SEEDS[1:])
    sub.add_parser("analyse")
    args = p.parse_args(argv)
    if args.stage == "measure":
        measure_seed(args.seed)
    else:
        analyse()


if __name__ == "__main__":
    main()
