"""Per-arm JSONL records of an evaluation run, and resuming from them.

Each arm writes ``<out>/<arm>.jsonl`` (each rank of a data-parallel run its own
``<arm>.rank<r>.jsonl``), one JSON object per answered sample, flushed after every
batch, so a killed run loses at most the batch in flight. A record's ``key`` hashes
the benchmark, the sample id, the arm, its config and the generation settings: a rerun
with the same folder skips samples whose key is already there and redoes the rest.
"""

from __future__ import annotations

import glob
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
    """The records of one arm in folder ``out``: those on disk (by key) and new ones.

    Records are read from ``<arm>.jsonl`` and from the shard files ``<arm>.rank<r>.jsonl``
    of a data-parallel run (any world size); new ones are appended to ``<arm>.jsonl``, or
    to this rank's shard file when ``rank`` is given. A last line cut off by a kill is
    dropped (and cut from this store's own file).
    """

    def __init__(self, out: str, arm: str, rank: int | None = None):
        self.path = os.path.join(out, f"{arm}.jsonl" if rank is None else f"{arm}.rank{rank}.jsonl")
        self.records: dict[str, dict] = {}
        shards = sorted(glob.glob(os.path.join(glob.escape(out), f"{glob.escape(arm)}.rank*.jsonl")))
        for path in [os.path.join(out, f"{arm}.jsonl"), *shards]:
            if os.path.exists(path):
                self._read(path, own=path == self.path)

    def _read(self, path: str, own: bool) -> None:
        with open(path, "rb") as f:
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
        if own and good < len(data):
            with open(path, "r+b") as f:
                f.truncate(good)

    def __contains__(self, key: str) -> bool:
        return key in self.records

    def add(self, records: list[dict]) -> None:
        """Append ``records`` (each with a ``key``; a key already present is replaced, in
        memory and, on the next read, by the later line) and flush them to disk."""
        with open(self.path, "a", encoding="utf-8") as f:
            for record in records:
                f.write(json.dumps(record, sort_keys=True) + "\n")
                self.records[record["key"]] = record
            f.flush()
            os.fsync(f.fileno())
