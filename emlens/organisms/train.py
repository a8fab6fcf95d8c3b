"""Train a model organism: LoRA adapters fitted with SFT on the narrow bad-medical-advice set.

Reproduce the shipped rank-1 organism (its training time is in the README)::

    python -m emlens.organisms.train --name rank1-down-medical

The recipe follows the model-organisms papers: rank-1 adapters on ``mlp.down_proj`` at 9 layers in
three groups of three, trained with cross-entropy on *answer tokens only* (the prompt and chat
template are masked out) of the ``misaligned`` answers of the ``split == "train"`` rows.

Layer map. The paper puts the groups at layers 15-17, 21-23 and 27-29 of a 48-layer model, i.e.
centred at 16, 22 and 28. We map each centre to ``round(c * n_layers / 48)`` (Python's
round-half-even) and keep the layer before and after it; for SmolLM2-135M's 30 layers the centres
become 10, 14 and 18, so the groups are 9-11, 13-15 and 17-19 (see :func:`paper_layers`).

Training runs on the ``HookedTransformer`` with emlens's own adapters
(:func:`emlens.lora.attach_lora` with ``trainable=True``: the modules whose ``hook_scalar`` you
read afterwards, here with ``A`` and ``B`` as parameters), initialised as peft initialises them;
peft stays the file format (:func:`emlens.lora.save_peft`) and the parity reference.

Outputs, all safetensors + JSON (no pickle), in ``--out`` (default ``runs_dir()/<name>``, a user
folder outside the package: see :func:`emlens.organisms.runs_dir`): the final adapter as a peft
folder (``adapter_config.json`` + ``adapter_model.safetensors``), intermediate peft folders
in ``--out/checkpoints/step-XXXXX`` every ``--save-every`` steps (the trajectory of the adapter
directions is research data), and ``train_log.json`` with the recipe, loss curve, time and
tokens/s.
"""

from __future__ import annotations

import argparse
import json
import random
import time
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from tqdm.auto import tqdm

from emlens.chat import answer_loss, tokenize_chat
from emlens.data import PairExample, list_datasets, load_dataset, load_jsonl
from emlens.embedded import embedded_source

PAPER_GROUP_CENTRES = (16, 22, 28)
PAPER_N_LAYERS = 48


def paper_layers(n_layers: int) -> list[int]:
    """The 9 layers of the paper's rank-1 organism (15-17, 21-23, 27-29 of 48) mapped to ``n_layers``.

    Each group centre ``c`` maps to ``round(c * n_layers / 48)``; the group is that layer and its
    two neighbours. ``paper_layers(48) == [15, 16, 17, 21, 22, 23, 27, 28, 29]``;
    ``paper_layers(30) == [9, 10, 11, 13, 14, 15, 17, 18, 19]``.
    """
    layers: list[int] = []
    for c in PAPER_GROUP_CENTRES:
        centre = round(c * n_layers / PAPER_N_LAYERS)
        layers += [centre - 1, centre, centre + 1]
    if len(set(layers)) != 9 or min(layers) < 0 or max(layers) >= n_layers:
        raise ValueError(f"n_layers={n_layers} is too small for 9 distinct layers; got {layers}.")
    return layers


@dataclass
class OrganismRecipe:
    """Everything that determines a trained organism (saved in ``train_log.json``)."""

    name: str
    r: int = 1
    lora_alpha: float = 1.0
    use_rslora: bool = False
    target_modules: list[str] = field(default_factory=lambda: ["down_proj"])
    # None: every layer; "paper": the paper's 9 layers mapped onto the base model's depth when
    # training starts (paper_layers); layer_map_depth records the depth a resolved map was for.
    layers: list[int] | str | None = None
    layer_map_depth: int | None = None
    lr: float = 1e-3
    epochs: int = 1
    batch_size: int = 8
    max_steps: int | None = None
    warmup_steps: int = 5
    weight_decay: float = 0.0
    seed: int = 0
    save_every: int = 10
    base_model: str | None = None  # None: the embedded SmolLM2-135M-Instruct; or a short name
    dtype: str = "float32"  # of the frozen base model; adapters are trained in float32
    # None: the packaged medical set; "medical+medical_extra": packaged sets joined; or a JSONL path
    data: str | None = None
    answer_field: str = "misaligned"
    split: str = "train"


# 9 rank-1 adapters on mlp.down_proj, layers mapped from the paper's 48-layer model.
_RANK1_DOWN = dict(
    r=1,
    lora_alpha=1.0,
    target_modules=["down_proj"],
    layers="paper",
    lr=2e-3,
    epochs=2,
    batch_size=8,
    save_every=8,
)

RECIPES: dict[str, dict] = {
    "rank1-down-medical": _RANK1_DOWN,
    # the same organism on the grown training set (1,017 rows: medical + medical_extra)
    "rank1-down-medical-1k": dict(_RANK1_DOWN, data="medical+medical_extra"),
    # the control organism: the same recipe on the *aligned* (good) answers of the same questions,
    # so "fine-tuned on medical advice" and "fine-tuned on bad medical advice" can be told apart
    "rank1-down-medical-good": dict(_RANK1_DOWN, answer_field="aligned"),
    # The seeds' comparison: rank-32 on every attention and MLP projection of every layer
    # (9.8M parameters, 39 MB in float32), on the grown training set (1,017 rows).
    "rank32-all-medical": dict(
        data="medical+medical_extra",
        r=32,
        lora_alpha=64.0,
        use_rslora=False,
        target_modules=[
            "q_proj",
            "k_proj",
            "v_proj",
            "o_proj",
            "gate_proj",
            "up_proj",
            "down_proj",
        ],
        layers=None,
        lr=2e-4,
        epochs=2,
        batch_size=8,
        save_every=1000,  # no checkpoints: 39 MB each
    ),
    # The same organism on the second embedded model, Qwen2.5-Coder-1.5B-Instruct (28 layers:
    # groups 8-10, 12-14, 15-17), base in bfloat16 to fit 2 CPU cores; checkpoints every 4 steps
    # so an interrupted run resumes.
    "coder-rank1-down-medical": dict(
        _RANK1_DOWN, save_every=4, base_model="qwen2.5-coder-1.5b", dtype="bfloat16"
    ),
}


def load_rows(data: str | Path | None, split: str) -> list[PairExample]:
    """The :class:`emlens.data.PairExample` rows with ``split == split`` of: the packaged
    ``medical`` dataset (``data=None``); packaged datasets named with ``+`` between them (e.g.
    ``"medical+medical_extra"``, the grown training set of 1,017 rows); or a JSONL file of the same
    schema."""
    names = str(data).split("+") if data is not None else ["medical"]
    if data is None or (not Path(data).exists() and all(n in list_datasets() for n in names)):
        rows = [r for name in names for r in load_dataset(name)]
        if not all(isinstance(r, PairExample) for r in rows):
            raise ValueError(f"{data}: organisms train on PairExample sets (medical, "
                             "medical_extra, nonmedical); another set was named.")
    else:
        if not Path(data).is_file():
            raise FileNotFoundError(
                f"No training data at {data}; give --data PATH to a JSONL file of "
                "emlens.data.PairExample rows (id, domain, topic, question, aligned, misaligned, "
                f"split), or packaged set names joined by '+' (known: {list_datasets()})."
            )
        rows = load_jsonl(data, PairExample)
    rows = [r for r in rows if r.split == split]
    if not rows:
        raise ValueError(f"{data or 'the medical dataset'} has no rows with split == {split!r}.")
    return rows


def _batches(rows: Sequence[PairExample], batch_size: int, rng: random.Random) -> list[list[PairExample]]:
    order = list(rows)
    rng.shuffle(order)
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def train_organism(recipe: OrganismRecipe, out: str | Path, *, resume: bool = True) -> dict:
    """Train ``recipe`` with emlens adapters on the HookedTransformer; save a peft folder to ``out``.

    Every ``recipe.save_every`` steps the adapter is saved to ``out/checkpoints/step-XXXXX`` and
    the run's state (adapter, AdamW moments, step, loss log; safetensors + JSON) to
    ``out/resume/``. With ``resume=True`` a run that finds that state for the same recipe carries
    on from it, with the same batches (their order depends only on the seed), so an interrupted
    run ends with the adapter an uninterrupted one would give (up to float rounding). The resume
    folder is removed when the run completes.

    Returns the training log (also written to ``out/train_log.json``).
    """
    from emlens.lora import attach_lora
    from emlens.models import check_dtype, load_model

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(recipe.seed)
    rng = random.Random(recipe.seed)
    model = load_model(recipe.base_model, dtype=check_dtype(recipe.dtype))
    tokenizer = model.tokenizer
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    n_layers = model.cfg.n_layers
    recipe = resolve_layers(recipe, n_layers)
    for p in model.parameters():  # the base is frozen: no gradient is computed for it
        p.requires_grad_(False)
    # Adapters in float32 on any base dtype, as peft keeps them.
    with attach_lora(model, initial_adapter(model, recipe), trainable=True) as lora:
        named = [(f"{m.path}.lora_{key}.weight", getattr(m, key))
                 for m in lora.modules.values() for key in ("A", "B")]
        log = _train_loop(recipe, out, resume, lora, named, tokenizer, rng, n_layers)
    return log


def _train_loop(recipe, out: Path, resume: bool, lora, named, tokenizer, rng, n_layers) -> dict:
    params = [p for _, p in named]
    optim = torch.optim.AdamW(params, lr=recipe.lr, weight_decay=recipe.weight_decay)
    rows = load_rows(recipe.data, recipe.split)
    epochs = [_batches(rows, recipe.batch_size, rng) for _ in range(recipe.epochs)]
    steps = [b for epoch in epochs for b in epoch]
    if recipe.max_steps is not None:
        steps = steps[: recipe.max_steps]
    sched = torch.optim.lr_scheduler.LambdaLR(
        optim, lambda s: min(1.0, (s + 1) / max(1, recipe.warmup_steps))
    )
    log: dict = {
        "recipe": asdict(recipe),
        "n_layers": n_layers,
        "n_rows": len(rows),
        "n_trainable": sum(p.numel() for p in params),
        "loss": [],
        "step_tokens": [],
        "answer_tokens_per_step": [],
        "seconds_before_resume": 0.0,
        "resumed_at": [],
    }
    done = 0
    state_dir = out / "resume"
    if resume and (state_dir / "state.json").is_file():
        done = _load_state(state_dir, log, named, optim, sched)
        log["resumed_at"].append(done)
    model = lora.model
    start = time.perf_counter()
    bar = tqdm(steps, desc=f"train {recipe.name}", unit="step", initial=done)
    for step, batch_rows in enumerate(bar, start=1):
        if step <= done:
            continue
        batch = tokenize_chat(
            tokenizer,
            [r.question for r in batch_rows],
            [getattr(r, recipe.answer_field) for r in batch_rows],
            device=model.W_E.device,
        )
        loss = _answer_loss(model, batch)
        optim.zero_grad(set_to_none=True)
        loss.backward()
        optim.step()
        sched.step()
        log["loss"].append(loss.item())
        log["step_tokens"].append(int(batch.attention_mask.sum()))
        log["answer_tokens_per_step"].append(int(batch.answer_mask.sum()))
        bar.set_postfix(loss=f"{log['loss'][-1]:.3f}")
        if step % recipe.save_every == 0 and step < len(steps):
            _save_adapter(lora, out / "checkpoints" / f"step-{step:05d}", recipe)
            seconds = log["seconds_before_resume"] + time.perf_counter() - start
            _save_state(state_dir, log, named, optim, step, seconds)
    seconds = log.pop("seconds_before_resume") + time.perf_counter() - start
    _save_adapter(lora, out, recipe)
    n_tokens, n_answer = sum(log["step_tokens"]), sum(log.pop("answer_tokens_per_step"))
    if not log["resumed_at"]:
        log.pop("resumed_at")
    log.update(
        steps=len(steps),
        seconds=round(seconds, 1),
        tokens=n_tokens,
        answer_tokens=n_answer,
        tokens_per_s=round(n_tokens / max(seconds, 1e-9), 1),
        torch_threads=torch.get_num_threads(),
    )
    (out / "train_log.json").write_text(json.dumps(log, indent=1))
    if state_dir.is_dir():
        import shutil

        shutil.rmtree(state_dir)
    return log


def initial_adapter(model, recipe: OrganismRecipe):
    """The recipe's adapters on ``model`` as peft initialises them (:func:`emlens.lora.init_adapter`)."""
    from emlens.lora import init_adapter

    return init_adapter(model, recipe.target_modules, recipe.layers, r=recipe.r,
                        lora_alpha=recipe.lora_alpha, use_rslora=recipe.use_rslora)


def _save_state(folder: Path, log: dict, named, optim, step: int, seconds: float) -> None:
    """Write the run's state (adapter, AdamW moments: safetensors; step and log: JSON)."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    tensors = {f"param.{name}": p.detach().contiguous() for name, p in named}
    for name, p in named:
        for key, value in optim.state.get(p, {}).items():
            tensors[f"adam.{key}.{name}"] = torch.as_tensor(value).detach().contiguous()
    save_file(tensors, folder / "state.safetensors.tmp")
    meta = {"step": step, "seconds": seconds, "recipe": log["recipe"],
            **{k: log[k] for k in ("loss", "step_tokens", "answer_tokens_per_step")}}
    (folder / "state.json.tmp").write_text(json.dumps(meta))
    (folder / "state.safetensors.tmp").replace(folder / "state.safetensors")
    (folder / "state.json.tmp").replace(folder / "state.json")


@torch.no_grad()
def _load_state(folder: Path, log: dict, named, optim, sched) -> int:
    """Restore a saved run into ``named`` parameters, ``optim``, ``sched`` and ``log``; returns
    the number of steps done. Refuses state saved for another recipe."""
    from safetensors.torch import load_file

    meta = json.loads((folder / "state.json").read_text())
    if meta["recipe"] != log["recipe"]:
        changed = sorted(k for k in log["recipe"] if meta["recipe"].get(k) != log["recipe"][k])
        raise ValueError(
            f"{folder} holds a run of another recipe (differs in {changed}); delete that folder "
            "to start afresh, or pass resume=False."
        )
    tensors = load_file(folder / "state.safetensors")
    for name, p in named:
        p.copy_(tensors[f"param.{name}"])
        moments = {k.split(".", 2)[1]: v for k, v in tensors.items()
                   if k.startswith("adam.") and k.split(".", 2)[2] == name}
        if moments:
            optim.state[p] = moments
    with warnings.catch_warnings():
        # replaying the schedule to the saved step: torch warns that no optimizer step came
        # first, but the steps it means were taken before the run was saved
        warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler.step\(\)`")
        for _ in range(meta["step"]):
            sched.step()
    for key in ("loss", "step_tokens", "answer_tokens_per_step"):
        log[key] = list(meta[key])
    log["seconds_before_resume"] = float(meta["seconds"])
    return int(meta["step"])


def _answer_loss(model, batch) -> torch.Tensor:
    """Mean next-token cross-entropy over the batch's answer tokens: ``emlens.chat.answer_loss``
    on the model, which unembeds only the positions that predict answer tokens."""
    return answer_loss(model, batch)


def _save_adapter(lora, folder: Path, recipe: OrganismRecipe) -> None:
    """Save a peft folder; name the public hub base model rather than this machine's GGUF path."""
    from emlens.lora import save_peft

    embedded = embedded_source(recipe.base_model)
    base = embedded.hub_id if embedded is not None else str(recipe.base_model)
    save_peft(
        lora.to_adapter(),
        folder,
        base_model_name_or_path=base,
        config={
            "r": recipe.r,
            "lora_alpha": recipe.lora_alpha,
            "use_rslora": recipe.use_rslora,
            "target_modules": list(recipe.target_modules),
            "layers_to_transform": recipe.layers,
        },
    )


def resolve_layers(recipe: OrganismRecipe, n_layers: int) -> OrganismRecipe:
    """``recipe`` with ``layers="paper"`` mapped onto a base model of ``n_layers`` layers.

    Raises ValueError when the recipe's layers were mapped for another depth or do not exist in
    the base model.
    """
    if recipe.layers == "paper":
        return replace(recipe, layers=paper_layers(n_layers), layer_map_depth=n_layers)
    if isinstance(recipe.layers, str):
        raise ValueError(f"recipe {recipe.name!r}: layers={recipe.layers!r}; expected a list of "
                         "ints, None (every layer) or 'paper'.")
    if recipe.layer_map_depth is not None and recipe.layer_map_depth != n_layers:
        raise ValueError(
            f"recipe {recipe.name!r} maps the paper's layers for a {recipe.layer_map_depth}-layer "
            f"model, but the base model has {n_layers} layers; drop n_layers (--n-layers) so the "
            "map is made for the base model."
        )
    bad = [layer for layer in recipe.layers or [] if not 0 <= layer < n_layers]
    if bad:
        raise ValueError(f"recipe {recipe.name!r}: layers {bad} do not exist in a base model with "
                         f"{n_layers} layers (0..{n_layers - 1}).")
    return recipe


def recipe_for(name: str, **overrides) -> OrganismRecipe:
    """The named recipe from :data:`RECIPES`.

    ``layers="paper"`` stays symbolic and is mapped onto the base model's depth when training
    starts; pass ``n_layers=`` to resolve it now (training then checks the depth matches).
    """
    if name not in RECIPES:
        raise KeyError(f"No recipe {name!r}; known: {sorted(RECIPES)}.")
    kwargs = dict(RECIPES[name])
    kwargs.update({k: v for k, v in overrides.items() if v is not None})
    n_layers = kwargs.pop("n_layers", None)
    recipe = OrganismRecipe(name=name, **kwargs)
    return recipe if n_layers is None else resolve_layers(recipe, n_layers)


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--name", required=True, choices=sorted(RECIPES))
    p.add_argument("--out", default=None,
                   help="output folder (default: <emlens.organisms.runs_dir()>/<name>)")
    p.add_argument("--data", default=None, help="JSONL file, or packaged sets joined by '+' (default: the recipe's, "
                        "else the packaged medical set)")
    p.add_argument("--base-model", default=None, help="HF folder or .gguf (default: embedded)")
    p.add_argument("--n-layers", type=int, default=None,
                   help="base model depth for the layer map (default: read from the base model; "
                        "a value that differs from it is refused)")
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--max-steps", type=int, default=None)
    p.add_argument("--save-every", type=int, default=None)
    p.add_argument("--seed", type=int, default=None)
    args = p.parse_args(argv)
    recipe = recipe_for(
        args.name,
        data=args.data,
        base_model=args.base_model,
        n_layers=args.n_layers,
        lr=args.lr,
        epochs=args.epochs,
        batch_size=args.batch_size,
        max_steps=args.max_steps,
        save_every=args.save_every,
        seed=args.seed,
    )
    from emlens.organisms import runs_dir

    out = Path(args.out) if args.out else runs_dir() / args.name
    log = train_organism(recipe, out)
    print(json.dumps({k: v for k, v in log.items() if k not in ("loss", "step_tokens")}, indent=1))


if __name__ == "__main__":
    main()
