"""Generation overhead of headgain against vanilla decoding and VCD, shaped like the
paper's Table 2 (seconds per batch, change against vanilla).

Arms, interleaved round by round (the starting arm rotates) so machine drift hits all
alike; the median over rounds is reported:

    vanilla-sdpa, headgain-sdpa, vanilla-eager, headgain-eager (the paper's setting), vcd-sdpa

Every arm decodes the same batch greedily with a fixed number of new tokens
(min = max). Peak memory: on a GPU ``torch.cuda.max_memory_allocated`` around each
timed run; on the CPU a fresh subprocess per arm builds the model, resets the
process's peak resident set (``/proc/self/clear_refs``), runs the batch once and reads
``VmHWM``, with glibc's mmap threshold fixed at 1 MiB so that freed tensors leave the
resident set (allocator caches of earlier arms cannot hide or inflate a peak that way).

    python benchmarks/overhead.py                      # CPU default, about 3 minutes on 2 cores
    python benchmarks/overhead.py --shape qwen2.5-vl-7b --visual-tokens 256,1024,4096
    python benchmarks/overhead.py --model /path/to/Qwen2.5-VL-7B-Instruct
    python benchmarks/overhead.py --scaling            # decoding-step cost against context and batch (scaling.py)
"""

from __future__ import annotations

import argparse
import datetime as _dt
import gc
import json
import os
import shlex
import statistics
import subprocess
import sys
import time
import warnings

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch

import headgain
from benchmarks import common
from headgain.baselines import vcd

ARMS = ("vanilla-sdpa", "headgain-sdpa", "vanilla-eager", "headgain-eager", "vcd-sdpa")
LABELS = {
    "vanilla-sdpa": "Vanilla (sdpa)",
    "headgain-sdpa": "headgain (sdpa)",
    "vanilla-eager": "Vanilla (eager)",
    "headgain-eager": "headgain (eager)",
    "vcd-sdpa": "VCD (sdpa)",
}
SECTION = "## Overhead benchmark (benchmarks/overhead.py)"
# Fixed glibc mmap/trim thresholds in the probe: every allocation of 1 MiB or more is mapped
# on its own and unmapped when freed, so VmHWM follows the live tensors. With glibc's
# default dynamic threshold, freed activations stay in the heap and the peak resident set
# depends on how small long-lived allocations fragment it, not on tensor memory.
PROBE_MALLOC = {"MALLOC_MMAP_THRESHOLD_": "1048576", "MALLOC_TRIM_THRESHOLD_": "1048576"}
RESULTS_MD = os.path.join(os.path.dirname(os.path.abspath(__file__)), "RESULTS.md")


def backend(arm: str) -> str:
    return arm.split("-", 1)[1]


def baseline(arm: str) -> str:
    return "vanilla-" + backend(arm)


# ---------------------------------------------------------------------- setup
def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument(
        "--shape",
        choices=sorted(common.SHAPES),
        default="cpu-default",
        help="random-weight model size (default cpu-default; qwen2.5-vl-7b needs a GPU)",
    )
    p.add_argument("--model", metavar="PATH", help="a local checkpoint with its processor instead of --shape")
    p.add_argument("--visual-tokens", metavar="N[,N...]", help="visual tokens per image; several values sweep")
    p.add_argument("--batch", type=int, help="prompts per batch")
    p.add_argument("--new-tokens", type=int, help="new tokens per prompt (min = max)")
    p.add_argument("--rounds", type=int, help="timed rounds (after one warm-up round)")
    p.add_argument("--arms", default=",".join(ARMS), help="comma-separated subset of " + ", ".join(ARMS))
    p.add_argument("--preset", default="ocean-r1-7b", help="headgain config preset (default ocean-r1-7b)")
    p.add_argument(
        "--memory",
        choices=("auto", "off"),
        default="auto",
        help="measure peak memory (auto: CUDA allocator stats, or one subprocess per arm on the CPU)",
    )
    p.add_argument("--json", metavar="PATH", help="write the results as JSON")
    p.add_argument("--results", metavar="PATH", default=RESULTS_MD, help="Markdown file to append a dated entry to")
    p.add_argument("--no-record", action="store_true", help="do not append to the results file")
    p.add_argument("--probe", metavar="ARM", help=argparse.SUPPRESS)  # internal: one memory measurement
    args = p.parse_args(argv)
    shape = common.SHAPES[args.shape]
    args.batch = args.batch or shape.batch
    args.new_tokens = args.new_tokens or shape.new_tokens
    args.rounds = args.rounds or shape.rounds
    vts = args.visual_tokens.split(",") if args.visual_tokens else [str(v) for v in shape.visual_tokens]
    try:
        args.visual_tokens = [int(v) for v in vts]
    except ValueError:
        p.error(f"--visual-tokens {','.join(vts)!r}: expected comma-separated integers")
    args.arms = [a.strip() for a in args.arms.split(",") if a.strip()]
    bad = [a for a in args.arms if a not in ARMS]
    if bad:
        p.error(f"--arms: unknown {bad}; known arms: {', '.join(ARMS)}")
    for name in ("batch", "new_tokens", "rounds"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if min(args.visual_tokens) < 4:
        p.error("--visual-tokens must be >= 4")
    return args


class Setup:
    """One model whose attention backend is switched per arm, plus the batch for each setting."""

    def __init__(self, args):
        self.args = args
        self.processor = None
        if args.model:
            self.model, self.processor = common.load_checkpoint(args.model, "sdpa")
        else:
            self.model = common.build_model(common.SHAPES[args.shape], "sdpa")
        self.device = self.model.device
        self.cuda = self.device.type == "cuda"
        self.handle = None

    def batch(self, visual_tokens: int) -> dict:
        dtype = self.model.dtype
        if self.processor is not None:
            return common.checkpoint_batch(self.processor, self.args.batch, visual_tokens, self.device, dtype)
        return common.synthetic_batch(self.args.batch, visual_tokens, self.device, dtype)

    def enter(self, arm: str) -> None:
        impl = backend(arm)
        if self.model.config._attn_implementation != impl:
            self.model.set_attn_implementation(impl)
        if arm.startswith("headgain"):
            self.handle = headgain.attach(self.model, cfg=self.args.preset)

    def leave(self) -> None:
        if self.handle is not None:
            self.handle.detach()
            self.handle = None

    def run(self, arm: str, inputs: dict) -> torch.Tensor:
        n = self.args.new_tokens
        if arm.startswith("vcd"):
            return vcd.generate(self.model, inputs, max_new_tokens=n, min_new_tokens=n)
        return self.model.generate(**inputs, max_new_tokens=n, min_new_tokens=n, do_sample=False)

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()


# ---------------------------------------------------------------------- measuring
class Progress:
    """A one-line progress bar on stderr (no dependency)."""

    def __init__(self, total: int):
        self.total, self.done, self.start = total, 0, time.perf_counter()
        self.tty = sys.stderr.isatty()

    def step(self, label: str) -> None:
        self.done += 1
        width = 30
        fill = round(width * self.done / self.total)
        elapsed = time.perf_counter() - self.start
        eta = elapsed / self.done * (self.total - self.done)
        line = (
            f"[{'#' * fill}{'.' * (width - fill)}] {self.done}/{self.total} {label:<32} {elapsed:5.0f}s eta {eta:4.0f}s"
        )
        if self.tty:
            sys.stderr.write("\r" + line + ("\n" if self.done == self.total else ""))
        elif self.done == self.total or self.done % 5 == 0:
            sys.stderr.write(line + "\n")
        sys.stderr.flush()


def measure(args, setup: Setup, progress: Progress) -> list[dict]:
    results = []
    for vt in args.visual_tokens:
        inputs = setup.batch(vt)
        prompt = int(inputs["input_ids"].shape[1])
        visual = int(_visual_count(setup, inputs))
        times = {arm: [] for arm in args.arms}
        peaks = {arm: [] for arm in args.arms}
        for r in range(args.rounds + 1):  # round 0 warms up
            k = r % len(args.arms)
            for arm in args.arms[k:] + args.arms[:k]:
                setup.enter(arm)
                try:
                    gc.collect()
                    if setup.cuda:
                        torch.cuda.empty_cache()
                        torch.cuda.reset_peak_memory_stats()
                        rest = torch.cuda.memory_allocated()
                    setup.sync()
                    t0 = time.perf_counter()
                    out = setup.run(arm, inputs)
                    setup.sync()
                    dt = time.perf_counter() - t0
                finally:
                    setup.leave()
                if out.shape[1] != prompt + args.new_tokens:
                    raise RuntimeError(f"{arm} produced {out.shape[1] - prompt} new tokens, expected {args.new_tokens}")
                if r > 0:
                    times[arm].append(dt)
                    if setup.cuda:
                        peaks[arm].append((torch.cuda.max_memory_allocated(), torch.cuda.max_memory_allocated() - rest))
                progress.step(f"{vt} vis tok, {'warm-up' if r == 0 else f'round {r}'}: {arm}")
                del out
        arms = {}
        for arm in args.arms:
            med = statistics.median(times[arm])
            arms[arm] = {
                "times_s": [round(t, 4) for t in times[arm]],
                "median_s": med,
                "tokens_per_s": args.batch * args.new_tokens / med,
            }
            if peaks[arm]:
                arms[arm]["peak_mib"] = max(p for p, _ in peaks[arm]) / 2**20
                arms[arm]["peak_above_rest_mib"] = max(d for _, d in peaks[arm]) / 2**20
                arms[arm]["memory_method"] = "torch.cuda.max_memory_allocated"
        results.append({"visual_tokens": vt, "visual_tokens_per_prompt": visual, "prompt_tokens": prompt, "arms": arms})
    return results


def _visual_count(setup: Setup, inputs: dict) -> float:
    ids = {getattr(setup.model.config, n, None) for n in ("image_token_id", "video_token_id")} - {None}
    hits = sum((inputs["input_ids"] == i).sum() for i in ids)
    return float(hits) / inputs["input_ids"].shape[0]


def _status_kb(field: str) -> int:
    with open("/proc/self/status", encoding="utf-8") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def probe(args) -> None:
    """Child process: peak resident memory of one arm's single run (prints one JSON line)."""
    setup = Setup(args)
    inputs = setup.batch(args.visual_tokens[0])
    setup.enter(args.probe)
    gc.collect()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM to the current resident set
        reset = True
    except OSError:
        reset = False
    rest = _status_kb("VmRSS")
    setup.run(args.probe, inputs)
    peak = _status_kb("VmHWM")
    print(
        "PROBE "
        + json.dumps(
            {
                "peak_mib": peak / 1024,
                "peak_above_rest_mib": (peak - rest) / 1024 if reset else None,
                "memory_method": "VmHWM of a fresh process" + ("" if reset else " (no reset)"),
            }
        )
    )


def cpu_memory(args, results: list[dict], progress: Progress) -> None:
    """Run one probe subprocess per arm and setting; fill the peaks into ``results``."""
    for entry in results:
        for arm in args.arms:
            cmd = [
                sys.executable,
                os.path.abspath(__file__),
                "--probe",
                arm,
                "--shape",
                args.shape,
                "--visual-tokens",
                str(entry["visual_tokens"]),
                "--batch",
                str(args.batch),
                "--new-tokens",
                str(args.new_tokens),
                "--preset",
                args.preset,
                "--no-record",
            ]
            if args.model:
                cmd += ["--model", args.model]
            proc = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, **PROBE_MALLOC))
            line = next((out for out in proc.stdout.splitlines() if out.startswith("PROBE ")), None)
            if proc.returncode != 0 or line is None:
                raise RuntimeError(f"memory probe for {arm} failed:\n{proc.stderr[-2000:]}")
            entry["arms"][arm].update(json.loads(line[6:]))
            progress.step(f"{entry['visual_tokens']} vis tok, memory: {arm}")


# ---------------------------------------------------------------------- reporting
def summarise(args, results: list[dict], cuda: bool) -> dict:
    """Relative changes and target checks, added in place; returns the target verdicts."""
    limit = 1.0 if cuda else 2.0
    verdicts = []
    for entry in results:
        arms = entry["arms"]
        for arm, a in arms.items():
            base = arms.get(baseline(arm))
            if base is not None and arm != baseline(arm):
                a["change_pct"] = 100.0 * (a["median_s"] / base["median_s"] - 1.0)
                if a.get("peak_mib") is not None and base.get("peak_mib"):
                    a["peak_change_pct"] = 100.0 * (a["peak_mib"] / base["peak_mib"] - 1.0)
        v = {"visual_tokens": entry["visual_tokens"]}
        hs, vs, ve = arms.get("headgain-sdpa"), arms.get("vanilla-sdpa"), arms.get("vanilla-eager")
        if hs and vs:
            v["headgain_sdpa_vs_vanilla_sdpa_pct"] = hs["change_pct"]
            v[f"time_within_{limit:g}pct"] = hs["change_pct"] <= limit
            if hs.get("peak_mib") is not None and vs.get("peak_mib"):
                v["peak_change_pct"] = hs["peak_change_pct"]
                v["peak_within_1pct"] = abs(hs["peak_change_pct"]) <= 1.0
        if hs and ve:
            v["headgain_sdpa_vs_vanilla_eager_pct"] = 100.0 * (hs["median_s"] / ve["median_s"] - 1.0)
            v["faster_than_vanilla_eager"] = hs["median_s"] < ve["median_s"]
        if "vcd-sdpa" in arms and vs:
            v["vcd_vs_vanilla_sdpa_pct"] = arms["vcd-sdpa"]["change_pct"]
        verdicts.append(v)
    return {"time_limit_pct": limit, "per_setting": verdicts}


def _cell(a: dict, base: bool) -> str:
    s = f"{a['median_s']:.2f}"
    return s if base or "change_pct" not in a else f"{s} ({a['change_pct']:+.1f}%)"


def tables(args, results: list[dict]) -> tuple[str, str]:
    """(Table 2 layout: seconds per batch, memory and throughput) as Markdown."""
    head = "| method | " + " | ".join(f"{e['visual_tokens_per_prompt']:.0f} visual tok" for e in results) + " |"
    sep = "|---|" + "---|" * len(results)
    rows = [head, sep]
    for arm in args.arms:
        rows.append(
            f"| {LABELS[arm]} | " + " | ".join(_cell(e["arms"][arm], arm == baseline(arm)) for e in results) + " |"
        )
    t1 = "\n".join(rows)
    rows = [
        "| method | visual tok | s/batch | tokens/s | peak MiB | peak above rest MiB |",
        "|---|---|---|---|---|---|",
    ]
    for e in results:
        for arm in args.arms:
            a = e["arms"][arm]
            peak = (
                "n/a"
                if a.get("peak_mib") is None
                else f"{a['peak_mib']:.0f}" + (f" ({a['peak_change_pct']:+.2f}%)" if "peak_change_pct" in a else "")
            )
            above = "n/a" if a.get("peak_above_rest_mib") is None else f"{a['peak_above_rest_mib']:.0f}"
            rows.append(
                f"| {LABELS[arm]} | {e['visual_tokens_per_prompt']:.0f} | {a['median_s']:.3f} | "
                f"{a['tokens_per_s']:.1f} | {peak} | {above} |"
            )
    return t1, "\n".join(rows)


def verdict_lines(targets: dict) -> list[str]:
    lines = []
    lim = targets["time_limit_pct"]
    for v in targets["per_setting"]:
        parts = [f"{v['visual_tokens']} visual tokens:"]
        if "headgain_sdpa_vs_vanilla_sdpa_pct" in v:
            ok = "met" if v[f"time_within_{lim:g}pct"] else "MISSED"
            parts.append(
                f"headgain-sdpa vs vanilla-sdpa {v['headgain_sdpa_vs_vanilla_sdpa_pct']:+.2f}% "
                f"(target <= +{lim:g}%: {ok});"
            )
        if "faster_than_vanilla_eager" in v:
            ok = "met" if v["faster_than_vanilla_eager"] else "MISSED"
            parts.append(f"vs vanilla-eager {v['headgain_sdpa_vs_vanilla_eager_pct']:+.1f}% (faster: {ok});")
        if "peak_change_pct" in v:
            ok = "met" if v["peak_within_1pct"] else "MISSED"
            parts.append(f"peak memory vs vanilla-sdpa {v['peak_change_pct']:+.2f}% (within 1%: {ok});")
        if "vcd_vs_vanilla_sdpa_pct" in v:
            parts.append(f"VCD {v['vcd_vs_vanilla_sdpa_pct']:+.1f}%")
        lines.append(" ".join(parts))
    return lines


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["--scaling"]:
        from benchmarks import scaling

        return scaling.main(argv[1:])
    args = parse_args(argv)
    # the reference fallback is recorded with each entry (common.extension_status)
    warnings.filterwarnings("ignore", message="headgain.*PyTorch reference", category=RuntimeWarning)
    if args.probe:
        probe(args)
        return 0
    command = "python benchmarks/overhead.py" + "".join(" " + shlex.quote(a) for a in argv)
    setup = Setup(args)
    mem_probes = args.memory == "auto" and not setup.cuda and os.path.exists("/proc/self/status")
    total = len(args.visual_tokens) * len(args.arms) * (args.rounds + 1 + (1 if mem_probes else 0))
    progress = Progress(total)
    results = measure(args, setup, progress)
    if args.memory == "off":
        for e in results:
            for a in e["arms"].values():
                for k in ("peak_mib", "peak_above_rest_mib", "memory_method"):
                    a.pop(k, None)
    elif mem_probes:
        del setup.model
        gc.collect()
        cpu_memory(args, results, progress)
    targets = summarise(args, results, setup.cuda)
    info = common.machine(setup.device.type)
    date = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    what = args.model or args.shape
    t1, t2 = tables(args, results)
    title = (
        f"Overhead: {what}, batch {args.batch}, {args.new_tokens} new tokens (greedy, min = max), "
        f"median of {args.rounds} interleaved rounds"
    )
    print("\n" + title + "\n\nSeconds per batch (change against vanilla of the same backend):\n\n" + t1)
    print("\nThroughput and peak memory (change against vanilla of the same backend):\n\n" + t2 + "\n")
    for line in verdict_lines(targets):
        print(line)
    payload = {
        "date": date,
        "command": command,
        "model": what,
        "batch": args.batch,
        "new_tokens": args.new_tokens,
        "rounds": args.rounds,
        "preset": args.preset,
        "machine": info,
        "revision": common.git_revision(),
        "results": results,
        "targets": targets,
    }
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(payload, f, indent=2)
    if not args.no_record:
        hw = info.get("gpu") or f"{info['cpu']}, {info['cores']} cores ({info['threads']} torch threads)"
        ext = common.extension_status(setup.device.type)
        entry = "\n".join(
            [
                f"### {date}: {what}",
                "",
                f"- Machine: {hw}; torch {info['torch']}, transformers {info['transformers']}, python {info['python']}"
                + (f", CUDA {info['cuda']}" if "cuda" in info else ""),
                f"- headgain ops: {ext}; revision {payload['revision']}",
                f"- Command: `{command}`",
                f"- Workload: batch {args.batch}, {args.new_tokens} new tokens (greedy, min = max), "
                f"preset {args.preset}, "
                f"median of {args.rounds} interleaved rounds after a warm-up round; prompt lengths "
                + ", ".join(str(e["prompt_tokens"]) for e in results),
                "- Peak memory: "
                + (
                    "torch.cuda.max_memory_allocated around each timed run"
                    if setup.cuda
                    else "VmHWM of a fresh subprocess per arm, reset before its one run (glibc mmap threshold 1 MiB)"
                    if mem_probes
                    else "not measured"
                ),
                "",
                t1,
                "",
                t2,
                "",
                *[f"- {verdict}" for verdict in verdict_lines(targets)],
            ]
        )
        common.record(args.results, SECTION, entry)
        print(f"\nappended to {args.results}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
