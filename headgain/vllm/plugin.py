"""`register`, the ``vllm.general_plugins`` entry point, and the engine checks.

vLLM calls `register` in every process it starts (front end, engine core, workers). It
wraps these methods, once per process:

* the (V1) model runners' ``load_model``: after the model is loaded, when the plugin is
  enabled (`headgain.vllm.settings`), check the engine's configuration (`check_engine`)
  and attach headgain (`headgain.vllm.attachment.Attachment`);
* ``GPUModelRunner.execute_model`` (the CPU runner inherits it): mark the engine step,
  so the attachment knows which requests its packed tokens belong to;
* the front end's input processor: it reads the settings when the engine starts (and runs
  `check_engine` there too, so a V2 model runner, which headgain does not wrap, is refused
  before it starts), checks each request's ``extra_args["headgain"]`` (refused when the plugin
  is not enabled) before the request reaches the engine, and keeps each request that has a
  config out of vLLM's prefix cache: it reads no cached blocks (``skip_reading_prefix_cache``),
  and a salt of its own (``cache_salt``) keeps the blocks it writes, computed under its gains,
  from ever serving another request. Requests without a config use the prefix cache as usual.
"""

from __future__ import annotations

import functools
import uuid

from ..core.errors import ConfigError, HeadGainError
from .attachment import Attachment, attachment_of
from .settings import ENV_ENABLE, REQUEST_KEY, PluginSettings, request_config

__all__ = ["register", "check_engine"]

_WRAPPED = "_headgain_wrapped"


def register() -> None:
    """Wrap vLLM's methods listed in the module docstring (idempotent)."""
    from vllm.platforms import current_platform
    from vllm.v1.engine import input_processor
    from vllm.v1.worker import gpu_model_runner

    runners = [gpu_model_runner.GPUModelRunner]
    if current_platform.is_cpu():
        from vllm.v1.worker import cpu_model_runner

        runners.append(cpu_model_runner.CPUModelRunner)
    for cls in runners:
        if "load_model" in cls.__dict__:
            _wrap(cls, "load_model", _load_model)
    _wrap(gpu_model_runner.GPUModelRunner, "execute_model", _execute_model)
    _wrap(input_processor.InputProcessor, "__init__", _init_processor)
    _wrap(input_processor.InputProcessor, "process_inputs", _process_inputs)


def _wrap(cls, name: str, wrapper) -> None:
    """Replace ``cls.name`` by ``wrapper(original, self, ...)`` unless already done."""
    original = cls.__dict__[name]
    if getattr(original, _WRAPPED, False):
        return

    @functools.wraps(original)
    def method(self, *args, **kwargs):
        return wrapper(original, self, *args, **kwargs)

    setattr(method, _WRAPPED, True)
    setattr(cls, name, method)


def check_engine(vllm_config) -> None:
    """Raise `HeadGainError` naming every engine setting headgain cannot serve, and the fix."""
    from vllm.config import CUDAGraphMode

    problems = []
    if vllm_config.use_v2_model_runner:
        problems.append("headgain hooks into vLLM's V1 model runner, not the V2 one (set VLLM_USE_V2_MODEL_RUNNER=0)")
    if vllm_config.compilation_config.cudagraph_mode != CUDAGraphMode.NONE:
        problems.append(
            "CUDA graphs replay recorded kernels without headgain's op, which reads S_v and scales the heads of "
            "each step's configured requests in Python (set enforce_eager=True, or keep torch.compile and turn "
            'CUDA graphs off: compilation_config={"cudagraph_mode": "NONE"})'
        )
    if vllm_config.kv_transfer_config is not None:
        problems.append(
            "KV transfer and offloading load blocks computed elsewhere, under gains headgain cannot know "
            "(remove kv_transfer_config)"
        )
    if vllm_config.speculative_config is not None:
        problems.append("speculative decoding verifies several tokens per step (remove speculative_config)")
    if vllm_config.parallel_config.pipeline_parallel_size != 1:
        problems.append(
            "pipeline parallelism splits the decoder's layers between processes; headgain is tested with whole "
            "decoders only (set pipeline_parallel_size=1; tensor parallelism is supported)"
        )
    if problems:
        raise HeadGainError(
            f"headgain's vLLM plugin is enabled ({ENV_ENABLE}=1 or HEADGAIN_CONFIG) but cannot serve this engine: "
            + "; ".join(problems)
        )


def _load_model(original, runner, *args, **kwargs):
    out = original(runner, *args, **kwargs)
    settings = PluginSettings.from_env()
    model = runner.get_model()
    if settings.enabled and attachment_of(model) is None:
        from vllm.distributed.parallel_state import get_tensor_model_parallel_rank

        check_engine(runner.vllm_config)
        Attachment(model, runner.model_config.hf_config, settings, get_tensor_model_parallel_rank())
    return out


def _execute_model(original, runner, scheduler_output, *args, **kwargs):
    attachment = attachment_of(runner.get_model())
    if attachment is None:
        return original(runner, scheduler_output, *args, **kwargs)
    attachment.begin_step(runner, scheduler_output)
    try:
        return original(runner, scheduler_output, *args, **kwargs)
    finally:
        attachment.end_step()


def _init_processor(original, processor, *args, **kwargs):
    original(processor, *args, **kwargs)
    processor._headgain_settings = PluginSettings.from_env()  # as the workers read it when they load the model
    if processor._headgain_settings.enabled:
        check_engine(processor.vllm_config)


def _process_inputs(original, processor, *args, **kwargs):
    params = kwargs["params"] if "params" in kwargs else args[2]  # (request_id, prompt, params, ...)
    extra = getattr(params, "extra_args", None)
    settings = processor._headgain_settings
    cfg = request_config(extra, settings.default)  # the request's own field, else the engine's default
    if extra and REQUEST_KEY in extra:
        if cfg is not None and not settings.enabled:
            raise ConfigError(
                f'this request asks for headgain (extra_args["{REQUEST_KEY}"]) but the engine runs without it; '
                f"start vLLM with {ENV_ENABLE}=1"
            )
        if cfg is not None:
            text = processor.model_config.hf_config
            text = text.get_text_config() if hasattr(text, "get_text_config") else text
            layers = getattr(text, "num_hidden_layers", None)
            if isinstance(layers, int):
                cfg.check_layers(layers)
    request = original(processor, *args, **kwargs)
    sampling = request.sampling_params
    if settings.enabled and sampling is not None and cfg is not None:
        sampling.skip_reading_prefix_cache = True  # the request's copy (streamed input sessions reuse the caller's)
        salt = f"headgain-{uuid.uuid4().hex}"
        request.cache_salt = salt if request.cache_salt is None else f"{salt}:{request.cache_salt}"
    return request
