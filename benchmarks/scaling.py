"""Cost of one decoding step (and of the prefill) against context length and batch:
the scaling mode of the overhead benchmark (`python benchmarks/overhead.py --scaling`).

Arms, interleaved call by call (each timed call of one arm is followed by one of each other
arm, the starting arm rotating), so that drifts of the machine hit every arm alike. Each
change against vanilla is the median over rounds of the round's ratio (the arms' times in the
same round), with a 95% bootstrap interval over rounds:

    vanilla-sdpa        the model as loaded
    headgain-fused      headgain attached (default): decoding steps compute the attention
                        output and S_v in one pass over the keys and values
    headgain-unfused    headgain attached with fused=False: the sdpa backend, then S_v from
                        a second read of the keys

Decoding steps: the KV cache of every point (batch x context) is filled with random keys
and values instead of running an N-token prefill (an hour of CPU at 16k tokens x 16), and
headgain is given the prompt's visual positions (the first N tokens after a 4-token
prefix) as its prefill would have. Each timed call decodes one token for the whole batch;
the cache is cropped back after it, so every call sees the same context. `--cache dynamic`
(transformers' default: every step concatenates the new keys to a copy of the cache) or
`static` (a preallocated cache written in place; the step's cost is then the weights and the
attention). Prefill: where
batch x context is at most --prefill-limit tokens, a real prefill of token ids (visual
placeholders, no pixels) is timed too. `--attach once` (default): headgain stays attached to
a copy of the model for the whole run, as in `generate()`, with two copies of the weights in
memory; `--attach per-call` (the runs before 2026-11-29 19:15 UTC): one model, headgain
attached before each timed call and detached after it, so that what the first call after an
attach does counts in every headgain step.

    python benchmarks/overhead.py --scaling                          # CPU grid, ~15 minutes on 2 cores
    python benchmarks/overhead.py --scaling --batches 1,4 --visual-tokens 256,1024 --rounds 3
"""

from __future__ import annotations

import argparse
import copy
import datetime as _dt
import json
import os
import shlex
import statistics
import sys
import time

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np
import torch

import headgain
from benchmarks import common
from headgain.eval.stats import paired_bootstrap
from headgain.testing.tiny import IMAGE_ID

ARMS = ("vanilla-sdpa", "headgain-fused", "headgain-unfused")
ATTACH = {"once": "once to a copy of the model", "per-call": "around each call"}
SECTION = "## Decoding-step scaling (benchmarks/overhead.py --scaling)"
RESULTS_MD = os.path.join(os.path.dirname(os.path.abspath(__file__)), "RESULTS.md")
PREFIX, SUFFIX = 4, 28  # text tokens before and after the visual span


def _ints(text: str, name: str, parser) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        parser.error(f"--{name} {text!r}: expected comma-separated integers")
    if not values or min(values) < 0:
        parser.error(f"--{name} {text!r}: expected non-negative integers")
    return values


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="benchmarks/overhead.py --scaling",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawTextHelpFormatter,
    )
    p.add_argument("--shape", choices=sorted(common.SHAPES), default="cpu-default", help="model size")
    p.add_argument("--batches", default="1,4,16", help="batch sizes (default 1,4,16)")
    p.add_argument("--visual-tokens", default="256,1024,4096,16384", help="visual tokens per sample")
    p.add_argument("--reasoning", default="0,2048", help="tokens already generated after the prompt (default 0,2048)")
    p.add_argument("--cache", choices=("dynamic", "static"), default="dynamic", help="KV cache (default dynamic)")
    p.add_argument("--steps", type=int, default=6, help="timed decoding calls per arm and round (default 6)")
    p.add_argument("--rounds", type=int, default=5, help="rounds after a warm-up round (default 5)")
    p.add_argument("--prefill-limit", type=int, default=4096, help="time the prefill up to batch x context tokens")
    p.add_argument("--preset", default="ocean-r1-7b", help="headgain config preset")
    p.add_argument(
        "--attach",
        choices=("once", "per-call"),
        default="once",
        help="once (default): headgain stays attached to a copy of the model, as in generate() (two copies of "
        "the weights); per-call: attached before each timed call and detached after",
    )
    p.add_argument("--json", metavar="PATH", help="write the results as JSON")
    p.add_argument("--plot", metavar="PNG", default=os.path.join(os.path.dirname(RESULTS_MD), "scaling.png"))
    p.add_argument("--results", metavar="PATH", default=RESULTS_MD, help="Markdown file to append an entry to")
    p.add_argument("--no-record", action="store_true", help="do not append to the results file")
    args = p.parse_args(argv)
    args.batches = _ints(args.batches, "batches", p)
    args.visual_tokens = _ints(args.visual_tokens, "visual-tokens", p)
    args.reasoning = _ints(args.reasoning, "reasoning", p)
    if min(args.batches) < 1 or args.steps < 1 or args.rounds < 1:
        p.error("--batches, --steps and --rounds must be >= 1")
    return args


class Point:
    """One (batch, visual tokens, reasoning tokens) point: its cache, visual mask and step inputs."""

    def __init__(self, model, batch: int, visual: int, reasoning: int, device, dtype, cache: str = "dynamic"):
        self.batch, self.visual_tokens, self.reasoning = batch, visual, reasoning
        self.context = PREFIX + visual + SUFFIX + reasoning
        self.static = cache == "static"
        text = model.config.get_text_config()
        kv_heads = text.num_key_value_heads
        head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
        from transformers import DynamicCache, StaticCache

        g = torch.Generator(device="cpu").manual_seed(batch * 100003 + self.context)
        if self.static:  # one free slot: the step writes it, `rewind` frees it again
            self.cache = StaticCache(config=model.config, max_cache_len=self.context + 1)
        else:
            self.cache = DynamicCache(config=model.config)
        for layer in range(text.num_hidden_layers):
            shape = (batch, kv_heads, self.context, head_dim)
            k = torch.randn(shape, generator=g).to(device=device, dtype=dtype)
            v = torch.randn(shape, generator=g).to(device=device, dtype=dtype)
            self.cache.update(k, v, layer)
        self.visual = torch.zeros(batch, self.context, dtype=torch.bool, device=device)
        self.visual[:, PREFIX : PREFIX + visual] = True
        self.step = {
            "input_ids": torch.full((batch, 1), 7, dtype=torch.long, device=device),
            "attention_mask": torch.ones(batch, self.context + 1, dtype=torch.long, device=device),
            "past_key_values": self.cache,  # the argument name of transformers 5.17 (5.24 also takes it)
            "use_cache": True,
        }

    def rewind(self) -> None:
        """Drop the token the last step added, so that every step sees the same context."""
        if self.static:  # transformers 5.17's static layers have no crop: move their write position back
            for layer in self.cache.layers:
                layer.cumulative_length.sub_(1)
        else:
            self.cache.crop(-1)  # negative: tokens to remove

    def label(self) -> str:
        return f"B={self.batch} vis={self.visual_tokens} reas={self.reasoning}"


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _timed_step(model, point: Point) -> float:
    """Seconds of one decoding call of ``model`` at ``point``; the call's token is dropped again."""
    try:
        _sync(point.visual.device)
        start = time.perf_counter()
        with torch.no_grad():
            model(**point.step)
        _sync(point.visual.device)
        return time.perf_counter() - start
    finally:
        point.rewind()


def _timed_prefill(model, point: Point) -> float:
    """Seconds of one prefill of ``point``'s context (token ids, visual placeholders) by ``model``."""
    ids = torch.full((point.batch, point.context), 9, dtype=torch.long, device=point.visual.device)
    ids[point.visual] = IMAGE_ID
    _sync(ids.device)
    start = time.perf_counter()
    with torch.no_grad():
        model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False)
    _sync(ids.device)
    return time.perf_counter() - start


def decode_time(model, point: Point, arm: str, preset: str) -> float:
    """Seconds of one decoding call of ``arm`` at ``point`` (headgain attached for the call only)."""
    if arm == "vanilla-sdpa":
        return _timed_step(model, point)
    handle = headgain.attach(model, cfg=preset, fused=arm == "headgain-fused")
    try:
        handle.set_visual_mask(point.visual)  # the cached context's visual positions (it was filled before attaching)
        return _timed_step(model, point)
    finally:
        handle.detach()


def prefill_time(model, point: Point, arm: str, preset: str) -> float:
    """Seconds of one prefill of ``point``'s context under ``arm`` (headgain attached for the call only)."""
    if arm == "vanilla-sdpa":
        return _timed_prefill(model, point)
    handle = headgain.attach(model, cfg=preset, fused=arm == "headgain-fused")
    try:
        return _timed_prefill(model, point)
    finally:
        handle.detach()


class Runner:
    """Times the arms' calls. ``attach="once"``: the headgain arms run on a copy of the model
    that stays attached for the whole run, as in ``generate()`` (the fused and unfused arms
    switch ``handle.fused``; two copies of the weights in memory, each point's cache filled
    alike in both); ``"per-call"``: one model, headgain attached before each timed call and
    detached after it (one copy of the weights; what the first call after an attach does
    counts in that call)."""

    def __init__(self, model, preset: str, attach: str):
        self.model, self.preset = model, preset
        self.copy = copy.deepcopy(model) if attach == "once" else None
        self.handle = None if self.copy is None else headgain.attach(self.copy, cfg=preset)

    def points(self, batch: int, visual: int, reasoning: int, cache: str) -> dict[str, Point]:
        """Arm -> its `Point` (the headgain arms share the attached copy's)."""
        model = self.model
        plain = Point(model, batch, visual, reasoning, model.device, model.dtype, cache)
        if self.copy is None:
            return dict.fromkeys(ARMS, plain)
        held = Point(self.copy, batch, visual, reasoning, model.device, model.dtype, cache)
        self.handle.set_visual_mask(held.visual, keep=True)  # the cached context's visual positions
        return {"vanilla-sdpa": plain, "headgain-fused": held, "headgain-unfused": held}

    def decode(self, points: dict[str, Point], arm: str) -> float:
        """Seconds of one decoding call of ``arm``."""
        return self._time(points, arm, decode_time, _timed_step)

    def prefill(self, points: dict[str, Point], arm: str) -> float:
        """Seconds of one prefill of ``arm``."""
        return self._time(points, arm, prefill_time, _timed_prefill)

    def _time(self, points: dict[str, Point], arm: str, per_call, timed) -> float:
        """``per_call(model, point, arm, preset)`` (headgain attached around the call), or
        ``timed(model, point)`` on the vanilla model or the attached copy."""
        if self.copy is None:
            return per_call(self.model, points[arm], arm, self.preset)
        if arm == "vanilla-sdpa":
            return timed(self.model, points[arm])
        self.handle.fused = arm == "headgain-fused"
        return timed(self.copy, points[arm])


def _rotated(rnd: int) -> tuple[str, ...]:
    return ARMS[rnd % len(ARMS) :] + ARMS[: rnd % len(ARMS)]


def paired_change(arm: list[float], vanilla: list[float]) -> tuple[float, tuple[float, float]]:
    """Median over rounds of the round's time of ``arm`` over vanilla's, minus 1, and a 95%
    bootstrap interval of that median (rounds resampled; one round: the interval is the point)."""
    ratios = np.array(arm) / np.array(vanilla)
    lo, hi = paired_bootstrap(lambda idx: float(np.median(ratios[idx])), len(ratios))
    return float(np.median(ratios)) - 1, (lo - 1, hi - 1)


def measure(args, model) -> list[dict]:
    runner = Runner(model, args.preset, args.attach)
    results = []
    points = [(b, v, r) for r in args.reasoning for v in args.visual_tokens for b in args.batches]
    for n, (b, v, r) in enumerate(points, 1):
        point = runner.points(b, v, r, args.cache)
        context = point["vanilla-sdpa"].context
        do_prefill = b * context <= args.prefill_limit
        decode = {a: [] for a in ARMS}
        prefill = {a: [] for a in ARMS}
        for rnd in range(args.rounds + 1):  # round 0 warms up
            steps = {a: [] for a in ARMS}
            for step in range(args.steps):
                for arm in _rotated(rnd + step):
                    steps[arm].append(runner.decode(point, arm))
            for arm in _rotated(rnd) if do_prefill else ():
                t = runner.prefill(point, arm)
                if rnd:
                    prefill[arm].append(t)
            if rnd:
                for arm in ARMS:
                    decode[arm].append(statistics.median(steps[arm]))
        entry = {"batch": b, "visual_tokens": v, "reasoning": r, "context": context, "arms": {}}
        for arm in ARMS:
            entry["arms"][arm] = {
                "decode_ms": 1e3 * statistics.median(decode[arm]),
                "decode_ms_rounds": [1e3 * t for t in decode[arm]],
                "prefill_ms": 1e3 * statistics.median(prefill[arm]) if do_prefill else None,
            }
        base = entry["arms"]["vanilla-sdpa"]
        for arm in ARMS[1:]:
            a = entry["arms"][arm]
            a["decode_change"], a["decode_ci"] = paired_change(decode[arm], decode["vanilla-sdpa"])
            a["prefill_change"], a["prefill_ci"] = (
                paired_change(prefill[arm], prefill["vanilla-sdpa"]) if do_prefill else (None, None)
            )
        results.append(entry)
        del point
        fused, unfused = entry["arms"]["headgain-fused"], entry["arms"]["headgain-unfused"]
        print(
            f"[{n}/{len(points)}] B={b} vis={v} reas={r}: vanilla {base['decode_ms']:.1f} ms/step, "
            f"fused {fused['decode_change']:+.1%}, unfused {unfused['decode_change']:+.1%}",
            file=sys.stderr,
            flush=True,
        )
    return results


def table(results: list[dict]) -> str:
    def pct(x, ci=None):
        if x is None:
            return "-"
        return f"{x:+.1%}" if ci is None else f"{x:+.1%} [{ci[0]:+.1%}, {ci[1]:+.1%}]"

    lines = [
        "| batch | visual | reasoning | context | vanilla ms/step | fused | unfused "
        "| vanilla prefill ms | fused | unfused |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for e in results:
        a = e["arms"]
        pre = a["vanilla-sdpa"]["prefill_ms"]
        fused, unfused = a["headgain-fused"], a["headgain-unfused"]
        lines.append(
            f"| {e['batch']} | {e['visual_tokens']} | {e['reasoning']} | {e['context']} | "
            f"{a['vanilla-sdpa']['decode_ms']:.1f} | {pct(fused['decode_change'], fused['decode_ci'])} | "
            f"{pct(unfused['decode_change'], unfused['decode_ci'])} | {'-' if pre is None else f'{pre:.0f}'} | "
            f"{pct(fused['prefill_change'], fused['prefill_ci'])} | "
            f"{pct(unfused['prefill_change'], unfused['prefill_ci'])} |"
        )
    return "\n".join(lines)


def plot(results: list[dict], path: str, title: str) -> None:
    """Decoding-step change against vanilla over context length, one line per batch and arm."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for b in sorted({e["batch"] for e in results}):
        for arm, style in (("headgain-fused", "-o"), ("headgain-unfused", "--x")):
            pts = sorted((e["context"], 100 * e["arms"][arm]["decode_change"]) for e in results if e["batch"] == b)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], style, label=f"{arm.split('-')[1]}, batch {b}")
    ax.axhline(0, color="black", lw=0.8)
    ax.axhspan(-2, 2, color="green", alpha=0.1, label="within 2%")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("context (tokens in the KV cache)")
    ax.set_ylabel("decoding step vs vanilla sdpa (%)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    args = parse_args(argv)
    command = "python benchmarks/overhead.py --scaling" + "".join(
        " " + shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv)
    )
    model = common.build_model(common.SHAPES[args.shape], "sdpa")
    results = measure(args, model)
    info = common.machine(model.device.type)
    date = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    hw = info.get("gpu") or f"{info['cpu']}, {info['cores']} cores ({info['threads']} torch threads)"
    text = table(results)
    print("\n" + text)
    if args.plot:
        plot(results, args.plot, f"{args.shape} on {hw}")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"date": date, "command": command, "machine": info, "results": results}, f, indent=2)
    if not args.no_record:
        entry = "\n".join(
            [
                f"### {date}: {args.shape}",
                "",
                f"- Machine: {hw}; torch {info['torch']}, transformers {info['transformers']}",
                f"- headgain ops: {common.extension_status(model.device.type)}; revision {common.git_revision()}",
                f"- Command: `{command}`",
                f"- Decoding step ({args.cache} cache): per round, the median of {args.steps} calls per arm, "
                f"arms alternating call by call, headgain attached {ATTACH[args.attach]}; prefill: one call per arm "
                "and round. Change against vanilla "
                f"sdpa: median over {args.rounds} rounds of the round's ratio, with a 95% bootstrap interval "
                f"over rounds; preset {args.preset}",
                "",
                text,
                "",
                f"![decoding-step change against context]({os.path.basename(args.plot)})" if args.plot else "",
            ]
        )
        common.record(args.results, SECTION, entry)
        print(f"appended to {args.results}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
