"""Issue 30 item 3 (``PLAN_narrow.md``, "Efficiency and stability"): the loss side of narrow vs
general on the coder, with intervals from a bootstrap over the held-out rows.

Both solutions are the shipped organisms (``coder-rank1-down-medical``: no KL, the general
solution; ``coder-rank1-down-medical-kl``: the narrow one). The data are the 26 held-out medical
rows' misaligned answers (``medical``, split ``heldout``), one row per batch so every loss is kept
per row (sum of answer-token CE and token count); blocks before the first adapted layer run once.

* Efficiency: CE at the adapters' B scaled by alpha (0 ... 2), against the effective norm
  ``|scaling B A|_F``; the effect is general's CE interpolated at the narrow solution's norm
  minus the narrow solution's CE (negative: the general solution is more efficient), with a
  2,000-resample row bootstrap (seed 30).
* Stability: ``(L(perturbed) - L(trained)) / (L(base) - L(trained))`` under orthogonal noise of
  size e on B and on A separately (each adapter's tensor), e in (0.3, 0.6), noise seeds 0-4; the
  effect is the general solution's mean over (e, target, seed) minus the narrow one's (negative:
  the general solution is more stable), bootstrap over rows (the seeds are kept).
* A manipulation check (descriptive, no verdict): each solution's KL(chat || solution) on the
  non-medical rows the KL term was trained on (all 303, misaligned answers).

Writes ``narrow/loss.json``: seed 0 of ``narrow_seeds.py``, whose ``analyse`` writes the
findings ``efficiency`` and ``stability`` (over training seeds) into
``results/coder/findings.json``::

    OMP_NUM_THREADS=2 python data-src/coder_causal/narrow_loss.py
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch

import emlens
from emlens.chat import iter_chat_batches
from emlens.findings import Comparison, Effect
from emlens.geometry import perturb
from emlens.organisms import load_organism
from emlens.organisms.train import load_rows
from emlens.trainable_adapter import TrainableAdapter
from emlens.training import PreparedSet, evaluate_loss, prepare

HERE = Path(__file__).parent

SOLUTIONS = {"general": "coder-rank1-down-medical", "narrow": "coder-rank1-down-medical-kl"}
ALPHAS = (0.25, 0.5, 0.75, 1.0, 1.5, 2.0)
EPS, TARGETS, NOISE_SEEDS = (0.3, 0.6), ("B", "A"), range(5)
N_BOOT, BOOT_SEED = 2000, 30
DELTA_EFF, DELTA_STAB = 0.05, 0.05  # the plan's smallest effects (nats per token; 5 points)
INSTRUMENT = ("answer-token cross-entropy on the 26 held-out medical rows' misaligned answers "
              "(loss, no reading)")


def misaligned_batches(tok, rows, batch_size: int) -> list:
    """Chat batches of ``rows``' questions and misaligned answers, in order."""
    return list(iter_chat_batches(tok, [r.question for r in rows], [r.misaligned for r in rows],
                                  batch_size=batch_size))


def row_losses(model, params, data: PreparedSet, kind: str = "ce") -> np.ndarray:
    """``[n_rows, 2]``: per row (one-row batches), the summed answer-token CE (``kind="kl"``:
    KL from the reference) and the token count."""
    out = []
    for pb in data.batches:
        one = PreparedSet([pb], data.start_layer)
        n = int(pb.batch.answer_mask[:, 1:].sum())
        out.append((evaluate_loss(model, params, one, kind=kind) * n, n))
    return np.asarray(out, dtype=float)


def mean_ce(rows: np.ndarray, idx: np.ndarray | None = None) -> np.ndarray | float:
    """Token-weighted mean CE of ``rows`` (``[..., n_rows, 2]``), over ``idx`` resamples
    (``[n_boot, n_rows]``) when given."""
    if idx is None:
        return float(rows[:, 0].sum() / rows[:, 1].sum())
    return rows[idx, 0].sum(-1) / rows[idx, 1].sum(-1)


def measure(chat, data: PreparedSet, p) -> dict:
    """One solution's per-row losses on ``data``: ``curve[alpha]`` at B scaled by alpha
    (:data:`ALPHAS`) and ``noisy[(target, e, seed)]`` under orthogonal noise."""
    return {"curve": {a: row_losses(chat, p.scaled(a), data) for a in ALPHAS},
            "noisy": {(t, e, s): row_losses(chat, perturb(p, e, t, torch.Generator().manual_seed(s)),
                                            data)
                      for t in TARGETS for e in EPS for s in NOISE_SEEDS}}


def efficiency(base, general: dict, narrow: dict, norms: dict, ix) -> np.ndarray:
    """General's CE interpolated at the narrow solution's norm minus the narrow CE at its own
    (alpha 1), per resample ``ix`` (``[n_boot, n_rows]``)."""
    xs = [0.0] + [a * norms["general"] for a in ALPHAS]
    g = np.stack([mean_ce(base, ix)] + [mean_ce(general["curve"][a], ix) for a in ALPHAS])
    at = np.array([np.interp(norms["narrow"], xs, g[:, j]) for j in range(g.shape[1])])
    return at - mean_ce(narrow["curve"][1.0], ix)


def stability(base, sol: dict, ix) -> np.ndarray:
    """The mean relative loss increase over (target, e, noise seed), per resample ``ix``."""
    lb, lt = mean_ce(base, ix), mean_ce(sol["curve"][1.0], ix)
    rel = [(mean_ce(v, ix) - lt) / (lb - lt) for v in sol["noisy"].values()]
    return np.mean(rel, axis=0)


def curve_lists(base, sols: dict, norms: dict) -> dict:
    """Each solution's efficiency curve as JSON lists: ``norms`` (0 is the chat model) and the
    token-weighted ``ce`` at each."""
    return {k: {"norms": [0.0] + [a * norms[k] for a in ALPHAS],
                "ce": [mean_ce(base)] + [mean_ce(sol["curve"][a]) for a in ALPHAS]}
            for k, sol in sols.items()}


def main() -> None:
    t0 = time.perf_counter()
    torch.manual_seed(0)
    chat = emlens.load_model("qwen2.5-coder-1.5b", dtype=torch.bfloat16)
    tok = chat.tokenizer
    rows = load_rows("medical", "heldout")
    params = {k: TrainableAdapter.from_adapter(load_organism(v)) for k, v in SOLUTIONS.items()}
    start = min(p.first_layer for p in params.values())
    data = prepare(chat, misaligned_batches(tok, rows, 1), start_layer=start)
    base = row_losses(chat, None, data)
    norms = {k: p.effective_norm() for k, p in params.items()}
    sols = {k: measure(chat, data, p) for k, p in params.items()}
    curves = {k: v["curve"] for k, v in sols.items()}
    noisy = {k: v["noisy"] for k, v in sols.items()}
    print(f"stability done ({time.perf_counter() - t0:.0f} s)", flush=True)
    # manipulation check (descriptive, not a verdict): did the KL term keep the chat model's
    # distribution on the non-medical rows it was trained on, and how far does the general
    # solution move it?
    other = load_rows("nonmedical", None)
    kl_set = prepare(chat, misaligned_batches(tok, other, 8), start_layer=start, reference=True)
    kl_check = {k: evaluate_loss(chat, p, kl_set, kind="kl") for k, p in params.items()}
    del kl_set
    print(f"KL on the non-medical rows: {kl_check} ({time.perf_counter() - t0:.0f} s)", flush=True)

    idx = np.random.default_rng(BOOT_SEED).integers(0, len(rows), (N_BOOT, len(rows)))
    everything = np.arange(len(rows))[None, :]

    eff = efficiency(base, sols["general"], sols["narrow"], norms, everything)[0]
    eff_lo, eff_hi = np.percentile(efficiency(base, sols["general"], sols["narrow"], norms, idx),
                                   [2.5, 97.5])
    stab = {k: stability(base, sols[k], everything)[0] for k in SOLUTIONS}
    stab_boot = stability(base, sols["general"], idx) - stability(base, sols["narrow"], idx)
    st_lo, st_hi = np.percentile(stab_boot, [2.5, 97.5])
    n = len(rows)
    eff_cmp = Comparison(
        "CE at equal norm, general - narrow (nats per token, held-out medical answers; row "
        "bootstrap)", Effect(float(eff), float(eff_lo), float(eff_hi), n), expected="decrease",
        delta=DELTA_EFF, short="loss")
    stab_cmp = Comparison(
        "relative loss increase under orthogonal noise, general - narrow (mean over e 0.3/0.6, "
        "B and A, 5 seeds; row bootstrap)",
        Effect(float(stab["general"] - stab["narrow"]), float(st_lo), float(st_hi), n),
        expected="decrease", delta=DELTA_STAB, short="loss")
    curve = curve_lists(base, sols, norms)
    per_cell = {k: {f"{t} e={e}": float(np.mean([
        (mean_ce(noisy[k][(t, e, s)]) - mean_ce(curves[k][1.0]))
        / (mean_ce(base) - mean_ce(curves[k][1.0])) for s in NOISE_SEEDS]))
        for t in TARGETS for e in EPS} for k in SOLUTIONS}
    out = {"plan": "data-src/coder_causal/PLAN_narrow.md", "rows": n,
           "base_ce": mean_ce(base), "norms": norms, "curves": curve,
           "stability_per_cell": per_cell, "stability_mean": stab,
           "kl_nonmedical": kl_check,
           "efficiency": eff_cmp.as_dict(), "stability": stab_cmp.as_dict(),
           "seconds": round(time.perf_counter() - t0, 1),
           "torch_threads": torch.get_num_threads(), "dtype": "bfloat16"}
    (HERE / "narrow").mkdir(exist_ok=True)
    (HERE / "narrow" / "loss.json").write_text(json.dumps(out, indent=1) + "\n")
    for name, c in (("efficiency", eff_cmp), ("stability", stab_cmp)):
        e = c.effect
        print(f"{name} (seed 0): {e.value:+.4f} [{e.low:+.4f}, {e.high:+.4f}] -> {c.verdict.value}")


if __name__ == "__main__":
    main()
