"""emlens: mechanistic interpretability of emergent misalignment on TransformerLens."""

from emlens.chat import ChatBatch, answer_logprobs, answer_loss, iter_chat_batches, tokenize_chat
from emlens.data import list_datasets, load_dataset
from emlens.evaluation import evaluate, misalignment_rate, plot_rates, rates, wilson_interval
from emlens.generation import Generation, generate
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
from emlens.models import embedded_model_path, load_hf, load_model

__all__ = [
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
