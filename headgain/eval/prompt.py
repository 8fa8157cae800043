"""The text a sample is asked with: question, options, and how to answer."""

from __future__ import annotations

from .sample import Sample

__all__ = ["prompt_text", "INSTRUCTIONS"]

#: The answer instruction appended per answer type.
INSTRUCTIONS = {
    "choice": "Answer with the option's letter from the given choices.",
    "number": "Answer with a single number.",
    "yes_no": "Answer yes or no.",
    "text": "",
}


def prompt_text(sample: Sample) -> str:
    """The question, then one ``X. text`` line per option, then the answer instruction."""
    lines = [sample.question.strip()]
    if sample.options:
        lines.append("Options:")
        lines.extend(f"{letter}. {text}" for letter, text in sample.options.items())
    instruction = INSTRUCTIONS[sample.answer_type]
    if instruction:
        lines.append(instruction)
    return "\n".join(lines)
