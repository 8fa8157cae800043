"""The ``headgain`` command (also ``python -m headgain``).

Subcommands:

* ``run``: generate for an image and a question, vanilla and rescaled; print both
  answers, the time each took, and the heads selected per layer.
* ``census``: S_v of every head over a folder of images (and a JSONL questions file);
  writes ``census.json``, ``samples.npy``, ``suggested_config.json`` and heat maps.
* ``contrib``: contribution maps of an answer, vanilla and rescaled, as PNG and JSON.
* ``eval``: vanilla against headgain configs on a benchmark: metrics, bootstrap
  intervals, McNemar tests (`headgain.eval`).
* ``sweep``: tune a config on a dev split, report it on the held-out rest.

``--model PATH`` loads a local checkpoint and its processor (nothing is downloaded);
without it the embedded toy Qwen2.5-VL (`headgain.toy`: trained on drawn shapes, it
answers questions such as "is there a red circle in the image ?") is used, so every
subcommand runs anywhere in seconds. Bad inputs end with a one-line message on
stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from .core import jsonio

__all__ = ["main", "CLIError", "build_parser"]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
DEFAULT_QUESTION = "Describe the image."


class CLIError(Exception):
    """A bad command-line input; its message is printed as one line, exit status 2."""


# ---------------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    model_opts = argparse.ArgumentParser(add_help=False)
    cfg_opts = argparse.ArgumentParser(add_help=False)
    c = cfg_opts.add_argument_group("config")
    c.add_argument("--preset", metavar="NAME", help="a paper preset (default: ocean-r1-7b)")
    c.add_argument("--config", metavar="FILE.json", help="a HeadGainConfig saved as JSON")
    g = model_opts.add_argument_group("model")
    g.add_argument("--model", metavar="PATH", help="local checkpoint folder (default: the embedded toy model)")
    g.add_argument(
        "--arch-map",
        metavar="FILE.json",
        help="an ArchMap saved as JSON, for a model type headgain has not registered "
        '(e.g. {"attention": "model.layers.*.self_attn", "visual_token_ids": ["image_token_id"]})',
    )
    g.add_argument("--attn", choices=("sdpa", "eager"), default="sdpa", help="attention implementation (default sdpa)")
    g.add_argument("--device", default="auto", help="torch device, e.g. cpu, cuda, cuda:1 (default: cuda if available)")
    g.add_argument(
        "--dtype",
        choices=("auto", "float32", "float16", "bfloat16"),
        default="auto",
        help="model dtype (auto: the checkpoint's, float32 for the embedded toy model)",
    )

    parser = argparse.ArgumentParser(
        prog="headgain",
        description=(
            "Training-free functional-head rescaling for vision-language models: run, census, contribution maps, "
            "benchmark evaluation and config sweeps."
        ),
    )
    sub = parser.add_subparsers(dest="command", metavar="{run,census,contrib,eval,sweep}")
    sub.required = True

    run = sub.add_parser(
        "run", parents=[model_opts, cfg_opts], help="answer a question about an image, vanilla and rescaled"
    )
    run.add_argument("--image", required=True, metavar="PATH", help="image file")
    run.add_argument("--question", required=True, help="question text")
    run.add_argument(
        "--max-new-tokens", type=_positive, default=32, metavar="N", help="tokens to generate (default 32)"
    )

    cen = sub.add_parser(
        "census", parents=[model_opts, cfg_opts], help="S_v statistics of every head over a folder of images"
    )
    cen.add_argument("--images", required=True, metavar="DIR", help="folder of images")
    cen.add_argument(
        "--questions",
        metavar="FILE.jsonl",
        help='one JSON object per line: {"image": "name.png", "question": "..."}, image relative to '
        f'--images (default: every image in the folder with "{DEFAULT_QUESTION}")',
    )
    cen.add_argument("--out", default="headgain-census", metavar="DIR", help="output folder (default headgain-census)")
    cen.add_argument(
        "--batch-size", type=_positive, default=1, metavar="B", help="samples per forward pass (default 1)"
    )
    cen.add_argument("--limit", type=_positive, metavar="N", help="use only the first N samples")
    cen.add_argument(
        "--target-fraction",
        type=float,
        default=0.064,
        metavar="F",
        help="share of heads the suggested config should select (default 0.064)",
    )
    cen.add_argument("--no-progress", action="store_true", help="hide the progress bar")

    con = sub.add_parser(
        "contrib", parents=[model_opts, cfg_opts], help="contribution maps of an answer, vanilla and rescaled"
    )
    con.add_argument("--image", required=True, metavar="PATH", help="image file")
    con.add_argument("--question", required=True, help="question text")
    con.add_argument(
        "--answer",
        help="answer text whose tokens are the targets (default: the vanilla model's greedy "
        "continuation of --max-new-tokens tokens)",
    )
    con.add_argument(
        "--max-new-tokens", type=_positive, default=8, metavar="N", help="greedy continuation length (default 8)"
    )
    con.add_argument(
        "--normalize", choices=("layer", "global"), default="layer", help="Eq. 40 (layer) or Eq. 41 (global)"
    )
    con.add_argument("--signed", action="store_true", help="draw the signed sensitivity S instead of the importance")
    con.add_argument(
        "--out", default="headgain-contrib", metavar="DIR", help="output folder (default headgain-contrib)"
    )
    from .eval.commands import add_subcommands

    add_subcommands(sub, model_opts, cfg_opts, _integer_at_least)
    return parser


def _integer_at_least(minimum: int) -> Callable[[str], int]:
    """The argparse type of integers >= ``minimum``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{value} must be at least {minimum}")
        return value

    return parse


_positive = _integer_at_least(1)


# ---------------------------------------------------------------------- entry point
def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status (0 ok, 2 bad input, 130 interrupted)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help, or argparse's own usage error (status 2)
        return int(e.code or 0)
    import torch

    from .core.errors import ArchError, ConfigError, HeadGainError

    threads = torch.get_num_threads()
    try:
        if args.command in ("eval", "sweep"):
            from .eval.commands import cmd_eval, cmd_sweep

            return {"eval": cmd_eval, "sweep": cmd_sweep}[args.command](args)
        return {"run": cmd_run, "census": cmd_census, "contrib": cmd_contrib}[args.command](args)
    except (CLIError, ConfigError, ArchError, HeadGainError) as e:
        return _fail(str(e))
    except OSError as e:
        where = f": {e.filename}" if getattr(e, "filename", None) else ""
        return _fail(f"{e.strerror or e}{where}")
    except KeyboardInterrupt:
        print("headgain: interrupted", file=sys.stderr)
        return 130
    finally:
        if torch.get_num_threads() != threads:
            torch.set_num_threads(threads)


def _fail(message: str) -> int:
    line = " ".join(message.split())
    print(f"headgain: error: {line}", file=sys.stderr)
    return 2


# ---------------------------------------------------------------------- inputs
def load_image(path: str):
    """The image at ``path`` as RGB, or `CLIError` when it is missing or not an image."""
    from PIL import Image, UnidentifiedImageError

    if not os.path.exists(path):
        raise CLIError(f"image file not found: {path}")
    if not os.path.isfile(path):
        raise CLIError(f"not an image file: {path} is a folder")
    try:
        with Image.open(path) as img:
            img.load()
            return img.convert("RGB")
    except UnidentifiedImageError:
        raise CLIError(f"cannot read image {path}: not an image file (or a format PIL does not know)") from None
    except (OSError, ValueError, SyntaxError) as e:
        raise CLIError(f"cannot read image {path}: {e}") from None


def load_arch_map(args):
    """The ArchMap of --arch-map, or None (look the model type up in the registry)."""
    from .core.archmap import ArchMap
    from .core.errors import ArchError

    if not args.arch_map:
        return None
    if not os.path.isfile(args.arch_map):
        raise CLIError(f"arch map file not found: {args.arch_map}")
    try:
        return ArchMap.from_json(args.arch_map)
    except ArchError as e:
        raise CLIError(f"bad arch map file {args.arch_map}: {e}") from None


def load_config(args):
    from .core.config import ConfigError, HeadGainConfig

    if args.preset and args.config:
        raise CLIError("give --preset or --config, not both")
    if args.config:
        if not os.path.isfile(args.config):
            raise CLIError(f"config file not found: {args.config}")
        try:
            return HeadGainConfig.from_json(args.config)
        except ConfigError as e:
            raise CLIError(f"bad config file {args.config}: {e}") from None
    return HeadGainConfig.coerce(args.preset)  # None -> default preset; unknown name -> ConfigError


def read_questions(images_dir: str, questions: str | None, limit: int | None) -> list[tuple[str, str]]:
    """(image path, question) pairs from the JSONL file, or every image with the default question."""
    if not os.path.isdir(images_dir):
        raise CLIError(f"images folder not found: {images_dir}")
    pairs: list[tuple[str, str]] = []
    if questions is None:
        names = sorted(n for n in os.listdir(images_dir) if n.lower().endswith(IMAGE_EXTENSIONS))
        pairs = [(os.path.join(images_dir, n), DEFAULT_QUESTION) for n in names]
        if not pairs:
            raise CLIError(f"no image files ({', '.join(IMAGE_EXTENSIONS)}) in {images_dir}")
    else:
        if not os.path.isfile(questions):
            raise CLIError(f"questions file not found: {questions}")
        for number, item in jsonio.jsonl_objects(questions, CLIError):
            if not isinstance(item.get("image"), str) or not isinstance(item.get("question"), str):
                raise CLIError(f'{questions} line {number}: expected {{"image": "...", "question": "..."}}')
            if not item["question"].strip():
                raise CLIError(f"{questions} line {number}: the question is empty")
            pairs.append((os.path.join(images_dir, item["image"]), item["question"]))
        if not pairs:
            raise CLIError(f"{questions} holds no questions")
    pairs = pairs[:limit] if limit else pairs
    for path, _ in pairs:
        if not os.path.isfile(path):
            raise CLIError(f"image file not found: {path}")
    return pairs


# ---------------------------------------------------------------------- model
@dataclass
class Loaded:
    """A model and the functions that turn images and text into its inputs."""

    model: object
    name: str
    inputs: Callable  # (images: list[PIL.Image], questions: list[str]) -> dict of tensors on the device
    encode: Callable  # str -> list[int] (no special tokens)
    decode: Callable  # list[int] -> str
    device: object


def _device(text: str):
    import torch

    if text == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        raise CLIError(f"unknown --device {text!r}; use cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CLIError(f"--device {text} requested but torch sees no CUDA device")
    return device


def load_model(args) -> Loaded:
    import torch

    device = _device(args.device)
    dtype = None if args.dtype == "auto" else getattr(torch, args.dtype)
    if args.model is None:
        if device.type == "cpu":
            torch.set_num_threads(1)  # the toy model's matrices are too small to gain from threads
        return _embedded(args.attn, dtype or torch.float32, device)
    return _checkpoint(args.model, args.attn, dtype, device)


def _to(batch: dict, device) -> dict:
    return {k: (v.to(device) if hasattr(v, "to") else v) for k, v in batch.items()}


def _embedded(attn: str, dtype, device) -> Loaded:
    from .toy import load
    from .toy.model import TOY, chat_prompt
    from .toy.scenes import DEFAULT_REASONING, reasoning_text

    model, processor = load(attn, dtype)
    model = model.to(device)
    tokenizer = processor.tokenizer

    def inputs(images, questions):
        reasoning = reasoning_text(DEFAULT_REASONING, "shapes", seed=0)
        texts = [chat_prompt(processor, q, reasoning) for q in questions]
        batch = processor(images=list(images), text=texts, return_tensors="pt", padding=True)
        batch["pixel_values"] = batch["pixel_values"].to(dtype)
        return _to(dict(batch), device)

    def encode(text):
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])

    def decode(ids):
        return tokenizer.decode(ids, skip_special_tokens=True)

    name = (
        f"embedded toy Qwen2.5-VL ({TOY['layers']} layers x {TOY['heads']} heads, trained on drawn shapes: "
        "it knows the words of headgain.toy.scenes only)"
    )
    return Loaded(model, name, inputs, encode, decode, device)


def _checkpoint(path: str, attn: str, dtype, device) -> Loaded:
    if not os.path.exists(path):
        raise CLIError(f"model path not found: {path} (--model takes a local checkpoint folder; nothing is downloaded)")
    if not os.path.isdir(path):
        raise CLIError(f"--model {path} is not a folder; give the checkpoint folder (with config.json)")
    import transformers as tf

    try:
        processor = tf.AutoProcessor.from_pretrained(path, local_files_only=True)
        model = tf.AutoModelForImageTextToText.from_pretrained(
            path, local_files_only=True, dtype=dtype if dtype is not None else "auto", attn_implementation=attn
        )
    except (OSError, ValueError, KeyError, ImportError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CLIError(f"cannot load model from {path}: {first}") from None
    model = model.to(device).eval()
    tokenizer = getattr(processor, "tokenizer", processor)
    if hasattr(tokenizer, "padding_side"):
        tokenizer.padding_side = "left"
    template = getattr(processor, "chat_template", None) or getattr(tokenizer, "chat_template", None)
    if not template:
        raise CLIError(f"the processor in {path} has no chat template; headgain cannot place the image in the prompt")

    def inputs(images, questions):
        texts = [
            processor.apply_chat_template(
                [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": q}]}],
                add_generation_prompt=True,
                tokenize=False,
            )
            for q in questions
        ]
        batch = processor(text=texts, images=list(images), return_tensors="pt", padding=True)
        batch = _to(dict(batch), device)
        if "pixel_values" in batch and batch["pixel_values"].is_floating_point():
            batch["pixel_values"] = batch["pixel_values"].to(model.dtype)
        return batch

    def encode(text):
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])

    def decode(ids):
        return tokenizer.decode(ids, skip_special_tokens=True)

    return Loaded(model, f"{path} ({type(model).__name__})", inputs, encode, decode, device)


def _describe_cfg(args, cfg) -> str:
    source = f"config {args.config}" if args.config else f"preset {args.preset or 'ocean-r1-7b (default)'}"
    return (
        f"{source}: l_perc={cfg.l_perc} tau_perc={cfg.tau_perc} g_perc={cfg.g_perc} | "
        f"l_reas={cfg.l_reas} tau_reas={cfg.tau_reas} g_reas={cfg.g_reas} | strategy={cfg.strategy}"
    )


def _generate(loaded: Loaded, batch: dict, max_new_tokens: int) -> tuple[list[int], float]:
    import torch

    if loaded.device.type == "cuda":
        torch.cuda.synchronize(loaded.device)
    start = time.perf_counter()
    with torch.no_grad():
        out = loaded.model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False)
    if loaded.device.type == "cuda":
        torch.cuda.synchronize(loaded.device)
    seconds = time.perf_counter() - start
    sequences = out.sequences if hasattr(out, "sequences") else out
    return sequences[0, batch["input_ids"].shape[1] :].tolist(), seconds


# ---------------------------------------------------------------------- subcommands
def _prepare(args):
    """The image, config and model of a single-image subcommand, announced on stdout."""
    if not args.question.strip():
        raise CLIError("--question is empty; ask something about the image")
    image = load_image(args.image)
    cfg = load_config(args)
    arch = load_arch_map(args)
    loaded = load_model(args)
    print(f"model: {loaded.name}")
    print(_describe_cfg(args, cfg))
    return image, cfg, arch, loaded


def cmd_run(args) -> int:
    from .core.handle import attach
    from .core.rules import HeadClass, classify, selected_heads

    image, cfg, arch, loaded = _prepare(args)
    with attach(loaded.model, arch, cfg) as handle:
        batch = loaded.inputs([image], [args.question])
        # warm-up (so the first timing carries no one-time cost): one rescaled prefill, whose
        # ratios are those at the prompt's last token
        _generate(loaded, batch, 1)
        ratios = handle.last_ratios[:, 0].numpy()  # (L, H)
        has_visual = bool(handle.last_has_visual[0])
        handle.enabled = False
        vanilla, t_vanilla = _generate(loaded, batch, args.max_new_tokens)
        handle.enabled = True
        rescaled, t_rescaled = _generate(loaded, batch, args.max_new_tokens)
    overhead = (t_rescaled / t_vanilla - 1) * 100 if t_vanilla > 0 else float("nan")
    print(f"vanilla  ({t_vanilla:.3f} s, {len(vanilla)} tokens): {loaded.decode(vanilla)!r}")
    print(f"rescaled ({t_rescaled:.3f} s, {len(rescaled)} tokens, {overhead:+.1f}% time): {loaded.decode(rescaled)!r}")
    if not has_visual:
        print("no visual tokens in the prompt: no head is selected (gain 1 everywhere)")
        return 0
    classes = classify(ratios, cfg)
    print("selected heads at the prompt's last token (0-based decoder layer: head indices):")
    for layer, (perc, reas) in enumerate(selected_heads(classes)):
        if perc or reas:
            print(f"  layer {layer:2d}: perception {perc} reasoning {reas}")
    count = int((classes > 0).sum())
    print(
        f"total: {count} of {classes.size} heads ({count / classes.size:.1%}): "
        f"{int((classes == HeadClass.PERCEPTION).sum())} perception, "
        f"{int((classes == HeadClass.REASONING).sum())} reasoning"
    )
    return 0


class _Batches:
    """Processor outputs for (image, question) pairs, built lazily, ``batch_size`` at a time."""

    def __init__(self, loaded: Loaded, pairs, batch_size: int):
        self.loaded, self.pairs, self.size = loaded, pairs, batch_size

    def __len__(self) -> int:
        return (len(self.pairs) + self.size - 1) // self.size

    def __iter__(self):
        for i in range(0, len(self.pairs), self.size):
            chunk = self.pairs[i : i + self.size]
            images = [load_image(path) for path, _ in chunk]
            yield self.loaded.inputs(images, [q for _, q in chunk])


def cmd_census(args) -> int:
    import numpy as np

    from .analysis import plots
    from .analysis.census import census
    from .core.handle import attach

    if not 0.0 < args.target_fraction < 1.0:
        raise CLIError(f"--target-fraction {args.target_fraction} must be between 0 and 1")
    pairs = read_questions(args.images, args.questions, args.limit)
    for path, _ in pairs:  # every image readable before the model loads
        load_image(path)
    cfg = load_config(args)
    arch = load_arch_map(args)
    loaded = load_model(args)
    print(f"model: {loaded.name}")
    print(_describe_cfg(args, cfg))
    with attach(loaded.model, arch, cfg):  # validates cfg against the model; census runs it disabled
        result = census(loaded.model, _Batches(loaded, pairs, args.batch_size), progress=not args.no_progress)
    if result.num_samples == 0:
        raise CLIError(f"none of the {result.skipped} samples holds visual tokens; nothing to measure")
    os.makedirs(args.out, exist_ok=True)
    out = {
        "census": result.save(os.path.join(args.out, "census.json"), cfg=cfg),
        "samples": os.path.join(args.out, "samples.npy"),
        "suggested": os.path.join(args.out, "suggested_config.json"),
        "ratio": plots.plot_ratio(result, os.path.join(args.out, "visual_ratio.png"), cfg=cfg),
        "classes": plots.plot_classes(
            result.classes(cfg),
            os.path.join(args.out, "classes.png"),
            title=f"head classes in at least half of {result.num_samples} samples",
            cfg=cfg,
        ),
    }
    np.save(out["samples"], result.samples)
    suggested = result.suggest(args.target_fraction, base=cfg)
    suggested.to_json(out["suggested"])
    out["classes_suggested"] = plots.plot_classes(
        result.classes(suggested),
        os.path.join(args.out, "classes_suggested.png"),
        title=f"head classes under the suggested config (target {args.target_fraction:.1%})",
        cfg=suggested,
    )
    share = result.selected_share(cfg)
    print(f"{result.num_samples} samples ({result.skipped} without visual tokens skipped) in {result.seconds:.2f} s")
    print(
        f"mean S_v over all heads: {float(result.mean.mean()):.4f}; the config selects {share:.1%} of heads per sample"
    )
    print("suggested config:")
    for line in result.last_suggestion.report.splitlines():
        print(f"  {line}")
    for key in ("census", "samples", "suggested", "ratio", "classes", "classes_suggested"):
        print(f"wrote {out[key]}")
    return 0


def cmd_contrib(args) -> int:
    from .analysis.contrib import contribution_map

    image, cfg, arch, loaded = _prepare(args)
    batch = loaded.inputs([image], [args.question])
    targets = None
    if args.answer is not None:
        targets = loaded.encode(args.answer)
        if not targets:
            raise CLIError("--answer is empty after tokenization; give some answer text or leave --answer out")
    kw = dict(normalize=args.normalize, signed=args.signed, n_tokens=args.max_new_tokens, arch_map=arch)
    start = time.perf_counter()
    vanilla = contribution_map(loaded.model, batch, targets, **kw)
    rescaled = contribution_map(loaded.model, batch, vanilla.targets, cfg=cfg, **kw)
    seconds = time.perf_counter() - start
    os.makedirs(args.out, exist_ok=True)
    paths = {
        "vanilla": vanilla.plot(os.path.join(args.out, "contrib_vanilla.png")),
        "rescaled": rescaled.plot(os.path.join(args.out, "contrib_rescaled.png")),
        "compare": vanilla.plot(os.path.join(args.out, "contrib_compare.png"), other=rescaled),
        "json": os.path.join(args.out, "contrib.json"),
    }
    with open(paths["json"], "w", encoding="utf-8") as f:
        json.dump(
            {
                "answer_ids": vanilla.targets,
                "answer": loaded.decode(vanilla.targets),
                "vanilla": vanilla.to_dict(),
                "rescaled": rescaled.to_dict(),
            },
            f,
            indent=1,
        )
        f.write("\n")
    source = "given answer" if targets is not None else "vanilla greedy continuation"
    print(f"targets ({source}, {len(vanilla.targets)} tokens): {loaded.decode(vanilla.targets)!r}")
    print(
        f"mean loss -log P: vanilla {sum(vanilla.losses) / len(vanilla.losses):.4f}, "
        f"rescaled {sum(rescaled.losses) / len(rescaled.losses):.4f} ({seconds:.2f} s)"
    )
    for m in (vanilla, rescaled):
        top = ", ".join(f"L{layer}H{head}" for layer, head in m.top(5))
        print(f"top heads, {m.label}: {top}")
    for key in ("vanilla", "rescaled", "compare", "json"):
        print(f"wrote {paths[key]}")
    return 0
