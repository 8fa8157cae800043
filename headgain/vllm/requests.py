"""What one worker keeps per request: its config, its visual flags, and, where headgain
cannot read vLLM's paged KV cache (`headgain.vllm.paged`: a backend whose layout it does not
know, or ``HEADGAIN_KEYS=copy``), a copy of its keys per layer, from which S_v of later steps
is read. Requests without a config cost nothing.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..core.config import HeadGainConfig
from ..core.rules import LayerRule

__all__ = ["RequestState", "StepRecord"]


@dataclass(frozen=True)
class StepRecord:
    """S_v and gains of one request at one engine step (kept with ``HEADGAIN_RECORD``).

    Attributes:
        past: tokens of the request computed before this step (0: the prefill).
        tokens: tokens this step computed for the request (the prompt, or 1).
        ratios: (L, H) float32 on the CPU, S_v at i* of this tensor-parallel rank's H heads.
        gains: (L, H) float32 on the CPU, the gains applied to them.
    """

    past: int
    tokens: int
    ratios: torch.Tensor
    gains: torch.Tensor


@dataclass(eq=False)
class RequestState:
    """headgain's state of one request in one worker.

    Attributes:
        req_id: vLLM's request id inside the engine.
        cfg: the request's config (None: vanilla, nothing kept).
        placeholders: (prompt length,) bool, the prompt positions vLLM fills with image or
            video embeddings, from the request's multimodal placeholders (None without
            images or videos: visual positions then come from the arch map's token ids).
        rules: the config's rule per decoder layer.
        length: tokens whose keys and visual flags are held.
        keys: (L, capacity, Hkv, D) keys after rotary embedding, in the model's dtype (None
            until the first layer of the prefill).
        visual: (capacity,) bool, visual flags of the tokens so far.
        steps: per-step records (only when recording).
    """

    req_id: str
    cfg: HeadGainConfig | None
    placeholders: torch.Tensor | None = None
    rules: tuple[LayerRule, ...] = ()
    length: int = 0
    keys: torch.Tensor | None = None
    visual: torch.Tensor | None = None
    steps: list[StepRecord] = field(default_factory=list)

    def reset(self) -> None:
        """Forget every token (a new prefill, or a preempted request computed again); the records stay."""
        self.length = 0

    def add_visual(self, flags: torch.Tensor) -> None:
        """Append (n,) bool visual flags of this step's tokens; ``length`` grows by n."""
        end = self.length + flags.shape[0]
        if self.visual is None or self.visual.shape[0] < end:
            grown = torch.zeros(_capacity(end), dtype=torch.bool, device=flags.device)
            if self.visual is not None:
                grown[: self.length] = self.visual[: self.length]
            self.visual = grown
        self.visual[self.length : end] = flags
        self.length = end

    def write_keys(self, num_layers: int, position: int, past: int, keys: torch.Tensor) -> torch.Tensor:
        """Store this step's (n, Hkv, D) keys of layer ``position`` after the ``past`` held ones;
        returns all keys of that layer so far as a (1, Hkv, past + n, D) view."""
        end = past + keys.shape[0]
        held = self.keys
        if held is None or held.shape[1] < end or held.dtype != keys.dtype:
            grown = keys.new_empty((num_layers, _capacity(end), *keys.shape[1:]))
            if held is not None and past:
                grown[:, :past] = held[:, :past]
            self.keys = held = grown
        held[position, past:end] = keys
        return held[position, :end].permute(1, 0, 2).unsqueeze(0)


def _capacity(needed: int) -> int:
    """Room for ``needed`` tokens, rounded up to a power of two (amortised growth)."""
    return 1 << max(needed - 1, 15).bit_length()
