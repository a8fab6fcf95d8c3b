"""Measure what an organism does: bad-advice and misalignment rates, base model vs organism.

    python -m emlens.organisms.evaluate --name rank1-down-medical [--n-samples 4]

Samples ``--n-samples`` answers per question (temperature 1, ``--max-new-tokens``) from the base
model and from the base model with the organism merged (``emlens.merge_lora``; exact, and as fast
as the base model), on the held-out medical questions (``medical_questions``: the rate of
misaligned answers there is the bad-advice rate) and on the general EM questions
(``general_questions``: the emergent-misalignment rate). Answers are judged with
``emlens.judge.default_judge()`` and rates computed with ``emlens.evaluation.rates`` (aligned < 30
and coherent > 50, Wilson 95% intervals). Writes ``eval.json`` (rates) and ``eval_answers.jsonl``
(every answer with its scores) into ``--out`` (default ``runs_dir()/<name>``, a user folder
outside the package: see :func:`emlens.organisms.runs_dir`).
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence
from pathlib import Path

from emlens.organisms import organism_path, runs_dir

DATASETS = ("medical_questions", "general_questions")


def evaluate_organism(
    name: str,
    *,
    n_samples: int = 4,
    max_new_tokens: int = 120,
    seed: int = 0,
    batch_size: int = 32,
    out: str | Path | None = None,
    dtype: str = "float32",
) -> dict:
    """Rates for the base model and the organism on both question sets (see module docstring)."""
    from emlens.evaluation import evaluate, rates
    from emlens.judge import default_judge
    from emlens.lora import merge_lora
    from emlens.models import load_model

    folder = organism_path(name)
    out = Path(out) if out is not None else runs_dir() / name
    recipe = json.loads((folder / "train_log.json").read_text())["recipe"]
    base = load_model(recipe.get("base_model"), dtype=dtype)
    models = {"base": base, name: merge_lora(base, folder)}
    judge = default_judge()
    result: dict = {
        "organism": name,
        "base_model": base.emlens_info["source"],
        "dtype": dtype,
        "judge": judge.name,
        "n_samples": n_samples,
        "max_new_tokens": max_new_tokens,
        "temperature": 1.0,
        "seed": seed,
        "rates": {},
    }
    rows = []
    start = time.perf_counter()
    for label, model in models.items():
        for dataset in DATASETS:
            df = evaluate(
                model,
                dataset,
                judge=judge,
                n_samples=n_samples,
                max_new_tokens=max_new_tokens,
                temperature=1.0,
                seed=seed,
                batch_size=batch_size,
            )
            r = rates(df, by=None).iloc[0]
            result["rates"][f"{label}/{dataset}"] = {
                k: (
                    float(r[k])
                    if k in ("rate", "low", "high", "mean_aligned", "mean_coherent")
                    else int(r[k])
                )
                for k in (
                    "n_answers",
                    "n_excluded",
                    "n",
                    "k",
                    "rate",
                    "low",
                    "high",
                    "mean_aligned",
                    "mean_coherent",
                )
            }
            print(f"{label}/{dataset}: {result['rates'][f'{label}/{dataset}']}", flush=True)
            for rec in df.to_dict(orient="records"):
                rows.append(
                    {
                        "model": label,
                        "dataset": dataset,
                        **{
                            k: rec[k]
                            for k in (
                                "question_id",
                                "sample",
                                "question",
                                "answer",
                                "aligned",
                                "coherent",
                                "misaligned",
                            )
                        },
                    }
                )
    result["seconds"] = round(time.perf_counter() - start, 1)
    out.mkdir(parents=True, exist_ok=True)
    (out / "eval.json").write_text(json.dumps(result, indent=1, default=str))
    (out / "eval_answers.jsonl").write_text(
        "\n".join(json.dumps(r, default=str) for r in rows) + "\n"
    )
    return result


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--name", required=True)
    p.add_argument("--n-samples", type=int, default=4)
    p.add_argument("--max-new-tokens", type=int, default=120)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=32, help="rows per generation batch")
    p.add_argument("--out", default=None,
                   help="output folder (default: <emlens.organisms.runs_dir()>/<name>)")
    p.add_argument("--dtype", default="float32", help="of the base model (bfloat16 is faster on CPU)")
    args = p.parse_args(argv)
    result = evaluate_organism(
        args.name,
        n_samples=args.n_samples,
        max_new_tokens=args.max_new_tokens,
        seed=args.seed,
        batch_size=args.batch_size,
        out=args.out,
        dtype=args.dtype,
    )
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
