"""Data-parallel evaluation: two CPU processes under torchrun (gloo), rank 0 merges."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import torch

from headgain.cli import main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ARGS = ["eval", "--bench", "shapes", "--limit", "5", "--batch", "1", "--max-new-tokens", "3", "--reps", "50"]
ARGS += ["--no-progress", "--device", "cpu"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port())]
    proc = subprocess.run(
        [*cmd, "-m", "headgain", *ARGS, "--out", str(sharded)], cwd=ROOT, env=env, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.count("wrote ") == 4  # only rank 0 reports
    files = sorted(n for n in os.listdir(sharded) if n.endswith(".jsonl"))
    assert files == ["ocean-r1-7b.rank0.jsonl", "ocean-r1-7b.rank1.jsonl", "vanilla.rank0.jsonl", "vanilla.rank1.jsonl"]
    with open(sharded / "vanilla.rank1.jsonl") as f:
        assert [json.loads(line)["id"] for line in f] == ["shapes-1", "shapes-3"]  # rank 1 takes every second sample

    single = tmp_path / "single"
    threads = torch.get_num_threads()
    assert main([*ARGS, "--out", str(single)]) == 0
    capsys.readouterr()
    torch.set_num_threads(threads)
    assert json.load(open(sharded / "summary.json")) == json.load(open(single / "summary.json"))
    assert _outputs(sharded) == _outputs(single) and len(_outputs(single)) == 10
