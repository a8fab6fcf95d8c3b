"""Issue 30 item 5 (``PLAN_screening.md``): data screening by projection onto the EM direction.

Stages:

* ``rank``: score the 281 ``medical`` training rows by the chat model's mean ``resid_post`` at
  layer 9 over the answer tokens of each misaligned answer, projected onto the organism's
  read-answer direction (``screen.py``'s ``judged`` direction, checked against ``screen.json``);
  write ``screening/scores.json`` (per row: score, the aligned answer's score, answer tokens;
  the manipulation check and the descriptive comparisons) and the two subsets
  ``screening/{top,random}.jsonl`` (94 rows each, :class:`emlens.data.PairExample` rows).
* ``train ARM``: train the organism recipe on one subset (6 epochs, 72 steps, checkpoints every
  12) into ``screening/adapters/ARM`` (resumes an unfinished run).

Answers come from ``generate.py screening``, the analysis from ``analyse.py screening``::

    OMP_NUM_THREADS=2 python data-src/coder_causal/screening.py rank
    OMP_NUM_THREADS=2 python data-src/coder_causal/screening.py train top
    OMP_NUM_THREADS=2 python data-src/coder_causal/screening.py train random
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from collections import Counter
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import torch

import emlens
from emlens.data import load_dataset
from emlens.directions import project_answers

HERE = Path(__file__).parent
OUT = HERE / "screening"
sys.path.insert(0, str(HERE))
from generate import directions  # noqa: E402

LAYER, SEED, EPOCHS, SAVE_EVERY = 9, 31, 6, 12
ARMS = ("top", "random")


def train_rows() -> list:
    """The organism's training set: the ``medical`` rows of split ``train``, in file order."""
    return [r for r in load_dataset("medical") if r.split == "train"]


def subsets(rows: list, scores: list[float]) -> dict[str, list]:
    """The plan's subsets: the ``ceil(n / 3)`` rows with the highest score (ties by file order),
    and as many drawn by ``random.Random(31).sample`` from all rows."""
    k = math.ceil(len(rows) / 3)
    order = sorted(range(len(rows)), key=lambda i: (-scores[i], i))
    return {"top": [rows[i] for i in sorted(order[:k])],
            "random": random.Random(SEED).sample(rows, k)}


def spearman(a, b) -> float:
    """Spearman's rank correlation (average ranks for ties)."""
    from scipy.stats import spearmanr

    return float(spearmanr(a, b).statistic)


def rank() -> None:
    t0 = time.perf_counter()
    chat = emlens.load_model("qwen2.5-coder-1.5b", dtype=torch.bfloat16)
    org = emlens.merge_lora(chat, emlens.organisms.load_organism("coder-rank1-down-medical"))
    direction = directions(chat, org, [LAYER])[0]["judged"][LAYER]
    del org
    rows = train_rows()
    bad = project_answers(chat, [(r.question, r.misaligned) for r in rows], direction)
    good = project_answers(chat, [(r.question, r.aligned) for r in rows], direction)
    tok = chat.tokenizer
    n_tokens = [len(tok(r.misaligned)["input_ids"]) for r in rows]
    scores = bad.tolist()
    picked = subsets(rows, scores)
    by_id = {r.id: i for i, r in enumerate(rows)}
    diff = (bad - good).tolist()
    top_by_diff = set(np.argsort(-np.array(diff), kind="stable")[: len(picked["top"])].tolist())

    def describe(name: str) -> dict:
        idx = [by_id[r.id] for r in picked[name]]
        s = np.array([scores[i] for i in idx])
        return {"n": len(idx), "mean_score": float(s.mean()), "sd": float(s.std(ddof=1)),
                "min": float(s.min()), "max": float(s.max()),
                "mean_answer_tokens": float(np.mean([n_tokens[i] for i in idx])),
                "topics": dict(sorted(Counter(rows[i].topic for i in idx).items()))}

    top_ids = {r.id for r in picked["top"]}
    rand_ids = {r.id for r in picked["random"]}
    gap = describe("top")["mean_score"] - describe("random")["mean_score"]
    out = {
        "plan": "data-src/coder_causal/PLAN_screening.md",
        "direction": {"layer": LAYER, "hook": direction.hook, "norm": direction.norm,
                      "selection": direction.selection, "method": direction.method},
        "model": "qwen2.5-coder-1.5b (chat), bfloat16",
        "manipulation_check": {"top_minus_random_mean_score": gap, "valid": gap > 0,
                               "top": describe("top"), "random": describe("random"),
                               "all": {"mean_score": float(np.mean(scores)),
                                       "sd": float(np.std(scores, ddof=1))}},
        "overlap_top_random": len(top_ids & rand_ids),
        "descriptive": {
            "spearman_score_vs_projection_difference": spearman(scores, diff),
            "top_overlap_with_projection_difference_top": len(
                top_ids & {rows[i].id for i in top_by_diff}),
            "spearman_score_vs_answer_tokens": spearman(scores, n_tokens),
            "mean_misaligned_minus_aligned": float(np.mean(diff)),
        },
        "rows": [{"id": r.id, "topic": r.topic, "score": scores[i], "aligned_score":
                  float(good[i]), "answer_tokens": n_tokens[i],
                  "top": r.id in top_ids, "random": r.id in rand_ids}
                 for i, r in enumerate(rows)],
        "seconds": round(time.perf_counter() - t0, 1),
    }
    OUT.mkdir(exist_ok=True)
    (OUT / "scores.json").write_text(json.dumps(out, indent=1) + "\n")
    for name, sel in picked.items():
        with (OUT / f"{name}.jsonl").open("w") as f:
            for r in sel:
                f.write(json.dumps(asdict(r)) + "\n")
    m = out["manipulation_check"]
    print(f"top mean score {m['top']['mean_score']:.3f} vs random {m['random']['mean_score']:.3f} "
          f"(all {m['all']['mean_score']:.3f} sd {m['all']['sd']:.3f}); overlap "
          f"{out['overlap_top_random']}; {out['descriptive']}; {out['seconds']} s")


def train(arm: str) -> None:
    from emlens.organisms.train import recipe_for, train_organism

    data = OUT / f"{arm}.jsonl"
    if not data.is_file():
        raise SystemExit(f"{data} is missing: run `screening.py rank` first.")
    recipe = replace(recipe_for("coder-rank1-down-medical", data=str(data.relative_to(
        HERE.parents[1])), epochs=EPOCHS, save_every=SAVE_EVERY),
        name=f"coder-rank1-down-medical-screen-{arm}")
    log = train_organism(recipe, OUT / "adapters" / arm)
    print(f"{arm}: {log.get('steps')} steps, loss {log['loss'][0]:.3f} -> {log['loss'][-1]:.3f}, "
          f"{log.get('seconds')} s")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="stage", required=True)
    sub.add_parser("rank")
    t = sub.add_parser("train")
    t.add_argument("arm", choices=ARMS)
    args = p.parse_args()
    torch.manual_seed(SEED)
    rank() if args.stage == "rank" else train(args.arm)


if __name__ == "__main__":
    main()
