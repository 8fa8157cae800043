"""The toy model's processor: a word-level tokenizer and Qwen2-VL's own image processor.

`ToyProcessor` is `transformers.Qwen2_5_VLProcessor` without the video processor (which
needs torchvision): same placeholder expansion, same chat-template machinery, saved and
reloaded with ``save_pretrained`` / ``ToyProcessor.from_pretrained``.
"""

from __future__ import annotations

import transformers as tf

from .scenes import IMAGE_SIZE, vocabulary

__all__ = ["SPECIAL_TOKENS", "CHAT_TEMPLATE", "ToyProcessor", "build_processor", "build_tokenizer", "image_processor"]

SPECIAL_TOKENS = (
    "<pad>",
    "<unk>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
    "<think>",
    "</think>",
)

#: Qwen's chat layout with words separated by spaces (the tokenizer splits on whitespace).
#: An assistant message is written as is, so a reasoning prefix can be given as its start.
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|> {{ m['role'] }} "
    "{% if m['content'] is string %}{{ m['content'] }} "
    "{% else %}{% for c in m['content'] %}"
    "{% if c['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|> "
    "{% else %}{{ c['text'] }} {% endif %}{% endfor %}{% endif %}"
    "{% if not (loop.last and continue_final_message) %}<|im_end|> {% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|> assistant {% endif %}"
)


class ToyProcessor(tf.Qwen2_5_VLProcessor):
    """`Qwen2_5_VLProcessor` for images only (no video processor, so no torchvision)."""

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        super().__init__(image_processor, tokenizer, None, chat_template=chat_template, **kwargs)


def build_tokenizer() -> tf.PreTrainedTokenizerFast:
    """A word-level tokenizer over the scenes' vocabulary (special tokens first, left padding)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = [*SPECIAL_TOKENS, "user", "assistant", *vocabulary()]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens(list(SPECIAL_TOKENS))
    out = tf.PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        unk_token="<unk>",
        eos_token="<|im_end|>",
        extra_special_tokens={
            "image_token": "<|image_pad|>",
            "video_token": "<|video_pad|>",
            "vision_start_token": "<|vision_start|>",
            "vision_end_token": "<|vision_end|>",
        },
    )
    out.padding_side = "left"
    return out


def image_processor(size: int = IMAGE_SIZE):
    """Qwen2-VL's image processor (its PIL backend) fixed to ``size`` x ``size`` pictures."""
    cls = getattr(tf, "Qwen2VLImageProcessorPil", None) or tf.Qwen2VLImageProcessor
    return cls(min_pixels=size * size, max_pixels=size * size, patch_size=14, merge_size=2, temporal_patch_size=2)


def build_processor(size: int = IMAGE_SIZE) -> ToyProcessor:
    """A fresh `ToyProcessor` (tokenizer, image processor, chat template)."""
    return ToyProcessor(image_processor=image_processor(size), tokenizer=build_tokenizer(), chat_template=CHAT_TEMPLATE)
