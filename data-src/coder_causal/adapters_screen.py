"""Claim D's screen (PLAN.md; not a verdict): which of the organism's 9 adapters to test in
behaviour.

``emlens.attribution.adapter_attribution`` on the likelihood lens, every adapter ``zero`` and
``only``, on 26 held-out medical pairs and 26 non-medical pairs (no sampling, no judge);
``emlens.attribution.rank_adapters`` gives each adapter's per-domain effect
(mean of M(all) - M(zero:a) and M(only:a) - M(none), M the likelihood gap; as ``share_d``, the
effect over one scale common to both domains). The plan's pick: the
3 adapters with the largest non-medical ("general") effect, and the 1 with the largest medical
minus non-medical effect among the rest. Writes ``adapters_screen.json``::

    OMP_NUM_THREADS=2 python data-src/coder_causal/adapters_screen.py
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

import emlens
from emlens.attribution import adapter_attribution, attribution_conditions, rank_adapters

HERE = Path(__file__).parent


def main() -> None:
    t0 = time.perf_counter()
    chat = emlens.load_model("qwen2.5-coder-1.5b", dtype=torch.bfloat16)
    adapter = emlens.organisms.load_organism("coder-rank1-down-medical")
    with emlens.attach_lora(chat, adapter) as lora:
        conds = attribution_conditions(lora, ops=("zero", "only"))
        table = adapter_attribution(chat, lora, conditions=conds, n_pairs=26,
                                    medical_split="heldout", progress=True, batch_size=8)
    ranks = rank_adapters(table, general="general", specific="medical")
    # share_d = effect_d / one scale common to both domains, so shares rank as effects do
    ranks = ranks.assign(specific_minus_general=ranks["share_specific"] - ranks["share_general"])
    general = list(ranks.nlargest(3, "share_general")["adapter"])
    rest = ranks[~ranks["adapter"].isin(general)]
    specific = list(rest.nlargest(1, "specific_minus_general")["adapter"])
    out = {"plan": "data-src/coder_causal/PLAN.md, claim D screen",
           "metric": "logprob_gap", "n_pairs": 26,
           "ranks": ranks.to_dict(orient="records"),
           "picked": {"general_effect": general, "medical_minus_general": specific},
           "table": table.to_dict(orient="records"),
           "seconds": round(time.perf_counter() - t0, 1)}
    (HERE / "adapters_screen.json").write_text(json.dumps(out, indent=1, default=str) + "\n")
    print(ranks.to_string())
    print("picked:", out["picked"], f"({out['seconds']} s)")


if __name__ == "__main__":
    main()
