"""The toy processor: Qwen2.5-VL's processor with a word-level tokenizer, saved and reloaded."""

from __future__ import annotations

import torch

from headgain.toy import WEIGHTS
from headgain.toy.model import chat_prompt, prompt_batch
from headgain.toy.processor import ToyProcessor, build_processor
from headgain.toy.scenes import make_qa, make_scene, vocabulary


def _batch(processor):
    scenes = [make_scene(s, "exist") for s in (1, 2)]
    return prompt_batch(processor, scenes, [make_qa(s, "exist") for s in scenes], reasoning=5)


def test_round_trip_gives_the_same_inputs(tmp_path):
    processor = build_processor()
    processor.save_pretrained(tmp_path)
    again = ToyProcessor.from_pretrained(tmp_path, local_files_only=True)
    assert type(again.image_processor) is type(processor.image_processor)
    assert again.tokenizer.get_vocab() == processor.tokenizer.get_vocab()
    assert again.chat_template == processor.chat_template
    a, b = _batch(processor), _batch(again)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_every_word_has_its_own_id_and_decodes_back():
    tok = build_processor().tokenizer
    words = vocabulary()
    ids = tok(" ".join(words), add_special_tokens=False)["input_ids"]
    assert len(ids) == len(words) and tok.unk_token_id not in ids
    assert tok.decode(ids) == " ".join(words)


def test_prompt_layout():
    processor = build_processor()
    text = chat_prompt(processor, "is there a red circle in the image ?", "let me look")
    assert text.split() == [
        "<|im_start|>",
        "user",
        "is",
        "there",
        "a",
        "red",
        "circle",
        "in",
        "the",
        "image",
        "?",
        "<|vision_start|><|image_pad|><|vision_end|>",
        "<|im_end|>",
        "<|im_start|>",
        "assistant",
        "<think>",
        "let",
        "me",
        "look",
        "</think>",
    ]
    batch = _batch(processor)
    image_id = processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    # 112 x 112 pixels: 8 x 8 patches of 14, merged 2 x 2 into 16 visual tokens per picture
    assert (batch["input_ids"] == image_id).sum(1).tolist() == [16, 16]
    assert batch["image_grid_thw"].tolist() == [[1, 8, 8], [1, 8, 8]]
    # transformers >= 5.19 computes Qwen2.5-VL's 3-D rotary positions only when told which
    # tokens are visual: the batch says so
    assert torch.equal(batch["mm_token_type_ids"].bool(), batch["input_ids"] == image_id)


def test_the_shipped_processor_matches_a_fresh_one():
    shipped = ToyProcessor.from_pretrained(WEIGHTS, local_files_only=True)
    fresh = build_processor()
    assert shipped.tokenizer.get_vocab() == fresh.tokenizer.get_vocab()
    a, b = _batch(shipped), _batch(fresh)
    for key in a:
        assert torch.equal(a[key], b[key]), key
