"""What the plugin reads from its environment, and the per-request field.

Environment of the vLLM processes (read when a worker loads the model):

* ``HEADGAIN_VLLM=1``: attach headgain to the model (implied by ``HEADGAIN_CONFIG``).
* ``HEADGAIN_CONFIG``: the engine-wide default config, for requests that do not name one:
  a preset name (``ocean-r1-7b``), a JSON object, or the path of a ``.json`` file.
  Unset: requests without the field run vanilla.
* ``HEADGAIN_ARCH_MAP``: an `ArchMap` (JSON object or path) for a model whose
  ``model_type`` is not in `headgain.vllm.archs.VLLM_ARCHS`, or to override its entry.
* ``HEADGAIN_RECORD``: keep S_v and the gains of every step of the last N requests
  (``Attachment.records``), for inspection and tests. Unset or 0: keep nothing.
* ``HEADGAIN_KEYS``: where S_v reads the keys of earlier tokens: ``auto`` (default: from
  vLLM's paged KV cache where headgain knows its layout, `headgain.vllm.paged`, else from
  a copy of its own) or ``copy`` (always the copy: the K half of the configured requests'
  KV cache again, in memory).

Per request: ``SamplingParams(extra_args={"headgain": value})`` with ``value`` a preset
name, a dict of `HeadGainConfig` fields or the same as a JSON object string, or ``False`` /
``None`` / ``"off"`` (vanilla, even under an engine-wide default). Over vLLM's OpenAI-style
HTTP API the field travels in ``vllm_xargs``, which takes strings and numbers only: send a
preset name, a JSON object string or ``"off"``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ..core.archmap import ArchMap
from ..core.config import HeadGainConfig, presets
from ..core.errors import ConfigError

__all__ = [
    "REQUEST_KEY",
    "ENV_ENABLE",
    "ENV_CONFIG",
    "ENV_ARCH_MAP",
    "ENV_RECORD",
    "ENV_KEYS",
    "PluginSettings",
    "request_config",
]

REQUEST_KEY = "headgain"
ENV_ENABLE = "HEADGAIN_VLLM"
ENV_CONFIG = "HEADGAIN_CONFIG"
ENV_ARCH_MAP = "HEADGAIN_ARCH_MAP"
ENV_RECORD = "HEADGAIN_RECORD"
ENV_KEYS = "HEADGAIN_KEYS"
KEY_SOURCES = ("auto", "copy")

_TRUE, _FALSE = {"1", "true", "yes", "on"}, {"", "0", "false", "no", "off"}


@dataclass(frozen=True)
class PluginSettings:
    """The plugin's engine-wide settings (validated on construction).

    Attributes:
        enabled: whether the workers attach headgain to the model they load.
        default: the config of requests without the per-request field (None: vanilla).
        arch_map: an `ArchMap` that replaces the registry's entry (None: the registry's).
        record: how many requests' per-step S_v and gains to keep (0: none).
        keys: "auto" (keys from vLLM's paged cache where its layout is known, else a copy)
            or "copy" (always headgain's own copy).
    """

    enabled: bool = False
    default: HeadGainConfig | None = None
    arch_map: ArchMap | None = None
    record: int = 0
    keys: str = "auto"

    def __post_init__(self) -> None:
        if not isinstance(self.enabled, bool):
            raise ConfigError(f"enabled must be True or False, got {self.enabled!r}")
        if self.default is not None and not isinstance(self.default, HeadGainConfig):
            raise ConfigError(f"default must be a HeadGainConfig or None, got {type(self.default).__name__}")
        if self.arch_map is not None and not isinstance(self.arch_map, ArchMap):
            raise ConfigError(f"arch_map must be an ArchMap or None, got {type(self.arch_map).__name__}")
        if isinstance(self.record, bool) or not isinstance(self.record, int) or self.record < 0:
            raise ConfigError(f"record must be a non-negative integer (requests kept), got {self.record!r}")
        if self.keys not in KEY_SOURCES:
            raise ConfigError(f"keys must be one of {', '.join(KEY_SOURCES)}, got {self.keys!r}")
        if (self.default is not None or self.arch_map is not None or self.record) and not self.enabled:
            raise ConfigError("a default config, an arch map or recording needs enabled=True")

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> PluginSettings:
        """The settings ``env`` (default ``os.environ``) gives; see the module docstring."""
        env = os.environ if env is None else env
        flag = env.get(ENV_ENABLE, "").strip().lower()
        if flag not in _TRUE | _FALSE:
            raise ConfigError(f"{ENV_ENABLE}={env[ENV_ENABLE]!r}: use 1 (attach headgain) or 0")
        text = env.get(ENV_CONFIG, "").strip()
        default = None
        if text:
            default = presets[text] if text in presets else HeadGainConfig.from_json(text)
        arch_text = env.get(ENV_ARCH_MAP, "").strip()
        record_text = env.get(ENV_RECORD, "").strip() or "0"
        if not record_text.isdigit():
            raise ConfigError(f"{ENV_RECORD}={record_text!r}: give the number of requests to keep (0: none)")
        keys = env.get(ENV_KEYS, "").strip().lower() or "auto"
        if keys not in KEY_SOURCES:
            raise ConfigError(f"{ENV_KEYS}={env[ENV_KEYS]!r}: use auto (vLLM's paged cache where possible) or copy")
        return cls(
            enabled=flag in _TRUE or default is not None,
            default=default,
            arch_map=ArchMap.from_json(arch_text) if arch_text else None,
            record=int(record_text),
            keys=keys,
        )


def request_config(extra_args: Mapping[str, Any] | None, default: HeadGainConfig | None) -> HeadGainConfig | None:
    """The config of one request: its ``extra_args["headgain"]`` field, else ``default``.

    The field takes a preset name, a dict of `HeadGainConfig` fields or a JSON object string
    of them, or False / None / "off" (vanilla). Raises `ConfigError` on anything else.
    """
    if not extra_args or REQUEST_KEY not in extra_args:
        return default
    value = extra_args[REQUEST_KEY]
    if value is None or value is False or value == "off":
        return None
    if isinstance(value, str) and value.lstrip().startswith("{"):
        return HeadGainConfig.from_json(value)
    if isinstance(value, (str, Mapping)):
        return HeadGainConfig.coerce(value)
    raise ConfigError(
        f'extra_args["{REQUEST_KEY}"] takes a preset name, a dict of HeadGainConfig fields or a JSON object string, '
        f'or False / None / "off"; got {value!r}'
    )
