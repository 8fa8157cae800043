"""The ``headgain eval`` and ``headgain sweep`` subcommands (parsers and handlers).

Imported by `headgain.cli` when the parser is built; heavy imports wait for the handlers.
"""

from __future__ import annotations

import argparse
import os
import sys
from itertools import islice

__all__ = ["add_subcommands", "cmd_eval", "cmd_sweep", "BUILTIN"]

#: Benchmarks built in (no files needed), by ``--bench`` name: random shapes for the
#: embedded random model, and the toy model's drawn scenes (`headgain.toy.bench`).
BUILTIN = ("shapes", "toy:exist", "toy:exist-popular", "toy:exist-adversarial", "toy:colour", "toy:count")
BUILTIN += ("toy:position", "toy:caption")
SHAPES_DEFAULT_N = 30
TOY_DEFAULT_N = 200


def _data_args(p: argparse.ArgumentParser, at_least, out_default: str) -> None:
    from .adapters import ADAPTERS

    positive = at_least(1)

    d = p.add_argument_group("data and generation")
    d.add_argument(
        "--bench",
        required=True,
        metavar="PATH_OR_NAME",
        help="a benchmark file or folder (VLMEvalKit .tsv, Hugging Face save_to_disk folder, parquet, .jsonl) or a "
        f"built-in benchmark: {', '.join(BUILTIN)}",
    )
    d.add_argument("--format", choices=("tsv", "hf", "parquet", "jsonl"), help="file format (default: from the path)")
    d.add_argument(
        "--split",
        metavar="NAME",
        help="split to read (default: the only one); for a toy: benchmark, the scene seed (default --seed)",
    )
    d.add_argument(
        "--adapter",
        choices=tuple(ADAPTERS),
        help="which benchmark's fields to expect (default: detected from the columns and file name)",
    )
    d.add_argument(
        "--limit",
        type=positive,
        metavar="N",
        help=f"use only the first N samples (built-in benchmarks: generate N; default {SHAPES_DEFAULT_N} shapes, "
        f"{TOY_DEFAULT_N} toy scenes)",
    )
    d.add_argument(
        "--reasoning",
        type=at_least(0),
        metavar="WORDS",
        help="toy benchmarks: words of reasoning text given before the answer (default 16, as in training)",
    )
    d.add_argument("--batch", type=positive, default=4, metavar="B", help="samples per generate call (default 4)")
    d.add_argument(
        "--max-new-tokens", type=positive, default=64, metavar="N", help="tokens generated per answer (default 64)"
    )
    d.add_argument(
        "--out", default=out_default, metavar="DIR", help=f"output folder, resumable (default {out_default})"
    )
    d.add_argument("--seed", type=int, default=0, metavar="S", help="seeds torch, the bootstrap and splits (default 0)")
    d.add_argument("--reps", type=positive, default=1000, metavar="N", help="bootstrap resamples (default 1000)")
    d.add_argument(
        "--judge",
        metavar="MODULE:FUNCTION",
        help="a Python callable judge(text, sample) -> answer or None, asked where no rule reads an answer "
        "(rule 'judge' in the records; none is built in and nothing is sent over the network by headgain)",
    )


def add_subcommands(sub, model_opts, cfg_opts, at_least) -> None:
    """Add ``eval`` and ``sweep`` to the ``headgain`` subparsers ``sub``; ``model_opts`` and
    ``cfg_opts`` are the parent parsers of the model and config options, ``at_least(n)`` the
    argparse type of integers >= n."""
    positive = at_least(1)
    ev = sub.add_parser(
        "eval",
        parents=[model_opts],
        help="vanilla against headgain configs on a benchmark: metrics, intervals, tests",
        description="Run vanilla and each config on the same samples (one model, headgain toggled); write per-arm "
        "JSONL records, summary.json, summary.md and summary.png into --out. Rerunning with the same --out resumes.",
    )
    _data_args(ev, at_least, "headgain-eval")
    ev.add_argument(
        "--configs",
        nargs="+",
        default=["ocean-r1-7b"],
        metavar="PRESET|FILE.json",
        help="configs to compare with vanilla: preset names or HeadGainConfig JSON files (default ocean-r1-7b)",
    )
    ev.add_argument(
        "--synonyms",
        metavar="FILE.json",
        help='CHAIR synonym table {"word or phrase": "object"} for caption samples with ground-truth "objects"',
    )
    ev.add_argument("--no-progress", action="store_true", help="hide the progress line")

    sw = sub.add_parser(
        "sweep",
        parents=[model_opts, cfg_opts],
        help="tune a config on a dev split, report it on the held-out rest",
        description="Search layer bounds, thresholds and gains around --preset/--config (and strategies A-D) with "
        "successive halving on dev samples, then compare vanilla and the chosen config on held-out samples.",
    )
    _data_args(sw, at_least, "headgain-sweep")
    dev = sw.add_mutually_exclusive_group()
    dev.add_argument("--dev-split", metavar="NAME", help="tune on this split of --bench (report on --split)")
    dev.add_argument(
        "--dev-frac", type=float, default=0.3, metavar="F", help="tune on a seeded random share F (default 0.3)"
    )
    sw.add_argument("--search", choices=("grid", "random"), default="grid", help="candidate configs (default grid)")
    sw.add_argument("--trials", type=positive, default=16, metavar="N", help="random draws per strategy (default 16)")
    sw.add_argument(
        "--strategies",
        default="enhance",
        metavar="LIST",
        help="comma-separated strategies among enhance, attenuate, bipolar, mixed (default enhance)",
    )
    sw.add_argument("--metric", default="accuracy", help="dev metric to maximise (default accuracy)")
    sw.add_argument("--eta", type=int, default=2, metavar="K", help="successive halving keeps 1/K per rung (default 2)")
    sw.add_argument(
        "--min-samples",
        type=positive,
        default=4,
        metavar="N",
        help="dev samples in the first rung, at least (default 4)",
    )


# ---------------------------------------------------------------------- shared
def _samples(args, split):
    from ..cli import CLIError
    from .datasets import DataError, load
    from .shapes import shapes

    if args.reasoning is not None and not args.bench.startswith("toy:"):
        raise CLIError(f"--reasoning applies to the toy benchmarks only, not to --bench {args.bench}")
    if os.path.exists(args.bench):
        try:
            samples = list(islice(load(args.bench, args.format, split, args.adapter), args.limit))
        except DataError as e:
            raise CLIError(str(e)) from None
        if not samples:
            raise CLIError(f"{args.bench} holds no samples")
        name = os.path.basename(os.path.normpath(args.bench))
        return samples, f"{samples[0].meta.get('benchmark', 'generic')} ({name})"
    if args.bench == "shapes":
        return shapes(args.limit or SHAPES_DEFAULT_N, seed=args.seed), args.bench
    if args.bench in BUILTIN:
        from ..toy.bench import samples as toy_samples
        from ..toy.scenes import DEFAULT_REASONING

        try:
            seed = args.seed if split is None else int(split)
        except ValueError:
            raise CLIError(f"--bench {args.bench}: a split is a scene seed (an integer), not {split!r}") from None
        words = DEFAULT_REASONING if args.reasoning is None else args.reasoning
        try:
            samples = toy_samples(args.bench, seed=seed, limit=args.limit or TOY_DEFAULT_N, reasoning=words)
        except ValueError as e:
            raise CLIError(str(e)) from None
        # the benchmark name keys resumed records: other reasoning lengths are other benchmarks
        return samples, f"{args.bench} (seed {seed})" + ("" if words == DEFAULT_REASONING else f" ({words} words)")
    raise CLIError(f"--bench {args.bench}: no such file or folder, and not a built-in benchmark ({', '.join(BUILTIN)})")


def _evaluator(args):
    import torch

    from ..cli import _device, load_arch_map
    from .model import checkpoint_source, embedded_source, toy_source
    from .runner import Evaluator

    local_rank = os.environ.get("LOCAL_RANK")
    if args.device == "auto" and local_rank is not None and torch.cuda.is_available():
        args.device = f"cuda:{int(local_rank) % torch.cuda.device_count()}"  # one GPU per process
    device = _device(args.device)
    if args.model is None:
        if device.type == "cpu":
            torch.set_num_threads(1)  # the tiny models' matrices are too small to gain from threads
        dtype = "float32" if args.dtype == "auto" else args.dtype
        source = (toy_source if args.bench.startswith("toy:") else embedded_source)(args.attn, dtype, str(device))
    elif args.bench.startswith("toy:"):  # a toy model trained elsewhere: toy prompts
        source = toy_source(args.attn, "float32" if args.dtype == "auto" else args.dtype, str(device), args.model)
    else:
        source = checkpoint_source(args.model, args.attn, args.dtype, str(device))
    try:
        return Evaluator.from_source(source, load_arch_map(args))
    except (OSError, ValueError, KeyError, ImportError) as e:
        from ..cli import CLIError

        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CLIError(f"cannot load model {args.model or '(embedded)'}: {first}") from None


def _configs(names):
    from ..cli import CLIError
    from ..core.config import ConfigError, HeadGainConfig

    out = {}
    for item in names:
        if item.endswith(".json"):
            if not os.path.isfile(item):
                raise CLIError(f"config file not found: {item}")
            try:
                cfg = HeadGainConfig.from_json(item)
            except ConfigError as e:
                raise CLIError(f"bad config file {item}: {e}") from None
            name = os.path.splitext(os.path.basename(item))[0]
        else:
            cfg, name = HeadGainConfig.from_preset(item), item
        if name in out or name == "vanilla":
            raise CLIError(f"two configs named {name!r} (or one named 'vanilla'); rename the file")
        out[name] = cfg
    return out


def _print_summary(summary) -> None:
    arms = list(summary["arms"])
    print(f"{summary['benchmark']}: n = {summary['n']}")
    for arm in arms:
        values = summary["arms"][arm]
        scalars = ", ".join(f"{m} {v:.4f}" for m, v in values.items() if isinstance(v, float))
        print(f"  {arm}: {scalars}")
    for c in summary["comparisons"]:
        p = "" if c["p_value"] is None else f", McNemar p = {c['p_value']:.4g}"
        print(
            f"  {c['arm']} - vanilla, {c['metric']}: {c['delta']:+.4f} "
            f"[{c['ci95'][0]:+.4f}, {c['ci95'][1]:+.4f}]{p} (fixed {c['fixed']}, broken {c['broken']})"
        )


def _judge(args):
    """The ``--judge`` callable, or None."""
    from ..cli import CLIError

    if not args.judge:
        return None
    from .extract import load_judge

    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())  # as `python -m` would: judges next to the user's data
    try:
        return load_judge(args.judge)
    except ValueError as e:
        raise CLIError(str(e)) from None


# ---------------------------------------------------------------------- handlers
def cmd_eval(args) -> int:
    import json

    from ..cli import CLIError
    from .runner import distributed_rank, evaluate

    configs = _configs(args.configs)
    judge = _judge(args)
    samples, benchmark = _samples(args, args.split)
    synonyms = None
    if args.synonyms:
        if not os.path.isfile(args.synonyms):
            raise CLIError(f"synonyms file not found: {args.synonyms}")
        with open(args.synonyms, encoding="utf-8") as f:
            synonyms = json.load(f)
        if not isinstance(synonyms, dict):
            raise CLIError(f'{args.synonyms}: expected a JSON object {{"word": "object"}}')
    evaluator = _evaluator(args)
    rank, world = distributed_rank()
    if rank == 0:
        shards = f" in {world} shards" if world > 1 else ""
        arms = ", ".join(["vanilla", *configs])
        print(f"model: {evaluator.name}; {len(samples)} samples of {benchmark}{shards}; arms: {arms}")
    summary = evaluate(
        evaluator,
        samples,
        configs,
        args.out,
        benchmark,
        max_new_tokens=args.max_new_tokens,
        batch=args.batch,
        seed=args.seed,
        reps=args.reps,
        judge=judge,
        synonyms=synonyms,
        progress=False if args.no_progress else None,
    )
    if world > 1:
        import torch.distributed as dist

        dist.destroy_process_group()
    if summary is None:  # another rank than 0: rank 0 merges and reports
        return 0
    _print_summary(summary)
    for name in ("summary.json", "summary.md", "summary.png", "run.json"):
        print(f"wrote {os.path.join(args.out, name)}")
    return 0


def cmd_sweep(args) -> int:
    from ..cli import CLIError, load_config
    from ..core.config import STRATEGIES
    from .sweep import candidates, split_dev, sweep

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise CLIError("headgain sweep runs in one process; launch it without torchrun / accelerate launch")
    strategies = [s.strip() for s in args.strategies.split(",") if s.strip()]
    if not strategies or any(s not in STRATEGIES for s in strategies):
        raise CLIError(f"--strategies {args.strategies!r}: choose among {', '.join(STRATEGIES)}")
    if args.eta < 2:
        raise CLIError(f"--eta {args.eta} must be at least 2")
    base = load_config(args)
    judge = _judge(args)
    if args.dev_split is not None:
        if args.dev_split == args.split:
            raise CLIError(f"--dev-split {args.dev_split} equals --split: tuning and reporting samples would overlap")
        dev, dev_name = _samples(args, args.dev_split)
        held_out, benchmark = _samples(args, args.split)  # reports name the held-out samples
        if dev_name != benchmark:
            print(f"tuning on {dev_name}")
    else:
        if not 0.0 < args.dev_frac < 1.0:
            raise CLIError(f"--dev-frac {args.dev_frac} must be between 0 and 1")
        samples, benchmark = _samples(args, args.split)
        try:
            dev, held_out = split_dev(samples, args.dev_frac, args.seed)
        except ValueError as e:
            raise CLIError(str(e)) from None
    evaluator = _evaluator(args)
    num_layers = evaluator.model.config.get_text_config().num_hidden_layers
    configs = candidates(base, num_layers, args.search, args.trials, args.seed, strategies)
    print(
        f"model: {evaluator.name}; {benchmark}: {len(dev)} dev and {len(held_out)} held-out samples; "
        f"{len(configs)} candidate configs"
    )
    try:
        result = sweep(
            evaluator,
            dev,
            held_out,
            configs,
            args.out,
            benchmark,
            metric=args.metric,
            eta=args.eta,
            min_samples=args.min_samples,
            max_new_tokens=args.max_new_tokens,
            batch=args.batch,
            seed=args.seed,
            reps=args.reps,
            judge=judge,
            log=print,
        )
    except ValueError as e:
        raise CLIError(str(e)) from None
    chosen = result["chosen"]
    print(f"chosen: {chosen} (selects {result['configs'][chosen]['selected_share']:.1%} of heads)")
    _print_summary(result["held_out"])
    print(f"wrote {os.path.join(args.out, 'sweep.json')} and {os.path.join(args.out, 'held_out', 'summary.md')}")
    return 0
