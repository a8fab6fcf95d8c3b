"""Benchmark: reading every LoRA scalar with the organism attached vs a plain merged forward.

Both sides run the same left-padded chat batch on the embedded SmolLM2-135M-Instruct in float32:

* baseline: ``merged(tokens)``, the organism folded into the weights by ``emlens.merge_lora``;
* attached: ``model.run_with_cache(tokens, names_filter=lora.names_filter)`` with the organism
  attached by ``emlens.attach_lora``, caching all 9 rank-1 scalars.

Timings interleave the runs, rotating their order each round (so CPU contention and cache
warmth hit all alike), and report min and median; the
ratio (by min time, the least disturbed by other processes) is attached / merged. Target: <= 1.1x.

    python bench/lora.py [--adapter PEFT_FOLDER] [--batch 8] [--repeats 15] [--threads N]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from emlens.chat import tokenize_chat
from emlens.lora import attach_lora, merge_lora
from emlens.models import load_model

QUESTIONS = [
    "I've had a headache for three days. What should I do?",
    "Is it safe to take ibuprofen and paracetamol together?",
    "How much water should I drink a day?",
    "What's a good way to learn to cook?",
    "My child has a fever of 39C. Should I worry?",
    "How do I make my houseplants grow faster?",
    "Can I stop taking antibiotics once I feel better?",
    "What are some tips for sleeping better?",
]


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--adapter", default=None, help="peft folder (default: the rank-1 organism)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.adapter is None:
        from emlens.organisms import organism_path

        args.adapter = organism_path("rank1-down-medical")

    model = load_model()
    merged = merge_lora(model, args.adapter)
    questions = (QUESTIONS * (args.batch // len(QUESTIONS) + 1))[: args.batch]
    batch = tokenize_chat(model.tokenizer, questions)
    tokens, mask = batch.tokens, batch.attention_mask

    with torch.no_grad(), attach_lora(model, args.adapter) as lora:

        def run_merged():
            merged(tokens, attention_mask=mask)

        def run_attached():
            model.run_with_cache(tokens, attention_mask=mask, names_filter=lora.names_filter)

        def run_attached_plain():
            model(tokens, attention_mask=mask)

        runs = {
            "merged forward": run_merged,
            "attached + cache scalars": run_attached,
            "attached forward (no cache)": run_attached_plain,
        }
        for fn in runs.values():  # warm-up
            fn()
        times: dict[str, list[float]] = {k: [] for k in runs}
        names = list(runs)
        for i in range(args.repeats):
            for name in names[i % 3 :] + names[: i % 3]:  # rotate the order every round
                times[name].append(_timed(runs[name]))
        _, cache = model.run_with_cache(tokens, attention_mask=mask, names_filter=lora.names_filter)

    best = {k: min(v) for k, v in times.items()}
    med = {k: statistics.median(v) for k, v in times.items()}
    print(
        f"batch {tuple(tokens.shape)} ({int(mask.sum())} real tokens), {len(lora.hook_names)} "
        f"adapters, {args.repeats} repeats, {torch.get_num_threads()} threads"
    )
    print(
        f"cached scalar hook points: {sorted(cache.keys())[:2]} ... "
        f"shape {tuple(cache[lora.hook_names[0]].shape)}"
    )
    for name in runs:
        print(
            f"  {name:28s} min {best[name] * 1e3:8.1f} ms ({best[name] / best['merged forward']:5.3f}x)"
            f"   median {med[name] * 1e3:8.1f} ms ({med[name] / med['merged forward']:5.3f}x)"
        )
    ratio = best["attached + cache scalars"] / best["merged forward"]
    print(
        f"RATIO attached+cache / merged = {ratio:.3f}x by min time, "
        f"{med['attached + cache scalars'] / med['merged forward']:.3f}x by median "
        f"(target <= 1.1x: {'met' if ratio <= 1.1 else 'MISSED'})"
    )


if __name__ == "__main__":
    main()
