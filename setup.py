"""Builds pydecouple._C: the CPU kernels always, the CUDA kernels where they can run.

PYDECOUPLE_CUDA=0/1 forces the CUDA part off/on; by default it is built only
where PyTorch is a CUDA build and nvcc's major version matches PyTorch's CUDA.
The Triton kernels in kernels/ install as pydecouple.kernels.
"""

import glob
import os
import re
import subprocess

from setuptools import setup

import torch
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension, CUDA_HOME


def _nvcc_major():
    nvcc = os.path.join(CUDA_HOME, "bin", "nvcc") if CUDA_HOME else "nvcc"
    try:
        out = subprocess.run([nvcc, "--version"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    m = re.search(r"release (\d+)\.", out)
    return int(m.group(1)) if m else None


def _want_cuda():
    forced = os.environ.get("PYDECOUPLE_CUDA")
    if forced is not None:
        return forced == "1"
    if torch.version.cuda is None:
        return False
    return _nvcc_major() == int(torch.version.cuda.split(".")[0])


cpu_sources = sorted(glob.glob("csrc/cpu/*.cpp")) + ["csrc/registration.cpp"]
cxx_flags = ["-O3", "-fopenmp", "-std=c++20", "-DNDEBUG"]
if os.environ.get("PYDECOUPLE_ASAN") == "1":
    cxx_flags += ["-fsanitize=address", "-fno-omit-frame-pointer", "-g", "-O1"]
link_flags = ["-fopenmp"] + (["-fsanitize=address"] if os.environ.get("PYDECOUPLE_ASAN") == "1" else [])

if _want_cuda():
    sources = cpu_sources + sorted(glob.glob("csrc/cuda/*.cu")) + sorted(glob.glob("csrc/cuda/kernels/*.cu"))
    ext = CUDAExtension(
        "pydecouple._C",
        sources,
        extra_compile_args={"cxx": cxx_flags + ["-DPYDECOUPLE_WITH_CUDA"], "nvcc": ["-O3", "-DPYDECOUPLE_WITH_CUDA"]},
        extra_link_args=link_flags,
    )
else:
    ext = CppExtension("pydecouple._C", cpu_sources, extra_compile_args=cxx_flags, extra_link_args=link_flags)

setup(
    packages=["pydecouple", "pydecouple.accelerate", "pydecouple.commands", "pydecouple.nn", "pydecouple.models",
              "pydecouple.kernels"],
    package_dir={"pydecouple.kernels": "kernels"},
    ext_modules=[ext],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
