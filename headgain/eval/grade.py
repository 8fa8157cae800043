"""Whether an extracted answer is right."""

from __future__ import annotations

import math
import re

from .extract import parse_number
from .sample import Sample

__all__ = ["is_correct", "normalize_text"]


def normalize_text(text: str) -> str:
    """Lower case, LaTeX ``\\text{}`` and ``$`` removed, punctuation and spaces collapsed."""
    text = re.sub(r"\\text(?:bf)?\{([^}]*)\}", r"\1", text).replace("$", "")
    return re.sub(r"[\s.,;:!?'\"`*]+", " ", text.lower()).strip()


def is_correct(value: str | float | bool | None, sample: Sample) -> bool:
    """Whether ``value`` (an `Extraction.value`) answers ``sample`` right.

    choice: the same letter. yes_no: the same truth value. number: equal after rounding
    both to ``meta["precision"]`` decimals when the sample gives one (MathVista), else
    equal within a relative 1e-6. text: equal after `normalize_text`. None is never right.
    """
    if value is None:
        return False
    if sample.answer_type == "choice":
        return str(value) == sample.answer
    if sample.answer_type == "yes_no":
        return bool(value) == (sample.answer == "yes")
    if sample.answer_type == "number":
        gold = parse_number(sample.answer)
        if gold is None or isinstance(value, bool):
            return False
        try:
            pred = float(value)
        except (TypeError, ValueError):
            return False
        precision = sample.meta.get("precision")
        if precision is not None:
            digits = int(precision)
            return round(pred, digits) == round(gold, digits)
        return math.isclose(pred, gold, rel_tol=1e-6, abs_tol=1e-9)
    return normalize_text(str(value)) == normalize_text(sample.answer)
