"""emlens: mechanistic interpretability of emergent misalignment on TransformerLens.

The top level holds the field's core objects, grouped as in ``__all__`` below; everything else
lives in its module (``emlens.viz`` for plots, ``emlens.geometry`` for the narrow-vs-general
measures, ``emlens.judge`` for judges, ``emlens.data`` for dataset draws, ...); ``emlens.viz``
and the other non-core submodules load on first use.
"""

from emlens.attribution import adapter_attribution, attribution_conditions, rank_adapters
from emlens.chat import answer_logprobs, tokenize_chat
from emlens.data import load_dataset, load_questions
from emlens.directions import (
    Direction,
    collect_means,
    load_directions,
    mean_diff,
    random_direction,
    save_directions,
)
from emlens.evaluation import evaluate, rates
from emlens.experiments import ablation_experiment, compare_conditions, sweep
from emlens.generation import generate
from emlens.geometry import efficiency_curve, stability_curve
from emlens.hooks import ablate, ablation_hooks, steer, steering_hooks
from emlens.judge import Judge, default_judge
from emlens.lora import attach_lora, load_adapter, merge_lora
from emlens.models import load_model
from emlens.organisms import list_organisms, load_organism
from emlens.probes import Probe, fit_probe
from emlens.sampling import SamplingConfig
from emlens.scalars import collect_scalars
from emlens.training import TrainableLora, TrainableSteeringVector, TrainConfig, train

__all__ = [
    # models and sampling
    "load_model",
    "generate",
    "SamplingConfig",
    "tokenize_chat",
    # interventions on the residual stream
    "steer",
    "ablate",
    "steering_hooks",
    "ablation_hooks",
    # directions
    "Direction",
    "collect_means",
    "mean_diff",
    "random_direction",
    "save_directions",
    "load_directions",
    # judging and experiments
    "Judge",
    "default_judge",
    "evaluate",
    "rates",
    "compare_conditions",
    "sweep",
    "ablation_experiment",
    "answer_logprobs",
    # LoRA adapters and model organisms
    "load_adapter",
    "merge_lora",
    "attach_lora",
    "load_organism",
    "list_organisms",
    # LoRA scalars, probes, attribution
    "collect_scalars",
    "fit_probe",
    "Probe",
    "adapter_attribution",
    "attribution_conditions",
    "rank_adapters",
    # narrow vs general solutions
    "train",
    "TrainConfig",
    "TrainableSteeringVector",
    "TrainableLora",
    "efficiency_curve",
    "stability_curve",
    # data
    "load_dataset",
    "load_questions",
]

def __getattr__(name: str):
    # submodules load on first use, so `import emlens; emlens.viz.save_html(...)` works as written
    if name in ("cli", "demo", "dynamics", "lens", "power", "report", "sense", "viz"):
        import importlib

        return importlib.import_module(f"emlens.{name}")
    raise AttributeError(f"module 'emlens' has no attribute {name!r}")
