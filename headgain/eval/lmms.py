"""The lmms-eval model ``headgain``: a Hugging Face vision-language model with headgain attached.

    lmms-eval --model headgain --tasks mmstar \\
        --model_args pretrained=Qwen/Qwen2.5-VL-7B-Instruct,cfg=ocean-r1-7b,dtype=bfloat16

lmms-eval finds the model through the entry point ``headgain`` of the group
``lmms_eval.models`` (``setup.py``), which calls `manifest`. This module imports lmms-eval
at the top and is imported only by it: ``import headgain`` and the rest of
``headgain.eval`` never need lmms-eval.

Model arguments (``--model_args key=value,...``; batch size and device also come from
``--batch_size`` and ``--device``):

* ``pretrained`` (required): a local checkpoint folder, a Hugging Face Hub model id (its
  configs, tokenizer files and safetensors weights are downloaded), or ``toy`` (the toy
  model shipped in ``headgain.toy``; a folder the toy trainer wrote is recognised too).
* ``cfg`` (required): a preset name (``headgain.presets``), a JSON config file (or inline
  JSON text), or ``none`` for the vanilla model.
* ``attn_implementation`` (``sdpa``), ``dtype`` (``auto``: the checkpoint's; or a torch
  dtype name such as ``bfloat16``), ``device`` (``cuda:<LOCAL_RANK>`` when CUDA is
  available, else ``cpu``), ``batch_size`` (1), ``arch_map`` (a registered arch map name or
  an `ArchMap` JSON file; default: looked up by the model's type).

Requests: ``generate_until`` (one user turn: the task's images, then its text, through the
processor's chat template; left-padded batches of requests with equal generation
arguments) and ``loglikelihood``; ``generate_until_multi_round`` is not supported.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence

import torch
from lmms_eval.api.instance import GenerationResult
from lmms_eval.api.model import lmms
from loguru import logger
from PIL import Image
from tqdm import tqdm

from ..core.config import ConfigError, HeadGainConfig, presets
from ..core.handle import attach
from .model import ModelSource, Prompter, checkpoint_source, toy_source
from .sample import Sample

__all__ = ["HeadGainLMM", "manifest", "parse_cfg", "generation_kwargs", "model_source"]

#: ``max_new_tokens`` when a task's generation arguments do not set it.
DEFAULT_MAX_NEW_TOKENS = 128
#: Generation arguments of lmms-eval tasks passed on to ``generate`` (others are ignored, with a warning).
GENERATE_KEYS = ("max_new_tokens", "do_sample", "temperature", "top_p", "top_k", "num_beams", "repetition_penalty")
#: Files of a Hub repository that loading needs (configs, tokenizer, chat template, weights).
HUB_FILES = ["*.json", "*.safetensors", "*.txt", "*.model", "*.jinja", "*.tiktoken"]
MODEL_ARGS = ("pretrained", "cfg", "attn_implementation", "dtype", "device", "batch_size", "arch_map")


def manifest():
    """lmms-eval's registration of ``--model headgain`` (the entry point calls it while
    ``lmms_eval.models`` initialises, so ``lmms_eval.models`` is imported here, not above)."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id="headgain", simple_class_path=f"{__name__}.{HeadGainLMM.__name__}")


def parse_cfg(value) -> HeadGainConfig | None:
    """The ``cfg`` model argument -> a config, or None for ``none`` (the vanilla model).

    Accepts a preset name, a path to a JSON config file, or JSON text; raises
    `headgain.ConfigError` saying what is accepted when it is none of these or invalid."""
    text = str(value).strip()
    if text.lower() == "none":
        return None
    if text.startswith("{") or text.endswith(".json") or os.path.isfile(text):
        try:
            return HeadGainConfig.from_json(text)
        except ConfigError as e:
            raise ConfigError(f"cfg={text}: {e}") from None
    if text in presets:
        return presets[text]
    raise ConfigError(
        f"cfg={text} is not a preset ({', '.join(sorted(presets))}), a JSON config file, or none; "
        "write for example cfg=ocean-r1-7b, cfg=path/to/config.json or cfg=none"
    )


def generation_kwargs(gen_kwargs: dict | None) -> tuple[list[str], dict, list[str]]:
    """A task's generation arguments -> (stop strings, ``generate`` keyword arguments, ignored keys).

    Greedy unless ``do_sample`` is true or, without ``do_sample``, ``temperature`` > 0;
    sampling arguments are dropped from greedy generation. ``until`` (a string or a list)
    becomes the stop strings: generation runs to EOS or ``max_new_tokens`` and the text is
    cut at the first stop string."""
    rest = dict(gen_kwargs or {})
    until = rest.pop("until", None) or []
    until = [until] if isinstance(until, str) else [s for s in until if s]
    kwargs = {k: rest.pop(k) for k in GENERATE_KEYS if k in rest}
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    kwargs.setdefault("max_new_tokens", DEFAULT_MAX_NEW_TOKENS)
    kwargs.setdefault("do_sample", float(kwargs.get("temperature", 0) or 0) > 0)
    if not kwargs["do_sample"]:
        for key in ("temperature", "top_p", "top_k"):
            kwargs.pop(key, None)
    return until, kwargs, sorted(rest)


def cut(text: str, until: Sequence[str]) -> str:
    """``text`` up to its first stop string, without surrounding whitespace."""
    for stop in until:
        text = text.split(stop, 1)[0]
    return text.strip()


def _is_toy_folder(path: str) -> bool:
    """Whether ``path`` holds a toy model (its processor is ``ToyProcessor``, which
    ``AutoProcessor`` does not know)."""
    try:
        with open(os.path.join(path, "processor_config.json"), encoding="utf-8") as f:
            return json.load(f).get("processor_class") == "ToyProcessor"
    except (OSError, ValueError):
        return False


def model_source(pretrained: str, attn_implementation: str, dtype: str, device: str) -> ModelSource:
    """The `headgain.eval.model` source of ``pretrained``: ``toy`` or a toy folder
    (`toy_source`, float32 for ``auto``), a local checkpoint folder, or a Hub model id
    (downloaded into the Hugging Face cache, then read as a local folder)."""
    if pretrained == "toy" or _is_toy_folder(pretrained):
        path = None if pretrained == "toy" else pretrained
        return toy_source(attn_implementation, "float32" if dtype == "auto" else dtype, device, path)
    if not os.path.isdir(pretrained):
        from huggingface_hub import snapshot_download

        pretrained = snapshot_download(pretrained, allow_patterns=HUB_FILES)
    return checkpoint_source(pretrained, attn_implementation, dtype, device)


def _default_device() -> str:
    return f"cuda:{os.environ.get('LOCAL_RANK', '0')}" if torch.cuda.is_available() else "cpu"


def _positive_int(name: str, value) -> int:
    try:
        number = int(str(value))
    except ValueError:
        number = 0
    if number < 1:
        raise ValueError(f"{name}={value} must be a positive integer (batch_size=auto is not supported)")
    return number


class HeadGainLMM(lmms):
    """A Hugging Face vision-language model, headgain attached with ``cfg`` (see the module
    docstring for the arguments); an lmms-eval simple model."""

    is_simple = True

    def __init__(
        self,
        pretrained: str | None = None,
        cfg: str | None = None,
        attn_implementation: str = "sdpa",
        dtype: str = "auto",
        device: str | None = None,
        batch_size: int | str = 1,
        arch_map: str | None = None,
        **unknown,
    ) -> None:
        super().__init__()
        if unknown:
            raise ValueError(
                f"unknown model argument(s) {', '.join(sorted(unknown))} for --model headgain; "
                f"it takes {', '.join(MODEL_ARGS)}"
            )
        if not pretrained or cfg is None:
            raise ValueError(
                "--model headgain needs pretrained= (a checkpoint folder, a Hub model id, or toy) and cfg= "
                f"(a preset: {', '.join(sorted(presets))}; a JSON config file; or none), "
                "for example --model_args pretrained=Qwen/Qwen2.5-VL-7B-Instruct,cfg=ocean-r1-7b"
            )
        if dtype != "auto" and not isinstance(getattr(torch, str(dtype), None), torch.dtype):
            raise ValueError(f"dtype={dtype} is not a torch dtype; write auto, bfloat16, float16 or float32")
        self.cfg = parse_cfg(cfg)
        self.batch_size = _positive_int("batch_size", batch_size)
        source = model_source(str(pretrained), attn_implementation, dtype, device or _default_device())
        model, processor = source()
        if not hasattr(processor, "image_processor"):
            raise ValueError(
                f"{pretrained}: AutoProcessor gave a {type(processor).__name__}, not a processor of images and text"
            )
        self.model = model.eval()
        self.prompter = Prompter(model, processor, prompt=getattr(source, "prompt", None))
        if arch_map is not None and str(arch_map).endswith(".json"):
            from ..core.archmap import ArchMap

            arch_map = ArchMap.from_json(arch_map)
        self.handle = None if self.cfg is None else attach(model, arch_map, self.cfg)
        self._ignored: set[str] = set()

    # ------------------------------------------------------------------ requests
    def _sample(self, context: str, doc_to_visual: Callable | None, doc_id, task: str, split: str) -> Sample:
        """One request as a `Sample`: the context as the question, the task's images."""
        images = []
        if doc_to_visual is not None:
            visuals = doc_to_visual(self.task_dict[task][split][doc_id]) or []
            images = visuals if isinstance(visuals, list) else [visuals]
        for image in images:
            if not isinstance(image, Image.Image):
                raise ValueError(
                    f"task {task}: doc_to_visual gave a {type(image).__name__}; "
                    "headgain's lmms-eval model takes images (PIL) only, not video or audio"
                )
        return Sample(id=str(doc_id), images=images, question=context)

    def _warn_ignored(self, keys: list[str]) -> None:
        new = set(keys) - self._ignored
        if new:
            logger.warning(f"headgain: generation arguments {sorted(new)} are not used (passed on: {GENERATE_KEYS})")
            self._ignored |= new

    def generate_until(self, requests) -> list[str]:
        """One text per request, in order: the generation after the prompt, cut at the task's
        ``until`` strings. Requests with equal generation arguments are batched in their order."""
        groups: dict[str, list[int]] = {}
        for i, request in enumerate(requests):
            groups.setdefault(json.dumps(request.args[1], sort_keys=True, default=str), []).append(i)
        out: list[str] = [""] * len(requests)
        bar = tqdm(total=len(requests), disable=self.rank != 0, desc="headgain generate")
        for indices in groups.values():
            until, kwargs, ignored = generation_kwargs(requests[indices[0]].args[1])
            self._warn_ignored(ignored)
            for start in range(0, len(indices), self.batch_size):
                batch = indices[start : start + self.batch_size]
                samples = [self._sample(requests[i].args[0], *requests[i].args[2:6]) for i in batch]
                for i, text in zip(batch, self._generate(samples, kwargs)):
                    out[i] = cut(text, until)
                bar.update(len(batch))
        bar.close()
        return out

    def _generate(self, samples: Sequence[Sample], kwargs: dict) -> list[str]:
        """The decoded generations of one left-padded batch (special tokens dropped)."""
        inputs = self.prompter.inputs(samples)
        pad = self.prompter.tokenizer.pad_token_id
        with torch.inference_mode():
            ids = self.model.generate(**inputs, **kwargs, **({} if pad is None else {"pad_token_id": pad}))
        return self.prompter.decode(ids[:, inputs["input_ids"].shape[1] :])

    def loglikelihood(self, requests) -> list:
        """(loss, whether greedy decoding gives the continuation) per request, the loss being
        the mean negative log-probability of the continuation's tokens after the prompt:
        lmms-eval's convention (its multiple-choice tasks pick the choice of least loss).

        The continuation is scored as it would be generated: the prompt is run once, then its
        tokens are fed one per step (``generate`` with the continuation forced), so each
        step's head gains come from that step's token, as in ``generate_until``.

        Each pair is wrapped in a ``GenerationResult``: lmms-eval 0.7.3's evaluator turns any
        other model output that is not text into its ``str()`` (``unwrap_generation_output``),
        which breaks every multiple-choice task; it hands ``GenerationResult.text`` on as is."""
        out = []
        for request in tqdm(requests, disable=self.rank != 0, desc="headgain loglikelihood"):
            context, target = request.args[:2]
            doc_to_visual, doc_id, task, split = request.args[2:6] if len(request.args) >= 6 else (None,) * 4
            if not isinstance(target, str):  # output_type loglikelihood: doc_to_target
                target = str(target(self.task_dict[task][split][doc_id]))
            sample = self._sample(context, doc_to_visual, doc_id, task, split)
            out.append(GenerationResult(text=self._score(sample, target)))
        return out

    def _score(self, sample: Sample, continuation: str) -> tuple[float, bool]:
        """(mean negative log-probability of ``continuation``'s tokens, all of them greedy)."""
        inputs = self.prompter.inputs([sample])
        forced = self.prompter.tokenizer(continuation, add_special_tokens=False)["input_ids"]
        if not forced:
            return 0.0, True
        start = inputs["input_ids"].shape[1]
        with torch.inference_mode():
            result = self.model.generate(
                **inputs,
                max_new_tokens=len(forced),
                do_sample=False,
                prefix_allowed_tokens_fn=lambda _, ids: [forced[ids.shape[-1] - start]],
                output_logits=True,
                return_dict_in_generate=True,
            )
        if len(result.logits) != len(forced):
            raise ValueError(
                f"the continuation {continuation!r} holds an end-of-sequence token before its end; it cannot be scored"
            )
        logits = torch.cat(result.logits).float()  # (T, V): the unprocessed logits of each step
        target = torch.tensor(forced, device=logits.device)
        loss = -logits.log_softmax(-1).gather(1, target[:, None]).mean()
        return float(loss), bool((logits.argmax(-1) == target).all())

    def generate_until_multi_round(self, requests):
        raise NotImplementedError(
            "headgain's lmms-eval model does not run multi-round tasks (generate_until_multi_round); "
            "use generate_until or loglikelihood tasks"
        )
