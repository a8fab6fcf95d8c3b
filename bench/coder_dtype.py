"""Qwen2.5-Coder-1.5B in float32 vs bfloat16: what the demo's likelihood lens costs and reads.

For each dtype: load the model, merge the shipped organism ``coder-rank1-down-medical``, and read
the likelihood lens (mean per-token log p(misaligned) - log p(aligned)) on the first ``--pairs``
general pairs and held-out medical pairs, for the chat model, the merged organism and the organism
attached as hooks. Prints the organism's effect (organism - chat) per dtype and path, the lens
time per dtype and their ratio, and, per merged weight, how far the bfloat16 merge's weight change
is from the float32 one (the rank-1 update rounded into bfloat16 weights). Needs ``make coder``::

    python bench/coder_dtype.py            # about 7 minutes on 2 cores
"""

from __future__ import annotations

import argparse
import gc
import time

import torch

import emlens
from emlens.data import pair_rows
from emlens.lens import likelihood_gaps
from emlens.lora import attach_lora, merge_lora

MODEL, ORGANISM = "qwen2.5-coder-1.5b", "coder-rank1-down-medical"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--pairs", type=int, default=12, help="pairs per question set")
    args = p.parse_args()
    org = emlens.load_organism(ORGANISM)
    rows = {"general": pair_rows("general_pairs", limit=args.pairs),
            "medical": pair_rows("medical", split="heldout", limit=args.pairs)}
    ref: dict[str, torch.Tensor] = {}
    effect: dict[tuple, float] = {}
    seconds: dict[tuple, float] = {}
    for dtype in (torch.float32, torch.bfloat16):
        name = str(dtype).removeprefix("torch.")
        start = time.perf_counter()
        chat = emlens.load_model(MODEL, dtype=dtype)
        print(f"{name}: load {time.perf_counter() - start:.0f} s", flush=True)
        merged = merge_lora(chat, org)
        params = dict(merged.named_parameters())
        deltas = {n: params[n].detach().float() - base.float()
                  for n, base in merged._emlens_lora_base.items()}
        if not ref:
            ref = deltas
        else:
            for n, d in deltas.items():
                rel = float((d - ref[n]).norm() / ref[n].norm())
                print(f"  {n}: |merged change (bf16) - merged change (fp32)| / |fp32| = {rel:.3f}")
        for set_name, rs in rows.items():
            start = time.perf_counter()
            base = likelihood_gaps(chat, rs)
            seconds[(name, set_name)] = time.perf_counter() - start
            effect[(name, set_name, "merged")] = float((likelihood_gaps(merged, rs).gap
                                                        - base.gap).mean())
            with attach_lora(chat, org):
                effect[(name, set_name, "attached")] = float((likelihood_gaps(chat, rs).gap
                                                              - base.gap).mean())
            print(f"{name} {set_name}: organism - chat, merged {effect[(name, set_name, 'merged')]:+.3f}"
                  f", attached {effect[(name, set_name, 'attached')]:+.3f} nats/token; lens on "
                  f"{len(rs)} pairs {seconds[(name, set_name)]:.1f} s", flush=True)
        del chat, merged, params, deltas
        gc.collect()
    for set_name in rows:
        ratio = seconds[("float32", set_name)] / seconds[("bfloat16", set_name)]
        diff = effect[("bfloat16", set_name, "merged")] - effect[("float32", set_name, "merged")]
        print(f"{set_name}: lens time float32 / bfloat16 = {ratio:.2f}x; organism effect "
              f"bfloat16 - float32 = {diff:+.3f} nats/token")


if __name__ == "__main__":
    main()
