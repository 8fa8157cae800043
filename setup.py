"""Build and install headgain.

The C++ extension ``headgain._C`` (``csrc/``) is compiled by ``torch.utils.cpp_extension``:
CPU kernels always; CUDA kernels when torch is a CUDA build and a CUDA toolkit is found.
Install with ``pip install --no-build-isolation -e .`` (an isolated build would fetch a
different torch).
"""

import glob
import os

from setuptools import find_packages, setup
from torch.utils.cpp_extension import BuildExtension, CppExtension

HERE = os.path.dirname(os.path.abspath(__file__))


def extensions():
    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    if not sources:
        return []
    return [CppExtension("headgain._C", sources, extra_compile_args={"cxx": ["-O3"]})]


setup(
    name="headgain",
    version="0.1.0",
    description="Training-free functional-head rescaling against hallucination in vision-language models",
    packages=find_packages(include=["headgain", "headgain.*"]),
    python_requires=">=3.10",
    install_requires=["torch>=2.11,<2.14", "transformers>=5.17", "numpy", "pillow", "matplotlib"],
    extras_require={"test": ["pytest"]},
    ext_modules=extensions(),
    cmdclass={"build_ext": BuildExtension},
    entry_points={"console_scripts": ["headgain=headgain.cli:main"]},
)
