"""Throughput of vLLM with headgain's dynamic plugin against vanilla vLLM (generated tokens/s).

Two engines in this process over the same random-weight Qwen2 checkpoint (written here;
nothing is downloaded), both in eager mode (``--compiled``: torch.compile, which vLLM's CPU
build runs without CUDA graphs) without prefix caching (the prompts differ;
configured requests never use it) or chunked prefill (every prompt in one pass):
"vanilla" (plugin off) and "headgain" (plugin on, every request with a config). Each prompt
holds ``--visual`` tokens the arch map calls visual. Batch sizes and arms are interleaved
round by round; the median over rounds is reported. Run it in the vLLM venv (`make test-vllm` makes one):

    VLLM_CPU_KVCACHE_SPACE=1 PYTHONPATH=. .venv-vllm/bin/python benchmarks/vllm_throughput.py
    ... benchmarks/vllm_throughput.py --batches 1,8,32 --new-tokens 64 --rounds 5
"""

from __future__ import annotations

import argparse
import datetime as _dt
import os
import shlex
import statistics
import sys
import tempfile
import time

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # both engines in this process
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB per engine

from benchmarks import common  # noqa: E402

SECTION = "## vLLM throughput (benchmarks/vllm_throughput.py)"
VISUAL_ID = 20
CFG = {"l_perc": 2, "tau_perc": 0.2, "g_perc": 1.2, "l_reas": 4, "tau_reas": 0.05, "g_reas": 1.3}


def _args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batches", default="1,4,16", help="comma-separated numbers of requests per generate call")
    p.add_argument("--prompt", type=int, default=256, help="prompt tokens per request")
    p.add_argument("--visual", type=int, default=128, help="visual tokens per prompt")
    p.add_argument("--new-tokens", type=int, default=32, help="generated tokens per request (min = max)")
    p.add_argument("--rounds", type=int, default=3, help="timed rounds per arm and batch size")
    p.add_argument("--compiled", action="store_true", help="both arms compiled (torch.compile) instead of eager")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="the model's and cache's dtype")
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--results", default=os.path.join(os.path.dirname(__file__), "RESULTS.md"))
    p.add_argument("--no-record", action="store_true", help="print only; do not append to RESULTS.md")
    return p.parse_args(argv)


def _engine(path: str, args, enabled: bool):
    """An engine with the plugin on or off (the plugin reads its environment at model load)."""
    import json

    from vllm import LLM

    import headgain.vllm as hv

    arch = {"attention": "model.layers.*.self_attn", "visual_token_ids": [VISUAL_ID]}
    os.environ[hv.ENV_ENABLE] = "1" if enabled else "0"
    os.environ[hv.ENV_ARCH_MAP] = json.dumps(arch) if enabled else ""
    return LLM(
        path,
        dtype=args.dtype,
        enforce_eager=not args.compiled,
        enable_prefix_caching=False,
        enable_chunked_prefill=False,
        max_model_len=args.prompt + args.new_tokens + 8,
        max_num_batched_tokens=max(batches(args)) * (args.prompt + args.new_tokens),
        max_num_seqs=max(batches(args)),
        seed=0,
    )


def batches(args) -> list[int]:
    return [int(b) for b in args.batches.split(",")]


def _prompts(args, batch: int) -> list[dict]:
    """``batch`` different prompts: bos, the visual block, then text words."""
    out = []
    for i in range(batch):
        text = [4 + (7 * i + 3 * j) % 296 for j in range(args.prompt - args.visual - 1)]
        text = [t if t != VISUAL_ID else VISUAL_ID + 1 for t in text]
        out.append({"prompt_token_ids": [1] + [VISUAL_ID] * args.visual + text})
    return out


def _time(llm, prompts, params) -> float:
    start = time.perf_counter()
    outputs = llm.generate(prompts, params, use_tqdm=False)
    elapsed = time.perf_counter() - start
    assert all(len(o.outputs[0].token_ids) == len(outputs[0].outputs[0].token_ids) for o in outputs)
    return elapsed


def main(argv=None) -> int:
    args = _args(argv)
    from vllm import SamplingParams
    from vllm import __version__ as vllm_version

    import headgain.vllm as hv
    from headgain.testing.checkpoints import qwen2_checkpoint

    hv.register()  # what vLLM does through the entry point when headgain is installed
    path = tempfile.mkdtemp(prefix="headgain-vllm-bench-")
    qwen2_checkpoint(
        path, args.layers, args.heads, args.kv_heads, args.head_dim, intermediate=4 * args.heads * args.head_dim
    )
    engines = {"vanilla": _engine(path, args, False), "headgain": _engine(path, args, True)}
    params = {
        arm: SamplingParams(
            max_tokens=args.new_tokens,
            min_tokens=args.new_tokens,
            temperature=0.0,
            extra_args={hv.REQUEST_KEY: CFG} if arm == "headgain" else None,
        )
        for arm in engines
    }
    times = {(arm, b): [] for arm in engines for b in batches(args)}
    load_before = os.getloadavg()[0]
    for arm, llm in engines.items():  # warm-up
        _time(llm, _prompts(args, 1), params[arm])
    for r in range(args.rounds):
        order = list(engines) if r % 2 == 0 else list(engines)[::-1]
        for b in batches(args):
            for arm in order:
                times[(arm, b)].append(_time(engines[arm], _prompts(args, b), params[arm]))
    rows = [
        "| requests | vanilla tok/s (rounds' range) | headgain tok/s (rounds' range) | change of the medians |",
        "|---|---|---|---|",
    ]
    for b in batches(args):
        rates = {arm: sorted(b * args.new_tokens / t for t in times[(arm, b)]) for arm in engines}
        median = {arm: statistics.median(r) for arm, r in rates.items()}
        cells = [f"{median[arm]:.1f} ({rates[arm][0]:.1f}-{rates[arm][-1]:.1f})" for arm in engines]
        rows.append(f"| {b} | {cells[0]} | {cells[1]} | {median['headgain'] / median['vanilla'] - 1:+.1%} |")
    table = "\n".join(rows)
    print(table)
    if not args.no_record:
        info = common.machine("cpu")
        date = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
        command = "python benchmarks/vllm_throughput.py " + shlex.join(argv if argv is not None else sys.argv[1:])
        entry = "\n".join(
            [
                f"### {date}: CPU, vLLM {vllm_version}",
                "",
                f"- Machine: {info['cpu']}, {info['cores']} cores ({info['threads']} torch threads); torch "
                f"{info['torch']}, transformers {info['transformers']}, vLLM {vllm_version} (CPU build), python "
                f"{info['python']}",
                f"- headgain ops: {common.extension_status('cpu')}; revision {common.git_revision()}",
                f"- Load average (1 min, from all jobs on the machine): {load_before:.1f} before the timed rounds, "
                f"{os.getloadavg()[0]:.1f} after",
                f"- Command: `{command.strip()}`",
                f"- Model: random-weight Qwen2, {args.layers} layers, {args.heads} heads ({args.kv_heads} KV heads) "
                f"of {args.head_dim}, {args.dtype}; {'compiled' if args.compiled else 'eager'} mode, no prefix "
                "caching, no chunked prefill in both arms",
                f"- Workload: per request {args.prompt} prompt tokens ({args.visual} visual), {args.new_tokens} "
                f"generated tokens (greedy, min = max), all requests of a row in one generate call; headgain arm: "
                f"every request with config {CFG}; median of {args.rounds} interleaved rounds after a warm-up",
                "",
                table,
            ]
        )
        common.record(args.results, SECTION, entry)
        print(f"\nappended to {args.results}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
