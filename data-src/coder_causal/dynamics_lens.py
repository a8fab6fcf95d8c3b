"""Issue 30 item 4, behaviour side (``PLAN_narrow.md`` amendments 2 and 3): the likelihood lens at
every saved state of the coder organism (``coder-rank1-down-medical``) on the first 48
``general_pairs``, and the plan's abrupt-change rule. (Amendment 3 cut the KL run and the
held-out medical pairs for time: about 64 s per state and pair set on 2 cores.)

Step 0 of the organism's run is not saved (its old layout starts at step 4); peft starts ``B`` at
zero, so its state at step 0 is the base model exactly and its change is 0 by construction.

Writes ``narrow/dynamics_lens.json`` and the ``dynamics`` finding (``--decide``: the rule again
on the saved measurement, no model)::

    OMP_NUM_THREADS=2 python data-src/coder_causal/dynamics_lens.py
    python data-src/coder_causal/dynamics_lens.py --decide
"""

from __future__ import annotations

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

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
from analyse import flat, write_findings  # noqa: E402

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


def main() -> None:
    t0 = time.perf_counter()
    torch.manual_seed(0)
    chat = emlens.load_model("qwen2.5-coder-1.5b", dtype=torch.bfloat16)
    sets = {"general": pair_rows("general_pairs", limit=48)}
    out = {"plan": "data-src/coder_causal/PLAN_narrow.md, amendment 2", "runs": {}}
    for label, run in RUNS.items():
        traj = load_adapter_trajectory(run)
        res = {}
        for name, rows in sets.items():
            steps, ch = per_row(chat, traj, rows)
            idx = np.random.default_rng(SEED).integers(0, ch.shape[1], (N_BOOT, ch.shape[1]))
            boot = ch[:, idx].mean(-1).T  # [n_boot, n_states]
            mean = ch.mean(1)
            res[name] = {"steps": steps, "change": mean.tolist(),
                         "low": np.percentile(boot, 2.5, axis=0).tolist(),
                         "high": np.percentile(boot, 97.5, axis=0).tolist(),
                         "n": int(ch.shape[1])}
            if name == "general":
                share = float(share_of_largest_interval(mean))
                sb = share_of_largest_interval(boot)
                total_b = boot[:, -1] - boot[:, 0]
                at = int(np.argmax(np.diff(mean)))
                res["abrupt"] = {
                    "share": share, "share_low": float(np.percentile(sb, 2.5)),
                    "share_high": float(np.percentile(sb, 97.5)),
                    "total": float(mean[-1] - mean[0]),
                    "total_low": float(np.percentile(total_b, 2.5)),
                    "total_high": float(np.percentile(total_b, 97.5)),
                    "interval": [steps[at], steps[at + 1]], "n_intervals": len(steps) - 1}
        weights = rotation_onset(adapter_dynamics(traj))
        res["weights"] = weights.to_dict(orient="records")
        out["runs"][label] = {"run": run, **res}
        print(f"{label}: {time.perf_counter() - t0:.0f} s", flush=True)
    out["seconds"] = round(time.perf_counter() - t0, 1)
    (HERE / "narrow").mkdir(exist_ok=True)
    (HERE / "narrow" / "dynamics_lens.json").write_text(json.dumps(out, indent=1) + "\n")
    decide(out)


def decide(out: dict) -> None:
    """The plan's rule on the measured lens (``dynamics_lens.json``), with the weights side
    summarised beside it; writes the ``dynamics`` finding."""
    a = out["runs"]["general"]["abrupt"]
    total_clear = a["total_low"] > 0 or a["total_high"] < 0
    if total_clear and a["share_low"] > 0.5:
        verdict = "reproduced"
    elif total_clear and a["share_high"] < 0.25:
        verdict = "not reproduced"
    else:
        verdict = "cannot decide"
    n = out["runs"]["general"]["general"]["n"]
    comp = Comparison(
        "share of the total lens change carried by the largest single checkpoint interval "
        "(general pairs; bootstrap over pairs)",
        Effect(a["share"], a["share_low"], a["share_high"], n), expected="increase",
        delta=0.5, null=0.0, short="lens share")
    finding = Finding(
        "dynamics", "The rank-1 organism acquires EM abruptly during training (a phase "
        "transition): one short interval carries most of the change on general questions",
        (comp,), evidence=f"largest interval steps {a['interval'][0]}-{a['interval'][1]} of "
                          f"{a['n_intervals']}; total change {a['total']:+.3f} "
                          f"[{a['total_low']:+.3f}, {a['total_high']:+.3f}] nats/token; rule of "
                          f"PLAN_narrow.md amendment 2: {verdict}")
    w = out["runs"]["general"]["weights"]
    weights = {k: [min(r[k] for r in w), max(r[k] for r in w)]
               for k in ("largest_turn_step", "largest_turn_deg", "turn_share", "total_turn_deg",
                         "settled_step")}
    entry = flat(finding, comp, "the rule's bounds: share > 0.5 abrupt, < 0.25 gradual", None,
                 {"verdict": verdict, "read_confirmation": None, "instrument": INSTRUMENT,
                  "delta": 0.5, "abrupt": a, "weights_range_over_adapters": weights,
                  "lens": {k: {s_: v[s_] for s_ in v if s_ not in ("run", "abrupt", "weights")}
                           for k, v in out["runs"].items()},
                  "rule": "reproduced: the total change's interval excludes 0 and the share's "
                          "lies above 0.5; not reproduced: the total's excludes 0 and the "
                          "share's lies below 0.25; else cannot decide"})
    write_findings([entry])
    print(f"dynamics: share {a['share']:.3f} [{a['share_low']:.3f}, {a['share_high']:.3f}], "
          f"total {a['total']:+.3f} -> {verdict}")


if __name__ == "__main__":
    if sys.argv[1:] == ["--decide"]:  # the rule again on the saved measurement
        decide(json.loads((HERE / "narrow" / "dynamics_lens.json").read_text()))
    else:
        main()
