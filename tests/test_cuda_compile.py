"""The CUDA kernels compile and link with nvcc, on any machine with a toolkit (no GPU needed).

Runs .ci/nvcc_check, which compiles csrc/cuda/check_kernels.cu (the torch-free kernel
templates of csrc/cuda/headgain_kernels.cuh, instantiated for every element type) with
csrc/cuda/headgain_kernels.cu (the other kernels, defined once). No header defines a
kernel that is not a template.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CUDA = ROOT / "csrc" / "cuda"
# The torch-free kernel sources that .ci/nvcc_check builds.
KERNEL_SOURCES = (CUDA / "headgain_kernels.cuh", CUDA / "headgain_kernels.cu")
KERNEL = re.compile(r"(template\s*<[^>]*>\s*)?__global__\s+void\s+(\w+)\s*\([^)]*\)\s*([;{])")


def _nvcc() -> str | None:
    cuda_home = os.environ.get("CUDA_HOME", "")
    candidate = Path(cuda_home, "bin", "nvcc") if cuda_home else None
    return shutil.which("nvcc") or (str(candidate) if candidate and candidate.exists() else None)


@pytest.mark.skipif(_nvcc() is None, reason="nvcc not found (no CUDA toolkit on PATH or in CUDA_HOME)")
def test_kernels_compile_with_nvcc():
    run = subprocess.run([str(ROOT / ".ci" / "nvcc_check")], capture_output=True, text=True, env={**os.environ, "NVCC": _nvcc()})
    assert run.returncode == 0, run.stdout + run.stderr
    compiled = set(re.findall(r"headgain7kernels\d+(\w+?)(?:I|E)", run.stdout))
    declared = {m.group(2) for path in KERNEL_SOURCES for m in KERNEL.finditer(path.read_text())}
    assert declared and declared <= compiled, f"kernels not compiled by .ci/nvcc_check: {declared - compiled}"


def test_headers_define_only_kernel_templates():
    # a kernel defined in a header would be compiled (and registered) by every file including it
    headers = sorted(CUDA.glob("*.cuh"))
    defined = {(h.name, m.group(2)) for h in headers for m in KERNEL.finditer(h.read_text()) if m.group(3) == "{" and not m.group(1)}
    assert headers and not defined, f"non-template kernels defined in headers (move them to a .cu file): {sorted(defined)}"
