"""Shared setup for headgain's benchmarks: model shapes, synthetic batches, machine facts.

Shapes come from real configs: ``cpu-default`` is a 12-layer Qwen2.5-VL decoder small
enough for two CPU cores; ``qwen2.5-vl-7b`` is the released 7B architecture (Ocean-R1
and R1-Onevision share it) with random weights. A local checkpoint can be used instead
with `load_checkpoint`.
"""

from __future__ import annotations

import math
import os
import platform
import subprocess
from dataclasses import dataclass

import torch

__all__ = [
    "SHAPES",
    "Shape",
    "build_model",
    "synthetic_batch",
    "load_checkpoint",
    "checkpoint_batch",
    "machine",
    "extension_status",
    "cpu_model",
    "cpu_has",
    "record",
]


@dataclass(frozen=True)
class Shape:
    """A random-weight Qwen2.5-VL size, with the run defaults that suit it."""

    name: str
    text: dict
    vision: dict
    device: str
    dtype: torch.dtype
    batch: int
    visual_tokens: tuple[int, ...]
    new_tokens: int
    rounds: int


def _text(hidden, intermediate, layers, heads, kv_heads, vocab, theta, mrope):
    return dict(
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        vocab_size=vocab,
        max_position_embeddings=32768,
        rms_norm_eps=1e-6,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        rope_parameters={"rope_type": "default", "mrope_section": mrope, "rope_theta": theta},
    )


SHAPES = {
    # 12 x 16 heads over 4 KV heads, head dim 64; vocabulary of the byte tokenizer
    "cpu-default": Shape(
        name="cpu-default",
        text=_text(1024, 2048, 12, 16, 4, 320, 10000.0, [12, 10, 10]),
        vision=dict(
            depth=2,
            hidden_size=128,
            intermediate_size=256,
            num_heads=2,
            out_hidden_size=1024,
            patch_size=14,
            spatial_merge_size=2,
            temporal_patch_size=2,
            window_size=112,
            fullatt_block_indexes=[1],
        ),
        device="cpu",
        dtype=torch.float32,
        batch=4,
        visual_tokens=(256,),
        new_tokens=16,
        rounds=5,
    ),
    # Qwen2.5-VL-7B-Instruct's config.json
    "qwen2.5-vl-7b": Shape(
        name="qwen2.5-vl-7b",
        text=_text(3584, 18944, 28, 28, 4, 152064, 1000000.0, [16, 24, 24]),
        vision=dict(
            depth=32,
            hidden_size=1280,
            intermediate_size=3420,
            num_heads=16,
            out_hidden_size=3584,
            patch_size=14,
            spatial_merge_size=2,
            temporal_patch_size=2,
            window_size=112,
            fullatt_block_indexes=[7, 15, 23, 31],
            tokens_per_second=2,
            hidden_act="silu",
        ),
        device="cuda",
        dtype=torch.bfloat16,
        batch=8,
        visual_tokens=(1024,),
        new_tokens=64,
        rounds=5,
    ),
}


def build_model(shape: Shape, attn_implementation: str = "sdpa", seed: int = 0):
    """A random-weight ``Qwen2_5_VLForConditionalGeneration`` of ``shape`` on its device, in eval mode.

    Visual placeholder ids are those of `headgain.testing.tiny`, so `synthetic_batch` inputs fit.
    """
    import transformers as tf

    from headgain.testing.tiny import IMAGE_ID, VIDEO_ID, VISION_END_ID, VISION_START_ID

    if shape.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"shape {shape.name!r} needs a CUDA GPU; none is visible (torch {torch.__version__})")
    config = tf.Qwen2_5_VLConfig(
        text_config=dict(shape.text),
        vision_config=dict(shape.vision),
        image_token_id=IMAGE_ID,
        video_token_id=VIDEO_ID,
        vision_start_token_id=VISION_START_ID,
        vision_end_token_id=VISION_END_ID,
    )
    torch.manual_seed(seed)
    with torch.device(shape.device):
        model = tf.AutoModelForImageTextToText.from_config(
            config, attn_implementation=attn_implementation, dtype=shape.dtype
        )
    return model.eval()


def image_side(visual_tokens: int) -> int:
    """Pixel side of a square image that Qwen2.5-VL turns into ``visual_tokens`` tokens (28 px per token)."""
    return max(2, round(math.sqrt(visual_tokens))) * 28


def synthetic_batch(batch: int, visual_tokens: int, device="cpu", dtype=None) -> dict:
    """``batch`` prompts, each a drawn image of about ``visual_tokens`` tokens and a question."""
    from headgain.testing.synthetic import draw_image, qwen_vl_inputs

    side = image_side(visual_tokens)
    questions = [
        "How many shapes are in the picture, and which colours do they have?",
        "Which shape is the largest?",
        "Is there a red circle?",
        "Describe the picture.",
    ]
    images = [draw_image((side, side), seed=i) for i in range(batch)]
    inputs = qwen_vl_inputs(images, [questions[i % len(questions)] for i in range(batch)], max_pixels=side * side)
    return _to(inputs, device, dtype)


def load_checkpoint(path: str, attn_implementation: str = "sdpa", device: str | None = None):
    """A local checkpoint and its processor: (model, processor)."""
    import transformers as tf

    if not os.path.isdir(path) or not os.path.isfile(os.path.join(path, "config.json")):
        raise SystemExit(f"--model {path!r}: no such local checkpoint (a folder with config.json is expected)")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    processor = tf.AutoProcessor.from_pretrained(path)
    model = tf.AutoModelForImageTextToText.from_pretrained(path, dtype=dtype, attn_implementation=attn_implementation)
    return model.to(device).eval(), processor


def checkpoint_batch(processor, batch: int, visual_tokens: int, device="cpu", dtype=None) -> dict:
    """Left-padded processor inputs for ``batch`` chat prompts with a drawn image each."""
    from headgain.testing.synthetic import draw_image

    side = image_side(visual_tokens)
    questions = [
        "How many shapes are in the picture?",
        "Which shape is the largest?",
        "Is there a red circle?",
        "Describe the picture.",
    ]
    texts, images = [], []
    for i in range(batch):
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": questions[i % 4]}]}]
        texts.append(processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False))
        images.append(draw_image((side, side), seed=i))
    if getattr(processor, "tokenizer", None) is not None:
        processor.tokenizer.padding_side = "left"
    kw = {}
    if hasattr(processor, "image_processor"):
        kw["images_kwargs"] = {"max_pixels": side * side, "min_pixels": 56 * 56}
    try:
        inputs = processor(text=texts, images=images, padding=True, return_tensors="pt", **kw)
    except (TypeError, ValueError):
        inputs = processor(text=texts, images=images, padding=True, return_tensors="pt")
    return _to(dict(inputs), device, dtype)


def _to(inputs: dict, device, dtype) -> dict:
    out = {}
    for k, v in inputs.items():
        if isinstance(v, torch.Tensor):
            v = v.to(device)
            if dtype is not None and v.is_floating_point():
                v = v.to(dtype)
        out[k] = v
    return out


def machine(device: str) -> dict:
    """The hardware and software a result was measured on."""
    import transformers

    info = {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "threads": torch.get_num_threads(),
    }
    if device == "cuda" and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
        info["cuda"] = torch.version.cuda
    try:
        import headgain

        info["headgain_extension"] = headgain.extension_available(device)
    except ImportError:
        pass
    return info


def extension_status(device: str) -> str:
    """Which headgain ops run on ``device``: the compiled ones or the PyTorch reference."""
    from headgain.core import ops

    if ops.extension_available(device):
        if torch.device(device).type != "cpu":
            return "compiled headgain._C"
        if ops.extension_parallel():
            return f"compiled headgain._C (CPU kernels on {torch.get_num_threads()} threads)"
        return "compiled headgain._C (CPU kernels on one thread: built without OpenMP)"
    if ops.extension_available():
        return f"PyTorch reference ops (headgain._C has no {device} kernels)"
    return f"PyTorch reference ops (extension not built: {ops.extension_error()})"


def _cpuinfo(key: str) -> str | None:
    """The first ``key : value`` line of /proc/cpuinfo (Linux), or None."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.split(":", 1)[0].strip() == key:
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def cpu_model() -> str:
    return _cpuinfo("model name") or platform.processor() or platform.machine()


def cpu_has(flag: str) -> bool | None:
    """Whether /proc/cpuinfo lists the CPU feature ``flag`` (e.g. ``avx512_bf16``); None
    where there is no /proc/cpuinfo."""
    flags = _cpuinfo("flags")
    return None if flags is None else flag in flags.split()


def git_revision() -> str | None:
    try:
        return subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
            cwd=os.path.dirname(__file__),
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def record(path: str, section: str, entry: str) -> None:
    """Append ``entry`` at the end of ``section`` (a "## " heading) of the Markdown file
    ``path``; the file and the section are created when missing."""
    text = open(path, encoding="utf-8").read() if os.path.exists(path) else "# Benchmark results\n"
    if section not in text:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    start = text.index(section) + len(section)
    nxt = text.find("\n## ", start)
    end = len(text) if nxt < 0 else nxt + 1
    body = text[start:end].rstrip("\n") + "\n\n" + entry.rstrip("\n") + "\n"
    text = text[:start] + body + ("\n" + text[end:] if end < len(text) else "")
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
