"""Build checks that need no GPU and no rebuild of the extension.

The CUDA kernels compile and link with nvcc on any machine with a toolkit: .ci/nvcc_check
compiles csrc/cuda/check_kernels.cu (the torch-free kernel templates of
csrc/cuda/headgain_kernels.cuh, instantiated for every element type) with
csrc/cuda/headgain_kernels.cu (the other kernels, defined once). No header defines a
kernel that is not a template. setup.py stops before compiling when the C++ compiler is
older than GCC 12, naming the compiler, its version and the fix.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys
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
    run = subprocess.run(
        [str(ROOT / ".ci" / "nvcc_check")], capture_output=True, text=True, env={**os.environ, "NVCC": _nvcc()}
    )
    assert run.returncode == 0, run.stdout + run.stderr
    compiled = set(re.findall(r"headgain7kernels\d+(\w+?)(?:I|E)", run.stdout))
    declared = {m.group(2) for path in KERNEL_SOURCES for m in KERNEL.finditer(path.read_text())}
    assert declared and declared <= compiled, f"kernels not compiled by .ci/nvcc_check: {declared - compiled}"


def test_headers_define_only_kernel_templates():
    # a kernel defined in a header would be compiled (and registered) by every file including it
    headers = sorted(CUDA.glob("*.cuh"))
    defined = {
        (h.name, m.group(2))
        for h in headers
        for m in KERNEL.finditer(h.read_text())
        if m.group(3) == "{" and not m.group(1)  # a definition, not a template
    }
    assert headers and not defined, f"non-template kernels defined in headers (move them to a .cu file): {defined}"


def _fake_compiler(tmp_path: Path, version_output: str) -> str:
    path = tmp_path / "c++"
    path.write_text("#!/bin/sh\ncat <<'EOF'\n" + version_output + "\nEOF\n")
    path.chmod(0o755)
    return str(path)


OLD_GCC = "g++ (Ubuntu 9.4.0-1ubuntu1~20.04.2) 9.4.0\nCopyright (C) 2019 Free Software Foundation, Inc."


def test_setup_stops_before_compiling_with_old_gcc(tmp_path):
    cxx = _fake_compiler(tmp_path, OLD_GCC)
    build = tmp_path / "build"
    build_ext = ["build_ext", "--build-temp", str(build / "temp"), "--build-lib", str(build / "lib")]
    run = subprocess.run(
        [sys.executable, "setup.py", *build_ext],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, "CXX": cxx, "HEADGAIN_FORCE_CPU": "1"},
        timeout=300,
    )
    out = run.stdout + run.stderr
    assert run.returncode != 0, out
    for expected in (cxx, "from $CXX", "GCC 9.4.0", "GCC 12 or newer, or Clang", "g++-12", "CXX=clang++"):
        assert expected in out, out
    assert not list(build.rglob("*.o")), "the compiler check must run before anything is compiled"


@pytest.fixture(scope="module")
def setup_py():
    spec = importlib.util.spec_from_file_location("headgain_setup", ROOT / "setup.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # setup() runs only as __main__
    return module


@pytest.mark.parametrize(
    "version_output",
    [
        "c++ (Debian 12.2.0-14+deb12u1) 12.2.0\nCopyright (C) 2022 Free Software Foundation, Inc.",
        "g++ (GCC) 14.2.1 20240912 (Red Hat 14.2.1-3)",
        "Ubuntu clang version 14.0.0-1ubuntu1.1\nTarget: x86_64-pc-linux-gnu",
        "Apple clang version 15.0.0 (clang-1500.3.9.4)",
    ],
)
def test_compiler_check_accepts_gcc12_and_clang(setup_py, tmp_path, monkeypatch, version_output):
    monkeypatch.setenv("CXX", _fake_compiler(tmp_path, version_output))
    setup_py.check_cxx_compiler()


def test_compiler_check_rejects_gcc11(setup_py, tmp_path, monkeypatch):
    gcc11 = "g++-11 (Ubuntu 11.4.0-1ubuntu1~22.04) 11.4.0\nCopyright (C) 2021 Free Software Foundation, Inc."
    monkeypatch.setenv("CXX", _fake_compiler(tmp_path, gcc11))
    with pytest.raises(Exception, match=r"is GCC 11\.4\.0; headgain needs GCC 12 or newer, or Clang"):
        setup_py.check_cxx_compiler()


def test_openmp_flags_probe_the_compiler(setup_py, tmp_path, monkeypatch, capsys):
    """The CPU kernels need -fopenmp (else at::parallel_for runs them on one thread): given
    where the real compiler builds OpenMP code; left out, with a warning that says so and
    how to fix it, where the compiler cannot."""
    import torch

    if not (torch.backends.openmp.is_available() and sys.platform.startswith("linux")):
        pytest.skip("torch does not use OpenMP here: the extension is built without it")
    monkeypatch.delenv("CXX", raising=False)
    assert setup_py.openmp_flags() == ["-fopenmp"]
    no_openmp = tmp_path / "c++"
    no_openmp.write_text("#!/bin/sh\necho 'fatal error: omp.h: No such file or directory' >&2\nexit 1\n")
    no_openmp.chmod(0o755)
    monkeypatch.setenv("CXX", str(no_openmp))
    assert setup_py.openmp_flags() == []
    out = capsys.readouterr().out
    for expected in ("cannot build OpenMP code", "omp.h: No such file", "run on one thread", "libomp-dev"):
        assert expected in out, out


def test_compiler_check_names_a_missing_compiler(setup_py, tmp_path, monkeypatch):
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-c++"))
    with pytest.raises(Exception, match=r"cannot run the C\+\+ compiler .*no-such-c\+\+.*CXX=clang\+\+"):
        setup_py.check_cxx_compiler()
