"""Per-arm JSONL records of an evaluation run, and resuming from them.

Each arm writes ``<out>/<arm>.jsonl``, one JSON object per answered sample, flushed after
every batch, so a killed run loses at most the batch in flight. A record's ``key`` hashes
the benchmark, the sample id, the arm, its config and the generation settings: a rerun
with the same folder skips samples whose key is already there and redoes the rest.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from typing import Any

__all__ = ["record_key", "ArmStore"]


def record_key(benchmark: str, sample_id: str, arm: str, config: Mapping[str, Any] | None, generation: Mapping) -> str:
    """A 16-hex-digit key of what decides a record's content (None config: vanilla)."""
    text = json.dumps([benchmark, sample_id, arm, config, dict(generation)], sort_keys=True)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


class ArmStore:
    """The records of one arm: those already on disk (by key) and new ones appended.

    A last line cut off by a kill (not valid JSON) is dropped from the file on open.
    """

    def __init__(self, path: str):
        self.path = path
        self.records: dict[str, dict] = {}
        if os.path.exists(path):
            self._read()

    def _read(self) -> None:
        with open(self.path, "rb") as f:
            data = f.read()
        good = 0
        for line in data.splitlines(keepends=True):
            try:
                record = json.loads(line)
            except (json.JSONDecodeError, UnicodeDecodeError):
                break
            if not line.endswith(b"\n") or not isinstance(record, dict) or "key" not in record:
                break
            self.records[record["key"]] = record
            good += len(line)
        if good < len(data):
            with open(self.path, "r+b") as f:
                f.truncate(good)

    def __contains__(self, key: str) -> bool:
        return key in self.records

    def add(self, records: list[dict]) -> None:
        """Append ``records`` (each with a ``key``) and flush them to disk."""
        with open(self.path, "a", encoding="utf-8") as f:
            for record in records:
                f.write(json.dumps(record, sort_keys=True) + "\n")
                self.records[record["key"]] = record
            f.flush()
            os.fsync(f.fileno())
