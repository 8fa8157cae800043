"""Benchmark of headgain's compiled ops against their PyTorch reference.

Shapes are those of Qwen2.5-VL-7B's decoder (28 query heads, 4 key/value heads, head
width 128) over key counts Nk and batch sizes B. Each op runs on CPU and, when a GPU is
present, on CUDA; the time is the median of repeated runs. The bandwidth floor is the
bytes an op must move divided by the bandwidth of a large copy on the same device.

    python benchmarks/ops.py            # quick grid (CPU in about two minutes on 2 cores)
    python benchmarks/ops.py --full     # Nk 1k..32k, B 1..16
    python benchmarks/ops.py --no-write # print only

Each device's table replaces that device's section of benchmarks/RESULTS.md ("## Ops
benchmark (benchmarks/ops.py)" for CPU, "## Ops benchmark on CUDA (benchmarks/ops.py)" for
CUDA); the section's dated subsections and the other sections are left as they are.
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import common
from headgain.core import ops, reference

HEADS, KV_HEADS, HEAD_DIM = 28, 4, 128  # Qwen2.5-VL-7B
PROBS_ROWS = 4  # query rows of the probability tensor (the ratio reads one of them)
PAGE_BLOCK = 128  # tokens per block of the paged cache ratio_from_blocks reads
SECTIONS = {"cpu": "## Ops benchmark (benchmarks/ops.py)", "cuda": "## Ops benchmark on CUDA (benchmarks/ops.py)"}
RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
QUICK = {"nk": (1024, 4096, 16384), "batch": (1, 4)}
FULL = {"nk": (1024, 4096, 16384, 32768), "batch": (1, 4, 16)}
NK_FREE = ("head_gains", "scale_heads_ decode")
CPU_MAX_BYTES = 4 << 30  # the CPU prefill case is skipped where its reference needs more memory


@dataclass
class Case:
    """One op at one shape: the fused call, its reference, and the bytes it must move."""

    op: str
    shape: str
    fused: Callable[[], object]
    ref: Callable[[], object]
    bytes_moved: int


def _nbytes(*tensors: torch.Tensor) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def make_cases(nk: int, b: int, device: str, dtype: torch.dtype, prefill: bool = True) -> list[Case]:
    """The ops at one (Nk, B): shared inputs, one Case per op (scale_heads_ prefill only when
    ``prefill``: its reference needs three float copies of the (B, Nk, H, D) tensor)."""
    g = torch.Generator(device=device).manual_seed(0)
    visual = torch.zeros((b, nk), dtype=torch.bool, device=device)
    visual[:, nk // 8 : nk // 8 + nk // 2] = True  # an image span in the middle of the prompt
    last = torch.zeros((b, PROBS_ROWS), device=device)
    last[:, -1] = 1.0
    probs = torch.rand((b, HEADS, PROBS_ROWS, nk), generator=g, device=device).to(dtype)
    q = torch.randn((b, HEADS, 1, HEAD_DIM), generator=g, device=device).to(dtype)
    k = torch.randn((b, KV_HEADS, nk, HEAD_DIM), generator=g, device=device).to(dtype)
    v = torch.randn((b, KV_HEADS, nk, HEAD_DIM), generator=g, device=device).to(dtype)
    mask = torch.ones((b, 1, nk), dtype=torch.bool, device=device)
    mask[0, :, : nk // 16] = False  # left padding of the first sample
    row_w = torch.ones((b, 1), device=device)
    ratios = torch.rand((b, HEADS), generator=g, device=device)
    has_visual = torch.ones(b, dtype=torch.bool, device=device)
    gain_args = (ratios, has_visual, 0.6, 0.2, 1.2, 1.1, 1.0)
    gains = ops.head_gains(*gain_args)
    full = torch.randn((b, nk if prefill else 1, HEADS, HEAD_DIM), generator=g, device=device).to(dtype)
    decode = full[:, :1].clone()
    scaling = HEAD_DIM**-0.5
    shape = f"B={b} Nk={nk}"
    row_bytes = probs[:, :, :1].numel() * probs.element_size()  # the one weighted row per head
    cases = [
        Case(
            "ratio_from_probs",
            shape,
            lambda: ops.ratio_from_probs(probs, visual, last),
            lambda: reference.ratio_from_probs(probs, visual, last),
            row_bytes + _nbytes(visual),
        ),
        Case(
            "ratio_from_qk",
            shape,
            lambda: ops.ratio_from_qk(q, k, mask, visual, row_w, scaling),
            lambda: reference.ratio_from_qk(q, k, mask, visual, row_w, scaling),
            _nbytes(q, k, mask, visual),
        ),
        Case(
            "head_gains",
            f"B={b}",
            lambda: ops.head_gains(*gain_args),
            lambda: reference.head_gains(*gain_args),
            _nbytes(ratios, has_visual) + _nbytes(ratios),
        ),
        Case(
            "scale_heads_ decode",
            f"B={b} N=1",
            lambda: ops.scale_heads_(decode, gains),
            lambda: decode.copy_(reference.scale_heads(decode, gains)),
            2 * _nbytes(decode),
        ),
    ]
    if ops.extension_available(device):
        sdpa_mask = mask[:, None]  # (B, 1, 1, Nk), as transformers gives it to sdpa

        def unfused():  # the sdpa backend, then S_v from a second read of the keys
            out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=sdpa_mask, enable_gqa=True)
            return out.transpose(1, 2).contiguous(), ops.ratio_from_qk(q, k, mask, visual, row_w, scaling)

        cases.insert(
            2,
            Case(
                "decode_attention",
                shape,
                lambda: ops.decode_attention(q, k, v, mask, visual, scaling),
                unfused,
                _nbytes(q, k, v, mask, visual, q),
            ),
        )
    if ops.extension_available(device):
        cases.insert(2, _paged_case(q, visual, nk, b, device, dtype, g, scaling, shape))
    if prefill:
        cases.insert(
            3,
            Case(
                "scale_heads_ prefill",
                f"B={b} N={nk}",
                lambda: ops.scale_heads_(full, gains),
                lambda: full.copy_(reference.scale_heads(full, gains)),
                2 * _nbytes(full),
            ),
        )
    return cases


def _paged_case(q, visual, nk, b, device, dtype, g, scaling, shape) -> Case:
    """ratio_from_blocks: each sample's nk keys in shuffled blocks of PAGE_BLOCK tokens of a
    paged cache laid out as vLLM lays it out on that device (CPU: per block and KV head a
    (D, block) array, then the values; CUDA: FlashAttention's (2, blocks, block, Hkv, D)), read
    in place, against gathering them first and reading the copy (ratio_from_qk)."""
    per = -(-nk // PAGE_BLOCK)
    if device == "cpu":
        cache = torch.randn((b * per, KV_HEADS, 2, HEAD_DIM, PAGE_BLOCK), generator=g, device=device).to(dtype)
        blocks = cache[:, :, 0].transpose(2, 3)  # (NB, Hkv, block, D)
    else:
        cache = torch.randn((2, b * per, PAGE_BLOCK, KV_HEADS, HEAD_DIM), generator=g, device=device).to(dtype)
        blocks = cache[0].transpose(1, 2)
    table = torch.randperm(b * per, generator=g, device=device).view(b, per).int()
    lengths = torch.full((b,), nk, device=device)
    rows = q[:, :, 0]
    row_w = torch.ones((b, 1), device=device)

    def gathered():
        keys, reads = reference.gather_blocks(blocks, table, lengths)
        return ops.ratio_from_qk(q, keys, reads[:, None], visual, row_w, scaling)

    return Case(
        "ratio_from_blocks",
        shape,
        lambda: ops.ratio_from_blocks(rows, blocks, table, lengths, visual, scaling),
        gathered,
        _nbytes(q, visual) + b * nk * KV_HEADS * HEAD_DIM * blocks.element_size(),
    )


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def median_ms(fn: Callable[[], object], device: str, repeats: int) -> float:
    fn()  # warm-up
    _sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def copy_bandwidth(device: str) -> float:
    """Bytes per second of a large device-to-device copy (read + write)."""
    src = torch.empty(256 << 20 if device == "cuda" else 64 << 20, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    ms = median_ms(lambda: dst.copy_(src), device, 10)
    return 2 * src.numel() / (ms / 1e3)


def run(grid: dict, devices: list[str], dtype: torch.dtype, repeats: int) -> list[dict]:
    rows = []
    for device in devices:
        bandwidth = copy_bandwidth(device)
        for b in grid["batch"]:
            for nk in grid["nk"]:
                prefill_bytes = b * nk * HEADS * HEAD_DIM * 4 * 3  # the reference's float copies
                prefill = device != "cpu" or prefill_bytes <= CPU_MAX_BYTES
                if not prefill:
                    print(
                        f"skip cpu scale_heads_ prefill B={b} Nk={nk}: its reference needs "
                        f"{prefill_bytes / 2**30:.1f} GiB",
                        file=sys.stderr,
                    )
                for case in make_cases(nk, b, device, dtype, prefill):
                    if nk != grid["nk"][0] and case.op in NK_FREE:
                        continue  # shapes that do not depend on Nk run once per B
                    fused = median_ms(case.fused, device, repeats)
                    ref = median_ms(case.ref, device, repeats)
                    floor = case.bytes_moved / bandwidth * 1e3
                    rows.append(
                        {
                            "device": device,
                            "op": case.op,
                            "shape": case.shape,
                            "ref": ref,
                            "fused": fused,
                            "floor": floor,
                        }
                    )
                    print(
                        f"{device:4} {case.op:22} {case.shape:18} ref {ref:9.3f} ms  fused {fused:9.3f} ms  "
                        f"x{ref / fused:6.1f}  floor {floor:8.3f} ms",
                        flush=True,
                    )
    return rows


def table(rows: list[dict]) -> str:
    lines = [
        "| device | op | shape | reference ms | fused ms | speed-up | bandwidth floor ms | fused / floor |",
        "|---|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['device']} | {r['op']} | {r['shape']} | {r['ref']:.3f} | {r['fused']:.3f} | "
            f"{r['ref'] / r['fused']:.1f}x | {r['floor']:.3f} | {r['fused'] / r['floor']:.1f} |"
        )
    return "\n".join(lines)


def machine(device: str) -> str:
    if device == "cuda":
        if not torch.cuda.is_available():
            return f"no CUDA GPU visible (torch {torch.__version__}, CUDA build {torch.version.cuda})"
        props = torch.cuda.get_device_properties(torch.cuda.current_device())
        return (
            f"GPU {props.name} (sm {props.major}.{props.minor}, {props.multi_processor_count} SMs, "
            f"{props.total_memory / 2**30:.0f} GiB), CUDA {torch.version.cuda}"
        )
    capability = torch.backends.cpu.get_cpu_capability()
    text = f"{common.cpu_model()}, {torch.get_num_threads()} threads (CPU capability {capability}"
    bf16_dot = common.cpu_has("avx512_bf16")
    if bf16_dot is not None:  # the CPU ratio_from_qk kernel for bfloat16 uses AVX512-BF16 where the CPU has it
        text += f", AVX512-BF16 {'yes' if bf16_dot else 'no'}"
    text += ")"
    if hasattr(os, "getloadavg"):
        text += f"; load average {os.getloadavg()[0]:.1f} (other work on the machine inflates CPU times)"
    return text


def write_section(rows: list[dict], command: str, dtype: torch.dtype, path: Path = RESULTS) -> None:
    """Replace the section of each device in ``rows`` (``SECTIONS``) with that device's table,
    keeping the section's dated ("### ") subsections; a missing section is appended."""
    text = path.read_text() if path.exists() else "# Benchmark results\n\n"
    for device in sorted({r["device"] for r in rows}):
        section = SECTIONS[device]
        body = "\n".join(
            [
                section,
                "",
                f"- date: {datetime.date.today().isoformat()}",
                f"- machine: {machine(device)}",
                f"- torch {torch.__version__}; ops: {common.extension_status(device)}; "
                f"revision {common.git_revision() or 'unknown'}",
                f"- command: `{command}`",
                f"- shapes: Qwen2.5-VL-7B ({HEADS} heads, {KV_HEADS} kv heads, head dim {HEAD_DIM}), {dtype}; "
                f"ratio_from_probs over {PROBS_ROWS} query rows (one weighted), ratio_from_qk over one row with a "
                "padding mask; decode_attention (one decoding step: output and S_v in one pass) against the unfused "
                "pair (torch sdpa, then ratio_from_qk) as its reference; median of repeated runs; "
                "floor = bytes the op must move / bandwidth of a large copy",
                "",
                table([r for r in rows if r["device"] == device]),
                "",
            ]
        )
        start = text.find(section)
        if start < 0:
            text = text.rstrip("\n") + "\n\n" + body
        else:  # the section's table up to its dated subsections (kept) or the next section
            ends = [i for i in (text.find("\n### ", start), text.find("\n## ", start + len(section))) if i >= 0]
            end = min(ends, default=-1)
            text = text[:start] + body + ("\n" + text[end + 1 :] if end >= 0 else "")
    path.write_text(text)
    print(f"wrote {path}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--full", action="store_true", help="the whole grid: Nk 1k..32k, B 1..16")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per measurement (median)")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--device", choices=["cpu", "cuda", "all"], default="all")
    parser.add_argument("--no-write", action="store_true", help="print only; leave RESULTS.md alone")
    args = parser.parse_args(argv)
    if not ops.extension_available():
        sys.exit(f"headgain extension not built: {ops.extension_error()}")
    if args.device == "cuda" and not (torch.cuda.is_available() and ops.extension_available("cuda")):
        sys.exit(
            f"--device cuda needs a visible CUDA GPU (torch {torch.__version__}, CUDA build {torch.version.cuda}, "
            f"GPU visible: {torch.cuda.is_available()}) and headgain built with its CUDA kernels "
            f"(built: {ops.extension_available('cuda')}); or use --device cpu"
        )
    devices = ["cuda"] if args.device == "cuda" else ["cpu"]
    if args.device == "all" and torch.cuda.is_available():
        if ops.extension_available("cuda"):
            devices.append("cuda")
        else:
            print("a CUDA GPU is visible but headgain was built without its CUDA kernels: CPU only")
    dtype = getattr(torch, args.dtype)
    rows = run(FULL if args.full else QUICK, devices, dtype, args.repeats)
    if not args.no_write:
        write_section(
            rows, " ".join(["python benchmarks/ops.py", *(argv if argv is not None else sys.argv[1:])]), dtype
        )


if __name__ == "__main__":
    with torch.no_grad():
        main()
