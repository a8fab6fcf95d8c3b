"""Mean-difference extraction cost on the embedded model, ratios measured in one run.

    python bench/directions.py [--answers 1000] [--batch 16]

Time: ``collect_means`` (all 30 layers, and one layer) vs plain forward passes
(``return_type=None``) over the same batches. Memory: peak resident memory above the loaded model
(Linux VmHWM, reset before each measurement) when extracting over N/4 and N answers: streaming
means the extra memory should not grow with N.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

import emlens
from emlens.directions import collect_means


def _rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak() -> int:
    Path("/proc/self/clear_refs").write_text("5")
    return _rss_kib("VmRSS:")


def _pairs(n: int) -> list[tuple[str, str]]:
    try:
        from emlens.data import load_dataset

        rows = load_dataset("medical")
        base = [(r.question, r.misaligned) for r in rows] + [(r.question, r.aligned) for r in rows]
    except Exception:  # the data module may not be installed in a partial checkout
        base = [(f"Question {i} about health?", "A plain answer with a few words. " * (1 + i % 5))
                for i in range(200)]
    return [base[i % len(base)] for i in range(n)]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--answers", type=int, default=1000)
    parser.add_argument("--batch", type=int, default=16)
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    model = emlens.load_model()
    pairs = _pairs(args.answers)
    batches = list(emlens.chat.iter_chat_batches(
        model.tokenizer, [q for q, _ in pairs], [a for _, a in pairs], batch_size=args.batch
    ))
    n_tokens = sum(int(b.attention_mask.sum()) for b in batches)

    def plain() -> None:
        for b in batches:
            model(b.tokens, attention_mask=b.attention_mask, return_type=None)

    def all_layers() -> None:
        collect_means(model, batches, "all", progress=False)

    def one_layer() -> None:
        collect_means(model, batches, [15], progress=False)

    timings = {}
    for name, fn in [("plain forward", plain), ("collect_means, 30 layers", all_layers),
                     ("collect_means, layer 15", one_layer)]:
        start = time.perf_counter()
        fn()
        timings[name] = time.perf_counter() - start
    print(f"{len(pairs)} answers, {len(batches)} batches of {args.batch}, {n_tokens} tokens")
    print(f"{'run':28s} {'seconds':>8s} {'ratio to plain':>15s}")
    for name, seconds in timings.items():
        print(f"{name:28s} {seconds:8.1f} {seconds / timings['plain forward']:15.2f}")

    print("\npeak memory above the loaded model (all 30 layers):")
    for n in (len(batches) // 4, len(batches)):
        base = _reset_peak()
        collect_means(model, batches[:n], "all", progress=False)
        extra = (_rss_kib("VmHWM:") - base) / 1024
        print(f"  {n * args.batch:5d} answers: {extra:7.1f} MiB")


if __name__ == "__main__":
    main()
