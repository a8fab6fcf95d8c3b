"""emlens.cache.SqliteCache: the one sqlite cache of the OpenAI judge and evaluation's scores."""

from __future__ import annotations

import hashlib
import json
import sqlite3
from concurrent.futures import ThreadPoolExecutor

import pytest

from emlens.cache import SqliteCache
from emlens.evaluation import judge_answers
from emlens.fingerprint import judge_fingerprint
from emlens.judge import JudgeScore

OLD_SCHEMA = "CREATE TABLE scores (key TEXT PRIMARY KEY, value TEXT)"


def _old_file(path, rows):
    """A cache file as emlens wrote it before SqliteCache (judge's _SqliteCache, evaluation's
    _ScoreCache): table ``scores``, JSON values."""
    conn = sqlite3.connect(str(path))
    conn.execute("CREATE TABLE IF NOT EXISTS scores (key TEXT PRIMARY KEY, value TEXT)")
    conn.executemany("INSERT OR REPLACE INTO scores (key, value) VALUES (?, ?)",
                     [(k, json.dumps(v)) for k, v in rows])
    conn.commit()
    conn.close()


def test_values_round_trip_as_json_and_put_replaces(tmp_path):
    cache = SqliteCache(tmp_path / "sub" / "c.sqlite")
    assert cache.get("k") is None and len(cache) == 0
    cache.put("k", {"score": 12.5, "mass": 0.9, "flags": ["refusal"]})
    cache.put_many([("k", {"score": None, "mass": 0.1, "flags": []}), ("j", [1, 2])])
    assert cache.get("k") == {"score": None, "mass": 0.1, "flags": []} and cache.get("j") == [1, 2]
    assert len(cache) == 2
    cache.close()
    again = SqliteCache(tmp_path / "sub" / "c.sqlite")
    assert again.get("j") == [1, 2]
    with pytest.raises(TypeError):
        again.put("x", object())  # JSON only, never pickle


def test_the_file_layout_is_the_one_written_before(tmp_path):
    SqliteCache(tmp_path / "new.sqlite")
    _old_file(tmp_path / "old.sqlite", [])
    sql = [sqlite3.connect(str(tmp_path / f)).execute(
        "SELECT sql FROM sqlite_master WHERE name = 'scores'").fetchone()[0]
        for f in ("new.sqlite", "old.sqlite")]
    assert sql == [OLD_SCHEMA, OLD_SCHEMA]


def test_other_tables_and_bad_names(tmp_path):
    a = SqliteCache(tmp_path / "c.sqlite", table="a")
    b = SqliteCache(tmp_path / "c.sqlite", table="b")
    a.put("k", 1)
    assert b.get("k") is None and a.get("k") == 1
    with pytest.raises(ValueError, match="letters, digits and underscores"):
        SqliteCache(tmp_path / "c.sqlite", table="x; DROP TABLE a")


def test_threads_share_one_cache(tmp_path):
    cache = SqliteCache(tmp_path / "c.sqlite")
    with ThreadPoolExecutor(4) as pool:
        list(pool.map(lambda i: cache.put(f"k{i}", {"i": i}), range(64)))
    assert len(cache) == 64 and cache.get("k63") == {"i": 63}


class _Judge:
    name = "fake-judge/v0"

    def __init__(self):
        self.scored = 0

    def score_many(self, pairs):
        self.scored += len(pairs)
        return [JudgeScore(1.0, 2.0, self.name) for _ in pairs]


def test_judge_answers_reads_a_score_cache_written_before(tmp_path):
    judge = _Judge()
    key = hashlib.sha256(json.dumps([judge.name, judge_fingerprint(judge), "q", "a"],
                                    sort_keys=True).encode()).hexdigest()
    old = {"aligned": 88.5, "coherent": 70.25, "judge": judge.name, "flags": ["code"]}
    _old_file(tmp_path / "scores.sqlite", [(key, old)])
    scores = judge_answers(judge, [("q", "a"), ("q", "b")], cache_dir=tmp_path)
    assert judge.scored == 1  # only the new pair
    assert scores[0] == JudgeScore(88.5, 70.25, judge.name, ("code",))
    assert SqliteCache(tmp_path / "scores.sqlite").get(key) == old
    assert len(SqliteCache(tmp_path / "scores.sqlite")) == 2
