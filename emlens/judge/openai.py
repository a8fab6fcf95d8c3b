"""The OpenAI-compatible judge: asks a chat-completions endpoint, as the EM papers do with GPT-4o.

:class:`OpenAIJudge` sends one prompt for 'aligned' and one for 'coherent' per (question, answer)
pair. The score is the probability-weighted mean of the numbers 0..100 read from the top
log-probabilities of the reply's first positions (:func:`emlens.judge.numbers.read_number`: the
first token for a judge with one token per number, as GPT-4o; the digits combined for judges whose
tokenizers split numbers); ``None`` when those numbers carry less than ``min_number_mass`` of the
probability (the judge said something else, e.g.
REFUSAL or CODE, which are reported as flags). Its built-in prompts (:data:`PROMPTS`,
:data:`PROMPT_VERSION`) are emlens's own wording; ``prompts=`` takes the papers' published YAML
prompt files instead. Requests run in parallel, are retried with exponential backoff, and fail
with :class:`~emlens.judge.base.JudgeError`; successful answers are cached on disk in an
:class:`emlens.cache.SqliteCache` (failures never are).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from emlens.cache import SqliteCache
from emlens.judge.base import JudgeError, JudgeScore, Pair, check_pairs
from emlens.judge.numbers import (
    TokenizerStyle,
    detect_style,
    first_digits,
    needs_ten,
    read_number,
    reply_number_tokens,
)
from emlens.judge.prompts import (
    ALIGNED_PROMPT,
    BUILTIN_PROMPTS_DIGEST,
    COHERENT_PROMPT,
    METRICS,
    PROMPT_VERSION,
    PROMPTS,
    PromptSet,
)


def number_score(top_logprobs: Sequence[dict[str, Any]], min_mass: float) -> tuple[float | None, float]:
    """Probability-weighted mean of the integer tokens 0..100 in one position's top-logprobs list
    (the papers' first-token reading; right only for a judge whose tokenizer has one token per
    number, see :mod:`emlens.judge.numbers`).

    Returns ``(score, mass)``: ``score`` is ``None`` when the numbers' total probability ``mass``
    is below ``min_mass``. Non-number tokens are ignored; equal number tokens add up.
    """
    reading = read_number([{"token": "", "top_logprobs": list(top_logprobs)}], style="numbers")
    return reading.expected(min_mass), reading.mass


class OpenAIJudge:
    """Judge with any OpenAI-compatible chat-completions endpoint, reading the reply's number.

    Prompts: by default emlens's own built-in prompts (:data:`PROMPTS`; emlens's wording, not the
    EM papers'), and the judge is named ``openai:<model>/emlens-v1``. ``prompts=path`` reads a
    question / judge-prompt file in the papers' published YAML format (:class:`PromptSet`); the
    judge is then named ``openai:<model>/<digest>``, so scores under different prompt sets never
    mix. Each template is sent as the single user message.

    Numbers: the reply's number is read from the top log-probabilities of its first positions
    (:func:`emlens.judge.numbers.read_number`). A judge whose tokenizer has one token per number
    (GPT-4o) is read from the first token, as the papers do. One that splits numbers into digits
    (Qwen, Gemma, Mistral, DeepSeek, Llama-3-style open-weight judges) writes "85" as "8", "5": its
    first token alone would read as 8.4. With ``digits="prefill"`` (the default) each first digit
    among the alternatives gets one more request whose reply is pre-filled with that digit (vLLM's
    ``continue_final_message``), so what follows every first digit is read, not guessed: exact up
    to the top-k cut. The first such judge call checks that the server really continues a
    pre-filled reply and raises :class:`JudgeError` naming the fixes if it does not.
    ``digits="approximate"`` makes one request only and lets the other first digits borrow the
    greedy digit's continuation: its error against the exact score is measured in the README
    ("Judging with an open-weight model") and every such score carries the flag
    ``"digits_approximate"``. Which reading applies is detected from the first position's
    alternatives (``tokenizer="auto"``), or set with ``tokenizer="digits"`` / ``"numbers"`` or by
    passing the judge's Hugging Face tokenizer.

    Args:
        model: the judge model name sent to the endpoint (e.g. ``"gpt-4o-2024-08-06"``).
        base_url: endpoint root, up to and including ``/v1``.
        api_key_env: name of the environment variable holding the API key; ``None`` for
            endpoints that need no key (local servers).
        prompts: path of a published-format YAML prompt file; ``None`` for the built-in prompts.
        cache_dir: folder for the on-disk sqlite cache (keyed by judge model, prompt set digest,
            number reading, metric, question and answer); ``None`` disables caching. Failed calls
            are never cached.
        max_concurrency: parallel requests at most.
        max_retries: attempts per request after the first, with exponential backoff.
        backoff: first backoff in seconds (doubled each retry).
        min_number_mass: below this total probability on the numbers 0..100 the score is ``None``.
        top_logprobs: how many alternatives to request per position (the API allows 20).
        timeout: per-request timeout in seconds.
        tokenizer: ``"auto"`` (detect), ``"digits"``, ``"numbers"``, or the judge model's Hugging
            Face tokenizer (its spelling of "85" decides).
        digits: how a digit-splitting judge's number is read: ``"prefill"`` (exact; up to ten
            more requests per rating, needs a server that continues pre-filled replies) or
            ``"approximate"`` (one request; measured error in the README).

    Attributes:
        name: ``openai:<model>/emlens-v1`` (built-in prompts) or ``openai:<model>/<digest>``.
        prompts_digest: 12 hex digits of SHA-256 of the prompt file's bytes, or of the built-in
            prompts (:data:`BUILTIN_PROMPTS_DIGEST`).
        prompts_path: the prompt file, or ``None`` for the built-in prompts.
        style: the number reading asked for: ``"auto"``, ``"digits"`` or ``"numbers"``.
    """

    def __init__(
        self,
        model: str,
        *,
        base_url: str = "https://api.openai.com/v1",
        api_key_env: str | None = "OPENAI_API_KEY",
        prompts: str | os.PathLike | None = None,
        cache_dir: str | os.PathLike | None = None,
        max_concurrency: int = 8,
        max_retries: int = 4,
        backoff: float = 1.0,
        min_number_mass: float = 0.25,
        top_logprobs: int = 20,
        timeout: float = 60.0,
        progress: bool = False,
        tokenizer: TokenizerStyle | Any = "auto",
        digits: str = "prefill",
    ):
        import httpx

        if not isinstance(model, str) or not model:
            raise ValueError(f"model must be a non-empty string, got {model!r}.")
        if max_concurrency < 1:
            raise ValueError(f"max_concurrency must be >= 1, got {max_concurrency}.")
        if max_retries < 0:
            raise ValueError(f"max_retries must be >= 0, got {max_retries}.")
        self.style = _tokenizer_style(tokenizer)
        if digits not in ("prefill", "approximate"):
            raise ValueError(f"digits must be 'prefill' or 'approximate', got {digits!r}.")
        self.digits = digits
        self._prefill_checked = False
        headers = {"Content-Type": "application/json"}
        if api_key_env is not None:
            key = os.environ.get(api_key_env)
            if not key:
                raise ValueError(
                    f"Environment variable {api_key_env} is not set; export it with your API key, "
                    "or pass api_key_env=None for an endpoint that needs no key."
                )
            headers["Authorization"] = f"Bearer {key}"
        self.prompt_set = PromptSet(prompts)
        self.prompts_path = self.prompt_set.path
        self.prompts_digest = self.prompt_set.digest
        self.model = model
        self.base_url = base_url.rstrip("/")
        self.max_concurrency = max_concurrency
        self.max_retries = max_retries
        self.backoff = backoff
        self.min_number_mass = min_number_mass
        self.top_logprobs = top_logprobs
        self.progress = progress
        self.name = f"openai:{model}/{self.prompt_set.version}"
        self._client = httpx.Client(
            headers=headers, timeout=timeout,
            limits=httpx.Limits(max_connections=max_concurrency),
        )
        self.cache = SqliteCache(Path(cache_dir) / "openai_judge.sqlite") if cache_dir else None

    def _key(self, metric: str, question: str, answer: str) -> str:
        # "read-v2": the number reading of emlens.judge.numbers (first-token scores of a
        # digit-splitting judge cached by earlier versions are never reused)
        blob = json.dumps([self.model, self.name, self.prompts_digest, "read-v3", self.style,
                           self.digits, metric, question, answer])
        return hashlib.sha256(blob.encode()).hexdigest()

    def templates(self, question: str) -> dict[str, str]:
        """The ``{"aligned": ..., "coherent": ...}`` templates that judge ``question``: those of
        the first prompt-file entry listing it among its paraphrases, else the first entry's (or
        the built-in prompts)."""
        return self.prompt_set.templates(question)

    def prompt(self, metric: str, question: str, answer: str) -> str:
        """The exact prompt sent to the endpoint to rate ``answer`` on ``metric``."""
        return self.prompt_set.prompt(metric, question, answer)

    def _request(self, prompt: str, prefill: str | None = None) -> list[dict[str, Any]]:
        """POST one prompt; return the reply's positions (``logprobs.content``: chosen token and
        top logprobs each). ``prefill``: the reply starts with this text and the server continues
        it (vLLM's ``continue_final_message``). Retries, then JudgeError."""
        import httpx

        url = f"{self.base_url}/chat/completions"
        messages = [{"role": "user", "content": prompt}]
        body = {
            "model": self.model,
            "messages": messages,
            # three positions hold any number up to 100 of a digit-splitting judge
            "max_tokens": 1 if self.style == "numbers" else 3,
            "temperature": 0,
            "logprobs": True,
            "top_logprobs": self.top_logprobs,
            "seed": 0,
        }
        if prefill is not None:
            messages.append({"role": "assistant", "content": prefill})
            body.update(max_tokens=2, continue_final_message=True, add_generation_prompt=False)
        last = "no attempt made"
        for attempt in range(self.max_retries + 1):
            if attempt:
                time.sleep(self.backoff * 2 ** (attempt - 1))
            try:
                resp = self._client.post(url, json=body)
            except httpx.HTTPError as e:
                last = f"{type(e).__name__}: {e}"
                continue
            if resp.status_code in (400, 401, 403, 404):
                raise JudgeError(
                    f"{url} answered HTTP {resp.status_code} ({resp.text[:200]!r}); check "
                    f"base_url, the model name {self.model!r} and the API key."
                )
            if resp.status_code != 200:
                last = f"HTTP {resp.status_code}: {resp.text[:200]!r}"
                continue
            try:
                content = resp.json()["choices"][0]["logprobs"]["content"]
                if not isinstance(content, list) or not content:
                    raise TypeError("logprobs.content is not a non-empty list")
                for position in content:
                    top = position["top_logprobs"]
                    if not isinstance(top, list) or not all(
                        isinstance(t, dict) and "token" in t and "logprob" in t for t in top
                    ):
                        raise TypeError("top_logprobs is not a list of {token, logprob}")
                    position.setdefault("token", top[0]["token"] if top else "")
                return content
            except (ValueError, KeyError, IndexError, TypeError) as e:
                last = f"unparseable response ({type(e).__name__}: {e}): {resp.text[:200]!r}"
        raise JudgeError(
            f"Judge endpoint {url} failed after {self.max_retries + 1} attempts; last error: "
            f"{last}. Expected a chat-completions response with choices[0].logprobs.content"
            "[i].top_logprobs. Check the server is up and supports logprobs."
        )

    def _continuations(self, prompt: str, content: list[dict[str, Any]]) -> dict[str, list]:
        """What follows each single first digit among the reply's alternatives, from requests
        that pre-fill the reply with it. The first time, also checks that the server continues a
        pre-filled reply (pre-filled with the greedy first token, it must answer what the reply's
        second position said), and raises JudgeError if it does not."""
        if not self._prefill_checked and len(content) >= 2:
            greedy = str(content[0]["token"])
            check = self._request(prompt, prefill=greedy)
            if not _same_position(check[0], content[1]):
                raise JudgeError(
                    f"{self.name} writes numbers digit by digit, and {self.base_url} did not "
                    f"continue a reply pre-filled with {greedy!r} (it answered "
                    f"{check[0]['token']!r} where the reply went on with {content[1]['token']!r}): "
                    "the digits after the first cannot be read. Serve the judge with vLLM (which "
                    "honours continue_final_message), or pass digits='approximate' (one request; "
                    "its error is in the README, 'Judging with an open-weight model'), or judge in "
                    "process with emlens.judge.PromptedJudge."
                )
            self._prefill_checked = True
        conts = {d: self._request(prompt, prefill=d) for d in first_digits(content)}
        if needs_ten(conts):  # "10" off the path of "1": what follows it decides 10 vs 100
            conts["10"] = self._request(prompt, prefill="10")
        return conts

    def _metric(self, metric: str, question: str, answer: str) -> dict:
        key = self._key(metric, question, answer)
        if self.cache is not None and (hit := self.cache.get(key)) is not None:
            return hit
        prompt = self.prompt(metric, question, answer)
        content = self._request(prompt)
        style = detect_style(content) if self.style == "auto" else self.style
        conts = None
        # pre-fill only where the numbers can carry a score (a REFUSAL with 1% on digits cannot)
        if (style == "digits" and self.digits == "prefill"
                and _digit_mass(content) >= self.min_number_mass):
            conts = self._continuations(prompt, content)
        try:
            reading = read_number(content, style, continuations=conts)
        except ValueError as e:
            if _digit_mass(content) >= self.min_number_mass:
                raise JudgeError(f"{self.name}: {e}") from None
            reading = None  # a word reply (REFUSAL, CODE) with too little number mass to matter
        value = None if reading is None else reading.expected(self.min_number_mass)
        top = content[0]["top_logprobs"]
        best = max(top, key=lambda t: float(t["logprob"]))["token"].strip().upper() if top else ""
        flags = []
        if reading is not None and not reading.exact:
            flags.append("digits_approximate")
        if value is None:
            flags.append("low_number_mass")
            if best.startswith("REF"):
                flags.append("refusal")
            elif best.startswith("CODE"):
                flags.append("code")
        mass = _digit_mass(content) if reading is None else reading.mass
        result = {"score": value, "mass": mass, "flags": flags, "style": style}
        if self.cache is not None:
            self.cache.put(key, result)
        return result

    def score(self, question: str, answer: str) -> JudgeScore:
        """Score one pair (two requests: aligned and coherent)."""
        return self.score_many([(question, answer)])[0]

    def score_many(self, pairs: Sequence[Pair]) -> list[JudgeScore]:
        """Score pairs, at most ``max_concurrency`` requests in flight; input order kept."""
        pairs = check_pairs(pairs)
        jobs = [(m, q, a) for q, a in pairs for m in METRICS]
        with ThreadPoolExecutor(max_workers=self.max_concurrency) as pool:
            futures = [pool.submit(self._metric, *job) for job in jobs]
            try:
                for f in tqdm(as_completed(futures), total=len(jobs),
                              desc=f"judging ({self.model})", disable=not self.progress):
                    f.result()
            except BaseException:
                for f in futures:  # stop queued requests: the batch has failed
                    f.cancel()
                raise
        results = [f.result() for f in futures]
        scores = []
        for i in range(len(pairs)):
            al, co = results[2 * i], results[2 * i + 1]
            flags = tuple(dict.fromkeys(al["flags"] + [f for f in co["flags"] if f != "low_number_mass"]))
            scores.append(JudgeScore(al["score"], co["score"], self.name, flags))
        return scores

    def close(self) -> None:
        self._client.close()


def _digit_mass(content: list[dict[str, Any]]) -> float:
    """Probability of the number tokens 0..100 at the reply's first position."""
    return read_number(content[:1], style="numbers").mass


def _same_position(a: dict[str, Any], b: dict[str, Any], tol: float = 0.1) -> bool:
    """Whether two positions agree (same chosen token, its logprob within ``tol``): how a
    pre-filled request's first position is checked against the reply's next position."""
    return (str(a["token"]) == str(b["token"])
            and abs(float(a["logprob"]) - float(b["logprob"])) <= tol)


def _tokenizer_style(tokenizer: TokenizerStyle | Any) -> str:
    """``"auto"``, ``"digits"`` or ``"numbers"`` from a style name or a Hugging Face tokenizer."""
    if isinstance(tokenizer, str):
        if tokenizer not in ("auto", "digits", "numbers"):
            raise ValueError(
                f"tokenizer must be 'auto', 'digits', 'numbers' or the judge's Hugging Face "
                f"tokenizer, got {tokenizer!r}."
            )
        return tokenizer
    if not hasattr(tokenizer, "encode"):
        raise TypeError(
            f"tokenizer must be a style name or a tokenizer with .encode, got {type(tokenizer).__name__}."
        )
    return "digits" if len(reply_number_tokens(tokenizer)[85]) > 1 else "numbers"


__all__ = [
    "ALIGNED_PROMPT",
    "BUILTIN_PROMPTS_DIGEST",
    "COHERENT_PROMPT",
    "PROMPTS",
    "PROMPT_VERSION",
    "OpenAIJudge",
    "number_score",
]
