"""Data-parallel evaluation: two CPU processes joined by gloo, as torchrun starts them
(RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT); rank 0 merges.

The two ranks are forked from the test process (no second import of torch and
transformers: seconds per process on a small CPU), then run the command line. A forked
process must keep torch at one thread: OpenMP threads started in a child after the parent
used them hang."""

from __future__ import annotations

import json
import multiprocessing
import os
import socket
import subprocess
import sys

import matplotlib.pyplot  # noqa: F401  (imported once, before the fork: the ranks inherit it)
import pytest
import torch
import transformers.models.qwen2_5_vl.modeling_qwen2_5_vl  # noqa: F401  (as above)

from headgain.cli import main

ARGS = ["eval", "--bench", "shapes", "--limit", "5", "--batch", "1", "--max-new-tokens", "3", "--reps", "50"]
ARGS += ["--no-progress", "--device", "cpu"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank(rank: int, port: int, out: str) -> None:
    """One rank: torchrun's environment, one torch thread, stdout to a file, exit with the
    command's status."""
    torch.set_num_threads(1)
    os.environ.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
    )
    with open(os.path.join(out, f"stdout{rank}.txt"), "w") as f:
        sys.stdout = f
        code = main([*ARGS, "--out", out])
        f.flush()
    sys.exit(code)


def _outputs(folder):
    found = {}
    for name in sorted(os.listdir(folder)):
        if name.endswith(".jsonl"):
            with open(os.path.join(folder, name)) as f:
                for line in f:
                    r = json.loads(line)
                    assert (r["arm"], r["id"]) not in found  # every sample answered once per arm
                    found[(r["arm"], r["id"])] = r["output"]
    return found


def test_two_process_shards_merge_to_the_single_process_result(tmp_path, capsys):
    sharded = tmp_path / "sharded"
    sharded.mkdir()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    context = multiprocessing.get_context("fork")
    port = _free_port()
    ranks = [context.Process(target=_rank, args=(r, port, str(sharded))) for r in range(2)]
    for p in ranks:
        p.start()
    single = tmp_path / "single"  # the single-process run, made while the ranks run
    assert main([*ARGS, "--out", str(single)]) == 0
    capsys.readouterr()
    for p in ranks:
        p.join(timeout=180)
    for p in ranks:
        if p.is_alive():
            p.kill()
    torch.set_num_threads(threads)
    assert [p.exitcode for p in ranks] == [0, 0]
    assert (sharded / "stdout0.txt").read_text().count("wrote ") == 4
    assert "wrote" not in (sharded / "stdout1.txt").read_text()  # only rank 0 reports
    files = sorted(n for n in os.listdir(sharded) if n.endswith(".jsonl"))
    assert files == ["ocean-r1-7b.rank0.jsonl", "ocean-r1-7b.rank1.jsonl", "vanilla.rank0.jsonl", "vanilla.rank1.jsonl"]
    with open(sharded / "vanilla.rank1.jsonl") as f:
        assert [json.loads(line)["id"] for line in f] == ["shapes-1", "shapes-3"]  # rank 1 takes every second sample
    assert json.load(open(sharded / "summary.json")) == json.load(open(single / "summary.json"))
    assert _outputs(sharded) == _outputs(single) and len(_outputs(single)) == 10


def test_accelerate_launch_shards_like_torchrun(tmp_path, capsys):
    """`accelerate launch` (its torchrun launcher: --multi_gpu, which on a machine without GPUs
    starts CPU processes; headgain joins them with gloo) gives the same merged result as one
    process."""
    pytest.importorskip("accelerate", reason="accelerate is installed by make install (lmms-eval's requirements)")
    sharded = tmp_path / "sharded"
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"]
    launch += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    launch += ["--main_process_port", str(_free_port()), "-m", "headgain", *ARGS, "--out", str(sharded)]
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run(launch, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("wrote ") == 4  # rank 0 reports once
    assert sorted(n for n in os.listdir(sharded) if n.endswith(".jsonl")) == [
        "ocean-r1-7b.rank0.jsonl",
        "ocean-r1-7b.rank1.jsonl",
        "vanilla.rank0.jsonl",
        "vanilla.rank1.jsonl",
    ]
    single = tmp_path / "single"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main([*ARGS, "--out", str(single)]) == 0
    finally:
        torch.set_num_threads(threads)
    capsys.readouterr()
    assert json.load(open(sharded / "summary.json")) == json.load(open(single / "summary.json"))
    assert _outputs(sharded) == _outputs(single) and len(_outputs(single)) == 10
