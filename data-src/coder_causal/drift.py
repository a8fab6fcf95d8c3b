"""Issue 30 item 3, the drift back (``PLAN_narrow.md`` amendment 4): the narrow (KL) solution
trained on without the KL term.

``coder-rank1-down-medical-kl`` continues for 24 steps (lr 2e-3, no warm-up, fresh AdamW state)
on the organism order's third epoch (batches 72-95 of ``organism_batches`` with 3 epochs),
checkpoints every 4 steps, into ``runs/coder-rank1-down-medical-kl-continued``. Then
KL(chat || solution) per answer token on each of the 303 ``nonmedical`` rows (misaligned
answers) for the narrow, continued and general solutions; the finding ``drift`` is the continued
solution's token-weighted KL minus the narrow one's with a 2,000-resample row bootstrap (seed 30),
smallest effect a tenth of the way back (0.1 x (general - narrow)). Also the KL curve over the
continued run's checkpoints (batches of 8) and each adapter's cosine of B to the general
solution's. Writes ``narrow/drift.json`` and the finding into ``results/coder/findings.json``::

    OMP_NUM_THREADS=2 python data-src/coder_causal/drift.py
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import torch

import emlens
from emlens.findings import Comparison, Effect, Finding
from emlens.organisms import load_organism
from emlens.organisms.train import load_rows, organism_batches, recipe_for
from emlens.train_runs import checkpoint_steps, load_trainable
from emlens.trainable_adapter import TrainableAdapter
from emlens.training import TrainConfig, evaluate_loss, prepare, train

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
from analyse import flat, write_findings  # noqa: E402
from narrow_loss import mean_ce, misaligned_batches, row_losses  # noqa: E402

ROOT = HERE.parents[1]
OUT = ROOT / "runs" / "coder-rank1-down-medical-kl-continued"
STEPS, LR, SAVE_EVERY = 24, 2e-3, 4
N_BOOT, BOOT_SEED = 2000, 30
INSTRUMENT = ("KL(chat || solution) per answer token on the 303 non-medical rows' misaligned "
              "answers (loss, no reading)")


def cosines_b(a: TrainableAdapter, b: TrainableAdapter) -> list[float]:
    """Per adapter, the cosine of ``a``'s B to ``b``'s (same modules, same order)."""
    return [float(torch.nn.functional.cosine_similarity(x.B.detach().double().flatten(),
                                                        y.B.detach().double().flatten(), dim=0))
            for x, y in zip(a.adapters, b.adapters, strict=True)]


def main() -> None:
    t0 = time.perf_counter()
    torch.manual_seed(0)
    chat = emlens.load_model("qwen2.5-coder-1.5b", dtype=torch.bfloat16)
    tok = chat.tokenizer
    narrow = TrainableAdapter.from_adapter(load_organism("coder-rank1-down-medical-kl"))
    general = TrainableAdapter.from_adapter(load_organism("coder-rank1-down-medical"))
    start = narrow.first_layer
    recipe = replace(recipe_for("coder-rank1-down-medical-kl"), epochs=3)
    batches = organism_batches(recipe, load_rows(recipe.data, recipe.split), tok)[72:72 + STEPS]
    cfg = TrainConfig(steps=STEPS, lr=LR, kl_weight=0.0, warmup_steps=0, seed=0,
                      save_every=SAVE_EVERY, shuffle=False, name="kl solution continued")
    if (OUT / "train_log.json").is_file():  # a finished run (train() would start it afresh)
        log = json.loads((OUT / "train_log.json").read_text())
        if log["config"] != asdict(cfg):
            raise SystemExit(f"{OUT} holds a run of another config: {log['config']}")
        continued = load_trainable(OUT / "final.safetensors")
    else:
        res = train(chat, narrow, prepare(chat, batches, start_layer=None), None, cfg, out=OUT,
                    meta={"plan": "data-src/coder_causal/PLAN_narrow.md, amendment 4",
                          "from": "coder-rank1-down-medical-kl",
                          "batches": "organism_batches(epochs=3)[72:96]"})
        continued, log = res.params, res.log
    print(f"continued: {log['seconds']} s", flush=True)
    other = load_rows("nonmedical", None)
    rows = prepare(chat, misaligned_batches(tok, other, 1), start_layer=start, reference=True)
    kl = {k: row_losses(chat, p, rows, kind="kl") for k, p in (("narrow", narrow), ("continued", continued),
                                                 ("general", general))}
    print(f"per-row KL done ({time.perf_counter() - t0:.0f} s)", flush=True)
    del rows
    batched = prepare(chat, misaligned_batches(tok, other, 8), start_layer=start,
                      reference=True)
    curve = {step: evaluate_loss(chat, load_trainable(OUT / "checkpoints"
                                                      / f"step-{step:05d}.safetensors"),
                                 batched, kind="kl")
             for step in checkpoint_steps(OUT)}
    n = len(other)
    idx = np.random.default_rng(BOOT_SEED).integers(0, n, (N_BOOT, n))
    mean = {k: mean_ce(v) for k, v in kl.items()}  # token-weighted means (of KL here)
    diff = mean_ce(kl["continued"], idx) - mean_ce(kl["narrow"], idx)
    share = diff / (mean_ce(kl["general"], idx) - mean_ce(kl["narrow"], idx))
    value = mean["continued"] - mean["narrow"]
    lo, hi = np.percentile(diff, [2.5, 97.5])
    s_lo, s_hi = np.percentile(share, [2.5, 97.5])
    delta = 0.1 * (mean["general"] - mean["narrow"])
    comp = Comparison("KL(chat || solution) on the non-medical rows, continued - narrow (nats "
                      "per answer token; row bootstrap)", Effect(value, float(lo), float(hi), n),
                      expected="increase", delta=delta, short="loss")
    share_point = value / (mean["general"] - mean["narrow"])
    cos = {"narrow_to_general": cosines_b(narrow, general),
           "continued_to_general": cosines_b(continued, general)}
    finding = Finding(
        "drift", "Without the KL term the narrow (KL) solution drifts back toward the general "
        "one: trained on for 24 steps, it moves the chat model's distribution on the non-medical "
        "rows as the general solution does", (comp,),
        evidence=f"KL narrow {mean['narrow']:.3f}, continued {mean['continued']:.3f}, general "
                 f"{mean['general']:.3f}; share of the way back {share_point:.2f} "
                 f"[{s_lo:.2f}, {s_hi:.2f}]; one training seed")
    entry = flat(finding, comp, "the narrow (KL) solution before the continued steps", None,
                 {"read_confirmation": None, "instrument": INSTRUMENT, "delta": delta,
                  "kl": mean, "share_back": {"value": share_point, "low": float(s_lo),
                                             "high": float(s_hi)},
                  "curve": curve, "cosine_b": cos})
    out = {"plan": "data-src/coder_causal/PLAN_narrow.md, amendment 4", "rows": n, "kl": mean,
           "effect": comp.as_dict(), "share_back": entry["share_back"], "curve": curve,
           "cosine_b": cos, "train_seconds": log["seconds"],
           "seconds": round(time.perf_counter() - t0, 1), "dtype": "bfloat16",
           "torch_threads": torch.get_num_threads()}
    (HERE / "narrow" / "drift.json").write_text(json.dumps(out, indent=1) + "\n")
    write_findings([entry])
    print(f"drift: {value:+.4f} [{lo:+.4f}, {hi:+.4f}] (delta {delta:.3f}) -> {entry['verdict']}; "
          f"share back {share_point:.2f} [{s_lo:.2f}, {s_hi:.2f}]; curve {curve}")


if __name__ == "__main__":
    main()
