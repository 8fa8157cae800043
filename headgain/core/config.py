"""`HeadGainConfig`: the method's hyper-parameters, validated, with JSON round-trip.

Layer indices are 0-based decoder layer indices (the ``layer_idx`` that ``transformers``
gives each decoder layer). The head-class rule the thresholds and layer bounds feed is
in `headgain.core.rules`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from . import jsonio
from .errors import ConfigError
from .rules import CLASS_NAMES

__all__ = ["HeadGainConfig", "presets", "STRATEGIES", "QUERIES", "MAX_GAIN"]

#: Gains are bounded: the method works near 1.1-1.4, and large gains overflow float16 activations.
MAX_GAIN = 10.0
STRATEGIES = ("enhance", "attenuate", "bipolar", "mixed")
QUERIES = ("last", "mean_text")


@dataclass(frozen=True)
class HeadGainConfig:
    """Hyper-parameters of functional-head rescaling (method.md sections 1-3).

    Strategies (appendix B of the paper):

    * ``"enhance"`` (A, the paper's choice): ``g_perc`` on perception heads, ``g_reas``
      on reasoning heads, 1 on neutral heads.
    * ``"attenuate"`` (B): ``beta`` on the classes in ``attenuate_classes``, 1 elsewhere.
    * ``"bipolar"`` (C): the enhanced classes get their gain (``alpha`` if set, else
      ``g_perc`` / ``g_reas``), every other head gets ``beta``.
    * ``"mixed"`` (D): enhanced classes as in C, ``beta`` on ``attenuate_classes``,
      1 on the rest.
    """

    l_perc: int = field(default=7, metadata={"help": "last decoder layer (0-based) that can hold perception heads"})
    l_reas: int = field(default=3, metadata={"help": "first decoder layer (0-based) that can hold reasoning heads"})
    tau_perc: float = field(default=0.22, metadata={"help": "S_v >= tau_perc marks a perception head"})
    tau_reas: float = field(default=0.01, metadata={"help": "S_v <= tau_reas marks a reasoning head"})
    g_perc: float = field(default=1.16, metadata={"help": "gain on perception heads"})
    g_reas: float = field(default=1.30, metadata={"help": "gain on reasoning heads"})
    strategy: str = field(default="enhance", metadata={"help": "one of " + ", ".join(STRATEGIES)})
    alpha: float | None = field(
        default=None, metadata={"help": "one gain for all enhanced heads (C, D); None keeps g_perc / g_reas"}
    )
    beta: float = field(default=0.8, metadata={"help": "attenuation gain, 0 < beta < 1 (B, C, D)"})
    enhance_classes: tuple[str, ...] = field(
        default=("perception", "reasoning"), metadata={"help": "classes enhanced by C and D"}
    )
    attenuate_classes: tuple[str, ...] = field(default=("neutral",), metadata={"help": "classes attenuated by B and D"})
    query: str = field(default="last", metadata={"help": "'last' (the paper's i*) or 'mean_text'"})
    shuffle_seed: int | None = field(
        default=None,
        metadata={
            "help": "control arm: within each layer the gains go to heads permuted at random (this seed), so as "
            "many heads per layer and class are rescaled, but not the selected ones; None: the method"
        },
    )

    def __post_init__(self) -> None:
        for name in ("enhance_classes", "attenuate_classes"):
            value = getattr(self, name)
            object.__setattr__(self, name, (value,) if isinstance(value, str) else tuple(value))
        errors = []
        for name in ("l_perc", "l_reas"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                errors.append(f"{name}={value!r} must be a non-negative integer (a 0-based decoder layer index)")
        for name in ("tau_perc", "tau_reas"):
            value = getattr(self, name)
            if not _is_real(value) or not 0.0 <= value <= 1.0:
                errors.append(f"{name}={value!r} must be a number in [0, 1] (a share of attention)")
        if _is_real(self.tau_perc) and _is_real(self.tau_reas) and not self.tau_reas < self.tau_perc:
            errors.append(
                f"tau_reas={self.tau_reas!r} must be below tau_perc={self.tau_perc!r} so the classes stay disjoint"
            )
        for name in ("g_perc", "g_reas", "alpha"):
            value = getattr(self, name)
            if name == "alpha" and value is None:
                continue
            if not _is_real(value) or not 0 < value <= MAX_GAIN:
                errors.append(
                    f"{name}={value!r} must be a number with 0 < {name} <= {MAX_GAIN:g} (the method works with gains "
                    "near 1.1-1.4; large gains overflow float16 activations into inf and NaN)"
                )
        if not _is_real(self.beta) or not 0.0 < self.beta < 1.0:
            errors.append(f"beta={self.beta!r} must be a number with 0 < beta < 1")
        seed = self.shuffle_seed
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or seed < 0):
            errors.append(f"shuffle_seed={seed!r} must be None or a non-negative integer")
        if self.strategy not in STRATEGIES:
            errors.append(f"strategy={self.strategy!r} is not one of {', '.join(STRATEGIES)}")
        if self.query not in QUERIES:
            errors.append(f"query={self.query!r} is not one of {', '.join(QUERIES)}")
        for name in ("enhance_classes", "attenuate_classes"):
            bad = [c for c in getattr(self, name) if c not in CLASS_NAMES]
            if bad:
                errors.append(f"{name} holds {bad}; allowed classes are {', '.join(CLASS_NAMES)}")
        if self.strategy == "mixed" and set(self.enhance_classes) & set(self.attenuate_classes):
            errors.append(
                f"strategy 'mixed' needs disjoint enhance_classes {self.enhance_classes} and "
                f"attenuate_classes {self.attenuate_classes}"
            )
        if errors:
            raise ConfigError("invalid HeadGainConfig: " + "; ".join(errors))

    # ------------------------------------------------------------------ gains
    def class_gains(self) -> dict[str, float]:
        """The gain each class of head receives under this config's strategy."""
        enhanced = {"perception": self.g_perc, "reasoning": self.g_reas, "neutral": 1.0}
        if self.alpha is not None:
            enhanced = {c: self.alpha for c in CLASS_NAMES}
        if self.strategy == "enhance":
            return {"perception": self.g_perc, "reasoning": self.g_reas, "neutral": 1.0}
        if self.strategy == "attenuate":
            return {c: (self.beta if c in self.attenuate_classes else 1.0) for c in CLASS_NAMES}
        if self.strategy == "bipolar":
            return {c: (enhanced[c] if c in self.enhance_classes else self.beta) for c in CLASS_NAMES}
        return {
            c: enhanced[c] if c in self.enhance_classes else self.beta if c in self.attenuate_classes else 1.0
            for c in CLASS_NAMES
        }

    def check_layers(self, num_layers: int) -> None:
        """Raise `ConfigError` unless both layer bounds index a decoder of ``num_layers`` layers."""
        bad = [f"{n}={getattr(self, n)}" for n in ("l_perc", "l_reas") if getattr(self, n) >= num_layers]
        if bad:
            raise ConfigError(
                f"{', '.join(bad)} outside the model: its decoder has {num_layers} layers "
                f"(valid indices 0..{num_layers - 1}); "
                "lower the bound or use a preset made for this model"
            )

    # ------------------------------------------------------------------ (de)serialisation
    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["enhance_classes"] = list(self.enhance_classes)
        d["attenuate_classes"] = list(self.attenuate_classes)
        return d

    def to_json(self, path: str | None = None) -> str:
        """The config as sorted JSON; also written to ``path`` when given."""
        return jsonio.write_text(self.to_dict(), path)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> HeadGainConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"unknown HeadGainConfig field(s) {unknown}; known fields: {', '.join(sorted(known))}")
        return cls(**dict(d))

    @classmethod
    def from_json(cls, text_or_path: str) -> HeadGainConfig:
        """Parse a JSON string, or read a ``.json`` file when given a path to one."""
        return cls.from_dict(jsonio.read_object(text_or_path, ConfigError, "config"))

    @classmethod
    def from_preset(cls, name: str) -> HeadGainConfig:
        """One of the paper's Table 3 settings; see `headgain.presets`."""
        if name not in presets:
            raise ConfigError(f"unknown preset {name!r}; available presets: {', '.join(sorted(presets))}")
        return presets[name]

    def replace(self, **changes: Any) -> HeadGainConfig:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    @classmethod
    def coerce(cls, cfg: HeadGainConfig | str | Mapping[str, Any] | None) -> HeadGainConfig:
        """Accept a config, a preset name, a dict of fields or None (the default preset)."""
        if cfg is None:
            return presets[DEFAULT_PRESET]
        if isinstance(cfg, HeadGainConfig):
            return cfg
        if isinstance(cfg, str):
            return cls.from_preset(cfg)
        if isinstance(cfg, Mapping):
            return cls.from_dict(cfg)
        raise ConfigError(f"cfg must be a HeadGainConfig, a preset name, a dict or None, got {type(cfg).__name__}")


def _is_real(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and not math.isnan(x)


DEFAULT_PRESET = "ocean-r1-7b"

#: The paper's Table 3 settings, keyed by model.
presets: dict[str, HeadGainConfig] = {
    "kimi-vl-a3b-thinking": HeadGainConfig(l_reas=5, tau_reas=0.01, g_reas=1.40, l_perc=10, tau_perc=0.27, g_perc=1.20),
    "ocean-r1-7b": HeadGainConfig(l_reas=3, tau_reas=0.01, g_reas=1.30, l_perc=7, tau_perc=0.22, g_perc=1.16),
    "r1-onevision": HeadGainConfig(l_reas=3, tau_reas=0.01, g_reas=1.30, l_perc=7, tau_perc=0.30, g_perc=1.20),
    # the toy model of headgain.toy (8 x 8 heads): the sweep of benchmarks/toy_effect.py (no config beat vanilla;
    # its first grid point), 5-14% of heads
    "toy": HeadGainConfig(l_reas=0, tau_reas=0.0001, g_reas=1.15, l_perc=0, tau_perc=0.402, g_perc=1.08),
}
