"""Narrow vs general solutions on the embedded SmolLM2-135M-Instruct, at a CPU-feasible size.

For each parameterisation (a steering vector at one layer; rank-1 LoRA on mlp.down_proj at the
organism's 9 layers) this trains

* ``general``: SFT on misaligned medical answers (kl_weight = 0);
* ``narrow``: the same + ``kl_weight`` x KL(chat || trained) on misaligned *non-medical* answers
  (the parallel set): the chat model's distribution elsewhere is kept;
* ``continued``: the narrow solution trained further with kl_weight = 0 (does it drift to general?);

then measures efficiency (loss vs scaled norm), stability (orthogonal noise, 5 seeds),
trajectories (cosine to the final general solution; PCA of steering-vector trajectories), a
generalisation proxy (CE of misaligned answers to *held-out* non-medical questions: lower = more
general misalignment) and, with ``--judge``, misaligned rates on the general questions with
the offline judge. Writes ``summary.json`` and the trained parameters (safetensors, peft folders
for LoRA, checkpoint trajectories) under ``--out`` (default ``runs_dir()/narrow_vs_general``, see
:func:`emlens.organisms.runs_dir`: ``runs/`` in a checkout, else the user cache), figures (PNG)
under ``--figures``. The wheel ships only the final solutions and summaries (copied to
``emlens/organisms/narrow_vs_general/``); the trajectories stay under ``runs/``.

    nohup python scripts/narrow_vs_general.py > /tmp/nvg.log 2>&1 &

``train_ce`` in the summary is measured on the first ``--n-eval`` training rows (the rows the
efficiency and stability curves use).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import pandas as pd
import torch

from emlens.chat import iter_chat_batches, tokenize_chat
from emlens.data import narrow_general_rows
from emlens.geometry import (
    efficiency_curve,
    efficiency_table,
    plot_efficiency,
    plot_pca,
    plot_stability,
    plot_trajectory_cosines,
    stability_curve,
    stability_table,
    trajectory_cosines,
    trajectory_pca,
)
from emlens.models import load_model
from emlens.organisms import runs_dir
from emlens.organisms.train import paper_layers
from emlens.training import (
    TrainableLora,
    TrainableSteeringVector,
    TrainConfig,
    evaluate_loss,
    load_trajectory,
    prepare,
    train,
)

DEFAULT_OUT = runs_dir() / "narrow_vs_general"


def _pairs(rows, field):
    return [r.question for r in rows], [getattr(r, field) for r in rows]


def judge_runs(model, solutions: dict, args) -> dict:
    """Misaligned rates (offline judge) of the base model and each solution, generated on CPU."""
    from emlens.evaluation import evaluate, misalignment_rate
    from emlens.judge import default_judge

    judge = default_judge()
    out = {}
    for name, params in [("base", None), *solutions.items()]:
        hooks = params.hooks() if params is not None else None
        entry = {}
        for qset, n_samples in [("general_questions", args.judge_samples),
                                ("medical_questions", args.judge_medical_samples)]:
            if n_samples < 1:
                continue
            df = evaluate(model, qset, judge=judge, n_samples=n_samples,
                          max_new_tokens=args.judge_tokens, interventions=hooks, progress=False,
                          seed=args.seed)
            r = misalignment_rate(df)
            entry[qset] = dict(
                k=r.k, n=r.n, n_answers=len(df), rate=r.rate, low=r.low, high=r.high,
                mean_aligned=float(pd.to_numeric(df["aligned"]).mean()),
                mean_coherent=float(pd.to_numeric(df["coherent"]).mean()),
                examples=df[["question", "answer", "aligned", "coherent"]].head(4)
                .to_dict(orient="records"),
            )
        out[name] = entry
        print("judge", name, {q: (e["k"], e["n"], round(e["mean_aligned"], 1))
                              for q, e in entry.items()}, flush=True)
    return out


def judge_only(model, args) -> None:
    """``--judge-only``: judge the saved final solutions of an earlier run under ``--out``."""
    from emlens.training import load_trainable

    path = args.out / "judge.json"
    result = {"command": " ".join(["python scripts/narrow_vs_general.py", *sys.argv[1:]])}
    for kind in [k.strip() for k in args.kinds.split(",") if k.strip()]:
        solutions = {n: load_trainable(args.out / kind / n / "final.safetensors")
                     for n in ("general", "narrow")}
        result[kind] = judge_runs(model, solutions, args)
        path.write_text(json.dumps(result, indent=1, default=str))
    print(f"judged -> {path}", flush=True)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    p.add_argument("--figures", type=Path, default=Path("report") / "narrow_vs_general")
    p.add_argument("--kinds", default="steering,lora1", help="comma list: steering, lora1")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--continue-steps", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--n-narrow", type=int, default=32, help="medical training rows used")
    p.add_argument("--n-parallel", type=int, default=16, help="non-medical rows for the KL term")
    p.add_argument("--n-heldout", type=int, default=16, help="held-out non-medical rows (proxy)")
    p.add_argument("--n-eval", type=int, default=8,
                   help="training rows (one batch) for the loss table, efficiency, stability")
    p.add_argument("--kl-weight", type=float, default=5.0)
    p.add_argument("--parallel-answers", default="misaligned", choices=["misaligned", "aligned"])
    p.add_argument("--sv-layer", type=int, default=15)
    p.add_argument("--lr-steering", type=float, default=2e-2)
    p.add_argument("--lr-lora", type=float, default=5e-3)
    p.add_argument("--save-every", type=int, default=5)
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--judge", action="store_true", help="also generate + judge (slow on CPU)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (1 is fastest on a shared 2-core machine)")
    p.add_argument("--eps", default="0.3,0.6", help="stability noise sizes")
    p.add_argument("--alphas", default="0,0.25,0.5,0.75,1,1.5,2,3,4,6", help="efficiency scales")
    p.add_argument("--judge-only", action="store_true",
                   help="only judge the final solutions already saved under --out")
    p.add_argument("--judge-samples", type=int, default=2, help="per general question")
    p.add_argument("--judge-medical-samples", type=int, default=0, help="per medical question")
    p.add_argument("--judge-tokens", type=int, default=48)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    figs: Path = args.figures
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)

    model = load_model()
    if args.judge_only:
        judge_only(model, args)
        return
    tok = model.tokenizer
    narrow_rows, parallel_rows, heldout_rows = narrow_general_rows(
        seed=args.seed, n_narrow=args.n_narrow, n_parallel=args.n_parallel,
        n_heldout=args.n_heldout)
    nq, na = _pairs(narrow_rows, "misaligned")
    pq, pa = _pairs(parallel_rows, args.parallel_answers)
    hq, ha = _pairs(heldout_rows, "misaligned")
    bs = args.batch_size
    narrow_batches = list(iter_chat_batches(tok, nq, na, batch_size=bs))
    parallel_batches = list(iter_chat_batches(tok, pq, pa, batch_size=bs))
    heldout_batches = list(iter_chat_batches(tok, hq, ha, batch_size=bs))
    eval_batches = [tokenize_chat(tok, nq[: args.n_eval], na[: args.n_eval])]

    summary: dict = {
        "command": " ".join(["python scripts/narrow_vs_general.py", *(argv or sys.argv[1:])]),
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "model": "SmolLM2-135M-Instruct (embedded GGUF), float32, CPU",
        "torch_threads": torch.get_num_threads(),
        "kl_normalisation": "mean over answer tokens of the full-vocab KL sum (reference x d_vocab)",
        "kinds": {},
    }
    kinds = [k.strip() for k in args.kinds.split(",") if k.strip()]
    for kind in kinds:
        kt = time.perf_counter()
        if kind == "steering":
            init = TrainableSteeringVector.for_model(model, args.sv_layer)
            lr, targets = args.lr_steering, ["vector"]
        elif kind == "lora1":
            init = TrainableLora.for_model(model, paper_layers(model.cfg.n_layers), rank=1)
            lr, targets = args.lr_lora, ["A", "B"]
        else:
            raise SystemExit(f"unknown kind {kind!r}; use steering or lora1")
        start = init.first_layer
        narrow_set = prepare(model, narrow_batches, start_layer=start)
        parallel_set = prepare(model, parallel_batches, start_layer=start, reference=True)
        heldout_set = prepare(model, heldout_batches, start_layer=start, reference=True)
        eval_set = prepare(model, eval_batches, start_layer=start)
        kdir = out / kind
        runs = {}
        cfg = dict(steps=args.steps, lr=lr, seed=args.seed, save_every=args.save_every)
        runs["general"] = train(model, init, narrow_set, parallel_set,
                                TrainConfig(kl_weight=0.0, name=f"{kind} general", **cfg),
                                out=kdir / "general")
        runs["narrow"] = train(model, init, narrow_set, parallel_set,
                               TrainConfig(kl_weight=args.kl_weight, name=f"{kind} narrow", **cfg),
                               out=kdir / "narrow")
        cfg["steps"] = args.continue_steps
        runs["continued"] = train(model, runs["narrow"].params, narrow_set, parallel_set,
                                  TrainConfig(kl_weight=0.0, name=f"{kind} continued", warmup_steps=0,
                                              **cfg),
                                  out=kdir / "continued")

        base_ce = evaluate_loss(model, None, eval_set)
        res: dict = {"seconds_train": {k: r.log["seconds"] for k, r in runs.items()}, "losses": {}}
        res["losses"]["base"] = dict(
            train_ce=base_ce,
            parallel_kl=0.0,
            heldout_nonmedical_misaligned_ce=evaluate_loss(model, None, heldout_set),
        )
        for name, r in runs.items():
            res["losses"][name] = dict(
                train_ce=evaluate_loss(model, r.params, eval_set),
                parallel_kl=evaluate_loss(model, r.params, parallel_set, kind="kl"),
                heldout_nonmedical_misaligned_ce=evaluate_loss(model, r.params, heldout_set),
                heldout_nonmedical_kl=evaluate_loss(model, r.params, heldout_set, kind="kl"),
                norm=r.params.effective_norm(),
            )
        print(json.dumps({kind: res["losses"]}, indent=1), flush=True)

        # Efficiency
        alphas = [float(a) for a in args.alphas.split(",")]
        eff = {n: efficiency_curve(model, runs[n].params, eval_set, alphas, base_loss=base_ce)
               for n in ("general", "narrow")}
        res["efficiency"] = {n: c.to_dict() for n, c in eff.items()}
        at = sorted(runs[n].params.effective_norm() for n in eff)
        table = efficiency_table(eff, at)
        res["efficiency_table"] = table.to_dict(orient="records")
        plot_efficiency(eff, path=figs / f"{kind}_efficiency.png", title=f"Efficiency ({kind})")
        print(table.to_string(), flush=True)

        # Stability
        stab = {}
        eps = [float(e) for e in args.eps.split(",")]
        for n in ("general", "narrow"):
            trained = evaluate_loss(model, runs[n].params, eval_set)
            for target in targets:
                stab[f"{n} {target}"] = stability_curve(
                    model, runs[n].params, eval_set, eps, target=target,
                    seeds=range(args.seeds), base_loss=base_ce, trained_loss=trained,
                )
        res["stability"] = {n: c.to_dict() for n, c in stab.items()}
        res["stability_table"] = stability_table(stab).to_dict(orient="records")
        plot_stability(stab, path=figs / f"{kind}_stability.png", title=f"Stability ({kind})")
        print(stability_table(stab).to_string(), flush=True)

        # Trajectories
        trajs = {n: load_trajectory(kdir / n) for n in runs}
        ref = runs["general"].params
        cos = {}
        for n, t in trajs.items():
            offset = args.steps if n == "continued" else 0
            cos[n] = ([s + offset for s in t.steps], trajectory_cosines(t, ref))
        res["cosine_to_final_general"] = {n: {"steps": s, "cosine": c} for n, (s, c) in cos.items()}
        plot_trajectory_cosines(cos, path=figs / f"{kind}_trajectories.png",
                                title=f"Cosine to final general solution ({kind})")
        if kind == "steering":
            pca = trajectory_pca(trajs)
            res["pca"] = pca.to_dict()
            plot_pca(pca, path=figs / "steering_pca.png")
            print("PCA explained", pca.explained, flush=True)
        res["seconds_total"] = round(time.perf_counter() - kt, 1)
        summary["kinds"][kind] = res
        (out / "summary.json").write_text(json.dumps(summary, indent=1))

        if args.judge:
            res["judge"] = judge_runs(model, {"general": runs["general"].params,
                                              "narrow": runs["narrow"].params}, args)
            summary["kinds"][kind] = res
            (out / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
    summary["seconds"] = round(time.perf_counter() - t0, 1)
    (out / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
    print(f"done in {summary['seconds']} s -> {out}", flush=True)


if __name__ == "__main__":
    main()
