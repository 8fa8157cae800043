"""Build and install headgain.

The C++ extension ``headgain._C`` (``csrc/``) is compiled by ``torch.utils.cpp_extension``:
CPU kernels always; CUDA kernels when torch is a CUDA build and a CUDA toolkit is found.
The C++ compiler must be GCC 12 or newer, or Clang (checked before anything is compiled).
Install with ``pip install --no-build-isolation -e .`` (an isolated build would fetch a
different torch).
"""

import glob
import os
import re
import shlex
import subprocess
import sys
import tempfile

from setuptools import find_packages, setup
from setuptools.errors import PlatformError
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension, get_cxx_compiler

# Ampere and Hopper code, plus PTX that newer GPUs compile at load time.
DEFAULT_CUDA_ARCHS = "8.0;9.0+PTX"
# The CPU kernels use __builtin_shufflevector (GCC 12 or Clang) and target_clones.
MIN_GCC = 12


def _version() -> str:
    """The version stated once, in headgain/__init__.py."""
    with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "headgain", "__init__.py")) as f:
        return re.search(r'^__version__ = "([^"]+)"', f.read(), re.M).group(1)


def _flag(name):
    return os.environ.get(name, "").strip().lower() in {"1", "true", "yes", "on"}


def build_with_cuda():
    """CUDA kernels when torch is a CUDA build and a toolkit is found (never from whether
    a GPU is visible: build hosts often have none). HEADGAIN_FORCE_CPU=1 or
    HEADGAIN_FORCE_CUDA=1 overrides the decision."""
    import torch

    if _flag("HEADGAIN_FORCE_CPU"):
        return False
    if _flag("HEADGAIN_FORCE_CUDA"):
        return True
    return torch.version.cuda is not None and CUDA_HOME is not None


def _warn_without_cudart():
    """Say how to fix the link step before it fails where the toolkit torch found (CUDA_HOME,
    else nvcc's grandparent folder) has no CUDA runtime library to link against."""
    from torch.utils.cpp_extension import library_paths

    if os.name != "posix":
        return
    dirs = library_paths(device_type="cuda", torch_include_dirs=False)
    dirs += [flag[2:] for flag in os.environ.get("LDFLAGS", "").split() if flag.startswith("-L")]
    if not any(glob.glob(os.path.join(d, "libcudart.so*")) for d in dirs):
        print(
            f"headgain: WARNING: no libcudart.so in {dirs} (CUDA toolkit at {CUDA_HOME}); if linking fails "
            "with 'cannot find -lcudart', set CUDA_HOME to the toolkit's root (for example /usr/local/cuda), "
            "add its library folder to LDFLAGS (-L...), or build the CPU kernels only with HEADGAIN_FORCE_CPU=1"
        )


def check_cxx_compiler():
    """Stop with a message naming the compiler, its version and the fix unless the C++
    compiler torch.utils.cpp_extension builds with ($CXX, else c++) is GCC 12 or newer or
    Clang; warn and go on when its --version output names neither."""
    cxx = get_cxx_compiler()
    where = "from $CXX" if os.environ.get("CXX") else "the default; CXX is not set"
    fix = (
        f"install g++-{MIN_GCC} or newer (for example apt-get install g++-{MIN_GCC}) and set CXX=g++-{MIN_GCC}, "
        "or set CXX=clang++"
    )
    try:
        out = subprocess.run([*shlex.split(cxx), "--version"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError) as err:
        raise PlatformError(f"headgain: cannot run the C++ compiler {cxx!r} ({where}): {err}; {fix}") from err
    first = (out.strip().splitlines() or [""])[0]
    if "clang" in out.lower():
        return
    versions = re.findall(r"\b(\d+)\.(\d+)(?:\.(\d+))?", first)
    if not ("Free Software Foundation" in out or re.search(r"\b(gcc|g\+\+|GCC)\b", first)) or not versions:
        print(
            f"headgain: WARNING: cannot tell which compiler {cxx!r} ({where}) is from its --version output "
            f"{first!r}; headgain needs GCC {MIN_GCC} or newer, or Clang"
        )
        return
    major, minor, patch = versions[-1]
    if int(major) < MIN_GCC:
        version = ".".join(v for v in (major, minor, patch) if v)
        raise PlatformError(
            f"headgain: the C++ compiler {cxx!r} ({where}) is GCC {version}; headgain needs "
            f"GCC {MIN_GCC} or newer, or Clang: {fix}"
        )


class BuildExtensionChecked(BuildExtension):
    """torch's BuildExtension, after check_cxx_compiler."""

    def build_extensions(self):
        check_cxx_compiler()
        super().build_extensions()


# An OpenMP parallel region, compiled and linked as the extension is (openmp_flags).
_OPENMP_PROBE = """#include <omp.h>
int headgain_probe() {
  int n = 0;
#pragma omp parallel
  n = omp_get_num_threads();
  return n;
}
"""


def openmp_flags() -> list[str]:
    """-fopenmp where torch runs its CPU threads on OpenMP (its Linux builds) and the C++
    compiler builds OpenMP code: ATen's ``at::parallel_for``, which the CPU kernels use, is a
    header template that runs its loop on one thread unless the including file is compiled
    with OpenMP. The extension then links the libgomp that torch ships and has already loaded
    (same soname). Where the compiler cannot, say so and build without (one thread)."""
    import torch

    if not torch.backends.openmp.is_available() or not sys.platform.startswith("linux"):
        return []
    cxx = get_cxx_compiler()
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "probe.cpp")
        with open(src, "w") as f:
            f.write(_OPENMP_PROBE)
        cmd = [*shlex.split(cxx), "-fopenmp", "-fPIC", "-shared", src, "-o", os.path.join(tmp, "probe.so")]
        try:
            run = subprocess.run(cmd, capture_output=True, text=True)
            why = None if run.returncode == 0 else ((run.stderr or run.stdout).strip().splitlines() or ["failed"])[-1]
        except OSError as err:
            why = str(err)
    if why is None:
        return ["-fopenmp"]
    print(
        f"headgain: WARNING: the C++ compiler {cxx!r} cannot build OpenMP code with -fopenmp ({why}); the CPU "
        "kernels will run on one thread whatever torch.get_num_threads() says. Fix: use GCC (CXX=g++), or "
        "install your compiler's OpenMP runtime (for Clang: libomp-dev), then rebuild"
    )
    return []


def extensions():
    # csrc/headgain.cpp (schemas), csrc/checks.cpp and the CPU kernels in csrc/cpu/
    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp"))) + sorted(glob.glob(os.path.join("csrc", "cpu", "*.cpp")))
    if not sources:
        return []
    openmp = openmp_flags()
    cxx = ["-O3", "-fno-trapping-math", "-Wno-psabi", *openmp]
    if not build_with_cuda():
        print("headgain: building the CPU extension (set HEADGAIN_FORCE_CUDA=1 to build the CUDA kernels)")
        return [CppExtension("headgain._C", sources, extra_compile_args={"cxx": cxx}, extra_link_args=openmp)]
    if not os.environ.get("TORCH_CUDA_ARCH_LIST"):
        import torch

        if torch.cuda.device_count() == 0:
            # torch reads the target architectures off the visible GPUs and fails without one
            os.environ["TORCH_CUDA_ARCH_LIST"] = DEFAULT_CUDA_ARCHS
            print(
                f"headgain: no GPU visible, building CUDA kernels for {DEFAULT_CUDA_ARCHS} "
                "(set TORCH_CUDA_ARCH_LIST to choose, e.g. TORCH_CUDA_ARCH_LIST=8.9)"
            )
    _warn_without_cudart()
    # csrc/cuda/check_*.cu are torch-free compile checks of the kernels, not part of the build.
    cuda = sorted(
        p for p in glob.glob(os.path.join("csrc", "cuda", "*.cu")) if not os.path.basename(p).startswith("check_")
    )
    print("headgain: building the CPU and CUDA extension (set HEADGAIN_FORCE_CPU=1 for CPU only)")
    return [
        CUDAExtension(
            "headgain._C",
            sources + cuda,
            extra_compile_args={"cxx": cxx, "nvcc": ["-O3"]},
            extra_link_args=openmp,
            define_macros=[("HEADGAIN_WITH_CUDA", "1")],
        )
    ]


# Guarded so that tests can import check_cxx_compiler; pip and `python setup.py` run this
# file as __main__.
if __name__ == "__main__":
    setup(
        name="headgain",
        version=_version(),
        description="Training-free functional-head rescaling against hallucination in vision-language models",
        packages=find_packages(include=["headgain", "headgain.*"]),
        # the toy model's weights, processor and training record (headgain.toy.load)
        package_data={"headgain.toy": ["weights/*.json", "weights/*.safetensors", "weights/*.jinja"]},
        python_requires=">=3.10",
        install_requires=["torch>=2.11,<2.14", "transformers>=5.17", "numpy", "pillow", "matplotlib"],
        extras_require={"test": ["pytest"], "eval": ["datasets>=2.14", "pyarrow>=12"]},
        ext_modules=extensions(),
        cmdclass={"build_ext": BuildExtensionChecked},
        entry_points={
            "console_scripts": ["headgain=headgain.cli:main"],
            # vLLM calls it in every process it starts (headgain.vllm: the dynamic method in vLLM)
            "vllm.general_plugins": ["headgain = headgain.vllm:register"],
            # lmms-eval reads it to find `--model headgain` (headgain.eval.lmms); lmms-eval is not a
            # dependency: the README says how to install it without torchvision
            "lmms_eval.models": ["headgain = headgain.eval.lmms:manifest"],
        },
    )
