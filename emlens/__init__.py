"""emlens: mechanistic interpretability of emergent misalignment on TransformerLens."""

from emlens.chat import ChatBatch, answer_logprobs, answer_loss, iter_chat_batches, tokenize_chat
from emlens.data import list_datasets, load_dataset
from emlens.evaluation import evaluate, misalignment_rate, plot_rates, rates, wilson_interval
from emlens.generation import Generation, generate
from emlens.geometry import (
    efficiency_curve,
    efficiency_table,
    orthogonal_noise,
    stability_curve,
    stability_table,
    trajectory_cosines,
    trajectory_pca,
)
from emlens.hooks import (
    PositionState,
    ablate,
    ablation_hooks,
    generation_positions,
    projections,
    steer,
    steering_hooks,
)
from emlens.judge import Judge, JudgeError, JudgeScore, OpenAIJudge, ProbeJudge, default_judge
from emlens.lora import (
    AttachedLora,
    LoraAdapter,
    LoraModule,
    attach_lora,
    load_adapter,
    merge_lora,
    unmerge_lora,
)
from emlens.models import embedded_model_path, load_hf, load_model
from emlens.organisms import list_organisms, load_organism
from emlens.training import (
    TrainableLora,
    TrainableSteeringVector,
    TrainConfig,
    TrainResult,
    load_trainable,
    train,
)

__all__ = [
    "AttachedLora",
    "LoraAdapter",
    "LoraModule",
    "TrainConfig",
    "TrainResult",
    "TrainableLora",
    "TrainableSteeringVector",
    "attach_lora",
    "efficiency_curve",
    "efficiency_table",
    "list_organisms",
    "load_adapter",
    "load_organism",
    "load_trainable",
    "merge_lora",
    "orthogonal_noise",
    "stability_curve",
    "stability_table",
    "train",
    "trajectory_cosines",
    "trajectory_pca",
    "unmerge_lora",
    "Judge",
    "JudgeError",
    "JudgeScore",
    "OpenAIJudge",
    "ProbeJudge",
    "default_judge",
    "evaluate",
    "list_datasets",
    "load_dataset",
    "misalignment_rate",
    "plot_rates",
    "rates",
    "wilson_interval",
    "ChatBatch",
    "Generation",
    "PositionState",
    "ablate",
    "ablation_hooks",
    "answer_logprobs",
    "answer_loss",
    "embedded_model_path",
    "generate",
    "generation_positions",
    "iter_chat_batches",
    "load_hf",
    "load_model",
    "projections",
    "steer",
    "steering_hooks",
    "tokenize_chat",
]
