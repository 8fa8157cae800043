"""A small trained vision-language model: drawn scenes, questions, and the weights.

`load()` returns the shipped toy model (a Qwen2.5-VL trained by ``python -m
headgain.toy.train``) and its processor; `headgain.toy.scenes` draws the pictures and asks
the questions; `headgain.toy.bench` turns them into benchmark samples.
"""

from __future__ import annotations

import json
import os

import torch

__all__ = ["WEIGHTS", "load", "metrics"]

#: Folder of the shipped weights, processor and training record (``metrics.json``).
WEIGHTS = os.path.join(os.path.dirname(__file__), "weights")


def load(attn_implementation: str = "sdpa", dtype: torch.dtype = torch.float32, path: str = WEIGHTS):
    """The toy model (eval mode) and its `ToyProcessor`, read from ``path`` (the shipped weights
    by default; stored in bfloat16, returned in ``dtype``)."""
    import transformers as tf

    from .processor import ToyProcessor

    if not os.path.isfile(os.path.join(path, "config.json")):
        raise FileNotFoundError(f"no toy model in {path} (train one with python -m headgain.toy.train --out {path})")
    bar = tf.utils.logging.is_progress_bar_enabled()
    tf.utils.logging.disable_progress_bar()  # a few MB: no progress bar on stderr
    try:
        model = tf.Qwen2_5_VLForConditionalGeneration.from_pretrained(
            path, attn_implementation=attn_implementation, dtype=dtype, local_files_only=True
        )
    finally:
        if bar:
            tf.utils.logging.enable_progress_bar()
    return model.eval(), ToyProcessor.from_pretrained(path, local_files_only=True)


def metrics(path: str = WEIGHTS) -> dict:
    """The training record of the weights in ``path``: arguments, time, held-out accuracy."""
    with open(os.path.join(path, "metrics.json")) as f:
        return json.load(f)
