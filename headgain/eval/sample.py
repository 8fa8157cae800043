"""`Sample`: one benchmark question, whatever file format it came from."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

__all__ = ["Sample", "ANSWER_TYPES"]

#: How an answer is read and graded: an option letter, a number, yes/no, or free text.
ANSWER_TYPES = ("choice", "number", "yes_no", "text")


@dataclass
class Sample:
    """One question of a benchmark.

    Attributes:
        id: the sample's identifier in its benchmark (a string, unique within the file).
        images: the question's images, a sequence of RGB ``PIL.Image.Image`` (a list, or
            the `headgain.eval.images.LazyImages` that `load` gives, which decodes on each
            access); may be empty: some HallusionBench questions have no figure.
        question: the question text, without the options.
        options: option letter -> option text, in the order shown ("A", "B", ...); empty
            for open-ended questions.
        answer: the gold answer as text: an option letter for ``choice``, the number as
            written for ``number`` ("1.5", "\\frac{1}{2}"), "yes"/"no" for ``yes_no``.
        answer_type: one of `ANSWER_TYPES`.
        meta: everything else a metric or a report needs: ``category`` (per-category
            breakdowns), ``precision`` (MathVista: decimals a number is rounded to),
            HallusionBench's ``subcategory``/``set_id``/``figure_id``/``question_id``,
            ``objects`` (ground-truth objects for CHAIR), ``benchmark`` (the adapter
            that read it, set by `headgain.eval.datasets.load`), ...
    """

    id: str
    images: list = field(default_factory=list)
    question: str = ""
    options: dict[str, str] = field(default_factory=dict)
    answer: str = ""
    answer_type: str = "text"
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.answer_type not in ANSWER_TYPES:
            raise ValueError(
                f"sample {self.id!r}: answer_type {self.answer_type!r} is not one of {', '.join(ANSWER_TYPES)}"
            )
        self.id = str(self.id)
        self.answer = "" if self.answer is None else str(self.answer).strip()

    @property
    def category(self) -> str | None:
        """``meta["category"]`` as a string, or None."""
        value = self.meta.get("category")
        return None if value is None else str(value)
