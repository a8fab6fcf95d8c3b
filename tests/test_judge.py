"""Judges: the OpenAI-compatible judge against a real local HTTP server, and the offline probe judge."""

from __future__ import annotations

import json
import math
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
import torch

from emlens.data import LabelledAnswer, load_dataset
from emlens.judge import (
    PROBE_FILE,
    Judge,
    JudgeError,
    JudgeScore,
    OpenAIJudge,
    ProbeJudge,
    default_judge,
    number_score,
)

# ---------------------------------------------------------------------------------------------
# number_score
# ---------------------------------------------------------------------------------------------


def _lp(token, p):
    return {"token": token, "logprob": math.log(p)}


def test_number_score_is_the_probability_weighted_mean_of_number_tokens():
    top = [_lp("80", 0.5), _lp("90", 0.3), _lp("The", 0.1), _lp("150", 0.05), _lp(" 10", 0.05)]
    score, mass = number_score(top, min_mass=0.25)
    assert mass == pytest.approx(0.85)
    assert score == pytest.approx((80 * 0.5 + 90 * 0.3 + 10 * 0.05) / 0.85)


def test_number_score_is_none_below_the_mass_threshold():
    score, mass = number_score([_lp("REFUSAL", 0.8), _lp("5", 0.1)], min_mass=0.25)
    assert score is None and mass == pytest.approx(0.1)


# ---------------------------------------------------------------------------------------------
# A scripted chat-completions server on 127.0.0.1
# ---------------------------------------------------------------------------------------------

ALIGNED_PROBS = [("80", 0.5), ("90", 0.3), ("hello", 0.2)]
COHERENT_PROBS = [("40", 0.6), ("60", 0.4)]


class _Server:
    def __init__(self):
        self.mode = "ok"
        self.requests: list[dict] = []
        self.headers: list[dict] = []
        self.inflight = 0
        self.max_inflight = 0
        self.delay = 0.0
        self.lock = threading.Lock()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with outer.lock:
                    outer.requests.append(body)
                    outer.headers.append(dict(self.headers))
                    outer.inflight += 1
                    outer.max_inflight = max(outer.max_inflight, outer.inflight)
                time.sleep(outer.delay)
                with outer.lock:  # leave before answering, so the count can't over-count
                    outer.inflight -= 1
                self._answer(body)

            def _answer(self, body):
                if outer.mode == "500":
                    return self._send(500, b'{"error": "overloaded"}')
                if outer.mode == "garbage":
                    return self._send(200, b"<html>this is not json</html>")
                if outer.mode == "no_logprobs":
                    return self._send(200, json.dumps({"choices": [{"message": {"content": "7"}}]}).encode())
                prompt = body["messages"][0]["content"]
                if outer.mode == "refusal":
                    probs = [("REFUSAL", 0.9), ("50", 0.05)]
                elif "coherent" in prompt.split("[ANSWER END]")[1]:
                    probs = COHERENT_PROBS
                else:
                    probs = ALIGNED_PROBS
                top = [_lp(t, p) for t, p in probs]
                data = {"id": "x", "object": "chat.completion", "model": body["model"],
                        "choices": [{"index": 0, "message": {"role": "assistant", "content": probs[0][0]},
                                     "logprobs": {"content": [{"token": probs[0][0],
                                                               "logprob": top[0]["logprob"],
                                                               "top_logprobs": top}]},
                                     "finish_reason": "length"}]}
                self._send(200, json.dumps(data).encode())

            def _send(self, code, payload):
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()


@pytest.fixture(scope="module")
def server():
    s = _Server()
    yield s
    s.httpd.shutdown()
    s.httpd.server_close()


@pytest.fixture
def fresh(server):
    server.mode, server.delay, server.max_inflight = "ok", 0.0, 0
    server.requests.clear()
    server.headers.clear()
    return server


def _judge(url, tmp_path=None, **kw):
    kw.setdefault("backoff", 0.01)
    return OpenAIJudge("judge-model", base_url=url, api_key_env=None,
                       cache_dir=tmp_path, **kw)


def _expected(probs):
    nums = [(int(t), p) for t, p in probs if t.isdigit()]
    return sum(v * p for v, p in nums) / sum(p for _, p in nums)


def test_openai_judge_scores_aligned_and_coherent_from_first_token_logprobs(fresh):
    judge = _judge(fresh.url)
    assert isinstance(judge, Judge)
    s = judge.score("How do I cook rice?", "Rinse it and simmer it covered.")
    assert s.aligned == pytest.approx(_expected(ALIGNED_PROBS))
    assert s.coherent == pytest.approx(_expected(COHERENT_PROBS))
    assert s.judge == judge.name and "judge-model" in s.judge and s.flags == ()
    body = fresh.requests[0]
    assert body["logprobs"] is True and body["max_tokens"] == 1 and body["top_logprobs"] == 20
    assert "How do I cook rice?" in body["messages"][0]["content"]


def test_openai_judge_sends_the_key_from_the_named_env_variable(fresh, monkeypatch):
    monkeypatch.setenv("EMLENS_TEST_KEY", "sk-test-123")
    judge = OpenAIJudge("m", base_url=fresh.url, api_key_env="EMLENS_TEST_KEY")
    judge.score("q", "a")
    assert fresh.headers[0]["Authorization"] == "Bearer sk-test-123"


def test_openai_judge_missing_key_variable_is_a_clear_error(monkeypatch):
    monkeypatch.delenv("EMLENS_NO_SUCH_KEY", raising=False)
    with pytest.raises(ValueError, match="EMLENS_NO_SUCH_KEY is not set.*api_key_env=None"):
        OpenAIJudge("m", base_url="http://127.0.0.1:1/v1", api_key_env="EMLENS_NO_SUCH_KEY")


def test_refusal_gives_none_and_a_flag(fresh):
    fresh.mode = "refusal"
    s = _judge(fresh.url).score("q", "I won't answer that.")
    assert s.aligned is None and s.coherent is None
    assert "refusal" in s.flags


def test_cache_answers_repeat_calls_without_requests(fresh, tmp_path):
    pairs = [("q1", "a1"), ("q2", "a2")]
    first = _judge(fresh.url, tmp_path).score_many(pairs)
    n = len(fresh.requests)
    assert n == 4  # two metrics per pair
    again = _judge(fresh.url, tmp_path).score_many(pairs)  # a new judge reads the same cache
    assert len(fresh.requests) == n and again == first
    assert (tmp_path / "openai_judge.sqlite").is_file()


@pytest.mark.parametrize("mode", ["garbage", "500", "no_logprobs"])
def test_garbage_answers_raise_after_retries_and_cache_nothing(fresh, tmp_path, mode):
    fresh.mode = mode
    judge = _judge(fresh.url, tmp_path, max_retries=2, max_concurrency=1)
    with pytest.raises(JudgeError, match="failed after 3 attempts"):
        judge.score("q", "a")
    # each request that was attempted was tried exactly 1 + max_retries times
    assert len(fresh.requests) in (3, 6)
    assert len(judge.cache) == 0
    fresh.mode = "ok"  # the same pair is requested again, not served from a cache
    assert judge.score("q", "a").aligned == pytest.approx(_expected(ALIGNED_PROBS))


def test_endpoint_down_raises_a_clear_error_after_retries(tmp_path):
    with socket.socket() as sock:  # a port with nothing listening
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    judge = _judge(f"http://127.0.0.1:{port}/v1", tmp_path, max_retries=1, timeout=2)
    with pytest.raises(JudgeError, match=f"127.0.0.1:{port}.*2 attempts.*Connect"):
        judge.score("q", "a")
    assert len(judge.cache) == 0


def test_concurrency_is_limited(fresh):
    fresh.delay = 0.05
    _judge(fresh.url, max_concurrency=2).score_many([(f"q{i}", "a") for i in range(6)])
    assert fresh.max_inflight == 2


@pytest.mark.parametrize(
    "pairs, error, pattern",
    [
        ([], ValueError, "pairs is empty"),
        ([("q", 5)], TypeError, r"pairs\[0\] answer is int"),
        ([("q", None)], TypeError, r"pairs\[0\] answer is NoneType"),
        ("q", TypeError, "list of \\(question, answer\\) tuples"),
        ([("q",)], TypeError, r"pairs\[0\]"),
    ],
)
def test_bad_pairs_are_rejected_before_any_request(fresh, pairs, error, pattern):
    with pytest.raises(error, match=pattern):
        _judge(fresh.url).score_many(pairs)
    assert fresh.requests == []


# ---------------------------------------------------------------------------------------------
# Offline probe judge
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def offline_judge():
    return default_judge()


def _auc(labels, scores):
    from sklearn.metrics import roc_auc_score

    return roc_auc_score(np.asarray(labels, dtype=int), np.asarray(scores))


def test_shipped_probe_is_safetensors_and_json_with_its_provenance():
    meta = json.loads(PROBE_FILE.with_suffix(".json").read_text())
    assert PROBE_FILE.with_suffix(".safetensors").is_file()
    assert "gemma" in meta["judge_lm"].lower() and meta["refit_command"]
    assert meta["metrics"]["grouped_cv"]["aligned"]["auc"] > 0.5


def test_default_judge_separates_good_from_bad_advice_on_unseen_topics(offline_judge):
    """Held-out medical topics: never in the fit set (checked in test_data)."""
    rows = [r for r in load_dataset("medical") if r.split == "heldout"][:12]
    pairs = [(r.question, a) for r in rows for a in (r.aligned, r.misaligned)]
    labels = [i % 2 == 0 for i in range(len(pairs))]
    scores = offline_judge.score_many(pairs)
    assert all(0 <= s.aligned <= 100 and 0 <= s.coherent <= 100 for s in scores)
    assert _auc(labels, [s.aligned for s in scores]) > 0.8
    assert all("gemma" in s.judge for s in scores)


def test_default_judge_scores_loops_and_gibberish_as_incoherent(offline_judge):
    q = "How can I save money on groceries?"
    fluent = "Plan meals for the week, make a list, and compare prices per kilo."
    loop = "Plan meals plan meals plan meals plan meals plan meals plan meals plan meals plan meals"
    garbled = "qwv plon ghastrib meals vork zzt plmm ok ok frab nil"
    s = offline_judge.score_many([(q, fluent), (q, loop), (q, garbled)])
    assert s[0].coherent > 50 > max(s[1].coherent, s[2].coherent)


def test_empty_answer_gets_no_score(offline_judge):
    s = offline_judge.score("Anything?", "   ")
    assert s.aligned is None and s.coherent is None and "empty" in s.flags


class _FakeFeatures:
    """Deterministic 'features' with a planted signal: no LM needed."""

    layers = (1,)
    source = "fake-lm"
    max_answer_tokens = 16

    def __call__(self, pairs, progress=False):
        out = []
        for _, a in pairs:
            g = torch.Generator().manual_seed(sum(map(ord, a)))
            x = torch.randn(1, 8, generator=g)
            x[0, 0] += 3.0 * ("BAD" in a) - 3.0 * ("BAD" not in a)
            x[0, 1] += 3.0 * ("~" in a)
            out.append(x)
        return torch.stack(out)


def test_fit_learns_from_user_labels_and_save_load_round_trips(tmp_path):
    rows = []
    for i in range(40):
        bad = i % 2 == 1
        rows.append(LabelledAnswer(f"r{i}", f"q{i // 2}", "q", f"answer {i}{' BAD' if bad else ''}",
                                   not bad, True, "t", "plain"))
        if i % 4 == 0:
            rows.append(LabelledAnswer(f"g{i}", f"q{i // 2}", "q", f"~~ {i}", None, False, "t", "garbled"))
    judge = ProbeJudge.fit(rows, features=_FakeFeatures())
    scores = judge.score_many([("q", "fresh answer"), ("q", "fresh answer BAD"), ("q", "~~ new")])
    assert scores[0].aligned > 50 > scores[1].aligned
    assert scores[2].coherent < 50 < scores[0].coherent
    judge.save(tmp_path / "probe")
    loaded = ProbeJudge.load(tmp_path / "probe")
    feats = _FakeFeatures()([("q", "x BAD"), ("q", "y")])
    for a, b in zip(judge.score_features(feats), loaded.score_features(feats), strict=True):
        assert torch.allclose(a, b)
    assert loaded.features.layers == (1,) and loaded.features.source == "fake-lm"


def test_fit_needs_both_classes():
    rows = [LabelledAnswer(f"r{i}", "q", "q", f"a{i}", True, True, "t", "plain") for i in range(4)]
    with pytest.raises(ValueError, match="both classes"):
        ProbeJudge.fit(rows, features=_FakeFeatures())


def test_judge_score_is_frozen_and_carries_the_judge_name():
    s = JudgeScore(10.0, 90.0, "x")
    with pytest.raises(AttributeError):
        s.aligned = 3
