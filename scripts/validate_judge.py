"""A judge against reading on labelled real answers: AUCs, per-condition rates, the issue's bar.

    python scripts/validate_judge.py --judge default --sets judge_fresh_smollm2
    python scripts/validate_judge.py --judge coder --sets judge_fresh_smollm2 --out x.json
    python scripts/validate_judge.py --judge prompted:qwen2.5-coder-1.5b --sets coder_general_em

Judges: ``default`` (:func:`emlens.default_judge`), ``coder`` (:func:`emlens.judge.coder_judge`),
``prompted:<source>`` (:class:`emlens.judge.PromptedJudge` on that chat LM), ``yesno:<source>``
(:class:`emlens.judge.YesNoJudge`). Sets: names of
:class:`emlens.data.GeneratedAnswer` datasets (labelled by reading); their conditions are
prefixed with the set's name. Scores are cached under ``--cache-dir``
(:func:`emlens.evaluation.judge_answers`). Prints and writes (``--out``) one
:class:`emlens.judge.validation.JudgeAgreement` per set and for all sets together, with the
least-sure answers.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from dataclasses import replace
from pathlib import Path

import torch

from emlens.data import load_dataset
from emlens.evaluation import judge_answers
from emlens.judge import PromptedJudge, YesNoJudge, coder_judge, default_judge
from emlens.judge.validation import agreement, least_sure


def make_judge(spec: str, dtype: str = "float32"):
    if spec == "default":
        return default_judge()
    if spec == "coder":
        return coder_judge()
    if spec.startswith("prompted:"):
        return PromptedJudge(spec.removeprefix("prompted:"), progress=True,
                             dtype=getattr(torch, dtype))
    if spec.startswith("yesno:"):
        return YesNoJudge(spec.removeprefix("yesno:"), progress=True, dtype=getattr(torch, dtype))
    raise SystemExit(f"--judge {spec!r}: expected default, coder, prompted:<source> or "
                     "yesno:<source>")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--judge", default="default")
    p.add_argument("--sets", nargs="+", default=["judge_fresh_smollm2"])
    p.add_argument("--cache-dir", type=Path, default=Path(".emlens_cache/judge_scores"))
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                   help="a prompted judge's dtype")
    p.add_argument("--intervention", default=None,
                   help="only rows with this intervention (e.g. none: the plain models)")
    p.add_argument("--sample", type=int, default=None,
                   help="judge a random sample of this many rows per set (seed --seed)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--least-sure", type=int, default=5)
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--check-file", type=Path, default=None,
                   help="also write the demo's judge check (all sets together) here, e.g. "
                   "emlens/data/judge_check.json")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    judge = make_judge(args.judge, args.dtype)
    results, all_rows, all_scores = {}, [], []
    start = time.perf_counter()
    for name in args.sets:
        rows = [replace(r, condition=f"{name}: {r.condition}") for r in load_dataset(name)
                if args.intervention is None or r.intervention == args.intervention]
        if args.sample is not None and args.sample < len(rows):
            rows = random.Random(args.seed).sample(rows, args.sample)
        scores = judge_answers(judge, [(r.question, r.answer) for r in rows],
                               cache_dir=args.cache_dir)
        res = agreement(rows, scores)
        print(res.describe(name))
        results[name] = {**res.as_dict(), "least_sure": least_sure(rows, scores, args.least_sure)}
        all_rows += rows
        all_scores += scores
    whole = agreement(all_rows, all_scores)
    if len(args.sets) > 1:
        print(whole.describe("all"))
        results["all"] = whole.as_dict()
    summary = {"judge": judge.name, "judge_spec": args.judge, "sets": args.sets,
               "intervention": args.intervention, "sample": args.sample, "seed": args.seed,
               "seconds": round(time.perf_counter() - start, 1),
               "torch_threads": torch.get_num_threads(), "results": results}
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(summary, indent=1) + "\n")
    if args.check_file is not None:
        check = {**whole.as_dict(), "labelled_sets": args.sets,
                 "least_sure": least_sure(all_rows, all_scores, args.least_sure),
                 "measured_by": "python scripts/validate_judge.py --judge "
                 f"{args.judge} --sets {' '.join(args.sets)}",
                 "heldout": "questions written for these sets, never used to fit or tune a judge"}
        args.check_file.write_text(json.dumps(check, indent=1) + "\n")


if __name__ == "__main__":
    main()
