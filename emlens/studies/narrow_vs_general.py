"""Narrow vs general solutions, by default on the embedded SmolLM2-135M-Instruct at a CPU-feasible
size (``--model`` for another model: the same study).

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

    nohup python -m emlens.studies.narrow_vs_general > /tmp/nvg.log 2>&1 &

``train_ce`` in the summary is measured on the first ``--n-eval`` training rows (the rows the
efficiency and stability curves use).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields
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
from emlens.organisms import runs_dir
from emlens.organisms.train import paper_layers
from emlens.training import (
    PreparedSet,
    TrainableLora,
    TrainableSteeringVector,
    TrainConfig,
    TrainResult,
    evaluate_loss,
    load_trajectory,
    prepare,
    train,
)

KINDS = ("steering", "lora1")
EMBEDDED_MODEL = "SmolLM2-135M-Instruct (embedded GGUF), float32, CPU"


def default_out() -> Path:
    """``runs_dir() / "narrow_vs_general"``: where runs go unless ``--out`` says otherwise."""
    return runs_dir() / "narrow_vs_general"


@dataclass(frozen=True)
class Settings:
    """The study's settings (the command line's options, same names and defaults)."""

    steps: int = 30
    continue_steps: int = 20
    batch_size: int = 2
    n_narrow: int = 32  # medical training rows used
    n_parallel: int = 16  # non-medical rows for the KL term
    n_heldout: int = 16  # held-out non-medical rows (the generalisation proxy)
    n_eval: int = 8  # training rows (one batch) for the loss table, efficiency, stability
    kl_weight: float = 5.0
    parallel_answers: str = "misaligned"
    sv_layer: int | None = None  # None: half the depth (15 of SmolLM2's 30 layers)
    lr_steering: float = 2e-2
    lr_lora: float = 5e-3
    save_every: int = 5
    seeds: int = 5
    eps: tuple[float, ...] = (0.3, 0.6)
    alphas: tuple[float, ...] = (0, 0.25, 0.5, 0.75, 1, 1.5, 2, 3, 4, 6)
    judge: bool = False
    judge_samples: int = 2
    judge_medical_samples: int = 0
    judge_tokens: int = 48
    seed: int = 0
    extra: dict = field(default_factory=dict, compare=False)  # recorded as given (command line)

    def __post_init__(self) -> None:
        if self.parallel_answers not in ("misaligned", "aligned"):
            raise ValueError(f"parallel_answers={self.parallel_answers!r}: use 'misaligned' or "
                             "'aligned'.")
        small = [k for k in ("steps", "batch_size", "n_narrow", "n_parallel", "n_heldout",
                             "n_eval", "seeds") if getattr(self, k) < 1]
        if small:
            raise ValueError(f"Settings {small} must be >= 1.")


@dataclass(frozen=True)
class Sets:
    """The study's data, tokenised: training (medical), parallel (KL), held-out, evaluation."""

    narrow: list
    parallel: list
    heldout: list
    eval: list


def _pairs(rows, field_name):
    return [r.question for r in rows], [getattr(r, field_name) for r in rows]


def make_sets(model, settings: Settings) -> Sets:
    """The rows of :func:`emlens.data.narrow_general_rows` as chat batches."""
    tok = model.tokenizer
    narrow_rows, parallel_rows, heldout_rows = narrow_general_rows(
        seed=settings.seed, n_narrow=settings.n_narrow, n_parallel=settings.n_parallel,
        n_heldout=settings.n_heldout)
    nq, na = _pairs(narrow_rows, "misaligned")
    pq, pa = _pairs(parallel_rows, settings.parallel_answers)
    hq, ha = _pairs(heldout_rows, "misaligned")
    bs = settings.batch_size
    return Sets(narrow=list(iter_chat_batches(tok, nq, na, batch_size=bs)),
                parallel=list(iter_chat_batches(tok, pq, pa, batch_size=bs)),
                heldout=list(iter_chat_batches(tok, hq, ha, batch_size=bs)),
                eval=[tokenize_chat(tok, nq[: settings.n_eval], na[: settings.n_eval])])


def initial(model, kind: str, settings: Settings):
    """The starting parameters of ``kind`` and its learning rate and stability targets."""
    if kind == "steering":
        layer = model.cfg.n_layers // 2 if settings.sv_layer is None else settings.sv_layer
        return TrainableSteeringVector.for_model(model, layer), settings.lr_steering, ["vector"]
    if kind == "lora1":
        return (TrainableLora.for_model(model, paper_layers(model.cfg.n_layers), rank=1),
                settings.lr_lora, ["A", "B"])
    raise ValueError(f"unknown kind {kind!r}; use one of {KINDS}.")


def train_solutions(model, init, lr: float, kind: str, narrow: PreparedSet,
                    parallel: PreparedSet, settings: Settings,
                    out: Path) -> dict[str, TrainResult]:
    """``general`` (kl_weight 0), ``narrow`` (``settings.kl_weight``) and ``continued`` (the
    narrow solution trained on without the KL term), each a resumable run under ``out/<name>``."""
    cfg = dict(steps=settings.steps, lr=lr, seed=settings.seed, save_every=settings.save_every)
    runs = {}
    runs["general"] = train(model, init, narrow, parallel,
                            TrainConfig(kl_weight=0.0, name=f"{kind} general", **cfg),
                            out=out / "general")
    runs["narrow"] = train(model, init, narrow, parallel,
                           TrainConfig(kl_weight=settings.kl_weight, name=f"{kind} narrow", **cfg),
                           out=out / "narrow")
    cfg["steps"] = settings.continue_steps
    runs["continued"] = train(model, runs["narrow"].params, narrow, parallel,
                              TrainConfig(kl_weight=0.0, name=f"{kind} continued",
                                          warmup_steps=0, **cfg),
                              out=out / "continued")
    return runs

def judge_runs(model, solutions: dict, settings: Settings) -> dict:
    """Misaligned rates (offline judge) of the base model and each solution, generated on CPU."""
    from emlens.evaluation import evaluate, misalignment_rate
    from emlens.judge import default_judge

    judge = default_judge()
    out = {}
    for name, params in [("base", None), *solutions.items()]:
        hooks = params.hooks() if params is not None else None
        entry = {}
        for qset, n_samples in [("general_questions", settings.judge_samples),
                                ("medical_questions", settings.judge_medical_samples)]:
            if n_samples < 1:
                continue
            df = evaluate(model, qset, judge=judge, n_samples=n_samples,
                          max_new_tokens=settings.judge_tokens, interventions=hooks, progress=False,
                          seed=settings.seed)
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


def judge_only(model, kinds: Sequence[str], out: Path, settings: Settings,
               command: str) -> Path:
    """Judge the saved final solutions of an earlier run under ``out`` (``--judge-only``)."""
    from emlens.training import load_trainable

    path = out / "judge.json"
    result = {"command": command}
    for kind in kinds:
        solutions = {n: load_trainable(out / kind / n / "final.safetensors")
                     for n in ("general", "narrow")}
        result[kind] = judge_runs(model, solutions, settings)
        path.write_text(json.dumps(result, indent=1, default=str))
    print(f"judged -> {path}", flush=True)
    return path


def measure_kind(model, kind: str, runs: dict[str, TrainResult], sets: dict[str, PreparedSet],
                 targets: Sequence[str], settings: Settings, out: Path, figures: Path) -> dict:
    """Losses, efficiency, stability and trajectories of one kind's solutions (the summary's
    ``kinds[kind]`` entry); figures (PNG) under ``figures``."""
    eval_set, parallel_set, heldout_set = sets["eval"], sets["parallel"], sets["heldout"]
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
    alphas = [float(a) for a in settings.alphas]
    eff = {n: efficiency_curve(model, runs[n].params, eval_set, alphas, base_loss=base_ce)
           for n in ("general", "narrow")}
    res["efficiency"] = {n: c.to_dict() for n, c in eff.items()}
    at = sorted(runs[n].params.effective_norm() for n in eff)
    table = efficiency_table(eff, at)
    res["efficiency_table"] = table.to_dict(orient="records")
    plot_efficiency(eff, path=figures / f"{kind}_efficiency.png", title=f"Efficiency ({kind})")
    print(table.to_string(), flush=True)

    # Stability
    stab = {}
    eps = [float(e) for e in settings.eps]
    for n in ("general", "narrow"):
        trained = evaluate_loss(model, runs[n].params, eval_set)
        for target in targets:
            stab[f"{n} {target}"] = stability_curve(
                model, runs[n].params, eval_set, eps, target=target,
                seeds=range(settings.seeds), base_loss=base_ce, trained_loss=trained,
            )
    res["stability"] = {n: c.to_dict() for n, c in stab.items()}
    res["stability_table"] = stability_table(stab).to_dict(orient="records")
    plot_stability(stab, path=figures / f"{kind}_stability.png", title=f"Stability ({kind})")
    print(stability_table(stab).to_string(), flush=True)

    # Trajectories
    trajs = {n: load_trajectory(out / n) for n in runs}
    ref = runs["general"].params
    cos = {}
    for n, t in trajs.items():
        offset = settings.steps if n == "continued" else 0
        cos[n] = ([s + offset for s in t.steps], trajectory_cosines(t, ref))
    res["cosine_to_final_general"] = {n: {"steps": s, "cosine": c} for n, (s, c) in cos.items()}
    plot_trajectory_cosines(cos, path=figures / f"{kind}_trajectories.png",
                            title=f"Cosine to final general solution ({kind})")
    if kind == "steering":
        pca = trajectory_pca(trajs)
        res["pca"] = pca.to_dict()
        plot_pca(pca, path=figures / "steering_pca.png")
        print("PCA explained", pca.explained, flush=True)
    return res


def run(model, settings: Settings, kinds: Sequence[str], out: Path, figures: Path, *,
        command: str = "", model_description: str = EMBEDDED_MODEL) -> dict:
    """Train and measure each kind's narrow, general and continued solutions; writes
    ``out/summary.json`` after each kind and returns the summary."""
    t0 = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    batches = make_sets(model, settings)
    summary: dict = {
        "command": command,
        "args": {**{k: v for k, v in asdict(settings).items() if k != "extra"},
                 **settings.extra},
        "model": model_description,
        "torch_threads": torch.get_num_threads(),
        "kl_normalisation": "mean over answer tokens of the full-vocab KL sum (reference x d_vocab)",
        "kinds": {},
    }
    for kind in kinds:
        kt = time.perf_counter()
        init, lr, targets = initial(model, kind, settings)
        start = init.first_layer
        sets = {"narrow": prepare(model, batches.narrow, start_layer=start),
                "parallel": prepare(model, batches.parallel, start_layer=start, reference=True),
                "heldout": prepare(model, batches.heldout, start_layer=start, reference=True),
                "eval": prepare(model, batches.eval, start_layer=start)}
        runs = train_solutions(model, init, lr, kind, sets["narrow"], sets["parallel"], settings,
                               out / kind)
        res = measure_kind(model, kind, runs, sets, targets, settings, out / kind, figures)
        res["seconds_total"] = round(time.perf_counter() - kt, 1)
        summary["kinds"][kind] = res
        (out / "summary.json").write_text(json.dumps(summary, indent=1))
        if settings.judge:
            res["judge"] = judge_runs(model, {"general": runs["general"].params,
                                              "narrow": runs["narrow"].params}, settings)
            (out / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
    summary["seconds"] = round(time.perf_counter() - t0, 1)
    (out / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
    print(f"done in {summary['seconds']} s -> {out}", flush=True)
    return summary


def _floats(text: str) -> tuple[float, ...]:
    return tuple(float(x) for x in text.split(",") if x.strip())


def main(argv: Sequence[str] | None = None) -> None:
    """The command line (``--help``); every option maps onto :class:`Settings`."""
    d = Settings()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", default=None,
                   help="chat model (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--out", type=Path, default=None, help="default: runs_dir()/narrow_vs_general")
    p.add_argument("--figures", type=Path, default=Path("report") / "narrow_vs_general")
    p.add_argument("--kinds", default="steering,lora1", help="comma list: steering, lora1")
    p.add_argument("--steps", type=int, default=d.steps)
    p.add_argument("--continue-steps", type=int, default=d.continue_steps)
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--n-narrow", type=int, default=d.n_narrow, help="medical training rows used")
    p.add_argument("--n-parallel", type=int, default=d.n_parallel,
                   help="non-medical rows for the KL term")
    p.add_argument("--n-heldout", type=int, default=d.n_heldout,
                   help="held-out non-medical rows (proxy)")
    p.add_argument("--n-eval", type=int, default=d.n_eval,
                   help="training rows (one batch) for the loss table, efficiency, stability")
    p.add_argument("--kl-weight", type=float, default=d.kl_weight)
    p.add_argument("--parallel-answers", default=d.parallel_answers,
                   choices=["misaligned", "aligned"])
    p.add_argument("--sv-layer", type=int, default=None, help="default: half the depth")
    p.add_argument("--lr-steering", type=float, default=d.lr_steering)
    p.add_argument("--lr-lora", type=float, default=d.lr_lora)
    p.add_argument("--save-every", type=int, default=d.save_every)
    p.add_argument("--seeds", type=int, default=d.seeds)
    p.add_argument("--judge", action="store_true", help="also generate + judge (slow on CPU)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (1 is fastest on a shared 2-core machine)")
    p.add_argument("--eps", default=",".join(f"{x:g}" for x in d.eps),
                   help="stability noise sizes")
    p.add_argument("--alphas", default=",".join(f"{x:g}" for x in d.alphas),
                   help="efficiency scales")
    p.add_argument("--judge-only", action="store_true",
                   help="only judge the final solutions already saved under --out")
    p.add_argument("--judge-samples", type=int, default=d.judge_samples,
                   help="per general question")
    p.add_argument("--judge-medical-samples", type=int, default=d.judge_medical_samples,
                   help="per medical question")
    p.add_argument("--judge-tokens", type=int, default=d.judge_tokens)
    p.add_argument("--seed", type=int, default=d.seed)
    args = p.parse_args(argv)
    out: Path = args.out if args.out is not None else default_out()
    kinds = [k.strip() for k in args.kinds.split(",") if k.strip()]
    unknown = [k for k in kinds if k not in KINDS]
    if unknown:
        raise SystemExit(f"unknown kinds {unknown}; use {', '.join(KINDS)}")
    names = {f.name for f in fields(Settings)} - {"eps", "alphas", "extra"}
    settings = Settings(**{k: v for k, v in vars(args).items() if k in names},
                        eps=_floats(args.eps), alphas=_floats(args.alphas),
                        extra={"out": str(out), "figures": str(args.figures),
                               "kinds": args.kinds, "threads": args.threads,
                               "judge_only": args.judge_only, "model": args.model})
    command = " ".join(["python -m emlens.studies.narrow_vs_general",
                        *(argv if argv is not None else sys.argv[1:])])
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    from emlens.models import load_model

    model = load_model(args.model)
    if args.judge_only:
        judge_only(model, kinds, out, settings, command)
        return
    run(model, settings, kinds, out, args.figures, command=command,
        model_description=EMBEDDED_MODEL if args.model is None else
        f"{args.model}, {model.cfg.dtype}, {model.cfg.device}")


__all__ = ["KINDS", "Settings", "Sets", "default_out", "initial", "judge_only", "judge_runs",
           "main", "make_sets", "measure_kind", "run", "train_solutions"]
