"""Where the evaluated model comes from, and how samples become its inputs.

A *model source* is any callable returning ``(model, processor_or_None)``: the embedded
tiny model (`embedded_source`), the trained toy model (`toy_source`), a local checkpoint
(`checkpoint_source`), or your own. With a processor, prompts go through its chat
template, or through the source's ``prompt`` attribute when it has one (the toy model's
prompts open the assistant turn with a reasoning text); without one (the embedded model
has no tokenizer) they are built with `headgain.testing.synthetic.qwen_vl_inputs`
(byte-level text ids and the Qwen2-VL image processor).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence

import torch

from .prompt import prompt_text
from .sample import Sample

__all__ = ["ModelSource", "PromptFn", "embedded_source", "toy_source", "checkpoint_source", "Prompter"]

#: ``() -> (model, processor or None)``; a ``name`` attribute, when set, names the model in
#: records and ``run.json`` (and is part of every record's resume key); a ``prompt``
#: attribute (a `PromptFn`), when set, builds the prompt texts.
ModelSource = Callable[[], tuple[torch.nn.Module, object]]
#: ``(processor, sample) -> prompt text`` (images as the processor's placeholders).
PromptFn = Callable[[object, Sample], str]


def embedded_source(attn_implementation: str = "sdpa", dtype: str = "float32", device: str = "cpu") -> ModelSource:
    """The default without ``--model``: `headgain.testing.tiny.byte_model` (random weights), no processor."""

    def load():
        from ..testing.tiny import byte_model

        return byte_model(attn_implementation, getattr(torch, dtype)).to(device), None

    load.name = "embedded tiny Qwen2.5-VL (random weights)"
    return load


def toy_source(
    attn_implementation: str = "sdpa", dtype: str = "float32", device: str = "cpu", path: str | None = None
) -> ModelSource:
    """The trained toy model (the default for ``toy:`` benchmarks): the weights shipped in
    `headgain.toy`, or those trained into ``path``, with its processor and prompts
    (`headgain.toy.bench.prompt`)."""
    from ..toy import WEIGHTS
    from ..toy.bench import prompt

    def load():
        from ..toy import load as load_toy

        model, processor = load_toy(attn_implementation, getattr(torch, dtype), path or WEIGHTS)
        return model.to(device), processor

    load.name = f"toy Qwen2.5-VL ({path})" if path else "toy Qwen2.5-VL (headgain.toy, trained)"
    load.prompt = prompt
    return load


def checkpoint_source(path: str, attn_implementation: str = "sdpa", dtype: str = "auto", device: str = "cpu"):
    """A local checkpoint folder and its processor (``local_files_only``: nothing is
    downloaded), in eval mode on ``device``."""

    def load():
        import transformers as tf

        if not os.path.isdir(path):
            raise FileNotFoundError(
                f"model folder not found: {path} (a local checkpoint folder; nothing is downloaded)"
            )
        processor = tf.AutoProcessor.from_pretrained(path, local_files_only=True)
        model = tf.AutoModelForImageTextToText.from_pretrained(
            path,
            local_files_only=True,
            dtype=dtype if dtype == "auto" else getattr(torch, dtype),
            attn_implementation=attn_implementation,
        )
        return model.to(device).eval(), processor

    load.name = path
    return load


class Prompter:
    """Builds left-padded model inputs for a batch of samples and decodes generations.

    Args:
        model: the model (its first parameter's device and dtype receive the inputs).
        processor: a ``transformers`` processor with a chat template, or None for the
            embedded model's byte-level prompts.
        max_pixels: image resize bound when ``processor`` is None.
        prompt: builds each prompt text from the processor and the sample (None: the
            question, options and instruction of `prompt_text` in the chat template).
    """

    def __init__(
        self, model: torch.nn.Module, processor=None, max_pixels: int = 112 * 112, prompt: PromptFn | None = None
    ):
        self.processor, self.max_pixels, self.prompt = processor, max_pixels, prompt
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype
        if processor is None:
            from ..testing.synthetic import ByteTokenizer

            self.tokenizer = ByteTokenizer()
        else:
            self.tokenizer = getattr(processor, "tokenizer", processor)
            self.tokenizer.padding_side = "left"
            if not getattr(processor, "chat_template", None) and not getattr(self.tokenizer, "chat_template", None):
                raise ValueError("the processor has no chat template; headgain cannot place the images in the prompt")

    def texts(self, samples: Sequence[Sample]) -> list[str]:
        """The prompt of each sample as the model sees it (chat template applied when there
        is a processor)."""
        if self.processor is None:
            return [prompt_text(s) for s in samples]
        if self.prompt is not None:
            return [self.prompt(self.processor, s) for s in samples]
        return [
            self.processor.apply_chat_template(
                [
                    {
                        "role": "user",
                        "content": [{"type": "image"}] * len(s.images) + [{"type": "text", "text": prompt_text(s)}],
                    }
                ],
                add_generation_prompt=True,
                tokenize=False,
            )
            for s in samples
        ]

    def inputs(self, samples: Sequence[Sample]) -> dict[str, torch.Tensor]:
        """``input_ids`` (B, N) and ``attention_mask`` (B, N) left-padded, plus the image
        tensors, on the model's device (floating image tensors in its dtype)."""
        if self.processor is None:
            from ..testing.synthetic import qwen_vl_inputs

            batch = qwen_vl_inputs([list(s.images) for s in samples], self.texts(samples), max_pixels=self.max_pixels)
        else:
            images = [img for s in samples for img in s.images]
            batch = dict(
                self.processor(text=self.texts(samples), images=images or None, return_tensors="pt", padding=True)
            )
        return {
            k: (v.to(self.device, self.dtype) if v.is_floating_point() else v.to(self.device))
            if isinstance(v, torch.Tensor)
            else v
            for k, v in batch.items()
        }

    def decode(self, ids: torch.Tensor) -> list[str]:
        """Generated ids (B, T) int64 -> one string per row, special tokens dropped."""
        if self.processor is None:  # byte ids only: ids past the bytes are special tokens
            eos = self.tokenizer.eos_token_id
            rows = []
            for row in ids.tolist():
                row = row[: row.index(eos)] if eos in row else row
                rows.append(self.tokenizer.decode([i for i in row if 4 <= i < 260]))
            return rows
        return self.tokenizer.batch_decode(ids, skip_special_tokens=True)
