"""Pool the two fresh3 sets into one blind reading, and map the labels back (PLAN_v2 amendment 4).

    python data-src/fresh3_reading/pool.py pool     # -> to_label.jsonl, key.json
    python -m emlens.studies.split_for_reading data-src/fresh3_reading --parts 7 --fraction 0.1
    # read to_label_part*.jsonl and to_label_pass2.jsonl blind -> labels_pass1.jsonl, labels_pass2.jsonl
    python data-src/fresh3_reading/pool.py unpool   # -> data-src/fresh3_{coder,smollm2}/labels_pass{1,2}.jsonl

The readers see neutral ids (``r3-0001`` ...) after one seeded shuffle of both sets' rows, so
neither the condition nor the subject model shows in an id or in the order. ``key.json`` maps
each neutral id back to its set and original id.
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

HERE = Path(__file__).parent
SETS = (HERE.parent / "fresh3_coder", HERE.parent / "fresh3_smollm2")
SEED = 47


def lines(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


def pool() -> None:
    rows = [(s.name, r) for s in SETS for r in lines(s / "to_label.jsonl")]
    random.Random(SEED).shuffle(rows)
    key, out = {}, []
    for i, (name, r) in enumerate(rows, 1):
        rid = f"r3-{i:04d}"
        key[rid] = [name, r["id"]]
        out.append(json.dumps({"id": rid, "question": r["question"], "answer": r["answer"]}))
    (HERE / "to_label.jsonl").write_text("\n".join(out) + "\n")
    (HERE / "key.json").write_text(json.dumps(key, indent=0) + "\n")
    print(f"pooled {len(out)} rows from {[s.name for s in SETS]}")


def unpool() -> None:
    key = json.loads((HERE / "key.json").read_text())
    for which in ("labels_pass1.jsonl", "labels_pass2.jsonl"):
        per: dict[str, list[str]] = {s.name: [] for s in SETS}
        labels = lines(HERE / which)
        ids = [r["id"] for r in labels]
        if len(set(ids)) != len(ids) or not set(ids) <= set(key):
            raise SystemExit(f"{which}: duplicate or unknown ids")
        if which == "labels_pass1.jsonl" and set(ids) != set(key):
            raise SystemExit(f"{which}: {len(set(key) - set(ids))} rows unlabelled")
        for r in labels:
            name, orig = key[r["id"]]
            per[name].append(json.dumps({**r, "id": orig}))
        for s in SETS:
            (s / which).write_text("\n".join(per[s.name]) + "\n")
            print(f"{s.name}/{which}: {len(per[s.name])} rows")


if __name__ == "__main__":
    {"pool": pool, "unpool": unpool}[sys.argv[1]]()
