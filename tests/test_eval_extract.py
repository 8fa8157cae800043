"""headgain.eval.extract and grading, on a table of real-looking (reasoning) model outputs."""

from __future__ import annotations

import pytest

from headgain.eval import extract
from headgain.eval.grade import is_correct
from headgain.eval.sample import Sample

OPTS = {"A": "3 cm", "B": "5 cm", "C": "a red car", "D": "car"}

CHOICE = [
    ("<think>The left one looks like A, or is it B?</think>The answer is (C).", "C", "answer_is"),
    ("◁think▷Counting the sides... maybe D◁/think▷\nAnswer: B", "B", "answer_colon"),
    ("Let me reason. The car is red.\n\nFinal answer: **D**", "D", "answer_colon"),
    ("We compute the side: 5 cm. Therefore \\boxed{B}", "B", "boxed"),
    ("Thus the final result is $\\boxed{\\text{(A)}}$.", "A", "boxed"),
    ("\\boxed{5 cm}", "B", "boxed"),  # a final given as the option's text
    ("B", "B", "letter"),
    ("(D)", "D", "letter"),
    ("C. a red car", "C", "letter"),
    ("A) because the ruler reads three", "A", "letter"),
    ("Looking at the picture, option D fits best.", "D", "letter"),
    ("It is a red car parked on the street.", "C", "option_text"),  # 'a red car' beats 'car'
    ("The segment measures 3 cm.", "A", "option_text"),
    ("A car is shown, I believe.", "D", "option_text"),  # the article 'A' is no letter
    ("The side is 5.", "B", "last_number"),
    ("I cannot tell from this image.", None, "none"),
    ("<think>It must be (B)", "B", "letter"),  # cut off inside the think block: its text is kept
]


@pytest.mark.parametrize("text, letter, rule", CHOICE)
def test_choice_table(text, letter, rule):
    sample = Sample("s", [], "q", OPTS, "C", "choice")
    found = extract.answer(text, sample)
    assert (found.value, found.rule) == (letter, rule)
    assert extract.choice(text, OPTS) == letter
    assert is_correct(found.value, sample) == (letter == "C")


NUMBER = [
    ("<think>3 + 4 = 7, then 7 * 2 = 14</think>So the answer is 14.", 14.0, "answer_is"),
    ("The total population is 1,234,567 people.", 1234567.0, "last_number"),
    ("Answer: 1,234.5 dollars", 1234.5, "answer_colon"),
    ("Step 1: 12 apples. Step 2: 3 eaten. 9 left.", 9.0, "last_number"),
    ("The answer is -2.5 m", -2.5, "answer_is"),
    ("\\boxed{\\frac{3}{4}}", 0.75, "boxed"),
    ("so x = 3/4", 0.75, "last_number"),
    ("Answer: 45%", 45.0, "answer_colon"),
    ("The angle is 30°.", 30.0, "last_number"),
    ("\\boxed{12} cm but 14 was considered", 12.0, "boxed"),
    ("It is $.5$ of the whole", 0.5, "last_number"),
    ("No idea.", None, "none"),
]


@pytest.mark.parametrize("text, value, rule", NUMBER)
def test_number_table(text, value, rule):
    sample = Sample("n", [], "q", {}, "14", "number")
    found = extract.answer(text, sample)
    assert (found.value, found.rule) == (value, rule)
    assert extract.number(text) == value


YES_NO = [
    ("No, there is no dog in the image.", False, "yes_no"),
    ("Yes.", True, "yes_no"),
    ("<think>yes? no? the bar is short</think> Answer: No", False, "answer_colon"),
    ("Looking closely, a cat sits on the mat, so yes there is a cat.", True, "yes_no"),
    ("At first glance yes, but after checking the legend the answer is no.", False, "answer_is"),
    ("I do not know", None, "none"),
    ("Nobody knows; yesterday it was there", None, "none"),  # words that only start like yes/no
]


@pytest.mark.parametrize("text, value, rule", YES_NO)
def test_yes_no_table(text, value, rule):
    sample = Sample("y", [], "q", {}, "no", "yes_no")
    found = extract.answer(text, sample)
    assert (found.value, found.rule) == (value, rule)
    assert is_correct(found.value, sample) == (value is False)


def test_strip_think_variants():
    assert extract.strip_think("<think>a</think> b <THINK>c</THINK> d").split() == ["b", "d"]
    assert extract.strip_think("reasoning the template opened</think>final") == "final"
    assert extract.strip_think("◁think▷x◁/think▷y") == "y"
    assert extract.strip_think("<think>never closed 42") == "never closed 42"


def test_text_answers_and_judge():
    sample = Sample("t", [], "q", {}, "Paris", "text")
    assert extract.answer("<think>France...</think>The answer is Paris.", sample) == extract.Extraction(
        "Paris", "answer_is"
    )
    assert extract.answer("paris", sample).rule == "text"
    assert is_correct("  PARIS. ", sample) and not is_correct("Lyon", sample)
    calls = []

    def judge(text, s):
        calls.append((text, s.id))
        return "C"

    choice = Sample("c", [], "q", OPTS, "C", "choice")
    assert extract.answer("hmm, hard to say", choice, judge) == extract.Extraction("C", "judge")
    assert extract.answer("B", choice, judge) == extract.Extraction("B", "letter")
    assert calls == [("hmm, hard to say", "c")]  # the judge only sees what rules could not read


def test_number_grading_precision_and_fractions():
    mathvista = Sample("m", [], "q", {}, "1.25", "number", {"precision": 2})
    assert is_correct(1.2500001, mathvista) and is_correct(1.249, mathvista) and not is_correct(1.244, mathvista)
    integer = Sample("i", [], "q", {}, "7", "number", {"precision": 0})
    assert is_correct(7.2, integer) and not is_correct(7.6, integer)
    frac = Sample("f", [], "q", {}, "\\frac{1}{2}", "number")
    assert is_correct(0.5, frac) and not is_correct(0.51, frac)
    thousands = Sample("k", [], "q", {}, "1,024", "number")
    assert is_correct(extract.number("about 1024 bytes"), thousands)
    assert not is_correct(None, thousands) and not is_correct(True, thousands)
