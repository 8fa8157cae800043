"""Visual contrastive decoding (VCD), a decoding-time baseline for headgain's benchmarks.

At every step the model runs twice, once on the original inputs and once on a copy
whose image tensors carry forward-diffusion noise, each pass with its own KV cache.
The next token comes from

    logits = (1 + alpha) * l - alpha * l_cd,

restricted to the tokens whose original probability is at least ``beta`` times the
top token's (the adaptive plausibility cut). ``alpha = 0`` is plain decoding.

Written for ``transformers`` models that generate with ``GenerationMixin`` (the model's
own ``prepare_inputs_for_generation`` slices the inputs and drops the pixel tensors
after the prefill; Qwen2.5-VL's multimodal rotary positions are prepared the way
``generate`` prepares them).
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Mapping
from typing import Any

import torch

__all__ = ["generate", "diffusion_noise", "noise_schedule", "contrastive_logits", "PIXEL_KEYS"]

#: Input keys holding the processor's normalised image/video tensors (the ones VCD distorts).
PIXEL_KEYS = ("pixel_values", "pixel_values_videos")


def noise_schedule(total: int = 1000) -> torch.Tensor:
    """(total,) float64 cumulative products abar_t = prod_{s <= t} (1 - beta_s), with
    beta_t = sigmoid(linspace(-6, 6, total)) * (5e-3 - 1e-5) + 1e-5."""
    if total < 1:
        raise ValueError(f"total={total!r} must be a positive number of diffusion steps")
    betas = torch.sigmoid(torch.linspace(-6.0, 6.0, total, dtype=torch.float64)) * (5e-3 - 1e-5) + 1e-5
    return torch.cumprod(1.0 - betas, dim=0)


def diffusion_noise(
    pixel_values: torch.Tensor,
    step: int = 500,
    total: int = 1000,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Forward diffusion of the processor's normalised pixels to step ``step``.

    Args:
        pixel_values: any shape and float dtype (Qwen2.5-VL: (P, C) flattened patches).
        step: 0-based index t into the schedule, 0 <= step < total (VCD's default 500).
        total: schedule length.
        generator: draws eps ~ N(0, 1) in float32 on ``pixel_values``' device.

    Returns:
        ``sqrt(abar_t) * x + sqrt(1 - abar_t) * eps``, same shape and dtype (computed in
        float32, rounded once).
    """
    if isinstance(step, bool) or not isinstance(step, int) or not 0 <= step < total:
        raise ValueError(f"step={step!r} must be an integer with 0 <= step < total={total}")
    if not pixel_values.is_floating_point():
        raise ValueError(f"pixel_values must be a float tensor, got dtype {pixel_values.dtype}")
    abar = float(noise_schedule(total)[step])
    eps = torch.randn(pixel_values.shape, generator=generator, dtype=torch.float32, device=pixel_values.device)
    noisy = math.sqrt(abar) * pixel_values.float() + math.sqrt(1.0 - abar) * eps
    return noisy.to(pixel_values.dtype)


def contrastive_logits(
    logits: torch.Tensor, logits_distorted: torch.Tensor, alpha: float = 1.0, beta: float = 0.1
) -> torch.Tensor:
    """VCD's next-token scores.

    Args:
        logits: (B, V) scores of the original inputs.
        logits_distorted: (B, V) scores of the distorted inputs.
        alpha: contrast strength (>= 0); beta: plausibility cut in [0, 1].

    Returns:
        (B, V) float32 ``(1 + alpha) * logits - alpha * logits_distorted``, with -inf where
        ``softmax(logits) < beta * max softmax(logits)`` (compared in log space:
        ``logits - max(logits) < log(beta)``). The top original token is always kept;
        a token whose original score is -inf stays -inf.
    """
    _check_alpha_beta(alpha, beta)
    if logits.shape != logits_distorted.shape:
        raise ValueError(
            f"logits {tuple(logits.shape)} and logits_distorted {tuple(logits_distorted.shape)} "
            "must have the same shape"
        )
    base = logits.float()
    if alpha:
        out = (1.0 + alpha) * base - alpha * logits_distorted.float()
        out = out.masked_fill(torch.isneginf(base), float("-inf"))  # -inf - (-inf) would be NaN
    else:
        out = base.clone()
    if beta > 0:
        cut = base - base.max(dim=-1, keepdim=True).values < math.log(beta)
        out = out.masked_fill(cut, float("-inf"))
    return out


def _check_alpha_beta(alpha, beta) -> None:
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0 <= alpha < math.inf:
        raise ValueError(f"alpha={alpha!r} must be a finite number >= 0")
    if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not 0 <= beta <= 1:
        raise ValueError(f"beta={beta!r} must be a number in [0, 1]")


class _Branch:
    """One decoding stream (original or distorted inputs) with its own cache and kwargs."""

    def __init__(self, model, extra: dict, attention_mask, position_ids, cache_key: str):
        from transformers import DynamicCache

        self.model = model
        self.cache_key = cache_key
        self.kwargs: dict[str, Any] = dict(extra)
        self.kwargs[cache_key] = DynamicCache(config=model.config)
        self.kwargs["attention_mask"] = attention_mask
        if position_ids is not None:
            self.kwargs["position_ids"] = position_ids
        self.kwargs["use_cache"] = True
        if "logits_to_keep" in inspect.signature(model.forward).parameters:
            self.kwargs["logits_to_keep"] = 1
        self.first = True

    def step(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Run the next forward pass; (B, V) float32 logits of the last position."""
        if self.first:
            model_inputs = self.model.prepare_inputs_for_generation(input_ids, is_first_iteration=True, **self.kwargs)
        else:
            model_inputs = self.model.prepare_inputs_for_generation(input_ids, next_sequence_length=1, **self.kwargs)
        out = self.model(**model_inputs, return_dict=True)
        self.first = False
        self._advance(out)
        return out.logits[:, -1].to(dtype=torch.float32, copy=True)

    def _advance(self, out) -> None:
        kw = self.kwargs
        cache = out.get(self.cache_key)
        if cache is not None:
            kw[self.cache_key] = cache
        if kw.get("token_type_ids") is not None:
            kw["token_type_ids"] = torch.cat([kw["token_type_ids"], kw["token_type_ids"][:, -1:]], dim=-1)
        if kw.get("mm_token_type_ids") is not None:
            t = kw["mm_token_type_ids"]
            kw["mm_token_type_ids"] = torch.cat([t, t.new_zeros((t.shape[0], 1))], dim=-1)
        if kw.get("position_ids") is not None:
            p = kw["position_ids"]
            kw["position_ids"] = torch.cat([p, p[..., -1:] + 1], dim=-1)
        if kw.get("attention_mask") is not None:
            m = kw["attention_mask"]
            kw["attention_mask"] = torch.cat([m, m.new_ones((m.shape[0], 1))], dim=-1)


def _token_ids(value) -> list[int]:
    if value is None:
        return []
    if isinstance(value, torch.Tensor):
        return [int(v) for v in value.flatten().tolist()]
    if isinstance(value, int):
        return [value]
    return [int(v) for v in value]


@torch.no_grad()
def generate(
    model,
    inputs: Mapping[str, torch.Tensor],
    *,
    alpha: float = 1.0,
    beta: float = 0.1,
    noise_step: int = 500,
    max_new_tokens: int = 64,
    min_new_tokens: int | None = None,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_p: float | None = None,
    top_k: int | None = None,
    seed: int | None = None,
    eos_token_id: int | list[int] | None = None,
    pad_token_id: int | None = None,
) -> torch.LongTensor:
    """Generate with visual contrastive decoding.

    Args:
        model: a ``transformers`` vision-language model with a language-modelling head
            (for example ``Qwen2_5_VLForConditionalGeneration``), in eval mode.
        inputs: the processor's output: ``input_ids`` (B, N) int64, left-padded when
            batched, ``attention_mask`` (B, N), and ``pixel_values`` and/or
            ``pixel_values_videos`` (distorted for the second pass) plus whatever else
            the model takes (``image_grid_thw``, ``mm_token_type_ids``, ...).
        alpha: contrast strength (0 gives plain decoding); beta: plausibility cut.
        noise_step: diffusion step of the distortion (0-based, of 1000).
        max_new_tokens: at most this many new tokens; min_new_tokens: EOS is forbidden
            before this many (set both equal for a fixed length).
        do_sample: sample from softmax(scores / temperature), after optional top-k and
            top-p filtering, instead of taking the argmax.
        seed: seeds the distortion noise and the sampling (None uses torch's global RNG).
        eos_token_id: stop ids (default: ``model.generation_config.eos_token_id``);
            pad_token_id: fills finished samples (default: the generation config's, else
            the first EOS id).

    Returns:
        (B, N + T) int64: the prompt followed by T <= max_new_tokens new tokens; the
        loop stops early once every sample has produced EOS.
    """
    _check_alpha_beta(alpha, beta)
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens!r} must be a positive integer")
    min_new_tokens = 0 if min_new_tokens is None else min_new_tokens
    if not 0 <= min_new_tokens <= max_new_tokens:
        raise ValueError(f"min_new_tokens={min_new_tokens!r} must lie in [0, max_new_tokens={max_new_tokens}]")
    if do_sample and not temperature > 0:
        raise ValueError(f"temperature={temperature!r} must be > 0 when sampling")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p={top_p!r} must lie in (0, 1]")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"top_k={top_k!r} must be a positive integer")

    inputs = dict(inputs)
    if "input_ids" not in inputs:
        raise ValueError("inputs need input_ids (the processor's output)")
    if not any(inputs.get(k) is not None for k in PIXEL_KEYS):
        raise ValueError(f"VCD distorts the image: inputs need one of {', '.join(PIXEL_KEYS)}, found {sorted(inputs)}")
    device = model.device if hasattr(model, "device") else inputs["input_ids"].device
    input_ids = inputs.pop("input_ids").to(device)
    attention_mask = inputs.pop("attention_mask", None)
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    attention_mask = attention_mask.to(device)
    extra = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in inputs.items()}

    gen_cfg = getattr(model, "generation_config", None)
    eos = _token_ids(eos_token_id if eos_token_id is not None else getattr(gen_cfg, "eos_token_id", None))
    if pad_token_id is None:
        pad_token_id = getattr(gen_cfg, "pad_token_id", None)
        if pad_token_id is None and eos:
            pad_token_id = eos[0]
    if eos and pad_token_id is None:
        raise ValueError("pass pad_token_id: finished samples need a padding id")

    noise_gen = sample_gen = None
    if seed is not None:
        pixel_device = next(v.device for k, v in extra.items() if k in PIXEL_KEYS and v is not None)
        noise_gen = torch.Generator(device=pixel_device).manual_seed(seed)
        sample_gen = torch.Generator(device=device).manual_seed(seed + 1)
    distorted = dict(extra)
    for key in PIXEL_KEYS:
        if distorted.get(key) is not None:
            distorted[key] = diffusion_noise(distorted[key], noise_step, generator=noise_gen)

    # positions the way generate() prepares them (Qwen2.5-VL: text + 3-D rotary rows)
    position_ids = None
    if "position_ids" in inspect.signature(model.forward).parameters and hasattr(
        model, "_prepare_position_ids_for_generation"
    ):
        position_ids = model._prepare_position_ids_for_generation(
            input_ids, dict(extra, input_ids=input_ids, attention_mask=attention_mask)
        )
    mask_for_model = None if bool((attention_mask == 1).all()) else attention_mask
    cache_key = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    original = _Branch(model, extra, mask_for_model, position_ids, cache_key)
    noisy = _Branch(model, distorted, mask_for_model, position_ids, cache_key)

    batch = input_ids.shape[0]
    unfinished = torch.ones(batch, dtype=torch.bool, device=device)
    eos_tensor = torch.tensor(eos, dtype=torch.long, device=device) if eos else None
    for produced in range(max_new_tokens):
        base = original.step(input_ids)
        l_cd = noisy.step(input_ids)
        if eos_tensor is not None and produced < min_new_tokens:
            base[:, eos_tensor] = float("-inf")  # forbidden tokens stay -inf through the contrast
        scores = contrastive_logits(base, l_cd, alpha, beta)
        if do_sample:
            next_tokens = _sample(scores, temperature, top_k, top_p, sample_gen)
        else:
            next_tokens = torch.argmax(scores, dim=-1)
        if eos_tensor is not None:
            next_tokens = torch.where(unfinished, next_tokens, torch.full_like(next_tokens, pad_token_id))
        input_ids = torch.cat([input_ids, next_tokens[:, None]], dim=-1)
        if eos_tensor is not None:
            unfinished = unfinished & ~torch.isin(next_tokens, eos_tensor)
            if not bool(unfinished.any()):
                break
    return input_ids


def _sample(scores, temperature, top_k, top_p, generator) -> torch.Tensor:
    scores = scores / temperature
    if top_k is not None and top_k < scores.shape[-1]:
        kth = torch.topk(scores, top_k, dim=-1).values[:, -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if top_p is not None and top_p < 1:
        sorted_scores, order = torch.sort(scores, dim=-1, descending=False)
        cum = sorted_scores.softmax(dim=-1).cumsum(dim=-1)
        drop_sorted = cum <= 1 - top_p
        drop_sorted[:, -1] = False
        drop = drop_sorted.scatter(1, order, drop_sorted)
        scores = scores.masked_fill(drop, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(1)
