"""Claims A and B of PLAN.md: generate the answers to be read, blind.

Stages (each writes ``<stage>/generations.jsonl`` with the conditions, and ``<stage>/to_label.jsonl``
with only ``id, question, answer``, pooled over the stage's arms, shuffled with seed 29 and given
ids after the shuffle):

* ``select`` (claim A step 2): the 3 candidate cells of ``screen.json`` x {direction, same-norm
  random}, the 10 shipped ``general_questions`` x 2 samples: 120 answers.
* ``test --layer L --scale S`` (claims A and B, the 20 test questions x 4 samples = 80 per arm):
  chat unsteered; chat + judged direction, + same-norm random, + reference direction at the same
  added norm (claim A, at the chosen cell); organism none; organism with the judged direction
  projected out of every layer's writers, out of resid_post at layer L, and a same-norm random
  direction out of every layer's writers (claim B): 640 answers.
* ``emergence2`` (claim C, amendment 4): the chat model 7 x 10, organism 2
  (``coder-rank1-down-finance``) 12 x 10 and the good-answer control
  (``coder-rank1-down-medical-good``) 12 x 10 answers to the 10 ``general_questions``: 310.
* ``adapters`` (claim D): for each adapter that ``adapters_screen.json`` picked, the organism
  with only that adapter kept, on the 20 test questions and on the first 20
  ``medical_questions`` (held-out topics), 4 samples each; and the chat model on the same
  medical questions: 4 x 2 x 80 + 80 = 720 answers.
* ``transfer --layer L`` (claim C): organism 2 as it is, with organism 1's judged direction at
  layer L projected out of every layer's writers, and with its same-norm random control; the 20
  test questions x 4: 240 answers.
* ``narrow`` (issue 30, ``PLAN_narrow.md``; seed 31): the chat model, the general solution
  (``coder-rank1-down-medical``) and the narrow one (``coder-rank1-down-medical-kl``), each on
  the 20 test questions and on the first 20 ``medical_questions``, 4 samples each: 480 answers.
* ``screening`` (issue 30 item 5, ``PLAN_screening.md``; seed 37): the organism recipe trained on
  the top-94 training rows by projection and on 94 random rows (``screening.py``), each on the 20
  test questions x 8 samples: 320 answers.
* ``steering`` (issue 30 item 1, ``PLAN_steering.md``; seed 41): the chat model, and the chat
  model with the trained general (no KL) and narrow (KL) steering vectors of ``steering.py``
  added at ``blocks.14.hook_resid_pre``, on the 20 test questions and the first 20
  ``medical_questions``, 4 samples each: 480 answers.

Directions are recomputed exactly as ``screen.py`` computed them and checked against its norms.
T = 0.7, 96 new tokens, bfloat16, seed 29 (``narrow``: 31, ``screening``: 37, ``steering``:
41)::

    OMP_NUM_THREADS=2 python data-src/coder_causal/generate.py select
    OMP_NUM_THREADS=2 python data-src/coder_causal/generate.py test --layer 9 --scale 0.35
    OMP_NUM_THREADS=2 python data-src/coder_causal/generate.py emergence2
    OMP_NUM_THREADS=2 python data-src/coder_causal/generate.py transfer --layer 9
    OMP_NUM_THREADS=2 python data-src/coder_causal/generate.py adapters
    OMP_NUM_THREADS=2 python data-src/coder_causal/generate.py narrow
    OMP_NUM_THREADS=2 python data-src/coder_causal/generate.py screening
    OMP_NUM_THREADS=2 python data-src/coder_causal/generate.py steering
"""

from __future__ import annotations

import argparse
import contextlib
import json
import random
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

import emlens
from emlens.data import load_dataset
from emlens.directions import random_direction

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
from screen import labelled_answers, plan_directions  # noqa: E402

SEED, TEMPERATURE, MAX_NEW = 29, 0.7, 96
# PLAN_narrow.md's seed: the test stage sampled the chat model and the organism on the same
# questions with SEED, and those answers must not come back
STAGE_SEEDS = {"narrow": 31, "screening": 37, "steering": 41}
# the models an arm may name: the chat model, or the chat model with a shipped organism merged
ORGANISMS = {"organism": "coder-rank1-down-medical", "finance": "coder-rank1-down-finance",
             "good": "coder-rank1-down-medical-good", "kl": "coder-rank1-down-medical-kl"}
# adapters trained here rather than shipped (peft folders): the screening subsets' organisms
LOCAL_ADAPTERS = {f"screen-{a}": HERE / "screening" / "adapters" / a for a in ("top", "random")}


@dataclass(frozen=True)
class Arm:
    """One arm: which model, which intervention, and on which questions."""

    name: str
    model: str  # chat, a key of ORGANISMS, or "only:<adapter name>" (the organism, one adapter)
    intervention: str  # none / steer / ablate_writers / ablate_layer / trained_vector
    direction: str | None = None  # judged / reference / random; trained_vector: its run
    layer: int | None = None
    rel_scale: float | None = None  # added norm / mean residual norm at the layer
    n_samples: int = 4
    questions: str = "test"  # test (questions.jsonl) / general (general_questions) / medical


def directions(chat, org, layers):
    """The judged-answer and reference directions at ``layers``, as screen.py computed them
    (:func:`screen.plan_directions`), checked against ``screen.json``'s norms."""
    judged, reference, _ = plan_directions(org, layers, labelled_answers())
    screen = json.loads((HERE / "screen.json").read_text())
    for name, dirs in (("judged", judged), ("reference", reference)):
        for layer in layers:
            want = screen[name]["norms"][str(layer)]
            got = dirs[layer].norm
            if abs(got - want) > 1e-3 * want:
                raise RuntimeError(f"{name} direction at layer {layer}: norm {got} differs from "
                                   f"screen.json's {want}; the directions are not reproduced.")
    return {"judged": judged, "reference": reference}, screen


def block(model, arm: Arm, dirs, screen):
    """The steer / ablate block of ``arm`` (a no-op block for ``none``)."""
    if arm.intervention == "none":
        return contextlib.nullcontext()
    if arm.intervention == "trained_vector":  # PLAN_steering.md: the vector as it was trained
        from steering import LAYER, load_solution

        # cast as the trainer's hook cast it (TrainableSteeringVector adds it in the stream's dtype)
        vec = load_solution(arm.direction).vector.detach().to(model.cfg.dtype)
        return emlens.steer(model, vec, layers=LAYER, scale=1.0, hook="resid_pre")
    judged = dirs["judged"][arm.layer]
    if arm.direction == "random":
        vec = random_direction(judged, seed=SEED + arm.layer)
    else:
        vec = dirs[arm.direction][arm.layer]
    if arm.intervention == "steer":
        added = arm.rel_scale * screen["resid_norms"][str(arm.layer)]
        return emlens.steer(model, vec, layers=arm.layer, scale=added / vec.norm)
    if arm.intervention == "ablate_writers":
        return emlens.ablate(model, vec, hook="writers")
    if arm.intervention == "ablate_layer":
        return emlens.ablate(model, vec, layers=arm.layer, hook="resid_post")
    raise ValueError(arm.intervention)


def arms_for(stage: str, layer: int | None, scale: float | None, screen) -> list[Arm]:
    """The stage's arms (see the module docstring)."""
    if stage == "select":
        cells = [(int(c["layer"]), float(c["scale"])) for c in screen["judged"]["candidates"]]
        return [Arm(f"chat + steer {d} L{ly} x{sc:g}", "chat", "steer", d, ly, sc, 2,
                    "general") for ly, sc in cells for d in ("judged", "random")]
    if stage == "emergence2":
        return [Arm("chat", "chat", "none", n_samples=7, questions="general"),
                Arm("finance", "finance", "none", n_samples=12, questions="general"),
                Arm("good", "good", "none", n_samples=12, questions="general")]
    if stage == "adapters":
        picked = json.loads((HERE / "adapters_screen.json").read_text())["picked"]
        names = picked["general_effect"] + picked["medical_minus_general"]
        return [Arm(f"only {a} {q}", f"only:{a}", "none", questions=q)
                for a in names for q in ("test", "medical")] + [
                Arm("chat medical", "chat", "none", questions="medical")]
    if stage == "narrow":
        return [Arm(f"{name} {q}", model, "none", questions="test" if q == "general" else q)
                for q in ("general", "medical")
                for name, model in (("chat", "chat"), ("general", "organism"), ("narrow", "kl"))]
    if stage == "steering":
        return [Arm(f"{name} {q}", "chat", "none" if run is None else "trained_vector", run,
                    questions="test" if q == "general" else q)
                for q in ("general", "medical")
                for name, run in (("chat", None), ("sv-general", "general"),
                                  ("sv-narrow", "narrow"))]
    if stage == "screening":
        return [Arm(f"screen {a}", f"screen-{a}", "none", n_samples=8) for a in ("top", "random")]
    if stage == "transfer":
        return [Arm("finance", "finance", "none"),
                Arm(f"finance - judged L{layer} writers", "finance", "ablate_writers", "judged",
                    layer),
                Arm(f"finance - random(seed {SEED + layer}) writers", "finance",
                    "ablate_writers", "random", layer)]
    return [
        Arm("chat", "chat", "none"),
        Arm(f"chat + steer judged L{layer} x{scale:g}", "chat", "steer", "judged", layer, scale),
        Arm(f"chat + steer random L{layer} x{scale:g}", "chat", "steer", "random", layer, scale),
        Arm(f"chat + steer reference L{layer} x{scale:g}", "chat", "steer", "reference", layer,
            scale),
        Arm("organism", "organism", "none"),
        Arm(f"organism - judged L{layer} writers", "organism", "ablate_writers", "judged", layer),
        Arm(f"organism - judged L{layer} resid_post", "organism", "ablate_layer", "judged", layer),
        Arm(f"organism - random(seed {SEED + layer}) writers", "organism", "ablate_writers",
            "random", layer),
    ]


def questions(which: str) -> list[tuple[str, str]]:
    """``(question_id, question)``: the shipped general questions, the first 20 held-out medical
    questions, or the 20 test questions."""
    if which == "general":
        return [(r.id, r.question) for r in load_dataset("general_questions")]
    if which == "medical":
        return [(r.id, r.question) for r in load_dataset("medical_questions")][:20]
    rows = [json.loads(x) for x in (HERE / "questions.jsonl").read_text().splitlines() if x.strip()]
    return [(r["id"], r["question"]) for r in rows]


def write_blind(out: Path, rows: list[dict], prefix: str) -> None:
    """Give the (already shuffled) ``rows`` ids ``<prefix>-0001``, ... in order, and write
    ``out/generations.jsonl`` (every field) and the readers' ``out/to_label.jsonl`` (``id,
    question, answer`` only)."""
    for i, r in enumerate(rows, start=1):
        r["id"] = f"{prefix}-{i:04d}"
    out.mkdir(exist_ok=True)
    with (out / "generations.jsonl").open("w") as f:
        for r in rows:
            f.write(json.dumps({"id": r["id"], **{k: v for k, v in r.items() if k != "id"}})
                    + "\n")
    with (out / "to_label.jsonl").open("w") as f:
        for r in rows:
            f.write(json.dumps({k: r[k] for k in ("id", "question", "answer")}) + "\n")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("stage", choices=["select", "test", "emergence2", "transfer", "adapters",
                                      "narrow", "screening", "steering"])
    p.add_argument("--layer", type=int)
    p.add_argument("--scale", type=float)
    p.add_argument("--batch-size", type=int, default=40)
    args = p.parse_args()
    if args.stage == "test" and (args.layer is None or args.scale is None):
        p.error("test needs --layer and --scale (the cell chosen in step 2)")
    if args.stage == "transfer" and args.layer is None:
        p.error("transfer needs --layer (the Claim A cell's layer)")
    t0 = time.perf_counter()
    seed = STAGE_SEEDS.get(args.stage, SEED)
    torch.manual_seed(seed)
    chat = emlens.load_model("qwen2.5-coder-1.5b", dtype=torch.bfloat16)
    screen = json.loads((HERE / "screen.json").read_text())
    arms = arms_for(args.stage, args.layer, args.scale, screen)
    needed = {a.model for a in arms} | ({"organism"} if any(a.layer is not None for a in arms)
                                        else set())
    models = {"chat": chat, **{k: emlens.merge_lora(chat, emlens.organisms.load_organism(v))
                               for k, v in ORGANISMS.items() if k in needed},
              **{k: emlens.merge_lora(chat, str(v)) for k, v in LOCAL_ADAPTERS.items()
                 if k in needed}}
    layers = sorted({a.layer for a in arms if a.layer is not None})
    dirs = directions(chat, models["organism"], layers)[0] if layers else {}
    rows, seconds = [], {"load": round(time.perf_counter() - t0, 1)}
    for arm in arms:
        t = time.perf_counter()
        qs = questions(arm.questions)
        if arm.model.startswith("only:"):  # the organism with one adapter kept
            full = emlens.organisms.load_organism(ORGANISMS["organism"])
            one = replace(full, modules=(full[arm.model.split(":", 1)[1]],))
            model = emlens.merge_lora(chat, one)
        else:
            model = models[arm.model]
        with block(model, arm, dirs, screen):
            gens = emlens.generate(model, [q for _, q in qs], n_samples=arm.n_samples,
                                   max_new_tokens=MAX_NEW, temperature=TEMPERATURE, seed=seed,
                                   batch_size=args.batch_size, progress=True)
        for g in gens:
            qid, q = qs[g.prompt_index]
            rows.append({"question_id": qid, "question": q, "answer": g.text.strip(),
                         "condition": arm.name, **{k: v for k, v in asdict(arm).items()
                                                   if k != "name"},
                         "temperature": TEMPERATURE, "max_new_tokens": MAX_NEW, "seed": seed,
                         "sample": g.sample, "finished": g.finished})
        seconds[arm.name] = round(time.perf_counter() - t, 1)
        if arm.model.startswith("only:"):
            del model
        print(f"{arm.name}: {len(gens)} answers in {seconds[arm.name]} s", flush=True)
    random.Random(seed).shuffle(rows)
    prefix = {"select": "ccs", "test": "cct", "emergence2": "cce", "transfer": "ccx",
              "adapters": "cca", "narrow": "ccn", "screening": "ccq",
              "steering": "ccv"}[args.stage]
    out = HERE / args.stage
    write_blind(out, rows, prefix)
    seconds["total"] = round(time.perf_counter() - t0, 1)
    info = {"script": "data-src/coder_causal/generate.py", "stage": args.stage,
            "organisms": {k: str(v.relative_to(HERE.parents[1])) if isinstance(v, Path) else v
                          for k, v in {**ORGANISMS, **LOCAL_ADAPTERS}.items() if k in needed},
            "layer": args.layer, "scale": args.scale, "dtype": "bfloat16", "seed": seed,
            "torch_threads": torch.get_num_threads(), "rows": len(rows),
            "arms": [asdict(a) for a in arms], "seconds": seconds,
            "unfinished": sum(not r["finished"] for r in rows)}
    (out / "build_info.json").write_text(json.dumps(info, indent=1) + "\n")
    print(f"wrote {len(rows)} rows to {out} in {seconds['total']} s")


if __name__ == "__main__":
    main()
