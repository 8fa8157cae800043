"""Instructions executed by one prefill, vanilla sdpa against headgain: the prefill's cost
counted by valgrind's callgrind rather than timed.

Timed prefills on a shared machine spread by several percent from one call to the next, more
than what headgain adds to a prefill (one attention row per layer, recomputed from the
queries and keys the backend already had, and one scaling of the head outputs). Callgrind
counts the instructions of exactly the prefill call, the same count whatever else the
machine runs, so a change of a fraction of a percent shows.

Each (arm, point) runs in its own process under ``valgrind --tool=callgrind`` with
instrumentation off until the model is built and one uncounted prefill has warmed the
allocator and the one-time paths; then counting is switched on around one prefill (through
callgrind's client requests, from a small C helper compiled here with gcc) and off again.
Both arms run the same model, inputs and thread count (one torch thread: valgrind runs
threads one at a time). headgain-fused and headgain-unfused run the same prefill code (the
fused kernel serves decoding steps only), so one headgain arm is counted.

    python benchmarks/prefill_instructions.py                        # 48- and 96-token prompts
    python benchmarks/prefill_instructions.py --points 1x256 --no-record

Needs valgrind with its headers (Debian: valgrind) and gcc. Slow: under valgrind the model
is built and run many times slower than on the CPU; on the CPU default shape one arm of the
96-token prompt took about 20 minutes on a busy 2-core machine, and longer prompts longer.
"""

from __future__ import annotations

import argparse
import ctypes
import datetime as _dt
import os
import re
import shlex
import subprocess
import sys
import tempfile

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import common
from benchmarks.scaling import PREFIX, SUFFIX

ARMS = ("vanilla-sdpa", "headgain")
SECTION = "## Prefill instructions (benchmarks/prefill_instructions.py)"
RESULTS_MD = os.path.join(os.path.dirname(os.path.abspath(__file__)), "RESULTS.md")
_HELPER = r"""
#include <valgrind/callgrind.h>
void headgain_count_on(void) { CALLGRIND_START_INSTRUMENTATION; CALLGRIND_TOGGLE_COLLECT; }
void headgain_count_off(void) { CALLGRIND_TOGGLE_COLLECT; CALLGRIND_STOP_INSTRUMENTATION; }
"""


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--shape", choices=sorted(common.SHAPES), default="cpu-default", help="model size")
    p.add_argument("--points", default="1x16,1x64", help="BATCHxVISUAL prompts (default 1x16,1x64)")
    p.add_argument("--preset", default="ocean-r1-7b", help="headgain config preset (default ocean-r1-7b)")
    p.add_argument("--results", metavar="PATH", default=RESULTS_MD, help="Markdown file to append an entry to")
    p.add_argument("--no-record", action="store_true", help="do not append to the results file")
    p.add_argument("--child", nargs=3, metavar=("ARM", "BATCH", "VISUAL"), help=argparse.SUPPRESS)
    p.add_argument("--helper", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    points = []
    for text in args.points.split(","):
        m = re.fullmatch(r"\s*(\d+)x(\d+)\s*", text)
        if not m or int(m.group(1)) < 1:
            p.error(f"--points {text!r}: expected BATCHxVISUAL with BATCH >= 1, e.g. 1x256")
        points.append((int(m.group(1)), int(m.group(2))))
    args.points = points
    return args


def build_helper(workdir: str) -> str:
    """Compile the C helper that switches callgrind's counting on and off (no-ops outside
    valgrind) into ``workdir``; returns the shared library's path."""
    helper = os.path.join(workdir, "count.so")
    source = os.path.join(workdir, "count.c")
    with open(source, "w", encoding="utf-8") as f:
        f.write(_HELPER)
    subprocess.run(["gcc", "-shared", "-fPIC", "-O1", "-o", helper, source], check=True)
    return helper


def child(args) -> None:
    """Inside valgrind: build, warm up, count one prefill of ``args.child``'s arm and point."""
    import torch

    import headgain
    from headgain.testing.tiny import IMAGE_ID

    torch.set_num_threads(1)
    arm, batch, visual = args.child[0], int(args.child[1]), int(args.child[2])
    counter = ctypes.CDLL(args.helper)
    model = common.build_model(common.SHAPES[args.shape], "sdpa")
    ids = torch.full((batch, PREFIX + visual + SUFFIX), 9, dtype=torch.long)
    ids[:, PREFIX : PREFIX + visual] = IMAGE_ID
    handle = headgain.attach(model, cfg=args.preset) if arm == "headgain" else None
    with torch.no_grad():
        for count in (False, True):  # the first prefill warms up, uncounted
            if count:
                counter.headgain_count_on()
            model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False)
            if count:
                counter.headgain_count_off()
    if handle is not None:
        handle.detach()


def count(args, helper: str, workdir: str, arm: str, batch: int, visual: int) -> int:
    """Instructions callgrind counted in ``arm``'s prefill at (batch, visual)."""
    out = os.path.join(workdir, f"callgrind.{arm}.{batch}x{visual}")
    cmd = [
        "valgrind",
        "--tool=callgrind",
        "--instr-atstart=no",
        "--collect-atstart=no",
        f"--callgrind-out-file={out}",
        sys.executable,
        os.path.abspath(__file__),
        "--shape",
        args.shape,
        "--preset",
        args.preset,
        "--helper",
        helper,
        "--child",
        arm,
        str(batch),
        str(visual),
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    run = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if run.returncode != 0:
        raise RuntimeError(f"{arm} at {batch}x{visual} failed under valgrind:\n{run.stderr[-3000:]}")
    with open(out, encoding="utf-8") as f:
        totals = [line for line in f if line.startswith(("summary:", "totals:"))]
    if not totals:
        raise RuntimeError(f"callgrind wrote no totals to {out}")
    return int(totals[-1].split()[1])


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.child:
        child(args)
        return 0
    command = "python benchmarks/prefill_instructions.py" + "".join(
        " " + shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv)
    )
    rows = []
    with tempfile.TemporaryDirectory() as workdir:
        helper = build_helper(workdir)
        for batch, visual in args.points:
            counts = {arm: count(args, helper, workdir, arm, batch, visual) for arm in ARMS}
            change = counts["headgain"] / counts["vanilla-sdpa"] - 1
            rows.append((batch, visual, PREFIX + visual + SUFFIX, counts, change))
            print(f"B={batch} vis={visual}: vanilla {counts['vanilla-sdpa']:,} instructions, headgain {change:+.3%}")
    lines = [
        "| batch | visual | prompt tokens | vanilla instructions | headgain instructions | change |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for batch, visual, tokens, counts, change in rows:
        lines.append(
            f"| {batch} | {visual} | {tokens} | {counts['vanilla-sdpa']:,} | {counts['headgain']:,} | {change:+.3%} |"
        )
    text = "\n".join(lines)
    print("\n" + text)
    if not args.no_record:
        info = common.machine("cpu")
        date = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
        entry = "\n".join(
            [
                f"### {date}: {args.shape}",
                "",
                f"- Machine: {info['cpu']}; torch {info['torch']}, transformers {info['transformers']}"
                "; one torch thread",
                f"- headgain ops: {common.extension_status('cpu')}; revision {common.git_revision()}",
                f"- Command: `{command}`",
                f"- Instructions of one prefill (use_cache off), counted by callgrind after one uncounted warm-up "
                f"prefill; preset {args.preset}",
                "",
                text,
            ]
        )
        common.record(args.results, SECTION, entry)
        print(f"appended to {args.results}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
