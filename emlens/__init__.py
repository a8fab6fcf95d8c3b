"""emlens: mechanistic interpretability of emergent misalignment on TransformerLens.

The top level holds the field's core objects, grouped as in ``__all__`` below; everything else
lives in its module (``emlens.viz`` for plots, ``emlens.geometry`` for the narrow-vs-general
measures, ``emlens.judge`` for judges, ``emlens.data`` for dataset draws, ...). A name that used
to be here and moved raises an AttributeError naming its new place.
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

# Names that were top-level before the API was grouped, and where they live now.
MOVED = {
    "AttachedLora": "emlens.lora.AttachedLora",
    "ChatBatch": "emlens.chat.ChatBatch",
    "Condition": "emlens.attribution.Condition",
    "Generation": "emlens.generation.Generation",
    "JudgeError": "emlens.judge.JudgeError",
    "JudgeScore": "emlens.judge.JudgeScore",
    "LabelledSet": "emlens.data.LabelledSet",
    "LoraAdapter": "emlens.lora.LoraAdapter",
    "LoraModule": "emlens.lora.LoraModule",
    "OpenAIJudge": "emlens.judge.OpenAIJudge",
    "PositionState": "emlens.hooks.PositionState",
    "ProbeJudge": "emlens.judge.ProbeJudge",
    "REFERENCE_PRESET": "emlens.probes.REFERENCE_PRESET",
    "TokenScalars": "emlens.scalars.TokenScalars",
    "TrainResult": "emlens.training.TrainResult",
    "answer_loss": "emlens.chat.answer_loss",
    "answer_set": "emlens.data.answer_set",
    "check_gradient_attribution": "emlens.attribution.check_gradient_attribution",
    "context_set": "emlens.data.context_set",
    "efficiency_table": "emlens.geometry.efficiency_table",
    "embedded_model_path": "emlens.models.embedded_model_path",
    "generation_positions": "emlens.hooks.generation_positions",
    "gradient_attribution": "emlens.attribution.gradient_attribution",
    "iter_chat_batches": "emlens.chat.iter_chat_batches",
    "judged_set": "emlens.data.judged_set",
    "list_datasets": "emlens.data.list_datasets",
    "load_hf": "emlens.models.load_hf",
    "load_trainable": "emlens.training.load_trainable",
    "misalignment_rate": "emlens.evaluation.misalignment_rate",
    "orthogonal_noise": "emlens.geometry.orthogonal_noise",
    "plot_attribution": "emlens.viz.plot_attribution",
    "plot_probe_coefficients": "emlens.viz.plot_probe_coefficients",
    "plot_rates": "emlens.evaluation.plot_rates",
    "plot_scale_sweep": "emlens.viz.plot_adapter_scales",
    "projection_view": "emlens.viz.projection_view",
    "projections": "emlens.hooks.projections",
    "reference_probe": "emlens.probes.reference_probe",
    "residual_features": "emlens.scalars.residual_features",
    "save_html": "emlens.viz.save_html",
    "stability_table": "emlens.geometry.stability_table",
    "token_scalars_view": "emlens.viz.token_scalars_view",
    "trajectory_cosines": "emlens.geometry.trajectory_cosines",
    "trajectory_pca": "emlens.geometry.trajectory_pca",
    "unmerge_lora": "emlens.lora.unmerge_lora",
    "wilson_interval": "emlens.evaluation.wilson_interval",
}


def __getattr__(name: str):
    # submodules load on first use, so `import emlens; emlens.viz.save_html(...)` works as written
    if name in ("cli", "demo", "lens", "power", "report", "sense", "viz"):
        import importlib

        return importlib.import_module(f"emlens.{name}")
    if name in MOVED:
        raise AttributeError(f"emlens.{name} moved: use {MOVED[name]} (the top level keeps the "
                             "core objects only; see emlens.__all__).")
    raise AttributeError(f"module 'emlens' has no attribute {name!r}")
