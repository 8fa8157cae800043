"""Synthetic inputs for the embedded tiny Qwen2.5-VL: drawn images, a byte tokenizer,
and processor outputs built without downloading a tokenizer.

The image side is the real Qwen2-VL image processor (normalised patches, grid sizes);
the text side maps bytes to ids, so prompts can be written as plain strings.
"""

from __future__ import annotations

import random

import torch
from PIL import Image, ImageDraw

from .tiny import IMAGE_ID, VIDEO_ID, VISION_END_ID, VISION_START_ID

__all__ = ["draw_image", "ByteTokenizer", "image_processor", "qwen_vl_inputs"]

_COLORS = ["red", "green", "blue", "orange", "purple", "yellow", "black", "cyan"]


def draw_image(size: tuple[int, int] = (224, 224), seed: int = 0, shapes: int = 4) -> Image.Image:
    """An RGB picture of a few coloured circles and rectangles on white (deterministic per seed)."""
    rng = random.Random(seed)
    img = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(img)
    w, h = size
    for _ in range(shapes):
        x0, y0 = rng.randrange(0, w * 3 // 4), rng.randrange(0, h * 3 // 4)
        x1, y1 = x0 + rng.randrange(w // 8, w // 3), y0 + rng.randrange(h // 8, h // 3)
        color = rng.choice(_COLORS)
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)([x0, y0, x1, y1], fill=color, outline="black")
    return img


class ByteTokenizer:
    """Bytes of UTF-8 text as ids 4..259 (0 pad, 1 bos, 2 eos); ids >= 260 decode as ``<id>``."""

    pad_token_id, bos_token_id, eos_token_id = 0, 1, 2

    def encode(self, text: str) -> list[int]:
        return [b + 4 for b in text.encode("utf-8")]

    def decode(self, ids) -> str:
        out, buf = [], bytearray()
        for i in (int(t) for t in ids):
            if 4 <= i < 260:
                buf.append(i - 4)
                continue
            if buf:
                out.append(buf.decode("utf-8", errors="replace"))
                buf = bytearray()
            if i not in (0, 1, 2):
                out.append(f"<{i}>")
        if buf:
            out.append(buf.decode("utf-8", errors="replace"))
        return "".join(out)


def image_processor(max_pixels: int = 224 * 224, min_pixels: int = 56 * 56):
    """The Qwen2-VL image processor (PIL backend where torchvision is absent)."""
    import transformers as tf

    cls = getattr(tf, "Qwen2VLImageProcessorPil", None) or tf.Qwen2VLImageProcessor
    return cls(min_pixels=min_pixels, max_pixels=max_pixels)


def qwen_vl_inputs(
    images: list,
    questions: list[str],
    *,
    max_pixels: int = 224 * 224,
    video_frames: int = 0,
    merge: int = 2,
    tokenizer: ByteTokenizer | None = None,
) -> dict[str, torch.Tensor]:
    """Left-padded Qwen2.5-VL inputs for one prompt per question.

    Args:
        images: per prompt a PIL image, a list of PIL images (several per prompt), or None.
        questions: per prompt the question text.
        max_pixels: resize bound of the image processor (sets the visual token count:
            about max_pixels / (28 * 28) tokens per image).
        video_frames: when > 0, each prompt also holds a clip of that many (even) frames of
            random normalised patches (video placeholder tokens, ``pixel_values_videos``).
        merge: the vision tower's spatial merge size.

    Returns:
        input_ids (B, N) int64, attention_mask (B, N) int64, mm_token_type_ids (B, N) int64
        (as the Qwen2.5-VL processor returns it: 0 text and padding, 1 image, 2 video
        placeholders; without it ``transformers`` >= 5.19 silently falls back to 1-D rotary
        positions), and pixel_values (P, C) / image_grid_thw (I, 3) when there are images,
        pixel_values_videos / video_grid_thw when there is video.
    """
    if len(images) != len(questions):
        raise ValueError(f"got {len(images)} image entries for {len(questions)} questions")
    tok = tokenizer or ByteTokenizer()
    proc = image_processor(max_pixels=max_pixels)
    flat, rows = [], []
    for entry in images:
        entry = [] if entry is None else entry if isinstance(entry, (list, tuple)) else [entry]
        flat.extend(entry)
        rows.append(len(entry))
    out: dict[str, torch.Tensor] = {}
    grids = []
    if flat:
        processed = proc(images=flat, return_tensors="pt")
        out["pixel_values"], out["image_grid_thw"] = processed["pixel_values"], processed["image_grid_thw"]
        grids = out["image_grid_thw"].tolist()
    video_grid = None
    if video_frames:
        if video_frames % 2:
            raise ValueError(f"video_frames must be even (temporal patch 2), got {video_frames}")
        video_grid = [video_frames // 2, 4, 4]
        patches = video_grid[0] * video_grid[1] * video_grid[2]
        generator = torch.Generator().manual_seed(0)
        out["pixel_values_videos"] = torch.randn(len(questions) * patches, 3 * 2 * 14 * 14, generator=generator)
        out["video_grid_thw"] = torch.tensor([video_grid] * len(questions))
    sequences, k = [], 0
    for count, question in zip(rows, questions):
        ids = [tok.bos_token_id]
        for t, h, w in grids[k : k + count]:
            ids += [VISION_START_ID] + [IMAGE_ID] * (t * h * w // merge**2) + [VISION_END_ID]
        k += count
        if video_grid is not None:
            t, h, w = video_grid
            ids += [VISION_START_ID] + [VIDEO_ID] * (t * h * w // merge**2) + [VISION_END_ID]
        sequences.append(ids + tok.encode(question))
    length = max(len(s) for s in sequences)
    input_ids = torch.full((len(sequences), length), tok.pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    for i, s in enumerate(sequences):
        input_ids[i, length - len(s) :] = torch.tensor(s)
        attention_mask[i, length - len(s) :] = 1
    out["input_ids"], out["attention_mask"] = input_ids, attention_mask
    out["mm_token_type_ids"] = (input_ids == IMAGE_ID).long() + 2 * (input_ids == VIDEO_ID).long()
    return out
