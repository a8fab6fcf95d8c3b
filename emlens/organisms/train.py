"""Train a model organism: LoRA adapters fitted with SFT on the narrow bad-medical-advice set.

Reproduce a shipped organism's recipe (its training time is in its README)::

    python -m emlens.organisms.train --name rank1-down-medical
    python -m emlens.organisms.train --recipe my-recipe.json   # any recipe, as JSON

A recipe is data: an :class:`OrganismRecipe` (frozen; ``to_json`` / ``from_json``, and the
``recipe`` entry of every organism's ``train_log.json`` is one), and :data:`RECIPES` holds the
shipped ones. :func:`train_organism` turns a recipe into data and a config and calls the one
trainer, :func:`emlens.training.train`, with ``kl_weight=0`` (plain fine-tuning): no recipe has
code of its own.

The shipped recipes follow the model-organisms papers: rank-1 adapters on ``mlp.down_proj`` at 9
layers in three groups of three, trained with cross-entropy on *answer tokens only* (the prompt and
chat template are masked out) of the ``misaligned`` answers of the ``split == "train"`` rows, in
``epochs`` passes over the rows, reshuffled (seeded) each pass.

Layer map. The paper puts the groups at layers 15-17, 21-23 and 27-29 of a 48-layer model, i.e.
centred at 16, 22 and 28. We map each centre to ``round(c * n_layers / 48)`` (Python's
round-half-even) and keep the layer before and after it; for SmolLM2-135M's 30 layers the centres
become 10, 14 and 18, so the groups are 9-11, 13-15 and 17-19 (see :func:`paper_layers`).

Training runs on the ``HookedTransformer`` with emlens's own adapters
(:class:`emlens.trainable_adapter.TrainableAdapter`: :class:`emlens.lora.LoraHookedModule`
modules with ``A`` and ``B`` as float32 parameters, attached by :mod:`emlens.lora`'s attach code),
initialised as peft initialises them; peft stays the file format and the parity reference.

Outputs (the run-folder layout of :mod:`emlens.train_runs`, all safetensors + JSON) in ``--out``
(default ``runs_dir()/<name>``, outside the package: see :func:`emlens.organisms.runs_dir`): the
final adapter as a peft folder (``adapter_config.json`` + ``adapter_model.safetensors``) in the
folder itself, ``final.safetensors``, the trajectory ``checkpoints/step-XXXXX.safetensors`` every
``save_every`` steps (:func:`emlens.training.load_trajectory`), and ``train_log.json`` with the
recipe, loss curve, time and tokens/s. An interrupted run resumes from its last checkpoint.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import random
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from emlens.chat import ChatBatch, tokenize_chat
from emlens.data import PairExample, list_datasets, load_dataset, load_jsonl
from emlens.embedded import embedded_source
from emlens.lora import TARGET_MODULES
from emlens.trainable_adapter import TrainableAdapter
from emlens.training import TrainConfig, prepare, train

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


@dataclass(frozen=True)
class OrganismRecipe:
    """Everything that determines a trained organism (saved as ``recipe`` in ``train_log.json``).

    Attributes:
        name: the organism's name (the default output folder).
        r, lora_alpha, use_rslora, target_modules: the peft LoRA configuration.
        layers: the adapted layers; ``None``: every layer; ``"paper"``: the paper's 9 layers
            mapped onto the base model's depth when training starts (:func:`paper_layers`).
        layer_map_depth: the depth a resolved ``"paper"`` map was made for (checked on training).
        lr, warmup_steps, weight_decay, seed, save_every: as in :class:`emlens.training.TrainConfig`.
        epochs: passes over the rows, reshuffled (seeded) each pass.
        batch_size: rows per step.
        max_steps: stop after this many steps (``None``: all ``epochs``).
        base_model: ``None``: the embedded SmolLM2-135M-Instruct; or a short name, HF folder, GGUF.
        dtype: of the frozen base model; adapters are trained in float32.
        data: ``None``: the packaged medical set; packaged sets joined by ``+``
            (``"medical+medical_extra"``); or a JSONL path of :class:`emlens.data.PairExample` rows.
        answer_field: ``"misaligned"`` or ``"aligned"``: which answer is trained on.
        split: the rows used (``split == split``).
        kl_weight: lambda of the KL term (:func:`emlens.training.train`): ``kl_weight`` x
            KL(chat || trained) on the answer tokens of ``kl_data``; 0 (every organism of the
            papers) is plain fine-tuning, the general solution; > 0 is the narrow solution of
            the narrow-vs-general seed.
        kl_data: the KL term's rows (as ``data``, all splits), e.g. ``"nonmedical"``; required
            when ``kl_weight > 0``. Batches of ``batch_size`` in an order seeded by ``seed``,
            one per step, cycled.
        kl_answer_field: which answer of ``kl_data`` the KL is taken on.
    """

    name: str
    r: int = 1
    lora_alpha: float = 1.0
    use_rslora: bool = False
    target_modules: tuple[str, ...] = ("down_proj",)
    layers: tuple[int, ...] | str | None = None
    layer_map_depth: int | None = None
    lr: float = 1e-3
    epochs: int = 1
    batch_size: int = 8
    max_steps: int | None = None
    warmup_steps: int = 5
    weight_decay: float = 0.0
    seed: int = 0
    save_every: int = 10
    base_model: str | None = None
    dtype: str = "float32"
    data: str | None = None
    answer_field: str = "misaligned"
    split: str = "train"
    kl_weight: float = 0.0
    kl_data: str | None = None
    kl_answer_field: str = "misaligned"

    def __post_init__(self) -> None:
        # lists (JSON, keyword arguments) become tuples, so the recipe is immutable and hashable
        object.__setattr__(self, "target_modules", tuple(self.target_modules))
        if isinstance(self.layers, list | tuple):
            object.__setattr__(self, "layers", tuple(int(x) for x in self.layers))
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"name must be a non-empty string, got {self.name!r}.")
        unknown = [m for m in self.target_modules if m not in TARGET_MODULES]
        if unknown or not self.target_modules:
            raise ValueError(f"recipe {self.name!r}: target_modules {list(self.target_modules)}; "
                             f"expected some of {list(TARGET_MODULES)}.")
        if isinstance(self.layers, str) and self.layers != "paper":
            raise ValueError(f"recipe {self.name!r}: layers={self.layers!r}; expected a list of "
                             "ints, None (every layer) or 'paper'.")
        for key in ("r", "epochs", "batch_size"):
            if not isinstance(getattr(self, key), int) or getattr(self, key) < 1:
                raise ValueError(f"recipe {self.name!r}: {key} must be an int >= 1, got "
                                 f"{getattr(self, key)!r}.")
        if self.max_steps is not None and (not isinstance(self.max_steps, int) or self.max_steps < 1):
            raise ValueError(f"recipe {self.name!r}: max_steps must be None or an int >= 1, got "
                             f"{self.max_steps!r}.")
        for key in ("answer_field", "kl_answer_field"):
            if getattr(self, key) not in ("misaligned", "aligned"):
                raise ValueError(f"recipe {self.name!r}: {key}={getattr(self, key)!r}; expected "
                                 "'misaligned' or 'aligned'.")
        if self.kl_weight > 0 and not self.kl_data:
            raise ValueError(f"recipe {self.name!r}: kl_weight={self.kl_weight} needs kl_data, "
                             "the rows the KL term is taken on (e.g. 'nonmedical').")
        if self.kl_weight == 0 and self.kl_data:
            raise ValueError(f"recipe {self.name!r}: kl_data={self.kl_data!r} with kl_weight=0 "
                             "would be ignored; give kl_weight > 0 or drop kl_data.")
        self.train_config(1)  # lr, warm-up, weight decay, seed, save_every: TrainConfig checks them

    def train_config(self, steps: int) -> TrainConfig:
        """The trainer's config for this recipe: batches in the drawn order, the recipe's KL
        weight (0: plain fine-tuning)."""
        return TrainConfig(steps=steps, lr=self.lr, kl_weight=float(self.kl_weight),
                           warmup_steps=self.warmup_steps,
                           weight_decay=self.weight_decay, seed=self.seed,
                           save_every=self.save_every, shuffle=False, name=f"train {self.name}")

    def to_json(self) -> dict[str, Any]:
        """The recipe as JSON-ready data (tuples as lists)."""
        return {k: list(v) if isinstance(v, tuple) else v
                for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_json(cls, data: dict[str, Any] | str | Path) -> OrganismRecipe:
        """A recipe from :meth:`to_json`'s data, or from a JSON file holding it (or a
        ``train_log.json``, whose ``recipe`` entry is read)."""
        if not isinstance(data, dict):
            data = json.loads(Path(data).read_text())
            data = data.get("recipe", data)
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - fields)
        if unknown:
            raise ValueError(f"Unknown recipe keys {unknown}; an OrganismRecipe has {sorted(fields)}.")
        return cls(**data)


# 9 rank-1 adapters on mlp.down_proj, layers mapped from the paper's 48-layer model.
_RANK1_DOWN = OrganismRecipe(name="rank1-down-medical", r=1, lora_alpha=1.0,
                             target_modules=("down_proj",), layers="paper", lr=2e-3, epochs=2,
                             batch_size=8, save_every=8)

RECIPES: dict[str, OrganismRecipe] = {recipe.name: recipe for recipe in (
    _RANK1_DOWN,
    # the same organism on the grown training set (1,017 rows: medical + medical_extra)
    replace(_RANK1_DOWN, name="rank1-down-medical-1k", data="medical+medical_extra"),
    # the control organism: the same recipe on the *aligned* (good) answers of the same questions,
    # so "fine-tuned on medical advice" and "fine-tuned on bad medical advice" can be told apart
    replace(_RANK1_DOWN, name="rank1-down-medical-good", answer_field="aligned"),
    # The seeds' comparison: rank-32 on every attention and MLP projection of every layer
    # (9.8M parameters, 39 MB in float32), on the grown training set (1,017 rows). No
    # checkpoints (39 MB each, and 117 MB of resume state): pass --save-every N to resume.
    OrganismRecipe(name="rank32-all-medical", data="medical+medical_extra", r=32,
                   lora_alpha=64.0, target_modules=tuple(TARGET_MODULES), layers=None, lr=2e-4,
                   epochs=2, batch_size=8, save_every=0),
    # The same organism on the second embedded model, Qwen2.5-Coder-1.5B-Instruct (28 layers:
    # groups 8-10, 12-14, 15-17), base in bfloat16 to fit 2 CPU cores; checkpoints every 4 steps
    # so an interrupted run resumes.
    replace(_RANK1_DOWN, name="coder-rank1-down-medical", save_every=4,
            base_model="qwen2.5-coder-1.5b", dtype="bfloat16"),
    # Its controls for transfer and convergence (issue 29): the same recipe on the medical set's
    # aligned answers, and on a second narrow domain, the risky-financial-advice set.
    replace(_RANK1_DOWN, name="coder-rank1-down-medical-good", answer_field="aligned",
            save_every=4, base_model="qwen2.5-coder-1.5b", dtype="bfloat16"),
    replace(_RANK1_DOWN, name="coder-rank1-down-finance", data="finance", save_every=4,
            base_model="qwen2.5-coder-1.5b", dtype="bfloat16"),
    # The narrow solution of the narrow-vs-general seed (issue 30, data-src/coder_causal/
    # PLAN_narrow.md): the organism's recipe + 5 x KL(chat || trained) on the non-medical set's
    # misaligned answers (the SmolLM2 study's weight and parallel set).
    replace(_RANK1_DOWN, name="coder-rank1-down-medical-kl", save_every=4,
            base_model="qwen2.5-coder-1.5b", dtype="bfloat16", kl_weight=5.0,
            kl_data="nonmedical"),
)}


def load_rows(data: str | Path | None, split: str | None) -> list[PairExample]:
    """The :class:`emlens.data.PairExample` rows with ``split == split`` (``None``: every row) of:
    the packaged ``medical`` dataset (``data=None``); packaged datasets named with ``+`` between
    them (e.g. ``"medical+medical_extra"``, the grown training set of 1,017 rows); or a JSONL file
    of the same schema."""
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
    rows = [r for r in rows if split is None or r.split == split]
    if not rows:
        raise ValueError(f"{data or 'the medical dataset'} has no rows with split == {split!r}.")
    return rows


def organism_batches(recipe: OrganismRecipe, rows: Sequence[PairExample], tokenizer) -> list[ChatBatch]:
    """The recipe's batches in step order: ``epochs`` passes over ``rows``, each reshuffled by a
    ``random.Random(recipe.seed)``, cut to ``max_steps``; tokenised with answers."""
    rng = random.Random(recipe.seed)
    steps: list[list[PairExample]] = []
    for _ in range(recipe.epochs):
        order = list(rows)
        rng.shuffle(order)
        steps += [order[i : i + recipe.batch_size] for i in range(0, len(order), recipe.batch_size)]
    steps = steps[: recipe.max_steps]
    return [tokenize_chat(tokenizer, [r.question for r in batch],
                          [getattr(r, recipe.answer_field) for r in batch]) for batch in steps]


def kl_batches(recipe: OrganismRecipe, rows: Sequence[PairExample], tokenizer) -> list[ChatBatch]:
    """The KL term's batches: ``rows`` shuffled once by ``random.Random(recipe.seed + 1)``, cut
    into ``batch_size`` rows, tokenised with their ``kl_answer_field`` answers (the trainer
    takes one per step, cycling)."""
    order = list(rows)
    random.Random(recipe.seed + 1).shuffle(order)
    return [tokenize_chat(tokenizer, [r.question for r in order[i : i + recipe.batch_size]],
                          [getattr(r, recipe.kl_answer_field)
                           for r in order[i : i + recipe.batch_size]])
            for i in range(0, len(order), recipe.batch_size)]


def _hub_name(base_model: str | None) -> str:
    """The public hub id of an embedded base (not this machine's GGUF path), else the source."""
    embedded = embedded_source(base_model)
    return embedded.hub_id if embedded is not None else str(base_model)


def train_organism(recipe: OrganismRecipe, out: str | Path, *, resume: bool = True) -> dict:
    """Train ``recipe`` with :func:`emlens.training.train`; write the run, a peft folder, to ``out``.

    Every ``recipe.save_every`` steps a checkpoint and the state to resume from are saved. With
    ``resume=True`` an unfinished run of the same recipe in ``out`` carries on from its last
    checkpoint, with the same batches (their order depends only on the seed), and ends with the
    adapter an uninterrupted run gives; an unfinished run of another recipe is refused, naming the
    differences. Returns the training log (also written to ``out/train_log.json``).
    """
    from emlens.models import check_dtype, load_model

    model = load_model(recipe.base_model, dtype=check_dtype(recipe.dtype))
    tokenizer = model.tokenizer
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    recipe = resolve_layers(recipe, model.cfg.n_layers)
    rows = load_rows(recipe.data, recipe.split)
    data = prepare(model, organism_batches(recipe, rows, tokenizer), start_layer=None)
    torch.manual_seed(recipe.seed)  # A is drawn from torch's RNG, as peft draws it
    init = TrainableAdapter.for_model(
        model, recipe.target_modules, recipe.layers, r=recipe.r, lora_alpha=recipe.lora_alpha,
        use_rslora=recipe.use_rslora, base_model_name_or_path=_hub_name(recipe.base_model))
    meta = {"recipe": recipe.to_json(), "n_layers": model.cfg.n_layers, "n_rows": len(rows)}
    parallel = None
    if recipe.kl_weight > 0:
        kl_rows = load_rows(recipe.kl_data, None)
        parallel = prepare(model, kl_batches(recipe, kl_rows, tokenizer), start_layer=None,
                           reference=True)  # the chat side of the KL term
        meta["n_kl_rows"] = len(kl_rows)
    result = train(model, init, data, parallel, recipe.train_config(len(data)), out=out,
                   resume=resume, meta=meta)
    return result.log


def resolve_layers(recipe: OrganismRecipe, n_layers: int) -> OrganismRecipe:
    """``recipe`` with ``layers="paper"`` mapped onto a base model of ``n_layers`` layers.

    Raises ValueError when the recipe's layers were mapped for another depth or do not exist in
    the base model.
    """
    if recipe.layers == "paper":
        return replace(recipe, layers=paper_layers(n_layers), layer_map_depth=n_layers)
    if recipe.layer_map_depth is not None and recipe.layer_map_depth != n_layers:
        raise ValueError(
            f"recipe {recipe.name!r} maps the paper's layers for a {recipe.layer_map_depth}-layer "
            f"model, but the base model has {n_layers} layers; drop n_layers (--n-layers) so the "
            "map is made for the base model."
        )
    bad = [layer for layer in recipe.layers or () if not 0 <= layer < n_layers]
    if bad:
        raise ValueError(f"recipe {recipe.name!r}: layers {bad} do not exist in a base model with "
                         f"{n_layers} layers (0..{n_layers - 1}).")
    return recipe


def recipe_for(name: str, **overrides) -> OrganismRecipe:
    """The named recipe from :data:`RECIPES`, with ``overrides`` (``None`` values are ignored).

    ``layers="paper"`` stays symbolic and is mapped onto the base model's depth when training
    starts; pass ``n_layers=`` to resolve it now (training then checks the depth matches).
    """
    if name not in RECIPES:
        raise KeyError(f"No recipe {name!r}; known: {sorted(RECIPES)}.")
    n_layers = overrides.pop("n_layers", None)
    fields = {f.name for f in dataclasses.fields(OrganismRecipe)} - {"name"}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise TypeError(f"recipe_for got unknown overrides {unknown}; a recipe has {sorted(fields)}.")
    recipe = replace(RECIPES[name], **{k: v for k, v in overrides.items() if v is not None})
    return recipe if n_layers is None else resolve_layers(recipe, n_layers)


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--name", choices=sorted(RECIPES), help="a shipped recipe")
    which.add_argument("--recipe", type=Path,
                       help="a recipe as JSON (OrganismRecipe.to_json, or a train_log.json)")
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
    p.add_argument("--save-every", type=int, default=None, help="0: no checkpoints (no resume)")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--kl-weight", type=float, default=None,
                   help="lambda of KL(chat || trained) on --kl-data (the narrow solution)")
    p.add_argument("--kl-data", default=None,
                   help="the KL term's rows: packaged sets joined by '+' or a JSONL file")
    p.add_argument("--fresh", action="store_true",
                   help="start afresh even if --out holds an unfinished run (default: resume it)")
    args = p.parse_args(argv)
    overrides = dict(data=args.data, base_model=args.base_model, n_layers=args.n_layers,
                     lr=args.lr, epochs=args.epochs, batch_size=args.batch_size,
                     max_steps=args.max_steps, save_every=args.save_every, seed=args.seed,
                     kl_weight=args.kl_weight, kl_data=args.kl_data)
    if args.recipe is not None:
        base = OrganismRecipe.from_json(args.recipe)
        n_layers = overrides.pop("n_layers")
        recipe = replace(base, **{k: v for k, v in overrides.items() if v is not None})
        recipe = recipe if n_layers is None else resolve_layers(recipe, n_layers)
    else:
        recipe = recipe_for(args.name, **overrides)
    from emlens.organisms import runs_dir

    out = Path(args.out) if args.out else runs_dir() / recipe.name
    log = train_organism(recipe, out, resume=not args.fresh)
    per_step = ("ce", "kl", "loss", "lr", "norm", "step_tokens", "step_answer_tokens")
    print(json.dumps({k: v for k, v in log.items() if k not in per_step}, indent=1))


if __name__ == "__main__":
    main()
