"""headgain's errors: one base class, `HeadGainError` (a `ValueError`), and one subclass per
kind of mistake, so callers can catch all of headgain's refusals at once."""

from __future__ import annotations

__all__ = ["HeadGainError", "ArchError", "ConfigError"]


class HeadGainError(ValueError):
    """headgain cannot run on this input, model or model state; the message says how to fix it."""


class ArchError(HeadGainError):
    """An architecture map does not fit the model it is applied to, or the model's layout is
    one headgain cannot act on."""


class ConfigError(HeadGainError):
    """A `HeadGainConfig` value is out of range or inconsistent."""
