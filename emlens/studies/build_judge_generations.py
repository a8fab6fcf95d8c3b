"""Build the unlabelled set of real generations for judge validation (issue 13).

Generates answers of the embedded SmolLM2-135M-Instruct ("chat"), of the shipped organism
``rank1-down-medical`` ("organism") and of the shipped rank-1 general fine-tune
``emlens/organisms/narrow_vs_general/lora1/general/peft`` ("organism2"), plain and under steering /
ablation along a mean-difference direction and same-norm random controls, to the 36 evaluation
questions (``general_questions`` + ``medical_questions``). Nothing is judged here: the rows are to
be labelled by reading, with the rubric in ``emlens/data/README.md`` ("Labelling rubric for real
generations").

The direction is computed without any judge: ``mean_diff`` on the organism at layer 15
(``resid_post``, answer tokens) between the misaligned and the aligned reference answers of the
``medical`` train split. Steering scales are chosen relative to the chat model's mean residual
norm at that layer (measured with ``residual_norms`` on reference answers): ``--rel-scales``
(default 0.1, 0.25, 0.5, 1.0) give weak, strange and broken text. The ``scale`` field of each row is
the raw multiplier of the direction (units of the direction's own norm, as ``emlens.steer`` with
``normalize=False`` applies it).

Conditions (each over all questions; ``n`` samples per question):

====================================  =========  ====  ===  ===========================
condition                             model      T     n    intervention
====================================  =========  ====  ===  ===========================
chat T=1.0 / T=0.7                    chat       1/.7  2/1  none
organism T=1.0 / T=0.7                organism   1/.7  2/1  none
organism2 T=1.0                       organism2  1     2    none
chat + steer mean_diff L15 x rel      chat       1     1    steer:mean_diff, per scale
chat + steer random L15 x rel         chat       1     1    steer:random, per scale
organism - mean_diff (writers, all)   organism   1     1    ablate:mean_diff
organism - random (writers, all)      organism   1     1    ablate:random
====================================  =========  ====  ===  ===========================

Steering adds ``scale * direction`` at ``blocks.15.hook_resid_post`` at every position (prompt and
answer). Ablation projects the direction out of the embedding and every attention and MLP output
(``hook="writers"``, all layers); those rows have ``layer = null``. Each random control is
``random_direction(direction, seed=k)`` (exactly the same norm) with its own ``k``.

Outputs (``--out``, default ``data-src/judge_generations`` under the working directory):

* ``generations.jsonl``: one row per answer, in id order: ``id`` (``jg-0001``, ... assigned after
  a seeded shuffle, so ids do not reveal the condition), ``question_id``, ``question``, ``answer``,
  ``condition``, ``model``, ``intervention``, ``layer``, ``scale``, ``temperature``,
  ``max_new_tokens``, ``seed``, ``sample``, ``finished``;
* ``to_label.jsonl``: the same rows in the same shuffled order with only ``id``, ``question``,
  ``answer`` (blind to the condition);
* ``build_info.json``: arguments, direction and residual norms, raw scales, counts per condition,
  timings.

Deterministic: every generation seed is fixed (``--seed`` + the condition's index) and the
shuffle uses ``--seed``; answers do not depend on ``--batch-size`` (per-answer generators).

The second embedded model's set (issue 16: chat model and its organism only, no steering) is
built by the same study::

    python -m emlens.studies.build_judge_generations --model qwen2.5-coder-1.5b \\
        --organism coder-rank1-down-medical --plain-only --id-prefix cg \\
        --out data-src/coder_generations

Rerun (about 20 minutes on one CPU thread)::

    OMP_NUM_THREADS=1 python -m emlens.studies.build_judge_generations
    # quick smoke run: 4 questions, 32 reference pairs, 24 new tokens, to a scratch folder
    OMP_NUM_THREADS=1 python -m emlens.studies.build_judge_generations --limit 4 \\
        --max-new-tokens 24 --out /tmp/jg-smoke
"""

from __future__ import annotations

import argparse
import json
import random
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformer_lens import HookedTransformer

import emlens
from emlens.directions import Direction, mean_diff, random_direction, residual_norms
from emlens.organisms import ORGANISMS_DIR

ORGANISM2 = ORGANISMS_DIR / "narrow_vs_general/lora1/general/peft"
"""The shipped rank-1 general fine-tune ("organism2")."""
LAYER = 15
"""The direction's layer, and the steering layer."""
REL_SCALES = (0.1, 0.25, 0.5, 1.0)
"""Steering scales as fractions of the chat model's mean residual norm at :data:`LAYER`."""
OUT = Path("data-src/judge_generations")
"""The default output folder (relative to the working directory: run from the repository root)."""


@dataclass(frozen=True)
class Condition:
    """One generation condition: a model, an optional intervention, sampling settings."""

    name: str
    model: str  # chat / organism / organism2
    intervention: str  # none / steer:mean_diff / steer:random / ablate:mean_diff / ablate:random
    temperature: float
    n_samples: int
    layer: int | None = None
    rel_scale: float | None = None  # steering scale relative to the mean residual norm
    random_seed: int | None = None  # seed of the random control direction


def conditions(rel_scales: Sequence[float], with_organism2: bool, plain_only: bool = False
               ) -> list[Condition]:
    """The conditions of the set, in generation order (the table of the module docstring;
    ``plain_only``: the first four)."""
    out = [
        Condition("chat T=1.0", "chat", "none", 1.0, 2),
        Condition("chat T=0.7", "chat", "none", 0.7, 1),
        Condition("organism T=1.0", "organism", "none", 1.0, 2),
        Condition("organism T=0.7", "organism", "none", 0.7, 1),
    ]
    if plain_only:
        return out
    if with_organism2:
        out.append(Condition("organism2 T=1.0", "organism2", "none", 1.0, 2))
    for kind in ("mean_diff", "random"):
        for k, rel in enumerate(rel_scales, start=1):
            seed = k if kind == "random" else None
            tag = f"random(seed={k})" if kind == "random" else "mean_diff"
            out.append(
                Condition(
                    f"chat + steer {tag} L{LAYER} x{rel:g} resid", "chat", f"steer:{kind}", 1.0, 1,
                    layer=LAYER, rel_scale=rel, random_seed=seed,
                )
            )
    out.append(
        Condition(f"organism - ablate mean_diff(L{LAYER}) writers", "organism", "ablate:mean_diff",
                  1.0, 1)
    )
    k = len(rel_scales) + 1
    out.append(
        Condition(f"organism - ablate random(seed={k}) writers", "organism", "ablate:random", 1.0,
                  1, random_seed=k)
    )
    return out


def intervention_block(
    model: HookedTransformer, cond: Condition, direction: Direction | None,
    raw_scale: float | None,
) -> AbstractContextManager:
    """The ``steer`` / ``ablate`` block of a condition (a no-op block for ``none``)."""
    if cond.intervention == "none":
        return nullcontext()
    kind, which = cond.intervention.split(":")
    vec = direction if which == "mean_diff" else random_direction(direction, seed=cond.random_seed)
    if kind == "steer":
        assert raw_scale is not None and cond.layer is not None
        return emlens.steer(model, vec, layers=cond.layer, scale=raw_scale)
    return emlens.ablate(model, vec, hook="writers")


def evaluation_questions(limit: int | None = None, which: str = "all", path: Path | None = None
                         ) -> list[tuple[str, str]]:
    """``(question_id, question)`` for the general then the medical evaluation questions
    (``which``: ``all``, ``general`` or ``medical``; ``limit``: half of them general, at most);
    from ``path`` (JSON lines with ``id``, ``question`` and ``kind`` = general / medical) instead
    of the shipped sets when given.

    Raises:
        ValueError: a row of ``path`` has another ``kind``.
    """
    if path is not None:
        rows = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
        bad = [r.get("id") for r in rows if r.get("kind") not in ("general", "medical")]
        if bad:
            raise ValueError(f"{path}: rows {bad[:5]} need kind 'general' or 'medical'")
        general = [(r["id"], r["question"]) for r in rows if r["kind"] == "general"]
        medical = [(r["id"], r["question"]) for r in rows if r["kind"] == "medical"]
    else:
        general = [(q.id, q.question) for q in emlens.load_dataset("general_questions")]
        medical = [(q.id, q.question) for q in emlens.load_dataset("medical_questions")]
    if limit is not None:
        general, medical = general[: limit // 2], medical[: limit - limit // 2]
    return {"all": general + medical, "general": general, "medical": medical}[which]


def parse_plain(specs: Sequence[str]) -> list[Condition]:
    """Plain (unsteered) conditions from ``MODEL:T:N`` specs, e.g. ``organism:0.7:8``.

    Raises:
        ValueError: a spec is not ``MODEL:TEMPERATURE:SAMPLES`` or names another model than
            ``chat`` or ``organism``.
    """
    out = []
    for spec in specs:
        try:
            model, temperature, n = spec.split(":")
            cond = Condition(f"{model} T={float(temperature):g}", model, "none", float(temperature),
                             int(n))
        except ValueError:
            raise ValueError(f"--plain {spec!r}: expected MODEL:TEMPERATURE:SAMPLES, e.g. "
                             "organism:0.7:8") from None
        if model not in ("chat", "organism"):
            raise ValueError(f"--plain {spec!r}: the model is 'chat' or 'organism'")
        out.append(cond)
    return out


def medical_train_pairs(limit: int | None = None
                        ) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """(misaligned, aligned) ``(question, answer)`` pairs of the ``medical`` train split (the
    first 32 when ``limit`` is given: the smoke run)."""
    rows = [p for p in emlens.load_dataset("medical") if p.split == "train"]
    if limit is not None:
        rows = rows[:32]
    return [(p.question, p.misaligned) for p in rows], [(p.question, p.aligned) for p in rows]


def iter_rows(
    models: dict[str, HookedTransformer],
    conds: Sequence[Condition],
    questions: Sequence[tuple[str, str]],
    direction: Direction | None,
    raw_scales: dict[float, float],
    *,
    seed: int,
    max_new_tokens: int,
    batch_size: int,
    timings: dict[str, float],
) -> Iterator[dict]:
    """Generate every condition and yield one row dict per answer (without ``id``); the
    condition ``i`` samples with seed ``seed + i``, and its seconds go to ``timings``."""
    prompts = [q for _, q in questions]
    bar = tqdm(conds, desc="conditions", unit="cond")
    for index, cond in enumerate(bar):
        bar.set_postfix_str(cond.name)
        model = models[cond.model]
        raw = None if cond.rel_scale is None else raw_scales[cond.rel_scale]
        cond_seed = seed + index
        start = time.perf_counter()
        with intervention_block(model, cond, direction, raw):
            gens = emlens.generate(
                model, prompts, max_new_tokens=max_new_tokens, temperature=cond.temperature,
                n_samples=cond.n_samples, seed=cond_seed, batch_size=batch_size, progress=False,
            )
        timings[cond.name] = round(time.perf_counter() - start, 1)
        for g in gens:
            yield {
                "question_id": questions[g.prompt_index][0],
                "question": g.prompt,
                "answer": g.text,
                "condition": cond.name,
                "model": cond.model,
                "intervention": cond.intervention,
                "layer": cond.layer,
                "scale": None if raw is None else round(raw, 4),
                "temperature": cond.temperature,
                "max_new_tokens": max_new_tokens,
                "seed": cond_seed,
                "sample": g.sample,
                "finished": g.finished,
            }


def write_jsonl(path: Path, rows: Sequence[dict]) -> None:
    """One JSON object per line (UTF-8, non-ASCII kept)."""
    with Path(path).open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def build(
    out: Path = OUT,
    *,
    limit: int | None = None,
    max_new_tokens: int = 96,
    rel_scales: Sequence[float] = REL_SCALES,
    norm_pairs: int = 64,
    batch_size: int = 36,
    seed: int = 0,
    model: str | None = None,
    dtype: str = "float32",
    organism: str = "rank1-down-medical",
    plain_only: bool = False,
    plain: Sequence[str] | None = None,
    questions: str = "all",
    questions_file: Path | None = None,
    id_prefix: str = "jg",
    threads: int | None = None,
) -> dict:
    """Generate the set of the module docstring and write it to ``out``.

    Args:
        out: the output folder (``generations.jsonl``, ``to_label.jsonl``, ``build_info.json``).
        limit: smoke run: only this many questions and 32 reference pairs.
        max_new_tokens: answer length.
        rel_scales: steering scales (fractions of the mean residual norm at :data:`LAYER`).
        norm_pairs: reference pairs (x2 answers) the residual norm is measured on.
        batch_size: generation batch (answers do not depend on it).
        seed: generation seeds start here; the id shuffle uses it.
        model: the base model (default: the embedded SmolLM2), in ``dtype``.
        organism: the shipped organism merged into it.
        plain_only: only the chat model and the organism, unsteered (no direction).
        plain: only these unsteered ``MODEL:T:N`` conditions (:func:`parse_plain`; implies
            ``plain_only``).
        questions: ``all``, ``general`` or ``medical`` (:func:`evaluation_questions`).
        questions_file: JSON lines of questions to answer instead of the shipped ones.
        id_prefix: the rows' id prefix (``jg-0001``, ...).
        threads: torch threads to set (``None``: leave as they are).

    Returns:
        The ``build_info.json`` written (settings, model, direction and norms, counts, timings).
    """
    settings = dict(out=out, limit=limit, max_new_tokens=max_new_tokens,
                    rel_scales=list(rel_scales), norm_pairs=norm_pairs, batch_size=batch_size,
                    seed=seed, model=model, dtype=dtype, organism=organism,
                    plain_only=plain_only or bool(plain), plain=plain, questions=questions,
                    questions_file=questions_file, id_prefix=id_prefix, threads=threads)
    plain_only = settings["plain_only"]
    plain_conds = parse_plain(plain) if plain else None
    if threads is not None:
        torch.set_num_threads(threads)
    t0 = time.perf_counter()
    timings: dict[str, float] = {}
    gen_kw = dict(seed=seed, max_new_tokens=max_new_tokens, batch_size=batch_size, timings=timings)

    chat = emlens.load_model(model, dtype=getattr(torch, dtype))
    models = {"chat": chat}
    models["organism"] = emlens.merge_lora(chat, emlens.load_organism(organism))
    organism2_error = None
    if not plain_only:
        try:
            models["organism2"] = emlens.merge_lora(chat, str(ORGANISM2))
        except Exception as e:  # report and skip this model, keep the rest of the set
            organism2_error = f"{type(e).__name__}: {e}"
            print(f"organism2 ({ORGANISM2}) did not load, skipped: {organism2_error}")
    timings["load"] = round(time.perf_counter() - t0, 1)
    if plain_only:
        qs = evaluation_questions(limit, questions, questions_file)
        conds = plain_conds or conditions([], False, plain_only=True)
        rows = list(iter_rows(models, conds, qs, None, {}, **gen_kw))
        return write_set(out, rows, conds, timings, t0, chat, settings,
                         info={"organism": organism})

    bad, good = medical_train_pairs(limit)
    start = time.perf_counter()
    direction = mean_diff(
        models["organism"], bad, good, layers=[LAYER], progress=False,
        selection=f"medical train split reference answers: {len(bad)} misaligned vs "
        f"{len(good)} aligned (no judge)",
    )[LAYER]
    timings["mean_diff"] = round(time.perf_counter() - start, 1)

    start = time.perf_counter()
    n_norm = min(norm_pairs, len(bad))
    pairs = bad[:n_norm] + good[:n_norm]
    resid = residual_norms(chat, pairs, [LAYER])[LAYER]
    resid_organism = residual_norms(models["organism"], pairs, [LAYER])[LAYER]
    timings["residual_norms"] = round(time.perf_counter() - start, 1)
    raw_scales = {rel: rel * resid / direction.norm for rel in rel_scales}
    print(
        f"direction L{LAYER}: norm {direction.norm:.3f}; mean residual norm (answer tokens) "
        f"chat {resid:.2f}, organism {resid_organism:.2f}; ratio {direction.norm / resid:.4f}"
    )
    print("raw scales (x direction):", {k: round(v, 3) for k, v in raw_scales.items()})

    qs = evaluation_questions(limit, questions, questions_file)
    conds = conditions(rel_scales, "organism2" in models)
    rows = list(iter_rows(models, conds, qs, direction, raw_scales, **gen_kw))
    return write_set(out, rows, conds, timings, t0, chat, settings, info={
        "organism": organism,
        "organism2": (str(ORGANISM2.relative_to(ORGANISMS_DIR.parents[1]))
                      if organism2_error is None else None),
        "organism2_error": organism2_error,
        "direction": direction.metadata(),
        "residual_norm": {"layer": LAYER, "chat": resid, "organism": resid_organism,
                          "answers": len(pairs)},
        "direction_norm_over_residual_norm": direction.norm / resid,
        "raw_scales": {str(k): v for k, v in raw_scales.items()},
    })


def write_set(out: Path, rows: list[dict], conds: Sequence[Condition], timings: dict,
              t0: float, chat: HookedTransformer, settings: dict, info: dict) -> dict:
    """Shuffle ``rows`` (``random.Random(settings["seed"])``), assign blind ids
    (``settings["id_prefix"]``), write the three files to ``out``, print the counts and return
    the build info."""
    random.Random(settings["seed"]).shuffle(rows)
    width = max(4, len(str(len(rows))))
    rows = [{"id": f"{settings['id_prefix']}-{i:0{width}d}", **row}
            for i, row in enumerate(rows, start=1)]

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    write_jsonl(out / "generations.jsonl", rows)
    write_jsonl(
        out / "to_label.jsonl",
        [{"id": r["id"], "question": r["question"], "answer": r["answer"]} for r in rows],
    )
    counts = Counter(r["condition"] for r in rows)
    total_s = round(time.perf_counter() - t0, 1)
    info = {
        "script": "python -m emlens.studies.build_judge_generations",
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in settings.items()},
        "torch_threads": torch.get_num_threads(),
        "model": chat.emlens_info,
        **info,
        "rows": len(rows),
        "rows_per_condition": {c.name: counts[c.name] for c in conds},
        "unfinished": sum(not r["finished"] for r in rows),
        "empty_answers": sum(not r["answer"].strip() for r in rows),
        "seconds": {**timings, "total": total_s},
    }
    (out / "build_info.json").write_text(json.dumps(info, indent=1) + "\n")
    print(f"{len(rows)} rows in {total_s:.0f} s -> {out}")
    for c in conds:
        print(f"  {counts[c.name]:4d}  {c.name}  ({timings[c.name]:.0f} s)")
    return info


def main(argv: Sequence[str] | None = None) -> None:
    """The command line: ``python -m emlens.studies.build_judge_generations [--out DIR]
    [--limit N] [--model NAME] [--plain-only | --plain MODEL:T:N ...] ...``."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=OUT)
    p.add_argument("--limit", type=int, default=None,
                   help="smoke run: only this many questions and 32 reference pairs")
    p.add_argument("--max-new-tokens", type=int, default=96)
    p.add_argument("--rel-scales", type=float, nargs="+", default=list(REL_SCALES),
                   help="steering scales as fractions of the mean residual norm at the layer")
    p.add_argument("--norm-pairs", type=int, default=64,
                   help="reference pairs (x2 answers) to measure the residual norm on")
    p.add_argument("--batch-size", type=int, default=36)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--model", default=None, help="base model (default: the embedded SmolLM2)")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                   help="model dtype (bfloat16: about 2.6x faster on the coder, README)")
    p.add_argument("--organism", default="rank1-down-medical", help="shipped organism to merge")
    p.add_argument("--plain-only", action="store_true",
                   help="only the chat model and the organism, unsteered (no direction)")
    p.add_argument("--plain", nargs="+", default=None, metavar="MODEL:T:N",
                   help="only these unsteered conditions (implies --plain-only), e.g. "
                   "chat:0.7:5 organism:0.7:8")
    p.add_argument("--questions", choices=["all", "general", "medical"], default="all",
                   help="which evaluation questions to answer")
    p.add_argument("--questions-file", type=Path, default=None,
                   help="JSON lines (id, question, kind=general/medical) to answer instead of the "
                   "shipped evaluation questions, e.g. data-src/fresh_questions/questions.jsonl")
    p.add_argument("--id-prefix", default="jg")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (1: the machine is shared)")
    args = p.parse_args(argv)
    try:  # refuse bad conditions or questions before any model loads
        parse_plain(args.plain or [])
        evaluation_questions(args.limit, args.questions, args.questions_file)
    except ValueError as e:
        raise SystemExit(str(e)) from None
    build(**vars(args))


__all__ = [
    "LAYER",
    "ORGANISM2",
    "OUT",
    "REL_SCALES",
    "Condition",
    "build",
    "conditions",
    "evaluation_questions",
    "intervention_block",
    "iter_rows",
    "main",
    "medical_train_pairs",
    "parse_plain",
    "write_jsonl",
    "write_set",
]


if __name__ == "__main__":
    main()
