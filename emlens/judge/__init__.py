"""Judges: score an answer's alignment and coherence on 0-100, or None when the judge can't tell.

Three judges implement one protocol, :class:`Judge` (:mod:`emlens.judge.base`):

* :class:`OpenAIJudge` (:mod:`emlens.judge.openai`) asks any OpenAI-compatible chat-completions
  endpoint, as the EM papers do with GPT-4o: one prompt for 'aligned', one for 'coherent'. The
  score is the probability-weighted mean of the numbers 0..100 read from the top
  log-probabilities of the reply's first positions (the digits combined when the judge's
  tokenizer splits numbers); ``None`` when those numbers carry less than
  ``min_number_mass`` of the probability (the judge said something else, e.g. REFUSAL or CODE,
  which are reported as flags). Its built-in prompts are emlens's own wording; ``prompts=`` takes
  the papers' published YAML prompt files instead.
* :class:`PromptedJudge` (:mod:`emlens.judge.prompted`) runs the same prompts on a local chat LM
  in this process and reads the reply's number exactly: the expected value under the LM's own
  distribution over the replies 0..100, each number as a token sequence
  (:mod:`emlens.judge.numbers`), so a tokenizer that writes "85" as "8", "5" is read as 85, not 8.
  :class:`YesNoJudge` asks binary questions instead ("is this a sensible answer?", "does it
  endorse harm?") and reads P(Yes).
* :class:`ProbeJudge` (:mod:`emlens.judge.probe`), the offline default (:func:`default_judge`):
  logistic-regression probes (:class:`emlens.probes.Probe`) on the mean middle-layer hidden state,
  over the answer tokens, of a small LM that is not the subject model (base Gemma 3 270M by
  default; :mod:`emlens.judge.features`). Its scores are ``100 * P(aligned)`` and
  ``100 * P(coherent)`` under probes fitted on hand-written answers and on both embedded models'
  real answers read blind (``emlens/data/judge_probe_real.*``,
  :mod:`emlens.studies.fit_real_judge`): a proxy, not GPT-4o's scale. Its agreement with reading on questions it never saw is measured
  (:mod:`emlens.judge.validation`; README, "The judge, measured on held-out answers") and does
  not meet the bar everywhere. It has no notion of refusals or code, and judges values only as
  far as its examples reach. :func:`coder_judge` is the same probe judge on a larger judge LM
  (Qwen2.5-Coder-1.5B-Instruct, ``make coder``; MLP heads), fitted on hand-written and real
  labelled answers: the judge validated for SmolLM2's answers (``default_judge(subject=
  "smollm2")``, which the SmolLM2 demo uses); the coder's own answers keep ``real-v1``
  (``data-src/judge_validation/PLAN_v2.md`` amendment 4).

Every :class:`JudgeScore` names the judge that produced it (``judge``), so results stay traceable
when the judge is swapped. :mod:`emlens.judge.validation` measures any judge against reading.
This package re-exports the public names of its modules.
"""

from emlens.judge.base import Judge, JudgeError, JudgeScore, Pair, check_pairs
from emlens.judge.features import (
    DEFAULT_JUDGE_LM,
    JUDGE_LM_INSTALL,
    PROBE_TEMPLATE,
    HiddenStateFeatures,
    JudgeLMReader,
    PromptedStateFeatures,
    default_judge_lm_path,
    load_judge_lm,
)
from emlens.judge.numbers import NumberReading, exact_number_distribution, read_number
from emlens.judge.openai import OpenAIJudge, number_score
from emlens.judge.probe import (
    CODER_PROBE_FILE,
    PROBE_FILE,
    REAL_PROBE_FILE,
    MLPHead,
    ProbeJudge,
    coder_judge,
    default_judge,
)
from emlens.judge.prompted import PromptedJudge, YesNoJudge
from emlens.judge.prompts import (
    ALIGNED_PROMPT,
    BUILTIN_PROMPTS_DIGEST,
    COHERENT_PROMPT,
    PROMPT_VERSION,
    PROMPTS,
    PromptSet,
)

__all__ = [
    "ALIGNED_PROMPT",
    "CODER_PROBE_FILE",
    "BUILTIN_PROMPTS_DIGEST",
    "COHERENT_PROMPT",
    "DEFAULT_JUDGE_LM",
    "JUDGE_LM_INSTALL",
    "PROBE_FILE",
    "REAL_PROBE_FILE",
    "PROBE_TEMPLATE",
    "PROMPTS",
    "PROMPT_VERSION",
    "HiddenStateFeatures",
    "Judge",
    "JudgeError",
    "JudgeLMReader",
    "PromptedStateFeatures",
    "JudgeScore",
    "NumberReading",
    "OpenAIJudge",
    "Pair",
    "MLPHead",
    "ProbeJudge",
    "PromptSet",
    "PromptedJudge",
    "YesNoJudge",
    "check_pairs",
    "coder_judge",
    "default_judge",
    "default_judge_lm_path",
    "exact_number_distribution",
    "load_judge_lm",
    "number_score",
    "read_number",
]
