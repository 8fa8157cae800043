"""The CUDA kernels compile with nvcc, on any machine with a toolkit (no GPU needed).

Runs .ci/nvcc_check, which compiles csrc/cuda/check_kernels.cu: the torch-free kernels of
csrc/cuda/headgain_kernels.cuh instantiated for every element type.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
KERNELS = ROOT / "csrc" / "cuda" / "headgain_kernels.cuh"


def _nvcc() -> str | None:
    cuda_home = os.environ.get("CUDA_HOME", "")
    candidate = Path(cuda_home, "bin", "nvcc") if cuda_home else None
    return shutil.which("nvcc") or (str(candidate) if candidate and candidate.exists() else None)


@pytest.mark.skipif(_nvcc() is None, reason="nvcc not found (no CUDA toolkit on PATH or in CUDA_HOME)")
def test_kernels_compile_with_nvcc():
    run = subprocess.run([str(ROOT / ".ci" / "nvcc_check")], capture_output=True, text=True, env={**os.environ, "NVCC": _nvcc()})
    assert run.returncode == 0, run.stdout + run.stderr
    compiled = set(re.findall(r"headgain7kernels\d+(\w+?)(?:I|E)", run.stdout))
    declared = set(re.findall(r"__global__ void (\w+)\(", KERNELS.read_text()))
    assert declared and declared <= compiled, f"kernels not instantiated by check_kernels.cu: {declared - compiled}"
