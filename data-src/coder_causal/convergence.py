"""Claim C's convergence (PLAN.md, amendments 3 and 6): do two organisms share the direction?

At every layer, the cosine between organism 1's judged-answer direction (its own answers in
``coder_general_em``, read misaligned vs aligned) and organism 2's (its own answers in
``emergence2``, read the same way), each a difference of per-answer means, with a 95% interval
from 1000 bootstrap resamples over answers (:func:`emlens.directions.cosine_intervals`).
Baselines: a random direction's 95% range (1.96 / sqrt(d_model)), and organism 1 against the
good-answer control's direction from the control's own answers where the control has at least 5
answers read misaligned and coherent (amendment 3). The finding is decided at the Claim A
cell's layer (amendment 6). Writes ``convergence.json`` and the ``convergence`` finding::

    OMP_NUM_THREADS=2 python data-src/coder_causal/convergence.py
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

import pandas as pd
import torch

import emlens
from emlens.directions import cosine_intervals, select_answers
from emlens.findings import Comparison, Effect, Finding

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
from analyse import flat, joined, write_findings  # noqa: E402
from generate import ORGANISMS, SEED  # noqa: E402
from screen import labelled_answers  # noqa: E402

MIN_CONTROL = 5  # amendment 3
SMALLEST = 0.5  # the smallest cosine of interest


def own_answers(table: pd.DataFrame):
    """``(misaligned, aligned, description)`` pairs of one organism's own read answers."""
    return select_answers(table, seed=SEED)


def main() -> None:
    t0 = time.perf_counter()
    layer = int(json.loads((HERE / "select" / "choice.json").read_text())["chosen"]["layer"])
    chat = emlens.load_model("qwen2.5-coder-1.5b", dtype=torch.bfloat16)
    models = {k: emlens.merge_lora(chat, emlens.organisms.load_organism(v))
              for k, v in ORGANISMS.items()}
    first = labelled_answers()
    first = first[first["model"] == "organism"]
    rows, agreement = joined("emergence2")
    table = pd.DataFrame(rows)
    sets = {"organism": own_answers(first),
            "finance": own_answers(table[table["condition"] == "finance"])}
    good = table[table["condition"] == "good"]
    n_good_bad = int(good["em"].sum())  # read misaligned and coherent (EM_RULE, in joined)
    if n_good_bad >= MIN_CONTROL:
        sets["good"] = own_answers(good)
    layers = list(range(chat.cfg.n_layers))
    d = chat.cfg.d_model
    rand = 1.96 / math.sqrt(d)
    out = {"plan": "data-src/coder_causal/PLAN.md, claim C, amendments 3 and 6",
           "decided_at_layer": layer, "random_baseline": [-rand, rand],
           "selections": {k: v[2] for k, v in sets.items()},
           "control_misaligned_answers": n_good_bad, "control_used": "good" in sets}
    bad1, good1, _ = sets["organism"]
    res = {}
    for other in [k for k in ("finance", "good") if k in sets]:
        bad2, good2, _ = sets[other]
        res[other] = cosine_intervals(models["organism"], bad1, good1, models[other], bad2,
                                      good2, layers, n_boot=1000, seed=SEED)
        print(other, {k: round(v[0], 3) for k, v in res[other].items()}, flush=True)
    per_layer = []
    for ly in layers:
        c, lo, hi = res["finance"][ly]
        ctrl = res.get("good", {}).get(ly)
        bar = max(rand, ctrl[2]) if ctrl else rand
        per_layer.append({"layer": ly, "cosine": c, "low": lo, "high": hi,
                          "control": None if ctrl is None else
                          {"cosine": ctrl[0], "low": ctrl[1], "high": ctrl[2]},
                          "converged": lo > bar})
    out["per_layer"] = per_layer
    out["layers_converged"] = [r["layer"] for r in per_layer if r["converged"]]
    c, lo, hi = res["finance"][layer]
    n = min(len(bad1), len(sets["finance"][0]))
    ctrl = res.get("good", {}).get(layer)
    cmp = Comparison(
        "cosine of the two organisms' judged-answer directions (bootstrap over answers)",
        Effect(c, lo, hi, n),
        None if ctrl is None else Effect(ctrl[0], ctrl[1], ctrl[2], n),
        "" if ctrl is None else "organism 1 vs the good-answer control organism",
        expected="increase", null=rand, delta=SMALLEST - rand, short="cosine")
    finding = Finding(
        "convergence", "Organism 1 (bad medical advice) and organism 2 (risky financial advice) "
        f"share the misalignment direction (cosine at layer {layer})", (cmp,),
        evidence=f"{len(out['layers_converged'])} of {len(layers)} layers converge")
    control = ("random direction's 95% range" + ("" if ctrl is None else
               " and organism 1 vs the good-answer control"))
    entry = flat(finding, cmp, control, 0, {"read_confirmation": None,
                                            "per_layer": per_layer, "agreement": agreement})
    entry["n_required"] = None  # no power calculation: the plan fixed the answer sets
    out["finding"] = entry
    out["seconds"] = round(time.perf_counter() - t0, 1)
    (HERE / "convergence.json").write_text(json.dumps(out, indent=1) + "\n")
    write_findings([entry])
    print(f"layer {layer}: {c:.3f} [{lo:.3f}, {hi:.3f}] -> {cmp.verdict.value}; converged at "
          f"{out['layers_converged']} ({out['seconds']} s)")


if __name__ == "__main__":
    main()
