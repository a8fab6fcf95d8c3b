"""Per-token LoRA scalars as features: run an attached organism over (question, answer) pairs.

A rank-1 adapter's activation ``A . h`` is one number per token (``<adapter>.hook_scalar``).
:func:`collect_scalars` streams chat batches through the model with ``run_with_cache`` restricted
to those hook points and returns a :class:`TokenScalars`: a ``[n_tokens, n_adapters]`` tensor over
real (non-padding) tokens, with one metadata row per token (row id, position, token string,
prompt/answer). :meth:`TokenScalars.aggregate` reduces it to one feature row per answer (mean, max
or last token), the unit probes are fitted on.

:func:`residual_features` collects the comparison features from the residual stream: mean
activation over the answer tokens, or its projection on a direction.

    >>> with attach_lora(model, load_organism("rank1-down-medical")) as lora:
    ...     ts = collect_scalars(model, lora, questions, answers)
    >>> X = ts.aggregate("mean")          # DataFrame [n_rows, n_adapters]
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import pandas as pd
import torch
from jaxtyping import Float, Int
from torch import Tensor
from tqdm.auto import tqdm
from transformer_lens import HookedTransformer

from emlens.chat import ChatBatch, iter_chat_batches
from emlens.lora import AttachedLora

Part = Literal["answer", "prompt", "all"]
Aggregation = Literal["mean", "max", "last", "sum"]
AGGREGATIONS: tuple[str, ...] = ("mean", "max", "last", "sum")


@dataclass(frozen=True)
class TokenScalars:
    """Per-token values (LoRA scalars, or attributions) for every real token of a set of rows.

    Attributes:
        values: ``[n_tokens, n_adapters]`` one row per real token, in row then position order.
        tokens: one row per token: ``row`` (index of the (question, answer) pair), ``position``
            (absolute, in the left-padded batch minus the padding, so 0 is the first real token),
            ``token_id``, ``token`` (decoded string), ``part`` (``"prompt"`` or ``"answer"``).
        adapters: adapter names, one per column of ``values``.
        n_rows: number of (question, answer) rows.
    """

    values: Float[Tensor, "n_tokens n_adapters"]
    tokens: pd.DataFrame
    adapters: list[str]
    n_rows: int

    def __post_init__(self) -> None:
        if self.values.ndim != 2 or self.values.shape[0] != len(self.tokens):
            raise ValueError(
                f"values has shape {tuple(self.values.shape)} but there are {len(self.tokens)} "
                "token rows; expected [n_tokens, n_adapters]."
            )
        if self.values.shape[1] != len(self.adapters):
            raise ValueError(
                f"values has {self.values.shape[1]} columns but {len(self.adapters)} adapter names."
            )

    def frame(self) -> pd.DataFrame:
        """Token metadata and one column per adapter, as one tidy-wide DataFrame."""
        vals = pd.DataFrame(self.values.float().numpy(), columns=self.adapters)
        return pd.concat([self.tokens.reset_index(drop=True), vals], axis=1)

    def _mask(self, part: Part) -> Tensor:
        if part == "all":
            return torch.ones(len(self.tokens), dtype=torch.bool)
        if part not in ("answer", "prompt"):
            raise ValueError(f"part={part!r}; expected 'answer', 'prompt' or 'all'.")
        return torch.tensor((self.tokens["part"] == part).to_numpy())

    def select(self, adapters: Sequence[str]) -> TokenScalars:
        """Only the given adapter columns (names as in :attr:`adapters`)."""
        unknown = [a for a in adapters if a not in self.adapters]
        if unknown:
            raise ValueError(f"Unknown adapters {unknown}; valid names: {self.adapters}.")
        idx = [self.adapters.index(a) for a in adapters]
        return TokenScalars(self.values[:, idx], self.tokens, list(adapters), self.n_rows)

    def row(self, row: int, part: Part = "all") -> tuple[list[str], Float[Tensor, "pos n_adapters"]]:
        """Token strings and values of one row (``part`` selects prompt/answer tokens)."""
        if not 0 <= row < self.n_rows:
            raise ValueError(f"row={row} out of range; there are {self.n_rows} rows.")
        keep = self._mask(part) & torch.tensor((self.tokens["row"] == row).to_numpy())
        return list(self.tokens["token"][keep.numpy()]), self.values[keep]

    def aggregate(
        self, how: Aggregation | Sequence[Aggregation] = "mean", *, part: Part = "answer"
    ) -> pd.DataFrame:
        """One feature row per (question, answer) row: mean, max or last-token value per adapter.

        Args:
            how: ``"mean"``, ``"max"``, ``"last"``, ``"sum"`` or a list of them. With one, columns are the
                adapter names; with several, ``"<how>:<adapter>"``.
            part: which tokens to reduce over (``"answer"`` by default).

        Returns:
            DataFrame indexed by row id, ``[n_rows, n_adapters * len(how)]``.
        """
        hows = [how] if isinstance(how, str) else list(how)
        bad = [h for h in hows if h not in AGGREGATIONS]
        if bad or not hows:
            raise ValueError(f"how={how!r}; expected one or more of {AGGREGATIONS}.")
        mask = self._mask(part)
        rows = torch.tensor(self.tokens["row"].to_numpy(), dtype=torch.long)[mask]
        vals = self.values[mask].float()
        counts = torch.bincount(rows, minlength=self.n_rows)
        empty = (counts == 0).nonzero().flatten().tolist()
        if empty:
            raise ValueError(
                f"{len(empty)} rows have no {part} tokens (e.g. row {empty[0]}); collect with "
                "answers=..., or aggregate with part='prompt' or 'all'."
            )
        n_ad = vals.shape[1]
        out: dict[str, Tensor] = {}
        for h in hows:
            if h in ("mean", "sum"):
                agg = torch.zeros(self.n_rows, n_ad).index_add_(0, rows, vals)
                agg = agg / counts[:, None] if h == "mean" else agg
            elif h == "max":
                agg = torch.full((self.n_rows, n_ad), -torch.inf).scatter_reduce_(
                    0, rows[:, None].expand_as(vals), vals, "amax"
                )
            else:  # tokens are stored in position order, so the last hit per row is its last token
                last = torch.zeros(self.n_rows, dtype=torch.long)
                last.scatter_reduce_(0, rows, torch.arange(len(rows)), "amax")
                agg = vals[last]
            for j, name in enumerate(self.adapters):
                out[name if len(hows) == 1 else f"{h}:{name}"] = agg[:, j]
        return pd.DataFrame({k: v.numpy() for k, v in out.items()}).rename_axis("row")


def check_attached(model: HookedTransformer, lora: object) -> AttachedLora:
    """Raise a clear ValueError unless ``lora`` is an :class:`AttachedLora` attached to ``model``."""
    if not isinstance(lora, AttachedLora):
        raise ValueError(
            f"Expected the handle returned by emlens.attach_lora(model, adapter), got "
            f"{type(lora).__name__}. A LoraAdapter must be attached first: "
            "`with attach_lora(model, adapter) as lora: ...`."
        )
    if not lora.attached:
        raise ValueError(
            f"{lora!r} has been removed from the model; the organism is not attached. Call this "
            "inside the `with attach_lora(...)` block, or attach it again."
        )
    if lora.model is not model:
        raise ValueError("This AttachedLora is attached to a different model than the one given.")
    return lora


def token_rows(
    batch: ChatBatch, tokenizer, row_offset: int
) -> tuple[pd.DataFrame, Int[Tensor, "batch pos"]]:
    """One table row per real (unpadded) token of ``batch``: ``row`` (``row_offset`` + its batch
    row), ``position`` from the row's first real token, ``token_id``, ``token``, ``part``
    (prompt / answer); and the ``[batch, pos]`` mask of real tokens."""
    real = batch.attention_mask.bool().cpu()
    starts = (~real).sum(-1)  # left padding width per row
    b_idx, p_idx = real.nonzero(as_tuple=True)
    ids = batch.tokens.cpu()[b_idx, p_idx]
    meta = pd.DataFrame(
        {
            "row": (b_idx + row_offset).numpy(),
            "position": (p_idx - starts[b_idx]).numpy(),
            "token_id": ids.numpy(),
            "token": tokenizer.convert_ids_to_tokens(ids.tolist()),
            "part": ["answer" if a else "prompt" for a in batch.answer_mask.cpu()[b_idx, p_idx]],
        }
    )
    return meta, real


def readable_tokens(tokens: list[str]) -> list[str]:
    """Tokens as text: byte-level BPE's "Ġ" (leading space) and "Ċ" (newline) spelled out."""
    return [t.replace("Ġ", " ").replace("Ċ", "\n") for t in tokens]


@torch.no_grad()
def join_token_scalars(chunks: list[Tensor], metas: list[pd.DataFrame], names: list[str],
                       n_rows: int) -> TokenScalars:
    """Join per-batch ``[tokens, n_adapters]`` values and their token tables."""
    tokens = pd.concat(metas, ignore_index=True)
    tokens["token"] = readable_tokens(list(tokens["token"]))
    return TokenScalars(torch.cat(chunks), tokens, names, n_rows)


def collect_scalars(
    model: HookedTransformer,
    lora: AttachedLora,
    questions: Sequence[str],
    answers: Sequence[str] | None = None,
    *,
    adapters: Sequence[str] | None = None,
    batch_size: int = 16,
    system_prompt: str | None = None,
    progress: bool = True,
) -> TokenScalars:
    """Per-token rank-1 LoRA scalars over chat-formatted (question, answer) pairs.

    Args:
        model: the HookedTransformer ``lora`` is attached to.
        lora: the :class:`AttachedLora` handle from :func:`emlens.attach_lora`.
        questions, answers: the rows (answers ``None`` for prompts only).
        adapters: adapter names or globs to keep (``lora.select`` semantics); default all.
        batch_size: rows per forward pass; results are streamed to CPU batch by batch.
        progress: show a tqdm bar.

    Returns:
        :class:`TokenScalars` over every real token (prompt and answer).
    """
    check_attached(model, lora)
    names = lora.select(adapters)  # ValueError naming the attached adapters
    rank_r = [f"{n} (rank {lora.modules[n].rank})" for n in names if lora.modules[n].rank != 1]
    if rank_r:
        raise ValueError(
            f"collect_scalars reads rank-1 scalars; {rank_r} have rank > 1 (their activation is an "
            "r-vector at <name>.hook_acts). Select rank-1 adapters with adapters=[...]."
        )
    hooks = [lora.modules[n].hook.name for n in names]
    hook_set = set(hooks)
    metas, chunks, offset = [], [], 0
    batches = iter_chat_batches(
        model.tokenizer, questions, answers, batch_size=batch_size,
        system_prompt=system_prompt, device=model.cfg.device,
    )
    n_batches = -(-len(questions) // batch_size)
    for batch in tqdm(batches, total=n_batches, disable=not progress, desc="lora scalars"):
        _, cache = model.run_with_cache(
            batch.tokens, attention_mask=batch.attention_mask, return_type=None,
            names_filter=lambda n: n in hook_set,
        )
        stacked = torch.stack([cache[h] for h in hooks], dim=-1)  # [batch, pos, n_adapters]
        meta, real = token_rows(batch, model.tokenizer, offset)
        chunks.append(stacked.cpu()[real].float())
        metas.append(meta)
        offset += len(batch)
    return join_token_scalars(chunks, metas, names, offset)


@torch.no_grad()
def residual_features(
    model: HookedTransformer,
    questions: Sequence[str],
    answers: Sequence[str],
    *,
    layer: int,
    hook: str = "resid_post",
    direction: Float[Tensor, " d_model"] | None = None,
    part: Part = "answer",
    batch_size: int = 16,
    system_prompt: str | None = None,
    progress: bool = True,
) -> Float[Tensor, "n_rows d"]:
    """Residual-stream features per row, for the same probes as the LoRA scalars.

    The activation at ``blocks.{layer}.hook_{hook}`` averaged over the ``part`` tokens of each row:
    ``[n_rows, d_model]``; with ``direction`` (any vector, or an ``emlens.Direction``), its
    projection on the unit direction: ``[n_rows, 1]``.
    """
    if not 0 <= layer < model.cfg.n_layers:
        raise ValueError(f"layer={layer} out of range; the model has {model.cfg.n_layers} layers.")
    name = f"blocks.{layer}.hook_{hook.removeprefix('hook_')}"
    if name not in model.hook_dict:
        raise ValueError(f"No hook point {name!r}; try hook='resid_post', 'resid_pre' or 'mlp_out'.")
    unit = None
    if direction is not None:
        vec = getattr(direction, "vector", direction)
        if vec.shape != (model.cfg.d_model,):
            raise ValueError(
                f"direction has shape {tuple(vec.shape)}; expected ({model.cfg.d_model},)."
            )
        unit = (vec / vec.norm()).float().cpu()
    out = []
    batches = iter_chat_batches(
        model.tokenizer, questions, answers, batch_size=batch_size,
        system_prompt=system_prompt, device=model.cfg.device,
    )
    n_batches = -(-len(questions) // batch_size)
    for batch in tqdm(batches, total=n_batches, disable=not progress, desc=f"{name}"):
        _, cache = model.run_with_cache(
            batch.tokens, attention_mask=batch.attention_mask, names_filter=name,
            stop_at_layer=layer + 1,  # nothing after the hook point is needed
        )
        mask = {"answer": batch.answer_mask, "prompt": batch.prompt_mask,
                "all": batch.attention_mask.bool()}.get(part)
        if mask is None:
            raise ValueError(f"part={part!r}; expected 'answer', 'prompt' or 'all'.")
        mask = mask.cpu().float()
        if (mask.sum(-1) == 0).any():
            raise ValueError(f"Some rows have no {part} tokens; give answers or another part.")
        acts = cache[name].float().cpu()
        means = (acts * mask[..., None]).sum(1) / mask.sum(-1, keepdim=True)
        out.append(means if unit is None else (means @ unit)[:, None])
    return torch.cat(out)


__all__ = ["AGGREGATIONS", "TokenScalars", "check_attached", "collect_scalars", "residual_features"]
