"""headgain's CUDA kernels and their launch code, built to run on the CPU (tests/cuda_emu/).

The sources in csrc/cuda are used as they are, with mechanical edits only: CUDA headers
dropped, ``extern __shared__`` arrays pointed at the emulated dynamic shared memory,
``__shared__`` variables made static, each ``kernel<<<grid, block, shared, stream>>>(args)``
turned into a call of the runtime's `emu_launch`, and the ops registered as
``torch.ops.hgemu.*`` for CPU tensors. The runtime (cuda_emu/runtime.cpp) runs every CUDA
thread of a block as a fiber; ``__syncthreads``, ``__syncwarp`` and ``__shfl_xor_sync`` are
barriers that fail on divergence (a barrier some threads never reach) and on full-mask
shuffles in incomplete warps; launches are checked against CUDA's limits (empty or oversized
grids, more than 1024 threads, more dynamic shared memory than CUDA's default 48 KiB), and
dynamic shared memory starts as NaN, so reads before writes show. It cannot see data races
between barriers (the fibers of a block run one at a time) nor anything about speed.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CSRC = ROOT / "csrc"
RUNTIME = Path(__file__).resolve().parent / "cuda_emu"
BUILD = ROOT / "build" / "cuda-emulation"

_LAUNCH = re.compile(r"([\w:<>, ]+?)<<<(.*?)>>>\((.*?)\);", flags=re.S)  # kernel<T, ...><<<...>>>(...)


def _rename(text: str) -> str:
    return text.replace("namespace headgain", "namespace hgemu").replace("headgain::", "hgemu::")


def _sources() -> dict[str, str]:
    """The translation unit's parts: file name -> text."""
    kernels = (CSRC / "cuda" / "headgain_kernels.cuh").read_text()
    kernels = re.sub(r"#include <(cuda_bf16|cuda_fp16|cuda_runtime|math_constants)\.h>", "", kernels)
    dynamic = r"extern __shared__ (?:__align__\(\d+\) )?float (\w+)\[\];"
    kernels = re.sub(dynamic, r"float* \1 = emu_dynsmem();", kernels)
    kernels = '#include "runtime.h"\n' + _rename(kernels.replace("__shared__", "static"))
    glue = (CSRC / "cuda" / "headgain_cuda.cu").read_text()
    glue = re.sub(r"#include <c10/cuda/\w+\.h>\n", "", glue)
    glue = glue.replace('#include "../headgain.h"', '#include "headgain.h"\n#include "cuda_stubs.h"')
    glue, launches = _LAUNCH.subn(lambda m: f"emu_launch([&] {{ {m.group(1)}({m.group(3)}); }}, {m.group(2)});", glue)
    if launches == 0 or "<<<" in glue:
        raise RuntimeError("emulated_cuda: the kernel launches of headgain_cuda.cu no longer match its rewrite")
    glue = _rename(glue.replace("TORCH_LIBRARY_IMPL(headgain, CUDA, m)", "TORCH_LIBRARY_IMPL(hgemu, CPU, m)"))
    schemas = _rename((CSRC / "headgain.cpp").read_text()).replace("TORCH_LIBRARY(headgain", "TORCH_LIBRARY(hgemu")
    schemas = "#include <torch/library.h>\n" + schemas[schemas.index("namespace hgemu {") :]
    return {
        "headgain_kernels.cuh": kernels,
        "headgain_kernels_impl.h": _rename((CSRC / "cuda" / "headgain_kernels.cu").read_text()),
        "headgain.h": _rename((CSRC / "headgain.h").read_text()),
        "checks.cpp": _rename((CSRC / "checks.cpp").read_text()),
        "schemas.cpp": schemas,
        "headgain_cuda.cpp": glue,
        "emulated.cpp": "\n".join(
            f'#include "{name}"'
            for name in ("runtime.h", "headgain_kernels.cuh", "headgain_kernels_impl.h", "checks.cpp")
            + ("schemas.cpp", "headgain_cuda.cpp")
        )
        + "\n",
    }


def load():
    """Build (or reuse) the emulated ops and load them: returns ``torch.ops.hgemu``."""
    import torch
    from torch.utils.cpp_extension import load as load_extension

    parts = _sources()
    digest = hashlib.sha256("".join(parts.values()).encode())
    for name in ("runtime.h", "runtime.cpp", "cuda_stubs.h"):
        digest.update((RUNTIME / name).read_bytes())
    out = BUILD / digest.hexdigest()[:16]
    out.mkdir(parents=True, exist_ok=True)
    for name, text in parts.items():
        (out / name).write_text(text)
    load_extension(
        name="headgain_cuda_emulated",
        sources=[str(out / "emulated.cpp"), str(RUNTIME / "runtime.cpp")],
        extra_include_paths=[str(RUNTIME)],
        extra_cflags=["-O1", "-std=c++17"],
        build_directory=str(out),
        is_python_module=False,
    )
    return torch.ops.hgemu
