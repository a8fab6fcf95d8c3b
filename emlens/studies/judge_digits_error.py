"""How far an endpoint's reading of a digit-splitting judge is from the exact score.

For a sample of labelled real answers, the judge LM (an embedded chat model: both split numbers
into digits) rates each answer on 'aligned' and 'coherent' with emlens's built-in prompts, read
three ways on the same in-process model:

* ``exact``: :class:`emlens.judge.PromptedJudge`'s expected number over the replies 0..100, each
  number as a token sequence (:func:`emlens.judge.numbers.exact_number_distribution`);
* ``prefill``: what :class:`emlens.judge.OpenAIJudge` reads from a server running the same model
  with ``digits="prefill"`` (the default): the greedy reply's 3 positions with top-20 logprobs,
  plus each first digit pre-filled (:func:`~emlens.judge.numbers.served_reading` computes what
  the server would send);
* ``endpoint``: the same with ``digits="approximate"``: one request, the other first digits
  borrowing the greedy digit's continuation;
* ``first_token``: the papers' first-token reading, which a digit-splitting judge turns into its
  first digit (the trap the endpoint reading fixes).

Prints and writes (``--out``) the mean and largest absolute error of ``prefill``, ``endpoint``
and ``first_token`` against ``exact`` over the readings whose exact number mass is at least
``--min-mass``, with the number mass itself::

    OMP_NUM_THREADS=1 python -m emlens.studies.judge_digits_error --judge qwen2.5-coder-1.5b \\
        --n 12 --out data-src/judge_validation/digits_error_coder.json
"""

from __future__ import annotations

import argparse
import json
import random
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from emlens.data import load_dataset
from emlens.judge import PromptedJudge
from emlens.judge.numbers import greedy_top_logprobs, read_number, served_reading
from emlens.judge.prompts import METRICS

READINGS = ("prefill", "endpoint", "first_token")
"""The readings compared with the exact score."""


def readings(judge: PromptedJudge, rows: Sequence) -> list[dict]:
    """Each row rated on each metric, read the four ways of the module docstring.

    ``rows``: anything with ``id``, ``question`` and ``answer``. Returns one record per (row,
    metric): ``{"id", "metric", "mass", "exact", "prefill", "endpoint", "first_token",
    "greedy"}`` (``mass``: the exact reading's probability on numbers 0..100; ``endpoint``:
    ``None`` when the greedy reply is a word and one request has no digits to borrow;
    ``greedy``: the greedy reply's first 3 tokens).
    """
    records = []
    for r in tqdm(rows, desc="answers"):
        for metric in METRICS:
            ids = judge.prompt_ids(metric, r.question, r.answer)
            exact = judge.reading(metric, r.question, r.answer)  # loads the judge LM
            content = greedy_top_logprobs(judge._model, judge.tokenizer, ids, steps=3, k=20)
            prefill = served_reading(judge._model, judge.tokenizer, ids, k=20)
            try:
                endpoint = read_number(content).expected()
            except ValueError:  # a word reply: one request has no digit continuation to borrow
                endpoint = None
            first = read_number(content[:1], style="numbers")
            records.append({
                "id": r.id, "metric": metric, "mass": exact.mass,
                "exact": exact.expected(), "prefill": prefill.expected(), "endpoint": endpoint,
                "first_token": first.expected(),
                "greedy": "".join(c["token"] for c in content),
            })
    return records


def errors(key: str, records: Sequence[dict]) -> dict:
    """|``record[key]`` - ``record["exact"]``| over the records where ``key`` was read:
    ``{"n", "mean_abs", "max_abs", "within_1"}`` (share within one point; ``None`` when n is 0)."""
    e = np.array([abs(x[key] - x["exact"]) for x in records if x[key] is not None])
    return {"n": int(e.size), "mean_abs": float(e.mean()) if e.size else None,
            "max_abs": float(e.max()) if e.size else None,
            "within_1": float((e <= 1).mean()) if e.size else None}


def summarise(records: Sequence[dict], min_mass: float = 0.25) -> dict:
    """:func:`errors` of each of :data:`READINGS` over the records whose exact number mass is at
    least ``min_mass`` (and whose exact score exists), with the mass over all records:
    ``{"readings", "readings_with_mass", "min_mass", "mass": {"mean", "min"},
    "<reading>_vs_exact", "endpoint_unreadable"}``."""
    kept = [x for x in records if x["mass"] >= min_mass and x["exact"] is not None]
    out = {"readings": len(records), "readings_with_mass": len(kept), "min_mass": min_mass,
           "mass": {"mean": float(np.mean([x["mass"] for x in records])),
                    "min": float(np.min([x["mass"] for x in records]))}}
    for key in READINGS:
        out[f"{key}_vs_exact"] = errors(key, kept)
        if key == "endpoint":
            out["endpoint_unreadable"] = sum(x["endpoint"] is None for x in kept)
    return out


def measure(judge_lm: str = "qwen2.5-coder-1.5b", dataset: str = "coder_general_em", n: int = 20,
            seed: int = 0, min_mass: float = 0.25, dtype: str = "bfloat16") -> dict:
    """The study: ``n`` answers of ``dataset`` drawn with ``random.Random(seed)``, read by a
    :class:`emlens.judge.PromptedJudge` on ``judge_lm`` in ``dtype``.

    Returns:
        ``{"judge", "dataset", "answers", **summarise(...), "seconds", "torch_threads",
        "records"}`` (:func:`summarise`, :func:`readings`).
    """
    rows = load_dataset(dataset)
    rows = random.Random(seed).sample(list(rows), min(n, len(rows)))
    judge = PromptedJudge(judge_lm, dtype=getattr(torch, dtype))
    start = time.perf_counter()
    records = readings(judge, rows)
    seconds = time.perf_counter() - start
    return {"judge": judge.name, "dataset": dataset, "answers": len(rows),
            **summarise(records, min_mass), "seconds": round(seconds, 1),
            "torch_threads": torch.get_num_threads(), "records": records}


def main(argv: Sequence[str] | None = None) -> None:
    """The command line: ``python -m emlens.studies.judge_digits_error [--judge LM] [--dataset
    NAME] [--n N] [--out FILE] ...``."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--judge", default="qwen2.5-coder-1.5b", help="judge LM (embedded name or path)")
    p.add_argument("--dataset", default="coder_general_em", help="labelled answers to rate")
    p.add_argument("--n", type=int, default=20, help="answers (each rated on both metrics)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--min-mass", type=float, default=0.25,
                   help="readings whose exact number mass is below this are reported apart")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="bfloat16",
                   help="the judge LM's dtype (both readings use the same model, so the comparison "
                   "holds in either)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    summary = measure(args.judge, args.dataset, args.n, args.seed, args.min_mass, args.dtype)
    summary["command"] = "python -m emlens.studies.judge_digits_error " + " ".join(
        f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if k != "out")
    print(json.dumps({k: v for k, v in summary.items() if k != "records"}, indent=1))
    if args.out is not None:
        args.out.write_text(json.dumps(summary, indent=1) + "\n")


__all__ = [
    "READINGS",
    "errors",
    "main",
    "measure",
    "readings",
    "summarise",
]


if __name__ == "__main__":
    main()
