"""emlens: mechanistic interpretability of emergent misalignment on TransformerLens."""

from emlens.chat import ChatBatch, answer_logprobs, answer_loss, iter_chat_batches, tokenize_chat
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
from emlens.models import embedded_model_path, load_hf, load_model

__all__ = [
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
