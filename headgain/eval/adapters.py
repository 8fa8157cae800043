"""Per-benchmark adapters: the fields of one row, as each benchmark's authors (or
VLMEvalKit) publish it, mapped onto a `Sample`.

An adapter takes ``(row, images, index)``: the row as a mapping of column -> value, its
images already decoded (a list of RGB PIL images) and the row's position in the file.
`detect` picks the adapter from the column names (and the file name as a tie-breaker).
"""

from __future__ import annotations

import ast
import math
import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .sample import Sample

__all__ = ["Adapter", "ADAPTERS", "detect", "SEED_DIMENSIONS"]

LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"

#: SEED-Bench's evaluation dimensions, keyed by ``question_type_id``.
SEED_DIMENSIONS = {
    1: "Scene Understanding",
    2: "Instance Identity",
    3: "Instance Attributes",
    4: "Instance Location",
    5: "Instances Counting",
    6: "Spatial Relation",
    7: "Instance Interaction",
    8: "Visual Reasoning",
    9: "Text Understanding",
    10: "Action Recognition",
    11: "Action Prediction",
    12: "Procedure Understanding",
}


@dataclass(frozen=True)
class Adapter:
    """How one benchmark's rows become samples.

    Attributes:
        name: the benchmark's name ("mathvista", ...).
        required: columns every row must have; each entry is a tuple of alternatives.
        signature: columns whose presence identifies the benchmark (all must be present).
        convert: ``(row, images, index) -> Sample``.
    """

    name: str
    required: tuple[tuple[str, ...], ...]
    signature: tuple[str, ...]
    convert: Callable[[Mapping[str, Any], list, int], Sample]

    def missing(self, columns: Sequence[str]) -> list[str]:
        """The required columns (alternatives joined by '|') absent from ``columns``."""
        have = set(columns)
        return ["|".join(alts) for alts in self.required if not have.intersection(alts)]


# ---------------------------------------------------------------------- helpers
def _blank(value: Any) -> bool:
    if value is None:
        return True
    if isinstance(value, float) and math.isnan(value):
        return True
    return isinstance(value, str) and value.strip().lower() in ("", "nan", "none")


def _get(row: Mapping[str, Any], *names: str, default: Any = None) -> Any:
    for name in names:
        if name in row and not _blank(row[name]):
            return row[name]
    return default


def _as_list(value: Any) -> list:
    """A list from a list, tuple, array or a string holding a Python/JSON list literal."""
    if _blank(value):
        return []
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("["):
            try:
                parsed = ast.literal_eval(text)
            except (ValueError, SyntaxError):
                return [value]
            return list(parsed) if isinstance(parsed, (list, tuple)) else [parsed]
        return [value]
    if hasattr(value, "tolist"):
        value = value.tolist()
    return list(value) if isinstance(value, (list, tuple)) else [value]


def _option_columns(row: Mapping[str, Any]) -> dict[str, str]:
    """Options from columns ``A``, ``B``, ... (VLMEvalKit), in order, up to the first blank one."""
    options = {}
    for letter in LETTERS:
        if letter not in row or _blank(row[letter]):
            break
        options[letter] = str(row[letter]).strip()
    return options


def _option_list(values: Sequence[Any]) -> dict[str, str]:
    return {LETTERS[i]: str(v).strip() for i, v in enumerate(values)}


def _letter_of(answer: str, options: Mapping[str, str]) -> str | None:
    """The letter of ``answer`` given as a letter ("B", "(B)") or as the option's text."""
    text = answer.strip()
    m = re.fullmatch(r"\(?([A-Z])\)?\.?", text)
    if m and m.group(1) in options:
        return m.group(1)
    for letter, option in options.items():
        if option == text:
            return letter
    for letter, option in options.items():
        if option.strip().lower() == text.lower():
            return letter
    return None


def _yes_no(value: Any) -> str:
    text = str(value).strip().lower()
    if text in ("1", "yes", "true", "y"):
        return "yes"
    if text in ("0", "no", "false", "n"):
        return "no"
    raise ValueError(f"yes/no answer expected, got {value!r}")


def _is_number(text: str) -> bool:
    try:
        float(text.replace(",", ""))
    except ValueError:
        return False
    return True


def _id(row: Mapping[str, Any], index: int, *names: str) -> str:
    value = _get(row, *names)
    return str(index) if value is None else str(value)


# ---------------------------------------------------------------------- adapters
def _mathvista(row, images, index) -> Sample:
    metadata = row.get("metadata") if isinstance(row.get("metadata"), Mapping) else {}
    choices = _as_list(row.get("choices"))
    options = _option_list(choices) if choices else _option_columns(row)
    answer = str(_get(row, "answer", default="")).strip()
    kind = str(_get(row, "answer_type", default="text")).lower()
    meta: dict[str, Any] = {
        "category": _get(row, "task", "category", default=metadata.get("task")),
        "question_type": _get(row, "question_type"),
        "mathvista_answer_type": kind,
        "unit": _get(row, "unit"),
        "skills": _as_list(_get(row, "skills", default=metadata.get("skills"))),
        "source": _get(row, "source", default=metadata.get("source")),
    }
    letter = _letter_of(answer, options) if options else None
    if letter is not None:
        answer_type, answer = "choice", letter
    elif kind in ("integer", "float"):
        answer_type = "number"
        precision = _get(row, "precision")
        meta["precision"] = 0 if kind == "integer" else int(float(precision)) if precision is not None else None
    else:
        answer_type = "text"
    question = str(_get(row, "question", default=""))
    return Sample(_id(row, index, "pid", "index"), images, question, options, answer, answer_type, meta)


def _mathvision(row, images, index) -> Sample:
    options = _option_list(_as_list(row.get("options"))) if "options" in row else {}
    options = options or _option_columns(row)
    answer = str(_get(row, "answer", default="")).strip()
    meta = {"category": _get(row, "subject", "category"), "level": _get(row, "level")}
    letter = _letter_of(answer, options) if options else None
    if letter is not None:
        answer_type, answer = "choice", letter
    else:
        answer_type = "number" if _is_number(answer) or answer.startswith("\\frac") else "text"
    question = str(_get(row, "question", default=""))
    return Sample(_id(row, index, "id", "index"), images, question, options, answer, answer_type, meta)


_MMSTAR_OPTIONS = re.compile(r"(?:^|,\s*|\n\s*)([A-F])[:.]\s*")


def _split_inline_options(question: str) -> tuple[str, dict[str, str]]:
    """MMStar writes its options inside the question: ``... \\nOptions: A: x, B: y, C: z``."""
    head, sep, tail = question.partition("Options:")
    if not sep:
        return question.strip(), {}
    parts = _MMSTAR_OPTIONS.split(tail.strip())
    letters, texts = parts[1::2], parts[2::2]
    if not letters or list(letters) != list(LETTERS[: len(letters)]):
        return question.strip(), {}
    return head.replace("Question:", "", 1).strip(), {k: v.strip().rstrip(",").strip() for k, v in zip(letters, texts)}


def _multiple_choice(category_columns: tuple[str, ...]):
    """A converter for multiple-choice benchmarks (MMStar, SEED-Bench): options from the
    ``A``.. columns, else SEED-Bench's ``choice_a``.. columns, else written inside the
    question (MMStar on the Hub); the category from the first of ``category_columns``
    present (SEED-Bench's numeric ``question_type_id`` named by `SEED_DIMENSIONS`)."""

    def convert(row, images, index) -> Sample:
        question = str(_get(row, "question", default=""))
        options = _option_columns(row)
        if not options and any(f"choice_{c}" in row for c in "abcd"):
            options = {
                c.upper(): str(row[f"choice_{c}"]).strip() for c in "abcdef" if not _blank(row.get(f"choice_{c}"))
            }
        if not options:
            question, options = _split_inline_options(question)
        answer = str(_get(row, "answer", default="")).strip()
        letter = _letter_of(answer, options)
        if letter is None:
            raise ValueError(f"row {index}: answer {answer!r} is not one of the options {list(options)}")
        category = _get(row, *category_columns)
        if "question_type_id" in category_columns and category is not None and str(category).isdigit():
            category = SEED_DIMENSIONS.get(int(category), str(category))
        meta = {"category": category}
        for extra in ("l2_category", "l2-category", "data_type"):
            if not _blank(row.get(extra)):
                meta[extra.replace("-", "_")] = row[extra]
        sid = _id(row, index, "question_id", "index", "id", "data_id")
        return Sample(sid, images, question, options, letter, "choice", meta)

    return convert


def _pope(row, images, index) -> Sample:
    meta = {"category": _get(row, "category"), "image_source": _get(row, "image_source")}
    answer = _yes_no(_get(row, "answer", default=""))
    sid = _id(row, index, "question_id", "index", "id")
    return Sample(sid, images, str(_get(row, "question", default="")), {}, answer, "yes_no", meta)


def _hallusion(row, images, index) -> Sample:
    meta = {
        "category": _get(row, "category"),
        "subcategory": _get(row, "subcategory", "l2-category", "l2_category"),
        "set_id": str(_get(row, "set_id")),
        "figure_id": str(_get(row, "figure_id")),
        "question_id": str(_get(row, "question_id")),
    }
    answer = _yes_no(_get(row, "answer", "gt_answer", default=""))
    sid = _id(row, index, "index")
    return Sample(sid, images, str(_get(row, "question", default="")), {}, answer, "yes_no", meta)


def _generic(row, images, index) -> Sample:
    raw_options = row.get("options")
    if isinstance(raw_options, Mapping):
        options = {str(k): str(v) for k, v in raw_options.items()}
    else:
        options = _option_list(_as_list(raw_options)) or _option_columns(row)
    answer = str(_get(row, "answer", default="")).strip()
    answer_type = _get(row, "answer_type")
    if answer_type is None:
        if options:
            answer_type = "choice"
        elif answer.lower() in ("yes", "no"):
            answer_type = "yes_no"
        elif _is_number(answer):
            answer_type = "number"
        else:
            answer_type = "text"
    if answer_type == "choice":
        letter = _letter_of(answer, options)
        if letter is None:
            raise ValueError(f"row {index}: answer {answer!r} is not one of the options {list(options)}")
        answer = letter
    elif answer_type == "yes_no":
        answer = _yes_no(answer)
    meta = {"category": _get(row, "category")}
    for key in ("precision", "objects", "subcategory", "set_id", "figure_id", "question_id"):
        if key in row and (isinstance(row[key], (list, tuple)) or not _blank(row[key])):
            meta[key] = row[key]
    sid = _id(row, index, "id", "index", "question_id")
    return Sample(sid, images, str(_get(row, "question", default="")), options, answer, answer_type, meta)


ADAPTERS: dict[str, Adapter] = {
    a.name: a
    for a in (
        Adapter(
            "hallusionbench",
            (("question",), ("answer", "gt_answer"), ("set_id",), ("figure_id",), ("question_id",)),
            ("set_id", "figure_id", "question_id"),
            _hallusion,
        ),
        Adapter("mathvista", (("question",), ("answer",)), ("question_type", "answer_type", "precision"), _mathvista),
        Adapter("mathvision", (("question",), ("answer",)), ("subject", "level"), _mathvision),
        Adapter(
            "seedbench",
            (("question",), ("answer",)),
            ("question_type_id",),
            _multiple_choice(("question_type_id", "category")),
        ),
        Adapter("pope", (("question",), ("answer",)), ("image_source",), _pope),
        Adapter("mmstar", (("question",), ("answer",)), ("l2_category", "meta_info"), _multiple_choice(("category",))),
        Adapter("generic", (("question",), ("answer",)), (), _generic),
    )
}

_NAME_HINTS = {
    "hallusion": "hallusionbench",
    "mathvista": "mathvista",
    "mathvision": "mathvision",
    "math_vision": "mathvision",
    "seed": "seedbench",
    "pope": "pope",
    "mmstar": "mmstar",
}


def detect(columns: Sequence[str], path: str = "") -> str:
    """The adapter name for a file with these ``columns``: a benchmark whose signature
    columns are all present, else one named in the file name (``MMStar.tsv``), else
    "generic"."""
    have = set(columns)
    for adapter in ADAPTERS.values():
        if adapter.signature and have.issuperset(adapter.signature):
            return adapter.name
    full = os.path.abspath(path) if path else ""
    tail = os.path.join(os.path.basename(os.path.dirname(full)), os.path.basename(full)) if full else ""
    lowered = re.sub(r"[^a-z_]", "", tail.lower().replace("-", "_"))
    for hint, name in _NAME_HINTS.items():
        if hint in lowered:
            return name
    return "generic"
