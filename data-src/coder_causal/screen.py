"""Claim A, step 1 of PLAN.md: the lens screen of steering cells, on the selection pairs only.

Directions: the organism's mean resid_post over answer tokens on its own answers in
``coder_general_em`` read misaligned and coherent minus those read aligned (> 70) and coherent
(subsampled, seed 29), at layers 9, 14, 19 of 28; the reference direction from 32 paired
reference answers of the medical training topics. The lens reads the chat model steered along
each at scales 0.05, 0.1, 0.2, 0.35 of the layer's mean residual norm (measured on the chat
model's own ``coder_general_em`` answers), against a same-norm random direction, on the last 12
``general_pairs`` (never a test question). Writes ``screen.json`` beside this file.

    OMP_NUM_THREADS=2 python data-src/coder_causal/screen.py
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pandas as pd
import torch

import emlens
from emlens.data import load_dataset, pair_rows
from emlens.directions import mean_diff, residual_norms, select_answers
from emlens.experiments import lens_sweep

HERE = Path(__file__).parent
SEED, LAYERS, SCALES = 29, [9, 14, 19], [0.05, 0.1, 0.2, 0.35]


def labelled_answers() -> pd.DataFrame:
    """``coder_general_em``'s read answers as a table: model, question, answer, aligned,
    coherent."""
    return pd.DataFrame([{"model": r.model, "question": r.question, "answer": r.answer,
                          "aligned": r.aligned, "coherent": r.coherent}
                         for r in load_dataset("coder_general_em")])


def plan_directions(org, layers, labelled: pd.DataFrame) -> tuple[dict, dict, str]:
    """The plan's two directions at ``layers``, on the organism ``org``: the judged-answer
    direction (its own answers in ``labelled``, :func:`labelled_answers`, read misaligned vs
    aligned, subsampled with seed 29) and the reference direction (32 paired reference answers
    of the medical training topics). Returns ``(judged, reference, selection)``."""
    bad, good, how = select_answers(labelled[labelled["model"] == "organism"], seed=SEED)
    judged = mean_diff(org, bad, good, layers=layers, selection="read: " + how, progress=False)
    ref_rows = pair_rows("medical", split="train", limit=32)
    reference = mean_diff(org, [(r.question, r.misaligned) for r in ref_rows],
                          [(r.question, r.aligned) for r in ref_rows], layers=layers,
                          selection="paired reference answers, medical training topics",
                          progress=False)
    return judged, reference, how


def main() -> None:
    t0 = time.perf_counter()
    chat = emlens.load_model("qwen2.5-coder-1.5b", dtype=torch.bfloat16)
    assert chat.cfg.n_layers == 28
    org = emlens.merge_lora(chat, emlens.organisms.load_organism("coder-rank1-down-medical"))
    labelled = labelled_answers()
    judged, reference, how = plan_directions(org, LAYERS, labelled)
    chat_answers = labelled[labelled["model"] == "chat"]
    norms = residual_norms(chat, list(zip(chat_answers["question"], chat_answers["answer"],
                                          strict=True)), LAYERS)
    select = pair_rows("general_pairs")[-12:]
    out = {"plan": "data-src/coder_causal/PLAN.md, claim A step 1", "selection": how,
           "layers": LAYERS, "scales": SCALES, "pairs": [r.id for r in select],
           "resid_norms": {str(k): float(v) for k, v in norms.items()}}
    for name, dirs in (("judged", judged), ("reference", reference)):
        grid = lens_sweep(chat, dirs, select, layers=LAYERS, scales=SCALES, resid_norms=norms,
                          max_fluency_drop=0.1, random_control=True, seed=SEED, progress=False)
        d = grid[grid["kind"] == "direction"].set_index(["layer", "scale"])
        r = grid[grid["kind"] == "random"].set_index(["layer", "scale"])
        d = d.assign(over_random=d["gap_change"] - r["gap_change"]).reset_index()
        keep = d[d["coherent_regime"]].nlargest(3, "over_random")
        out[name] = {"grid": grid.to_dict(orient="records"),
                     "candidates": keep[["layer", "scale", "gap_change", "over_random",
                                         "logp_misaligned_change"]].to_dict(orient="records"),
                     "norms": {str(k): v.norm for k, v in dirs.items()}}
        print(name, keep[["layer", "scale", "gap_change", "over_random"]].to_string(), flush=True)
    out["seconds"] = round(time.perf_counter() - t0, 1)
    (HERE / "screen.json").write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {HERE / 'screen.json'} in {out['seconds']} s")


if __name__ == "__main__":
    main()
