"""Split a blind ``to_label.jsonl`` into parts for several readers, and draw the second-pass sample.

Rows keep the file's (already shuffled, condition-blind) order; part ``k`` is written to
``to_label_part<k>.jsonl``. The second pass is a ``--fraction`` of all rows (at least
``--min-pass2``), drawn with ``--seed`` and put in a fresh shuffled order, written to
``to_label_pass2.jsonl``: a reader who did not label those rows in pass 1 relabels them::

    python scripts/split_for_reading.py data-src/fresh_smollm2 --parts 4
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("folder", type=Path, help="folder holding to_label.jsonl")
    p.add_argument("--parts", type=int, default=4)
    p.add_argument("--fraction", type=float, default=0.12)
    p.add_argument("--min-pass2", type=int, default=60)
    p.add_argument("--seed", type=int, default=2)
    args = p.parse_args()
    lines = [x for x in (args.folder / "to_label.jsonl").read_text().splitlines() if x.strip()]
    size = -(-len(lines) // args.parts)
    for k in range(args.parts):
        part = lines[k * size : (k + 1) * size]
        (args.folder / f"to_label_part{k + 1}.jsonl").write_text("\n".join(part) + "\n")
        print(f"part {k + 1}: {len(part)} rows")
    n2 = min(len(lines), max(args.min_pass2, round(args.fraction * len(lines))))
    rng = random.Random(args.seed)
    sample = rng.sample(lines, n2)
    rng.shuffle(sample)
    (args.folder / "to_label_pass2.jsonl").write_text("\n".join(sample) + "\n")
    ids = [json.loads(x)["id"] for x in sample]
    print(f"pass 2: {n2} rows ({ids[0]} ...)")


if __name__ == "__main__":
    main()
