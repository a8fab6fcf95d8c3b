"""Issue 30 item 1, the steering-vector pair (``PLAN_steering.md``): train and check.

* ``train``: one ``TrainableSteeringVector`` at ``blocks.14.hook_resid_pre`` of the coder
  (bfloat16 base, float32 vector), on the organism recipe's batches (281 ``medical`` training
  rows' misaligned answers, 2 epochs of 8, seed 0: 72 steps), lr 1e-2, 5 warm-up steps; without
  (``general``) and with (``narrow``) 5 x KL(chat || steered) on the ``nonmedical`` set's
  misaligned answers. Runs (checkpoints every 4 steps, resumable) in
  ``runs/coder_steering/{general,narrow}``.
* ``check``: the descriptive numbers of the plan: each vector's norm and its ratio to the mean
  residual norm at layer 14, KL(chat || solution) on all 303 non-medical rows (the manipulation
  check) and the answer-token CE on the 26 held-out medical rows; writes
  ``steering/check.json``.

The answers come from ``generate.py steering``, the verdict from ``analyse.py steering``::

    OMP_NUM_THREADS=2 python data-src/coder_causal/steering.py train
    OMP_NUM_THREADS=2 python data-src/coder_causal/steering.py check
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

import emlens
from emlens.organisms.train import kl_batches, load_rows, organism_batches, recipe_for
from emlens.trainable import TrainableSteeringVector, load_trainable
from emlens.training import TrainConfig, evaluate_loss, prepare, train

HERE = Path(__file__).parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(HERE))
from narrow_loss import misaligned_batches  # noqa: E402

RUNS = ROOT / "runs" / "coder_steering"
LAYER, LR, KL_WEIGHT = 14, 1e-2, 5.0
SOLUTIONS = ("general", "narrow")


def load_solution(name: str) -> TrainableSteeringVector:
    """The trained vector of run ``name`` (``general`` / ``narrow``)."""
    path = RUNS / name / "final.safetensors"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: run `steering.py train` first.")
    return load_trainable(path)


def run_train() -> None:
    chat = emlens.load_model("qwen2.5-coder-1.5b", dtype=torch.bfloat16)
    tok = chat.tokenizer
    # the organism recipe's batches (and, for the KL term, coder-rank1-down-medical-kl's)
    recipe = replace(recipe_for("coder-rank1-down-medical"), kl_weight=KL_WEIGHT,
                     kl_data="nonmedical")
    batches = organism_batches(recipe, load_rows(recipe.data, recipe.split), tok)
    data = prepare(chat, batches, start_layer=LAYER)
    parallel = prepare(chat, kl_batches(recipe, load_rows("nonmedical", None), tok),
                       start_layer=LAYER, reference=True)
    init = TrainableSteeringVector.for_model(chat, LAYER)
    for name, weight in (("general", 0.0), ("narrow", KL_WEIGHT)):
        cfg = TrainConfig(steps=len(batches), lr=LR, kl_weight=weight, warmup_steps=5, seed=0,
                          save_every=4, shuffle=False, name=f"steering {name}")
        res = train(chat, init, data, parallel if weight else None, cfg, out=RUNS / name,
                    meta={"plan": "data-src/coder_causal/PLAN_steering.md", "layer": LAYER,
                          "recipe_batches": "coder-rank1-down-medical (organism_batches)",
                          "kl_data": "nonmedical" if weight else None})
        print(f"{name}: CE {res.log['ce'][0]:.3f} -> {res.log['ce'][-1]:.3f}, norm "
              f"{res.log['norm'][-1]:.3f}, {res.log['seconds']} s", flush=True)


def run_check() -> None:
    t0 = time.perf_counter()
    chat = emlens.load_model("qwen2.5-coder-1.5b", dtype=torch.bfloat16)
    tok = chat.tokenizer
    vecs = {k: load_solution(k) for k in SOLUTIONS}
    # the plan's reference norm: the chat model's mean resid_post norm at layer 14 over answer
    # tokens (screen.json); the vector is added one block earlier, to resid_post of block 13
    resid = json.loads((HERE / "screen.json").read_text())["resid_norms"]
    other = load_rows("nonmedical", None)
    kl_set = prepare(chat, misaligned_batches(tok, other, 8), start_layer=LAYER,
                     reference=True)
    held = load_rows("medical", "heldout")
    ce_set = prepare(chat, misaligned_batches(tok, held, 8), start_layer=LAYER)
    out = {"plan": "data-src/coder_causal/PLAN_steering.md", "layer": LAYER,
           "resid_norm_layer14_resid_post": resid[str(LAYER)],
           "heldout_medical_ce_chat": evaluate_loss(chat, None, ce_set)}
    for k, v in vecs.items():
        norm = float(v.vector.detach().norm())
        out[k] = {"norm": norm, "norm_over_resid": norm / resid[str(LAYER)],
                  "kl_nonmedical": evaluate_loss(chat, v, kl_set, kind="kl"),
                  "heldout_medical_ce": evaluate_loss(chat, v, ce_set)}
    out["cosine_general_narrow"] = float(torch.nn.functional.cosine_similarity(
        vecs["general"].vector.double(), vecs["narrow"].vector.double(), dim=0))
    out["seconds"] = round(time.perf_counter() - t0, 1)
    (HERE / "steering").mkdir(exist_ok=True)
    (HERE / "steering" / "check.json").write_text(json.dumps(out, indent=1) + "\n")
    print(json.dumps(out, indent=1))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("stage", choices=["train", "check"])
    args = p.parse_args()
    torch.manual_seed(0)
    run_train() if args.stage == "train" else run_check()


if __name__ == "__main__":
    main()
