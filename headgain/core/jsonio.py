"""JSON in and out for headgain's files: a dataclass's JSON form (config, `ArchMap`) and
JSONL files of objects, with errors that name the file, the line and what is wrong."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any


def read_object(text_or_path: str, error: type[Exception], what: str) -> dict[str, Any]:
    """The JSON object in ``text_or_path`` (JSON text starting with ``{``, else a file path).

    Raises ``error`` naming ``what`` when the file cannot be read, the text is not JSON, or
    it holds something other than an object."""
    text = text_or_path
    if not text_or_path.lstrip().startswith("{"):
        try:
            with open(text_or_path, encoding="utf-8") as f:
                text = f.read()
        except OSError as e:
            raise error(f"cannot read {what} file {text_or_path!r}: {e.strerror}") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise error(f"{what} is not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise error(f"{what} JSON must be an object, got {type(data).__name__}")
    return data


def write_text(data: dict[str, Any], path: str | None) -> str:
    """``data`` as indented JSON with sorted keys, also written to ``path`` when given."""
    text = json.dumps(data, indent=2, sort_keys=True)
    if path is not None:
        with open(path, "w", encoding="utf-8") as f:
            f.write(text + "\n")
    return text


def jsonl_objects(path: str, error: type[Exception]) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, object) for every non-blank line of the JSONL file ``path``; raises
    ``error`` naming the line that is not JSON or not a JSON object."""
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                item = json.loads(line)
            except json.JSONDecodeError as e:
                raise error(f"{path} line {number}: not valid JSON ({e.msg})") from None
            if not isinstance(item, dict):
                raise error(f"{path} line {number}: expected a JSON object, got {type(item).__name__}")
            yield number, item
