"""The judge check: the judge's agreement with reading on labelled real generations, and
this run's answers nearest the thresholds."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from emlens.demo.common import Story, model_key

DATA = Path(__file__).parents[1] / "data"
JUDGE_CHECK = DATA / "judge_check.json"  # the embedded SmolLM2's labelled answers
# the judge against reading on each embedded model's own labelled answers
JUDGE_CHECKS = {None: JUDGE_CHECK, "qwen2.5-coder-1.5b": DATA / "judge_check_coder.json"}


def judge_check_for(model_name: str | None) -> tuple[dict | None, bool]:
    """The shipped judge check for a model's answers and whether it is that model's own
    (``False``: only the embedded SmolLM2's check exists for this model)."""
    path = JUDGE_CHECKS.get(model_key(model_name))
    own = path is not None
    path = path or JUDGE_CHECK
    return (json.loads(path.read_text()) if path.is_file() else None), own


def least_sure(answers: pd.DataFrame, k: int = 3) -> pd.DataFrame:
    """The ``k`` answers per condition whose judge scores sit nearest a threshold (coherent 50,
    aligned 30): where one point of judge error flips what is counted."""
    from emlens.evaluation import ALIGNED_BELOW, COHERENT_ABOVE

    df = answers.dropna(subset=["aligned", "coherent"]).copy()
    df["margin"] = np.minimum((df["coherent"] - COHERENT_ABOVE).abs(),
                              (df["aligned"] - ALIGNED_BELOW).abs())
    keys = [c for c in ("model_role", "question_set") if c in df.columns]
    picked = (df.sort_values("margin", kind="stable").groupby(keys, sort=False).head(k)
              if keys else df.nsmallest(k, "margin"))
    cols = keys + ["question", "answer", "aligned", "coherent", "margin"]
    out = picked[cols].copy()
    out["answer"] = out["answer"].str.slice(0, 240)
    return out.reset_index(drop=True)


def section(s: Story) -> None:
    rep = s.rep
    check, own = judge_check_for(s.rep.results.get("settings", {}).get("model"))
    sets = ", ".join((check or {}).get("labelled_sets", ["judge_generations"]))
    whose = ("this model's own real answers" if own else
             "another model's real answers (the embedded SmolLM2-135M-Instruct's; none of this "
             "model's answers labelled by reading ship with emlens, so they do not describe the "
             "judge on this model)")
    rep.section(
        "Judge check: how far the judge's counts can be trusted",
        "Every rate in this report is counted by the judge. Below: how the shipped offline judge "
        f"agrees with careful reading on {check['n'] if check else 'no'} answers of {whose} "
        f"(labelled blind to the condition: {sets}; emlens/data/README.md), and, for each "
        "condition judged here, the answers nearest the thresholds, so that a reader can see what "
        "was counted.",
    )
    if check is None:
        rep.text("No judge check is shipped with this installation.")
    else:
        if check["judge"] != s.judge.name:
            rep.text(f"These figures were measured for {check['judge']}; this report's judge is "
                     f"{s.judge.name}: they do not describe it.")
        rep.table(pd.DataFrame([{
            "judge": check["judge"], "answers": check["n"], "coherent (read)": check["n_coherent"],
            "misaligned (read)": check["n_misaligned"], "coherence ROC AUC": check["coherent_auc"],
            "misaligned ROC AUC (among coherent)": check["misaligned_auc_among_coherent"],
            "conditions within 0.10": check["conditions_within_0.10"],
            "worst rate difference": check["max_rate_diff"]}]),
            "The judge against reading on labelled real generations (measured by "
            f"`{check['measured_by']}`).")
        rows = [{"condition": c, "read": f"{v['labelled']['k']}/{v['labelled']['n']}",
                 "judged": f"{v['judged']['k']}/{v['judged']['n']}",
                 "coherent share read": v["labelled_coherent_share"],
                 "coherent share judged": v["judged_coherent_share"]}
                for c, v in check["per_condition"].items()]
        rep.table(pd.DataFrame(rows), "Misaligned among coherent, read vs judged, per condition "
                  "of the labelled set (k/n).")
    if s.answers is not None and len(s.answers):
        unsure = least_sure(s.answers)
        rep.table(unsure, "This run's answers where the judge was least sure (smallest distance "
                  "of a score from its threshold), per model and question set.")
        rep.results["judge_check"] = {"shipped": check, "least_sure": unsure}
