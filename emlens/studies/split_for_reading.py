"""Split a blind ``to_label.jsonl`` into parts for several readers, and draw the second-pass sample.

Rows keep the file's (already shuffled, condition-blind) order; part ``k`` is written to
``to_label_part<k>.jsonl``. The second pass is a ``--fraction`` of all rows (at least
``--min-pass2``), drawn with ``--seed`` and put in a fresh shuffled order, written to
``to_label_pass2.jsonl``: a reader who did not label those rows in pass 1 relabels them::

    python -m emlens.studies.split_for_reading data-src/fresh_smollm2 --parts 4
"""

from __future__ import annotations

import argparse
import json
import random
from collections.abc import Sequence
from pathlib import Path


def split(folder: Path, parts: int = 4, fraction: float = 0.12, min_pass2: int = 60,
          seed: int = 2) -> dict:
    """Cut ``folder/to_label.jsonl`` into ``parts`` consecutive parts and draw the second pass.

    Writes ``to_label_part1.jsonl`` ... ``to_label_part<parts>.jsonl`` (ceil(rows / parts) rows
    each, the last shorter) and ``to_label_pass2.jsonl``: ``max(min_pass2, round(fraction *
    rows))`` rows (at most all of them), sampled and shuffled by one ``random.Random(seed)``.

    Returns:
        ``{"parts": [rows per part], "pass2": [ids of the second pass, in its order]}``.
    """
    folder = Path(folder)
    lines = [x for x in (folder / "to_label.jsonl").read_text().splitlines() if x.strip()]
    size = -(-len(lines) // parts)
    sizes = []
    for k in range(parts):
        part = lines[k * size : (k + 1) * size]
        (folder / f"to_label_part{k + 1}.jsonl").write_text("\n".join(part) + "\n")
        sizes.append(len(part))
    n2 = min(len(lines), max(min_pass2, round(fraction * len(lines))))
    rng = random.Random(seed)
    sample = rng.sample(lines, n2)
    rng.shuffle(sample)
    (folder / "to_label_pass2.jsonl").write_text("\n".join(sample) + "\n")
    return {"parts": sizes, "pass2": [json.loads(x)["id"] for x in sample]}


def main(argv: Sequence[str] | None = None) -> None:
    """The command line: ``python -m emlens.studies.split_for_reading FOLDER [--parts K] ...``."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("folder", type=Path, help="folder holding to_label.jsonl")
    p.add_argument("--parts", type=int, default=4)
    p.add_argument("--fraction", type=float, default=0.12)
    p.add_argument("--min-pass2", type=int, default=60)
    p.add_argument("--seed", type=int, default=2)
    args = p.parse_args(argv)
    res = split(args.folder, args.parts, args.fraction, args.min_pass2, args.seed)
    for k, n in enumerate(res["parts"], start=1):
        print(f"part {k}: {n} rows")
    print(f"pass 2: {len(res['pass2'])} rows ({res['pass2'][0]} ...)")


__all__ = [
    "main",
    "split",
]


if __name__ == "__main__":
    main()
