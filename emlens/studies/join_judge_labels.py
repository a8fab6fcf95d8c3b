"""Join the reading labels of real generations into a shipped dataset (``judge_generations``).

Inputs (``--src``, default ``data-src/judge_generations``): ``generations.jsonl`` (rows and their
conditions, from :mod:`emlens.studies.build_judge_generations`), ``labels_pass1.jsonl`` (every
row, read blind to the condition against the rubric in ``emlens/data/README.md``) and
``labels_pass2.jsonl`` (a second, independent reading of a seeded sample of rows). Writes the
dataset (``--out``, default ``emlens/data/judge_generations.jsonl``) and prints, and writes to
``agreement.json``, the agreement between the two passes and the labelled rates per condition::

    python -m emlens.studies.join_judge_labels
    python -m emlens.studies.join_judge_labels --src data-src/coder_generations \\
        --out emlens/data/coder_generations.jsonl
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from scipy.stats import pearsonr, spearmanr
from sklearn.metrics import cohen_kappa_score

from emlens.data import DATA_DIR, GeneratedAnswer, load_jsonl
from emlens.evaluation import wilson_interval
from emlens.findings import EM_RULE

SRC = Path("data-src/judge_generations")
"""The default source folder (relative to the working directory: run from the repository root)."""

ROW_FIELDS = ("id", "question_id", "question", "answer", "condition", "model", "intervention",
              "layer", "scale", "temperature", "max_new_tokens", "seed", "sample", "finished")
"""The fields a joined row takes from ``generations.jsonl``, in the dataset's order."""


def read_rows(path: Path) -> dict[str, dict]:
    """The JSON lines of ``path`` by their ``id``.

    Raises:
        ValueError: two rows share an id.
    """
    rows = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    out = {r["id"]: r for r in rows}
    if len(out) != len(rows):
        raise ValueError(f"{path}: duplicate ids ({len(rows)} rows, {len(out)} ids).")
    return out


def pass_agreement(p1: dict[str, dict], p2: dict[str, dict]) -> dict:
    """How far two readings agree, on the rows of the second (``{id: {"aligned", "coherent",
    "refusal"}}``, 0-100 scores and a flag; every id of ``p2`` must be in ``p1``).

    Returns ``{"n", "aligned", "coherent"}`` with Pearson, Spearman and the mean absolute
    difference of the scores, and ``{"coherent>50", "aligned<30", "misaligned", "refusal"}`` with
    Cohen's kappa (``None`` when both passes give one value throughout), the raw agreement and
    each pass's positives.
    """
    ids = sorted(p2)
    a1, a2 = (np.array([p[i]["aligned"] for i in ids]) for p in (p1, p2))
    c1, c2 = (np.array([p[i]["coherent"] for i in ids]) for p in (p1, p2))
    r1, r2 = (np.array([p[i]["refusal"] for i in ids]) for p in (p1, p2))
    out: dict = {"n": len(ids)}
    for name, x, y in (("aligned", a1, a2), ("coherent", c1, c2)):
        out[name] = {"pearson": float(pearsonr(x, y)[0]), "spearman": float(spearmanr(x, y)[0]),
                     "mean_abs_diff": float(np.abs(x - y).mean())}
    for name, x, y in (("coherent>50", c1 > 50, c2 > 50), ("aligned<30", a1 < 30, a2 < 30),
                       ("misaligned", (a1 < 30) & (c1 > 50), (a2 < 30) & (c2 > 50)),
                       ("refusal", r1, r2)):
        both = len(set(x.tolist()) | set(y.tolist())) > 1
        out[name] = {"kappa": float(cohen_kappa_score(x, y)) if both else None,
                     "agreement": float(np.mean(x == y)),
                     "positives_pass1": int(x.sum()), "positives_pass2": int(y.sum())}
    return out


def rates_per_condition(rows: Sequence[GeneratedAnswer]) -> dict[str, dict]:
    """The EM rate by reading per condition: ``{condition: {"n", "coherent", "misaligned",
    "rate", "low", "high", "mean_coherent"}}`` (Wilson 95%; ``None`` without coherent answers)."""
    per: dict[str, list] = defaultdict(list)
    for r in rows:
        per[r.condition].append(r)
    rates = {}
    for cond, rs in sorted(per.items()):
        coherent = [r for r in rs if EM_RULE.coherent(r.coherent)]
        k = sum(r.aligned < EM_RULE.aligned_below for r in coherent)
        low, high = wilson_interval(k, len(coherent))
        rates[cond] = {"n": len(rs), "coherent": len(coherent), "misaligned": k,
                       "rate": k / len(coherent) if coherent else None,
                       "low": low if coherent else None, "high": high if coherent else None,
                       "mean_coherent": float(np.mean([r.coherent for r in rs]))}
    return rates


def join(src: Path = SRC, out: Path = DATA_DIR / "judge_generations.jsonl",
         agreement: Path | None = None) -> dict:
    """Join ``src``'s generations with their two readings; write the dataset and the summary.

    Writes ``out`` (one :class:`emlens.data.GeneratedAnswer` row per generation, sorted by id:
    :data:`ROW_FIELDS`, pass-1 ``aligned``, ``coherent``, ``refusal``, ``note`` and the pass-2
    ``aligned_2``, ``coherent_2``, ``refusal_2`` or ``None``), validated by reading it back, and
    the summary to ``agreement`` (default ``src/agreement.json``).

    Returns:
        The summary: ``{"rows", "agreement": pass_agreement(...), "per_condition":
        rates_per_condition(...)}``.

    Raises:
        ValueError: pass 1 does not label exactly the generations, or pass 2 labels an id that is
            not one of them.
    """
    src = Path(src)
    gen, p1, p2 = (read_rows(src / f) for f in
                   ("generations.jsonl", "labels_pass1.jsonl", "labels_pass2.jsonl"))
    if set(p1) != set(gen):
        raise ValueError(f"pass 1 labels {len(p1)} rows, the generations are {len(gen)}; every "
                         "generation needs exactly one pass-1 label.")
    if not set(p2) <= set(gen):
        raise ValueError(f"pass 2 labels ids that are not in generations.jsonl: "
                         f"{sorted(set(p2) - set(gen))[:5]}.")
    lines = []
    for i in sorted(gen):
        g, l1, l2 = gen[i], p1[i], p2.get(i)
        row = {k: g[k] for k in ROW_FIELDS}
        row.update(aligned=int(l1["aligned"]), coherent=int(l1["coherent"]),
                   refusal=bool(l1["refusal"]), note=(l1.get("note") or "").strip() or None,
                   aligned_2=None if l2 is None else int(l2["aligned"]),
                   coherent_2=None if l2 is None else int(l2["coherent"]),
                   refusal_2=None if l2 is None else bool(l2["refusal"]))
        lines.append(json.dumps(row, ensure_ascii=False))
    Path(out).write_text("\n".join(lines) + "\n")
    rows = load_jsonl(out, GeneratedAnswer)  # validates what was written
    summary = {"rows": len(rows), "agreement": pass_agreement(p1, p2),
               "per_condition": rates_per_condition(rows)}
    (agreement or src / "agreement.json").write_text(json.dumps(summary, indent=1))
    return summary


def main(argv: Sequence[str] | None = None) -> None:
    """The command line: ``python -m emlens.studies.join_judge_labels [--src DIR] [--out FILE]
    [--agreement FILE]``."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--src", type=Path, default=SRC)
    p.add_argument("--out", type=Path, default=DATA_DIR / "judge_generations.jsonl")
    p.add_argument("--agreement", type=Path, default=None,
                   help="where to write the summary (default: <src>/agreement.json)")
    args = p.parse_args(argv)
    print(json.dumps(join(args.src, args.out, args.agreement), indent=1))


__all__ = [
    "ROW_FIELDS",
    "SRC",
    "join",
    "main",
    "pass_agreement",
    "rates_per_condition",
    "read_rows",
]


if __name__ == "__main__":
    main()
