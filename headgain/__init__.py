"""headgain: training-free functional-head rescaling for vision-language models.

Measure how much attention each decoder head pays to image tokens, then amplify the
shallow heads that look at the image (perception) and the deep heads that do not
(reasoning), scaling their outputs before the output projection.
"""

from .analysis.census import Census, census
from .core.config import ConfigError, HeadGainConfig, presets
from .analysis.contrib import ContributionMap, contribution_map
from .core.handle import Handle, HeadGainError, attach
from .core.ops import extension_available
from .core.registry import ArchError, ArchMap, register_arch, registered_archs

__all__ = [
    "attach",
    "Handle",
    "HeadGainConfig",
    "presets",
    "ArchMap",
    "register_arch",
    "registered_archs",
    "extension_available",
    "ConfigError",
    "ArchError",
    "HeadGainError",
    "contribution_map",
    "ContributionMap",
    "census",
    "Census",
]
__version__ = "0.1.0"
