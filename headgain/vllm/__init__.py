"""headgain inside vLLM: the paper's dynamic method, per request, in vLLM's own batching.

Install headgain where vLLM runs; vLLM finds the plugin through the
``vllm.general_plugins`` entry point ``headgain`` and calls `register` in every process.
Enable it with ``HEADGAIN_VLLM=1`` (or an engine-wide default in ``HEADGAIN_CONFIG``) and
pass a config per request in ``SamplingParams(extra_args={"headgain": ...})``; see
`headgain.vllm.settings`. Supported: eager and compiled mode without CUDA graphs, with or without
chunked prefill (each chunk is a pass of its own) and prefix caching (requests with a config
stay out of it), without speculative decoding, pipeline parallelism or KV transfer
(`check_engine` refuses the rest when the engine starts).

Importing this package does not import vLLM.
"""

from .attachment import Attachment, attachment_of, records_of
from .plugin import check_engine, register
from .requests import StepRecord
from .settings import (
    ENV_ARCH_MAP,
    ENV_CONFIG,
    ENV_ENABLE,
    ENV_KEYS,
    ENV_RECORD,
    REQUEST_KEY,
    PluginSettings,
    request_config,
)

__all__ = [
    "register",
    "check_engine",
    "attachment_of",
    "records_of",
    "Attachment",
    "StepRecord",
    "PluginSettings",
    "request_config",
    "REQUEST_KEY",
    "ENV_ENABLE",
    "ENV_CONFIG",
    "ENV_ARCH_MAP",
    "ENV_RECORD",
    "ENV_KEYS",
]
