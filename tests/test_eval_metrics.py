"""headgain.eval.metrics and headgain.eval.stats against hand-counted cases and brute force."""

from __future__ import annotations

import itertools
import random

import numpy as np
import pytest

from headgain.eval import metrics
from headgain.eval.stats import mcnemar, paired_bootstrap


def test_binary_hand_counted():
    pred = [True, True, False, None, True, False]
    gold = [True, False, False, True, True, True]
    # TP: 0, 4; FP: 1; FN: 3 (unread), 5; TN: 2; right: 0, 2, 4
    out = metrics.binary(pred, gold)
    assert out == pytest.approx(
        {"accuracy": 3 / 6, "precision": 2 / 3, "recall": 2 / 4, "f1": 4 / 7, "yes_ratio": 3 / 6}
    )
    none = metrics.binary([False, None], [False, False])
    assert none == {"accuracy": 0.5, "precision": 0.0, "recall": 0.0, "f1": 0.0, "yes_ratio": 0.0}


def test_weighted_f1_hand_counted():
    gold = ["A", "A", "A", "B", "B", "C"]
    pred = ["A", "A", "B", "B", "C", None]
    # A: P 1, R 2/3, F1 0.8; B: P 1/2, R 1/2, F1 0.5; C: TP 0 -> F1 0
    assert metrics.weighted_f1(pred, gold) == pytest.approx(3 / 6 * 0.8 + 2 / 6 * 0.5)
    assert metrics.weighted_f1(gold, gold) == pytest.approx(1.0)


def test_weighted_f1_against_confusion_matrix():
    rng = random.Random(3)
    labels = "ABCD"
    for _ in range(20):
        gold = [rng.choice(labels[:3]) for _ in range(37)]
        pred = [rng.choice(labels + "-") for _ in range(37)]
        pred = [None if p == "-" else p for p in pred]
        index = {c: i for i, c in enumerate(labels)}
        conf = np.zeros((4, 5))  # rows gold, columns predicted (last: unread)
        for p, g in zip(pred, gold):
            conf[index[g], 4 if p is None else index[p]] += 1
        total = 0.0
        for i in range(4):
            tp, support, predicted = conf[i, i], conf[i].sum(), conf[:, i].sum()
            if support:
                f1 = 2 * tp / (support + predicted)  # 2TP / (2TP + FP + FN)
                total += support / len(gold) * f1
        assert metrics.weighted_f1(pred, gold) == pytest.approx(total)


def _hb(category, sub, set_id, fig, q, correct):
    return dict(category=category, subcategory=sub, set_id=set_id, figure_id=fig, question_id=q, correct=correct)


def test_hallusion_groupings_hand_counted():
    records = [
        _hb("VD", "chart", 1, 0, 0, True),
        _hb("VD", "chart", 1, 0, 1, True),
        _hb("VD", "chart", 1, 1, 0, False),
        _hb("VD", "chart", 1, 1, 1, True),
        _hb("VS", "map", 1, 0, 0, True),  # same set/figure/question ids, other category: its own groups
        _hb("VD", "table", 2, 0, 0, False),
    ]
    # figures: chart/1/0 right, chart/1/1 wrong, map/1/0 right, table/2/0 wrong -> 2/4
    # questions: chart/1/q0 (fig 0 right, fig 1 wrong) wrong, chart/1/q1 right, map/1/q0 right, table/2/q0 wrong -> 2/4
    assert metrics.hallusion(records) == {"aAcc": 4 / 6, "fAcc": 2 / 4, "qAcc": 2 / 4}
    with pytest.raises(ValueError, match="figure_id"):
        metrics.hallusion([{"correct": True, "category": "VD", "subcategory": "x", "set_id": 1, "question_id": 0}])


def test_chair_hand_counted():
    synonyms = {
        "man": "person",
        "woman": "person",
        "people": "person",
        "puppy": "dog",
        "hot dog": "hot dog",
        "car": "car",
    }
    synonyms.update({"dog": "dog", "cat": "cat"})
    captions = ["A man walks a puppy.", "Two dogs and a cat near a hot dog stand.", "A red car."]
    objects = [["person", "dog"], ["dog"], []]
    assert metrics.mentioned_objects(captions[1], synonyms) == ["dog", "cat", "hot dog"]
    # hallucinated mentions: cat, hot dog (caption 2), car (caption 3) of 2 + 3 + 1 mentions
    assert metrics.chair(captions, objects, synonyms) == {"chair_s": 2 / 3, "chair_i": 3 / 6}
    assert metrics.chair(["nothing here"], [["dog"]], synonyms) == {"chair_s": 0.0, "chair_i": 0.0}


def test_accuracy_and_by_category():
    assert metrics.accuracy([True, False, True, True]) == 0.75
    with pytest.raises(ValueError, match="no samples"):
        metrics.accuracy([])
    cats = ["b", "a", None, "b"]
    got = metrics.by_category(cats, metrics.accuracy, [True, False, True, False])
    assert got == {"(none)": 1.0, "a": 0.0, "b": 0.5}
    assert list(got) == ["(none)", "a", "b"]


def _brute_force_mcnemar(fixed, broken):
    n = fixed + broken
    if n == 0:
        return 1.0
    observed = abs(fixed - n / 2)
    extreme = sum(1 for flips in itertools.product((0, 1), repeat=n) if abs(sum(flips) - n / 2) >= observed)
    return extreme / 2**n


@pytest.mark.parametrize("fixed, broken", [(0, 0), (1, 9), (3, 3), (5, 2), (0, 7), (6, 5), (12, 0)])
def test_mcnemar_exact_against_enumeration(fixed, broken):
    rng = random.Random(fixed * 31 + broken)
    pairs = [(False, True)] * fixed + [(True, False)] * broken + [(True, True)] * 4 + [(False, False)] * 3
    rng.shuffle(pairs)
    p, f, b = mcnemar([x for x, _ in pairs], [y for _, y in pairs])
    assert (f, b) == (fixed, broken)
    assert p == pytest.approx(_brute_force_mcnemar(fixed, broken), abs=1e-12)
    if (fixed, broken) == (1, 9):
        assert p == 22 / 1024


def test_paired_bootstrap_interval():
    n = 400
    base = np.zeros(n, dtype=bool)
    arm = np.arange(n) < 120  # delta 0.3
    delta = lambda idx: arm[idx].mean() - base[idx].mean()  # noqa: E731
    lo, hi = paired_bootstrap(delta, n, reps=2000, seed=1)
    half = 1.96 * np.sqrt(0.3 * 0.7 / n)  # normal approximation, about 0.045
    assert lo == pytest.approx(0.3 - half, abs=0.012) and hi == pytest.approx(0.3 + half, abs=0.012)
    assert paired_bootstrap(delta, n, reps=2000, seed=1) == (lo, hi)
    assert paired_bootstrap(delta, n, reps=2000, seed=2) != (lo, hi)
    assert paired_bootstrap(lambda idx: 0.0 * len(idx), n, reps=50) == (0.0, 0.0)
    # clusters of 10 identical outcomes: 40 independent units, an interval about sqrt(10) wider
    clustered = np.repeat(np.arange(40) < 12, 10)
    lo_c, hi_c = paired_bootstrap(lambda idx: clustered[idx].mean(), n, reps=2000, seed=1, clusters=np.arange(n) // 10)
    lo_s, hi_s = paired_bootstrap(lambda idx: clustered[idx].mean(), n, reps=2000, seed=1)
    assert 2.2 < (hi_c - lo_c) / (hi_s - lo_s) < 4.2
