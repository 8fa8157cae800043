"""Answers read off model outputs, by rules, with the rule that decided each one.

Reasoning models write long chains, so every reader first strips think blocks
(``<think>...</think>``, ``◁think▷...◁/think▷``), then prefers an explicit final answer
(``\\boxed{...}``, "the answer is ...", "Answer: ..."), then falls back on the whole
text: option letters, then option text, then the last number. Rules that fire, in the
``rule`` field of `Extraction`:

* ``boxed``, ``answer_is``, ``answer_colon``: an explicit final answer was read;
* ``letter``: an option letter in the text ("B", "(B)", "B.", "option B");
* ``option_text``: the text of an option;
* ``last_number``: the last number in the text (for choices: the option equal to it);
* ``yes_no``: the first yes/no word of a reply that starts with one, else the last;
* ``text``: the whole stripped reply (open-ended text answers);
* ``judge``: the optional judge callable;
* ``none``: nothing could be read (the value is None).
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from .sample import Sample

__all__ = [
    "Extraction",
    "strip_think",
    "final_answer",
    "choice",
    "number",
    "yes_no",
    "answer",
    "parse_number",
    "Judge",
    "load_judge",
]

#: ``judge(text, sample) -> answer or None``: a letter, a number, a bool or text, by the
#: sample's answer type (for instance a call to a grading LLM; none is built in).
Judge = Callable[[str, Sample], object]


def load_judge(spec: str) -> Judge:
    """The judge named by ``spec``, ``"module:function"`` (``module`` importable, for example
    from the working directory or PYTHONPATH; ``function`` a callable attribute, dotted for
    nested ones). Raises ValueError saying what is missing."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"judge {spec!r}: expected MODULE:FUNCTION, for example my_judges:grade")
    try:
        target = importlib.import_module(module_name)
    except ImportError as e:
        raise ValueError(f"judge {spec!r}: cannot import module {module_name!r} ({e})") from None
    for part in attr.split("."):
        if not hasattr(target, part):
            raise ValueError(f"judge {spec!r}: {module_name} has no attribute {attr!r}")
        target = getattr(target, part)
    if not callable(target):
        raise ValueError(f"judge {spec!r}: {attr} is a {type(target).__name__}, not a callable (text, sample)")
    return target


@dataclass(frozen=True)
class Extraction:
    """An answer read from a model output.

    Attributes:
        value: a letter (choice), float (number), bool (yes_no), str (text), or None.
        rule: the rule that decided (see the module docstring).
    """

    value: str | float | bool | None
    rule: str


_THINK = (
    re.compile(r"<think>.*?</think>", re.S | re.I),
    re.compile(r"◁think▷.*?◁/think▷", re.S),
)
_THINK_CLOSE = re.compile(r"</think>|◁/think▷", re.I)
_THINK_OPEN = re.compile(r"<think>|◁think▷", re.I)


def strip_think(text: str) -> str:
    """``text`` without its think blocks. A closing tag without an opening one (the chat
    template opened the block in the prompt) drops everything before it; an opening tag
    without a closing one (the output was cut off) keeps the text after the tag."""
    for pattern in _THINK:
        text = pattern.sub(" ", text)
    closes = list(_THINK_CLOSE.finditer(text))
    if closes:
        text = text[closes[-1].end() :]
    return _THINK_OPEN.sub(" ", text).strip()


def _boxed(text: str) -> str | None:
    """The content of the last ``\\boxed{...}`` (nested braces allowed), or None."""
    start = max(text.rfind("\\boxed{"), text.rfind("\\fbox{"))
    if start < 0:
        return None
    i = text.index("{", start) + 1
    depth, j = 1, i
    while j < len(text) and depth:
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        j += 1
    return text[i : j - 1] if depth == 0 else text[i:]


_ANSWER_IS = re.compile(r"\b(?:final\s+)?answer\s+(?:is|would\s+be|should\s+be)\s*:?\s*([^\n]+)", re.I)
_ANSWER_COLON = re.compile(r"\b(?:final\s+)?answer\s*\**\s*[:：]\s*\**\s*([^\n]+)", re.I)


def final_answer(text: str) -> tuple[str, str] | None:
    """``(rule, segment)`` of the explicit final answer in ``text`` (think blocks already
    stripped): the last ``\\boxed{}``, else the last "the answer is ...", else the last
    "Answer: ..." (segments run to the end of their line); None when there is none."""
    boxed = _boxed(text)
    if boxed is not None and boxed.strip():
        return "boxed", boxed.strip()
    for rule, pattern in (("answer_is", _ANSWER_IS), ("answer_colon", _ANSWER_COLON)):
        found = pattern.findall(text)
        if found and found[-1].strip():
            return rule, found[-1].strip()
    return None


# ---------------------------------------------------------------------- numbers
_NUMBER = re.compile(
    r"\\[dt]?frac\{\s*(-?\d+(?:\.\d+)?)\s*\}\{\s*(-?\d+(?:\.\d+)?)\s*\}"  # \frac{a}{b}
    r"|(-?\d+(?:\.\d+)?)\s*/\s*(\d+(?:\.\d+)?)"  # a/b
    r"|(-?\d{1,3}(?:,\d{3})+(?:\.\d+)?|-?\d+(?:\.\d+)?|-?\.\d+)"  # 1,234.5 | 12 | .5
)


def _numbers(text: str) -> list[float]:
    """Every number in ``text``, in order: fractions as their value, thousands separators
    dropped, units and signs like %, $ and ° ignored, fractions over zero skipped."""
    out = []
    for m in _NUMBER.finditer(text):
        plain = m.group(5)
        if plain is not None:
            out.append(float(plain.replace(",", "")))
            continue
        num, den = (m.group(1), m.group(2)) if m.group(1) is not None else (m.group(3), m.group(4))
        if float(den) != 0:
            out.append(float(num) / float(den))
    return out


def parse_number(text: str) -> float | None:
    """The first number in ``text`` (see `number` for what counts), or None."""
    found = _numbers(text)
    return found[0] if found else None


def _number(text: str) -> tuple[float | None, str]:
    body = strip_think(text)
    final = final_answer(body)
    if final is not None:
        value = parse_number(final[1])
        if value is not None:
            return value, final[0]
    found = _numbers(body)
    return (found[-1], "last_number") if found else (None, "none")


def number(text: str) -> float | None:
    """The numeric answer of ``text``: the first number of the explicit final answer,
    else the last number; None when there is no number."""
    return _number(text)[0]


# ---------------------------------------------------------------------- choices
def _clean(segment: str) -> str:
    segment = re.sub(r"\\text(?:bf)?\{([^}]*)\}", r"\1", segment)
    return segment.replace("**", "").replace("$", "").strip()


def _norm(text: str) -> str:
    return re.sub(r"[\s.,;:!?'\"`*$]+", " ", text.lower()).strip()


def _leading_letter(segment: str, options: Mapping[str, str]) -> str | None:
    m = re.match(r"^\s*(?:option|choice)?\s*\(?([A-Z])\)?(?=$|[\s.:,)\]])", _clean(segment))
    return m.group(1) if m and m.group(1) in options else None


def _option_text(segment: str, options: Mapping[str, str]) -> str | None:
    """The option whose text occurs last in ``segment`` (the longer text on a tie)."""
    hay = f" {_norm(segment)} "
    best, best_key = None, (-1, -1)
    for letter, option in options.items():
        needle = _norm(option)
        if not needle:
            continue
        pos = hay.rfind(f" {needle} ")
        if pos >= 0 and (pos + len(needle), len(needle)) > best_key:
            best, best_key = letter, (pos + len(needle), len(needle))
    return best


def _numeric_option(value: float, options: Mapping[str, str]) -> str | None:
    for letter, option in options.items():
        parsed = _numbers(_clean(option))
        if len(parsed) == 1 and abs(parsed[0] - value) <= 1e-9 * max(1.0, abs(value)):
            return letter
    return None


def _in_segment(segment: str, options: Mapping[str, str]) -> str | None:
    letter = _leading_letter(segment, options)
    if letter is not None:
        return letter
    letter = _option_text(segment, options)
    if letter is not None:
        return letter
    value = parse_number(_clean(segment))
    return None if value is None else _numeric_option(value, options)


_LETTER_MENTION = re.compile(r"(?:\b(?:option|choice)\s*\(?([A-Z])\)?(?![A-Za-z])|\(([A-Z])\))")


def _choice(text: str, options: Mapping[str, str]) -> tuple[str | None, str]:
    body = strip_think(text)
    final = final_answer(body)
    if final is not None:
        letter = _in_segment(final[1], options)
        if letter is not None:
            return letter, final[0]
    bare = re.fullmatch(r"\W*\(?([A-Z])\)?\W*", body)
    if bare and bare.group(1) in options:
        return bare.group(1), "letter"
    lead = re.match(r"^\s*\(?([A-Z])(?:\)|[.:](?!\w))", body)
    if lead and lead.group(1) in options:
        return lead.group(1), "letter"
    mentions = [a or b for a, b in _LETTER_MENTION.findall(body) if (a or b) in options]
    if mentions:
        return mentions[-1], "letter"
    letter = _option_text(body, options)
    if letter is not None:
        return letter, "option_text"
    found = _numbers(body)
    if found:
        letter = _numeric_option(found[-1], options)
        if letter is not None:
            return letter, "last_number"
    return None, "none"


def choice(text: str, options: Mapping[str, str]) -> str | None:
    """The option letter ``text`` answers with (a key of ``options``), or None."""
    return _choice(text, options)[0]


# ---------------------------------------------------------------------- yes / no
_YES_NO = re.compile(r"\b(yes|no)\b", re.I)


def _yes_no(text: str) -> tuple[bool | None, str]:
    body = strip_think(text)
    final = final_answer(body)
    if final is not None:
        m = _YES_NO.search(final[1])
        if m:
            return m.group(1).lower() == "yes", final[0]
    words = _YES_NO.findall(body)
    if not words:
        return None, "none"
    first = re.match(r"^\W*(yes|no)\b", body, re.I)
    word = first.group(1) if first else words[-1]
    return word.lower() == "yes", "yes_no"


def yes_no(text: str) -> bool | None:
    """True for yes, False for no, None when ``text`` says neither."""
    return _yes_no(text)[0]


def _text(text: str) -> tuple[str | None, str]:
    body = strip_think(text)
    final = final_answer(body)
    if final is not None:
        return _clean(final[1]).rstrip("."), final[0]
    return (body, "text") if body else (None, "none")


# ---------------------------------------------------------------------- dispatch
def answer(text: str, sample: Sample, judge: Judge | None = None) -> Extraction:
    """The answer of ``text`` to ``sample``, read by its ``answer_type``; when no rule
    applies and ``judge`` is given, ``judge(text, sample)`` decides (rule ``"judge"``)."""
    if sample.answer_type == "choice":
        value, rule = _choice(text, sample.options)
    elif sample.answer_type == "number":
        value, rule = _number(text)
    elif sample.answer_type == "yes_no":
        value, rule = _yes_no(text)
    else:
        value, rule = _text(text)
    if value is None and judge is not None:
        verdict = judge(text, sample)
        if verdict is not None:
            return Extraction(verdict, "judge")
    return Extraction(value, rule)
