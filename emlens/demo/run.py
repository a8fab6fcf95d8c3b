"""``run_demo``: load the models, run the sections in order, write the report."""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import torch

from emlens.cards import model_card
from emlens.demo import (
    ablation,
    attribution,
    judge_check,
    lenses,
    narrow_general,
    probes,
    rates,
    read_verdicts,
    steering,
)
from emlens.demo.common import (
    DEFAULTS,
    PAPERS_TEMPERATURE,
    QUICK,
    TRANSFER_ORGANISM,
    Context,
    choose_temperature,
    measured_coherence,
    resolve_adapter,
)
from emlens.demo.config import DemoConfig
from emlens.demo.lenses import check_pair_budget
from emlens.report import Report
from emlens.sampling import SamplingConfig


def run_demo(
    *,
    out: str | Path = "report",
    model_name: str | None = None,
    organism: str | None = None,
    transfer_organism: str | None = TRANSFER_ORGANISM,
    quick: bool = False,
    config: DemoConfig | None = None,
    train: bool = False,
    seed: int = 0,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
    temperature: float | None = None,
    progress: bool = True,
) -> Path:
    """Run the research story and write ``<out>/index.html`` and ``<out>/results.json``.

    Args:
        out: report folder.
        model_name: chat model (``None``: the embedded SmolLM2-135M-Instruct; any name of an
            embedded model, e.g. ``"qwen2.5-coder-1.5b"``; or a local HF folder, ``.gguf`` file
            or TransformerLens name such as ``Qwen/Qwen2.5-7B-Instruct``). Resolved once to the
            model's card (:func:`emlens.cards.model_card`), which the sections read as
            ``ctx.card``: any name of an embedded model gives exactly the same demo.
        organism: a shipped organism name (``emlens.list_organisms()``) or a peft adapter folder;
            ``None``: the card's organism (the shipped rank-1 organism of an embedded model).
        transfer_organism: a second fine-tune for the transfer test (a shipped organism name, a
            path relative to ``emlens/organisms/``, a peft folder or hub id); ``None`` skips it.
            The default stands for the card's own second fine-tune (SmolLM2's shipped one; none
            for any other model).
        quick: tiny settings (a smoke run, :meth:`DemoConfig.quick_settings`); otherwise
            :data:`DEFAULTS` (``DemoConfig()``).
        config: a :class:`DemoConfig` of your own (overrides ``quick``).
        train: retrain the organism (into ``<out>/organisms/``) and the narrow / general
            steering vectors of section 6 (into ``<out>/narrow_vs_general/``) instead of using
            the shipped ones. Only for a model whose card ships the recipes (SmolLM2).
        temperature: sampling temperature of every judged answer; ``None``: the one with the
            highest coherent share by reading of the model's labelled answers shipped with emlens
            (:func:`emlens.demo.common.choose_temperature`; 0.7 for SmolLM2), or the card's
            fallback, the papers' 1.0, for a model without any.
    """
    import emlens
    from emlens.data import load_dataset
    from emlens.judge import default_judge
    from emlens.lora import merge_lora
    from emlens.organisms import default_organism

    cfg = config if config is not None else (QUICK if quick else DEFAULTS)
    check_pair_budget(cfg)
    card = model_card(model_name)  # resolved once; every section reads ctx.card
    if train and not card.retrain:
        raise ValueError(f"train=True retrains the shipped recipes of {card.name!r}'s card; it "
                         "has none: pass trained adapters with --organism instead.")
    out = Path(out)
    measured = measured_coherence(card)
    if temperature is None:
        temperature, temperature_why = choose_temperature(card, measured)
    else:
        temperature_why = "set by the caller" + (
            " (the papers' setting)" if temperature == PAPERS_TEMPERATURE else "")
    if organism is None:
        organism = default_organism(card)
    if transfer_organism == TRANSFER_ORGANISM:  # the default: this model's own second fine-tune
        transfer_organism = card.transfer_organism
    t0 = time.perf_counter()
    rep = Report(title="emlens: emergent misalignment on " + card.name)
    rep.results["settings"] = dict(cfg.as_dict(), train=train, seed=seed, model=card.key,
                                   organism=organism, transfer_organism=transfer_organism,
                                   temperature=temperature)
    rep.results["temperature"] = {"value": temperature, "why": temperature_why,
                                  "measured": measured}

    def log(msg: str) -> None:
        if progress:
            print(f"[{time.perf_counter() - t0:6.0f}s] {msg}", flush=True)

    timings: dict[str, float] = {}
    if train:
        log("training the organism (--train)")
        organism = train_organism_now(organism, out / "organisms", cfg)
    log("loading the chat model, the organism and the judge")
    start = time.perf_counter()
    chat = emlens.load_model(card.source, device=device, dtype=dtype)
    adapter = resolve_adapter(organism)
    judge = default_judge(subject=card if card.validated_judge else None)
    timings["load"] = round(time.perf_counter() - start, 1)
    general = [q.question for q in load_dataset("general_questions")][: cfg.n_general]
    medical = [q.question for q in load_dataset("medical_questions")][: cfg.n_medical]
    ctx = Context(
        cfg=cfg, card=card, chat=chat, org=merge_lora(chat, adapter), adapter=adapter,
        judge=judge, qsets={"general": general, "medical": medical},
        sampling=SamplingConfig(n_samples=cfg.n_samples, max_new_tokens=cfg.max_new_tokens,
                                temperature=temperature, seed=seed, batch_size=cfg.batch_size),
        seed=seed, progress=progress, out=out, temperature_why=temperature_why,
    )
    rep.results["judge"] = judge.name
    step = _Steps(log, timings, total=8)

    # The method, in order: judged rates -> the judge against reading -> what was decided on
    # this model before the run (shipped, not measured here) -> directions and the
    # steering cell -> ablation and transfer -> probes -> attribution -> narrow vs general ->
    # power. Each section measures into a frozen result, then renders it into the report.
    with step("1_rates", "answers and judged rates: chat model vs organism"):
        rated = rates.measure(ctx)
        rates.render(rated, rep)
    with step("judge_check", "judge check: agreement with reading, least-sure answers"):
        checked = judge_check.measure(ctx, rated.answers)
        judge_check.render(checked, rep)
    with step("read_verdicts", "the seed claims decided on this model before this run"):
        read = read_verdicts.measure(ctx)
        read_verdicts.render(read, rep)
    with step("2_steering", "mean-difference direction and steering sweep"):
        steered = steering.measure(ctx, rated)
        steering.render(steered, rep)
    with step("3_ablation", "ablating the direction in the organism and in a second organism"):
        ablated = ablation.measure(ctx, rated, steered, transfer_organism)
        ablation.render(ablated, rep)
    # sections 4-5 attach the adapter to the chat model: the merged copy is freed here
    ctx = replace(ctx, org=None)
    with step("4_probes", "probes on the LoRA scalars"):
        probed = probes.measure(ctx, rated, steered)
        probes.render(probed, rep)
    with step("5_attribution", "per-adapter attribution"):
        attributed = attribution.measure(ctx)
        attribution.render(attributed, rep)
    with step("6_narrow_vs_general", "narrow vs general solutions"):
        nvg = narrow_general.measure(ctx, train)
        narrow_general.render(nvg, rep)
    findings = [f for r in (rated, steered, ablated, probed, attributed, nvg) for f in r.findings]
    lenses.render_power(lenses.measure_power(cfg, ctx.qsets, rated, steered, ablated, findings),
                        rep)
    rep.results["seconds"] = round(time.perf_counter() - t0, 1)
    rep.results["seconds_by_section"] = timings
    rep.text(f"Total time {rep.results['seconds']:.0f} s on {torch.get_num_threads()} threads "
             f"({', '.join(f'{k} {v:.0f} s' for k, v in timings.items())}).")
    path = rep.write(out)
    log(f"wrote {path}")
    return path


class _Steps:
    """Times each section and logs ``i/total what`` as it starts (``with step(key, what):``)."""

    def __init__(self, log, timings: dict[str, float], total: int) -> None:
        self.log, self.timings, self.total, self.i = log, timings, total, 0

    @contextmanager
    def __call__(self, key: str, what: str):
        self.i += 1
        self.log(f"{self.i}/{self.total} {what}")
        start = time.perf_counter()
        yield
        self.timings[key] = round(time.perf_counter() - start, 1)


def train_organism_now(name: str, folder: Path, cfg: DemoConfig) -> str:
    from emlens.organisms.train import RECIPES, recipe_for, train_organism

    if name not in RECIPES:
        raise ValueError(f"--train retrains a shipped recipe; {name!r} is not one of "
                         f"{sorted(RECIPES)}.")
    target = folder / name
    train_organism(recipe_for(name, max_steps=cfg.organism_steps), target)
    return str(target)
