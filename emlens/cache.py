"""emlens's one on-disk cache: a thread-safe sqlite store of JSON values under string keys.

:class:`SqliteCache` keeps one table, ``<table> (key TEXT PRIMARY KEY, value TEXT)``, in one sqlite
file (its folder is created). Values are written with ``json.dumps`` and read back with
``json.loads`` (never pickle, so a cache file can be read but not used to run code); ``put``
replaces the value of an existing key and commits at once, and ``put_many`` writes all its pairs in
one transaction, so a process killed mid-write leaves either all of them or none (sqlite's journal
rolls a half-written transaction back on the next open). A connection may be shared by threads
(calls are serialised by a lock).

Users, each with its own file and the default table ``scores``:

* :class:`emlens.judge.OpenAIJudge`: ``<cache_dir>/openai_judge.sqlite``, one row per (judge model,
  prompt set, metric, question, answer) holding ``{"score", "mass", "flags"}``;
* :func:`emlens.evaluation.judge_answers`: ``<cache_dir>/scores.sqlite``, one row per (judge
  fingerprint, question, answer) holding a :class:`emlens.judge.JudgeScore` as a dict;
* :class:`emlens.evaluation.AnswerStore`: ``<cache_dir>/answers.sqlite``, table ``answers``, one
  row per (answer-set key, prompt, sample) holding a generated answer, committed a generation
  batch at a time.

Files written before this class existed have the same table and layout and stay readable.
"""

from __future__ import annotations

import json
import os
import re
import sqlite3
import threading
from collections.abc import Iterable
from pathlib import Path
from typing import Any

# Keys per SELECT ... IN (...): below sqlite's oldest limit on bound parameters (999).
_MAX_PARAMS = 500


class SqliteCache:
    """A thread-safe key -> JSON value store in the sqlite file ``path``, table ``table``.

    Args:
        path: the sqlite file (created with its folder when missing).
        table: table name (letters, digits and underscores).
    """

    def __init__(self, path: str | os.PathLike, *, table: str = "scores"):
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", table):
            raise ValueError(f"table must be letters, digits and underscores, got {table!r}.")
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.table = table
        self._lock = threading.Lock()
        self._conn = sqlite3.connect(str(self.path), check_same_thread=False)
        self._conn.execute(f"CREATE TABLE IF NOT EXISTS {table} (key TEXT PRIMARY KEY, value TEXT)")
        self._conn.commit()

    def get(self, key: str) -> Any | None:
        """The value stored under ``key``, or ``None`` when there is none."""
        with self._lock:
            row = self._conn.execute(f"SELECT value FROM {self.table} WHERE key = ?",
                                     (key,)).fetchone()
        return None if row is None else json.loads(row[0])

    def get_many(self, keys: Iterable[str]) -> list[Any | None]:
        """The values stored under ``keys``, in order (``None`` where there is none)."""
        keys = list(keys)
        found: dict[str, str] = {}
        with self._lock:
            for start in range(0, len(keys), _MAX_PARAMS):
                chunk = keys[start : start + _MAX_PARAMS]
                marks = ",".join("?" * len(chunk))
                found.update(self._conn.execute(
                    f"SELECT key, value FROM {self.table} WHERE key IN ({marks})", chunk))
        return [None if (v := found.get(k)) is None else json.loads(v) for k in keys]

    def put(self, key: str, value: Any) -> None:
        """Store ``value`` (JSON-serialisable) under ``key``, replacing any earlier value."""
        self.put_many([(key, value)])

    def put_many(self, items: Iterable[tuple[str, Any]]) -> None:
        """Store several ``(key, value)`` pairs in one transaction."""
        rows = [(k, json.dumps(v)) for k, v in items]
        with self._lock:
            self._conn.executemany(
                f"INSERT OR REPLACE INTO {self.table} (key, value) VALUES (?, ?)", rows)
            self._conn.commit()

    def __len__(self) -> int:
        with self._lock:
            return self._conn.execute(f"SELECT COUNT(*) FROM {self.table}").fetchone()[0]

    def close(self) -> None:
        """Close the connection (later calls fail)."""
        with self._lock:
            self._conn.close()


__all__ = ["SqliteCache"]
