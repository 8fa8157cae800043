"""headgain: training-free functional-head rescaling for vision-language models.

Measure how much attention each decoder head pays to image tokens, then amplify the
shallow heads that look at the image (perception) and the deep heads that do not
(reasoning), scaling their outputs before the output projection.

``import headgain`` loads the core and the compiled ops only; ``transformers`` is imported
when a ``transformers`` model is attached, and the analysis tools (census, contribution
maps) on first use.
"""

from .core.archmap import ArchMap
from .core.config import HeadGainConfig, presets
from .core.errors import ArchError, ConfigError, HeadGainError
from .core.fold import FoldedGains, fold_gains, unfold_gains
from .core.handle import Handle, attach, handle_of
from .core.ops import extension_available
from .core.registry import register_arch, registered_archs

__all__ = [
    "attach",
    "handle_of",
    "Handle",
    "HeadGainConfig",
    "presets",
    "ArchMap",
    "register_arch",
    "registered_archs",
    "fold_gains",
    "unfold_gains",
    "FoldedGains",
    "extension_available",
    "HeadGainError",
    "ConfigError",
    "ArchError",
    "census",
    "Census",
    "contribution_map",
    "ContributionMap",
]
__version__ = "0.2.0"

_LAZY = {
    "census": ("analysis.census", "census"),
    "Census": ("analysis.census", "Census"),
    "contribution_map": ("analysis.contrib", "contribution_map"),
    "ContributionMap": ("analysis.contrib", "ContributionMap"),
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        value = getattr(importlib.import_module(f"{__name__}.{module}"), attr)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'headgain' has no attribute {name!r}")
