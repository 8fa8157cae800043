"""The paper's metrics (appendix G) and the benchmarks' own.

All functions take plain Python sequences (one entry per sample, in the same order) and
return floats in [0, 1]. An unreadable prediction (None) counts as wrong; for the binary
metrics it also counts as "not yes".
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from typing import Any

__all__ = [
    "accuracy",
    "binary",
    "weighted_f1",
    "hallusion",
    "chair",
    "by_category",
    "HALLUSION_FIGURE",
    "HALLUSION_QUESTION",
]

#: HallusionBench groupings: a figure is right when all its questions are (fAcc), a
#: question is right when it is answered right on all its figures (qAcc).
HALLUSION_FIGURE = ("category", "subcategory", "set_id", "figure_id")
HALLUSION_QUESTION = ("category", "subcategory", "set_id", "question_id")


def _check(n: int, what: str) -> None:
    if n == 0:
        raise ValueError(f"{what} of no samples is undefined")


def accuracy(correct: Sequence[bool]) -> float:
    """The share of True entries of ``correct``."""
    _check(len(correct), "accuracy")
    return sum(bool(c) for c in correct) / len(correct)


def binary(pred: Sequence[bool | None], gold: Sequence[bool]) -> dict[str, float]:
    """Yes/no metrics with "yes" (True) as the positive class.

    Returns:
        ``accuracy``, ``precision`` = TP / (TP + FP), ``recall`` = TP / (TP + FN),
        ``f1`` = 2TP / (2TP + FP + FN) (each 0 when its denominator is), and ``yes_ratio``,
        the share of *predicted* yes (POPE's bias indicator).
    """
    if len(pred) != len(gold):
        raise ValueError(f"{len(pred)} predictions for {len(gold)} gold answers")
    _check(len(gold), "binary metrics")
    tp = sum(1 for p, g in zip(pred, gold) if p is True and g)
    fp = sum(1 for p, g in zip(pred, gold) if p is True and not g)
    fn = sum(1 for p, g in zip(pred, gold) if p is not True and g)
    right = sum(1 for p, g in zip(pred, gold) if p is not None and bool(p) == bool(g))
    return {
        "accuracy": right / len(gold),
        "precision": tp / (tp + fp) if tp + fp else 0.0,
        "recall": tp / (tp + fn) if tp + fn else 0.0,
        "f1": 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0,
        "yes_ratio": (tp + fp) / len(gold),
    }


def weighted_f1(pred: Sequence[Hashable | None], gold: Sequence[Hashable]) -> float:
    """Support-weighted F1 over the gold classes (paper Eq. 29-33): the sum over classes i
    of support(i) / N * F1(i), with precision, recall and F1 of a class 0 when their
    denominator is. Predictions outside the gold classes (and None) are false negatives
    of their sample's class."""
    if len(pred) != len(gold):
        raise ValueError(f"{len(pred)} predictions for {len(gold)} gold answers")
    _check(len(gold), "weighted F1")
    total = 0.0
    for cls in sorted(set(gold), key=str):  # a fixed order: the same sum in every process
        tp = sum(1 for p, g in zip(pred, gold) if p == cls and g == cls)
        fp = sum(1 for p, g in zip(pred, gold) if p == cls and g != cls)
        support = sum(1 for g in gold if g == cls)
        precision = tp / (tp + fp) if tp + fp else 0.0
        recall = tp / support
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        total += support / len(gold) * f1
    return total


def _group_accuracy(records: Sequence[Mapping[str, Any]], keys: Sequence[str]) -> float:
    groups: dict[tuple, bool] = {}
    for r in records:
        key = tuple(str(r[k]) for k in keys)
        groups[key] = groups.get(key, True) and bool(r["correct"])
    return sum(groups.values()) / len(groups)


def hallusion(records: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    """HallusionBench's three accuracies.

    Args:
        records: one mapping per question with ``correct`` (bool) and the keys of
            `HALLUSION_FIGURE` and `HALLUSION_QUESTION` (category, subcategory, set_id,
            figure_id, question_id).

    Returns:
        ``aAcc`` (share of questions right), ``fAcc`` (share of figures with all their
        questions right), ``qAcc`` (share of questions right on all their figures).
    """
    _check(len(records), "HallusionBench accuracy")
    missing = [k for k in ("correct", *HALLUSION_FIGURE, "question_id") if k not in records[0]]
    if missing:
        raise ValueError(f"HallusionBench records need the keys {missing}")
    return {
        "aAcc": accuracy([r["correct"] for r in records]),
        "fAcc": _group_accuracy(records, HALLUSION_FIGURE),
        "qAcc": _group_accuracy(records, HALLUSION_QUESTION),
    }


def _singular(word: str) -> list[str]:
    forms = [word]
    if word.endswith("ies") and len(word) > 4:
        forms.append(word[:-3] + "y")
    if word.endswith("es") and len(word) > 3:
        forms.append(word[:-2])
    if word.endswith("s") and len(word) > 2:
        forms.append(word[:-1])
    return forms


def mentioned_objects(caption: str, synonyms: Mapping[str, str]) -> list[str]:
    """The canonical objects a caption mentions, in order, repeats kept (as CHAIR counts).

    ``synonyms`` maps a lower-case word or phrase ("man", "hot dog") to its canonical
    object name ("person", "hot dog"); canonical names map to themselves implicitly.
    Longer phrases win; a plural matches when its singular is listed ("dogs" -> "dog").
    """
    table = {k.lower(): v for k, v in synonyms.items()}
    table.update({v.lower(): v for v in synonyms.values() if v.lower() not in table})
    longest = max((len(k.split()) for k in table), default=1)
    words = re.findall(r"[a-z]+", caption.lower())
    found, i = [], 0
    while i < len(words):
        for size in range(min(longest, len(words) - i), 0, -1):
            head = " ".join(words[i : i + size - 1])
            hit = next(
                (table[p] for form in _singular(words[i + size - 1]) if (p := f"{head} {form}".strip()) in table), None
            )
            if hit is not None:
                found.append(hit)
                i += size
                break
        else:
            i += 1
    return found


def chair(captions: Sequence[str], objects: Sequence[Iterable[str]], synonyms: Mapping[str, str]) -> dict[str, float]:
    """CHAIR (Rohrbach et al. 2018) of captions against each image's ground-truth objects.

    Args:
        captions: one caption per image.
        objects: per image its ground-truth objects (canonical names, or words that
            ``synonyms`` maps to them).
        synonyms: word or phrase -> canonical object (see `mentioned_objects`).

    Returns:
        ``chair_s``: share of captions that mention at least one object absent from their
        image; ``chair_i``: hallucinated mentions / all object mentions (0 without
        mentions).
    """
    if len(captions) != len(objects):
        raise ValueError(f"{len(captions)} captions for {len(objects)} object lists")
    _check(len(captions), "CHAIR")
    table = {k.lower(): v for k, v in synonyms.items()}
    mentions = hallucinated = bad_captions = 0
    for caption, truth in zip(captions, objects):
        gold = {table.get(o.lower(), o) for o in truth}
        said = mentioned_objects(caption, synonyms)
        wrong = sum(1 for o in said if o not in gold)
        mentions += len(said)
        hallucinated += wrong
        bad_captions += wrong > 0
    return {"chair_s": bad_captions / len(captions), "chair_i": hallucinated / mentions if mentions else 0.0}


def by_category(categories: Sequence[str | None], fn: Callable[..., Any], *columns: Sequence[Any]) -> dict[str, Any]:
    """``fn`` of each category's share of ``columns``: ``{category: fn(*columns_of_category)}``,
    sorted by category name; a None category is reported as "(none)"."""
    rows: dict[str, list[int]] = defaultdict(list)
    for i, c in enumerate(categories):
        rows["(none)" if c is None else str(c)].append(i)
    return {c: fn(*[[col[i] for i in rows[c]] for col in columns]) for c in sorted(rows)}
