"""Sense features for the judge: text statistics and the judge LM's likelihood of an answer."""

from __future__ import annotations

import pytest
import torch

from emlens.sense import SENSE_FEATURES, TEXT_FEATURES, SenseFeatures, text_features


def _t(answer: str) -> dict[str, float]:
    return dict(zip(TEXT_FEATURES, text_features(answer), strict=True))


def test_text_features_see_loops_soup_and_markers():
    plain = _t("Keep the same bedtime, avoid screens late, and talk to a doctor if it lasts.")
    loop = _t("the the the the the the the the the the the the the the the the")
    soup = _t("Wal! EW! ##@@ 42 ;; %% xx !! ** ?? ++ ==")
    marker = _t("Sure.<|im_end|><|im_start|>assistant")
    assert plain["distinct1"] == 1.0 and loop["distinct1"] < 0.1
    assert loop["repeat4"] > 0.9 and plain["repeat4"] == 0.0
    assert loop["gzip_ratio"] < plain["gzip_ratio"]
    assert soup["alpha_frac"] < plain["alpha_frac"]
    assert marker["marker_frac"] > 0 and plain["marker_frac"] == 0
    assert _t("")["log_words"] == 0.0


@pytest.mark.integration
def test_likelihood_features_prefer_an_answer_to_its_own_question():
    feats = SenseFeatures(max_answer_tokens=32)
    answer = "Paris is the capital of France."
    x = feats([("What is the capital of France?", answer),
               ("How do I fix a flat bicycle tyre?", answer),
               ("What is the capital of France?", "Lantern ferret purple because the Tuesday.")])
    col = {n: i for i, n in enumerate(SENSE_FEATURES)}
    assert x.shape == (3, len(SENSE_FEATURES)) and torch.isfinite(x).all()
    assert x[0, col["pmi"]] > x[1, col["pmi"]]  # the question helps predict its own answer
    assert x[0, col["lp_mean"]] > x[2, col["lp_mean"]]  # sense is likelier than word salad
    assert x[0, col["frac_unlikely"]] < x[2, col["frac_unlikely"]]


_PAIRS = [("What is the capital of France?", "Paris is the capital of France."),
          ("How do I sleep better?", "Keep a regular bedtime and avoid screens late at night."),
          ("Any advice?", "Lantern ferret purple because the Tuesday."),
          ("Say something.", "")]


@pytest.mark.integration
def test_reading_features_are_the_sense_statistics_and_hidden_means_of_one_pass():
    from emlens.judge import HiddenStateFeatures
    from emlens.sense import READING_LIKELIHOOD, ReadingFeatures

    reader = ReadingFeatures(layers=(6, 9), batch_size=4, max_answer_tokens=32)
    x = reader(_PAIRS)
    stats, hidden = reader.split(x)
    assert stats.shape == (4, len(READING_LIKELIHOOD)) and sorted(hidden) == [6, 9]
    # the float floor of the comparison: the same extractor one row at a time
    single = ReadingFeatures(layers=(6, 9), batch_size=1, max_answer_tokens=32)(_PAIRS)
    floor = (x - single).abs().max().item()
    tol = 4 * floor + 16 * torch.finfo(torch.float32).eps * x.abs().max().item()
    sense = SenseFeatures(batch_size=4, max_answer_tokens=32)(_PAIRS)
    cols = [SENSE_FEATURES.index(n) for n in READING_LIKELIHOOD]
    assert (stats - sense[:, cols]).abs().max().item() <= tol
    # the empty answer included: every extractor reads it as the one token of " "
    hid = HiddenStateFeatures(layers=(6, 9), batch_size=4, max_answer_tokens=32)(_PAIRS)
    for i, layer in enumerate((6, 9)):
        assert (hidden[layer] - hid[:, i]).abs().max().item() <= tol
    with pytest.raises(ValueError, match="out of range"):
        ReadingFeatures(layers=(99,))(_PAIRS[:1])


def test_reading_features_and_judge_lm_refuse_bad_settings():
    from emlens.judge import load_judge_lm
    from emlens.sense import ReadingFeatures

    with pytest.raises(ValueError, match="layers is empty"):
        ReadingFeatures(layers=())
    with pytest.raises(TypeError, match="floating torch.dtype"):
        load_judge_lm(None, torch.int8)
    reader = ReadingFeatures(layers=(1, 2))
    with pytest.raises(ValueError, match="do not split"):
        reader.split(torch.zeros(2, 5 + 7))
