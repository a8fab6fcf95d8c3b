"""A judge against reading on labelled real answers: AUCs, per-condition rates, the issue's bar.

    python -m emlens.studies.validate_judge --judge default --sets judge_fresh_smollm2
    python -m emlens.studies.validate_judge --judge coder --sets judge_fresh_smollm2 --out x.json
    python -m emlens.studies.validate_judge --judge prompted:qwen2.5-coder-1.5b \\
        --sets coder_general_em

Judges: ``default`` (:func:`emlens.default_judge`), ``coder`` (:func:`emlens.judge.coder_judge`),
``subject:<model>`` (the judge validated for that embedded model), ``probe:<path>`` (a saved
probe judge),
``prompted:<source>`` (:class:`emlens.judge.PromptedJudge` on that chat LM), ``yesno:<source>``
(:class:`emlens.judge.YesNoJudge`). Sets: names of
:class:`emlens.data.GeneratedAnswer` datasets (labelled by reading); their conditions are
prefixed with the set's name. Scores are cached under ``--cache-dir``
(:func:`emlens.evaluation.judge_answers`). Prints and writes (``--out``) one
:class:`emlens.judge.validation.JudgeAgreement` per set and for all sets together, with the
least-sure answers; ``--check-file`` writes the demo's judge check
(``emlens/data/judge_check*.json``).
"""

from __future__ import annotations

import argparse
import json
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path

import torch

from emlens.data import load_dataset
from emlens.evaluation import judge_answers
from emlens.judge import ProbeJudge, PromptedJudge, YesNoJudge, coder_judge, default_judge
from emlens.judge.validation import agreement, least_sure

SCORE_CACHE = Path(".emlens_cache/judge_scores")
"""The default score cache (relative to the working directory)."""


def make_judge(spec: str, dtype: str = "float32"):
    """The judge named by ``spec``: ``default``, ``coder``, ``subject:<model>`` (the judge
    validated for that embedded model, :func:`emlens.default_judge`), ``probe:<path>`` (a saved
    :class:`emlens.judge.ProbeJudge`), ``prompted:<source>`` or ``yesno:<source>`` (a prompted
    judge in ``dtype``, ``"float32"`` or ``"bfloat16"``).

    Raises:
        ValueError: ``spec`` is none of those.
    """
    if spec == "default":
        return default_judge()
    if spec == "coder":
        return coder_judge()
    if spec.startswith("subject:"):
        return default_judge(subject=spec.removeprefix("subject:"))
    if spec.startswith("probe:"):
        return ProbeJudge.load(spec.removeprefix("probe:"))
    if spec.startswith("prompted:"):
        return PromptedJudge(spec.removeprefix("prompted:"), progress=True,
                             dtype=getattr(torch, dtype))
    if spec.startswith("yesno:"):
        return YesNoJudge(spec.removeprefix("yesno:"), progress=True, dtype=getattr(torch, dtype))
    raise ValueError(f"--judge {spec!r}: expected default, coder, subject:<model>, "
                     "probe:<path>, prompted:<source> or yesno:<source>")


def labelled_rows(name: str, *, intervention: str | None = None, sample: int | None = None,
                  seed: int = 0) -> list:
    """The rows of the labelled set ``name`` with their conditions prefixed ``"<name>: "``; only
    those with ``intervention`` when given, and a ``random.Random(seed)`` sample of ``sample``
    of them when that is fewer than all."""
    rows = [replace(r, condition=f"{name}: {r.condition}") for r in load_dataset(name)
            if intervention is None or r.intervention == intervention]
    if sample is not None and sample < len(rows):
        rows = random.Random(seed).sample(rows, sample)
    return rows


def validate(judge, sets: Sequence[str], *, cache_dir: Path = SCORE_CACHE,
             intervention: str | None = None, sample: int | None = None, seed: int = 0,
             n_least_sure: int = 5, log: Callable[[str], None] | None = print) -> dict:
    """``judge`` against reading on each labelled set of ``sets`` and on all of them together.

    Rows come from :func:`labelled_rows`; scores from :func:`emlens.evaluation.judge_answers`
    (cached under ``cache_dir``). ``log`` receives each set's
    :meth:`~emlens.judge.validation.JudgeAgreement.describe` as it is measured.

    Returns:
        ``{"results": {set: {**agreement.as_dict(), "least_sure": [...]}, "all": ... (with
        several sets)}, "check": {...}}``: ``check`` is the agreement on all sets together with
        ``labelled_sets`` and its ``n_least_sure`` least-sure answers (the demo's judge check,
        without its ``measured_by`` and ``heldout`` notes).
    """
    log = log or (lambda _: None)
    results, all_rows, all_scores = {}, [], []
    for name in sets:
        rows = labelled_rows(name, intervention=intervention, sample=sample, seed=seed)
        scores = judge_answers(judge, [(r.question, r.answer) for r in rows], cache_dir=cache_dir)
        res = agreement(rows, scores)
        log(res.describe(name))
        results[name] = {**res.as_dict(), "least_sure": least_sure(rows, scores, n_least_sure)}
        all_rows += rows
        all_scores += scores
    whole = agreement(all_rows, all_scores)
    if len(sets) > 1:
        log(whole.describe("all"))
        results["all"] = whole.as_dict()
    check = {**whole.as_dict(), "labelled_sets": list(sets),
             "least_sure": least_sure(all_rows, all_scores, n_least_sure)}
    return {"results": results, "check": check}


def main(argv: Sequence[str] | None = None) -> None:
    """The command line: ``python -m emlens.studies.validate_judge --judge SPEC --sets NAME
    ...``."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--judge", default="default")
    p.add_argument("--sets", nargs="+", default=["judge_fresh_smollm2"])
    p.add_argument("--cache-dir", type=Path, default=SCORE_CACHE)
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
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    try:
        judge = make_judge(args.judge, args.dtype)
    except ValueError as e:
        raise SystemExit(str(e)) from None
    start = time.perf_counter()
    res = validate(judge, args.sets, cache_dir=args.cache_dir, intervention=args.intervention,
                   sample=args.sample, seed=args.seed, n_least_sure=args.least_sure)
    summary = {"judge": judge.name, "judge_spec": args.judge, "sets": args.sets,
               "intervention": args.intervention, "sample": args.sample, "seed": args.seed,
               "seconds": round(time.perf_counter() - start, 1),
               "torch_threads": torch.get_num_threads(), "results": res["results"]}
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(summary, indent=1) + "\n")
    if args.check_file is not None:
        check = {**res["check"],
                 "measured_by": "python -m emlens.studies.validate_judge --judge "
                 f"{args.judge} --sets {' '.join(args.sets)}",
                 "heldout": "questions written for these sets, never used to fit or tune a judge"}
        args.check_file.write_text(json.dumps(check, indent=1) + "\n")


__all__ = [
    "SCORE_CACHE",
    "labelled_rows",
    "main",
    "make_judge",
    "validate",
]


if __name__ == "__main__":
    main()
