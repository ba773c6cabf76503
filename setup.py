"""Builds gpusaver's C extension; everything else is declared in pyproject.toml.

``gpusaver._native`` holds the per-tensor loops of the host path (see
gpusaver/native.py). The kernels/ sources ship inside the package as
gpusaver/kernels/ so that an installed wheel can compile them with NVRTC.
"""

import os
import shutil

import numpy
from setuptools import Extension, setup
from setuptools.command.build_py import build_py


class BuildPyWithKernels(build_py):
    """Copies kernels/*.cu into the built package (gpusaver/kernels/)."""

    def run(self) -> None:
        super().run()
        here = os.path.dirname(os.path.abspath(__file__))
        target = os.path.join(self.build_lib, "gpusaver", "kernels")
        os.makedirs(target, exist_ok=True)
        for name in sorted(os.listdir(os.path.join(here, "kernels"))):
            if name.endswith(".cu"):
                shutil.copy2(os.path.join(here, "kernels", name), os.path.join(target, name))


native = Extension(
    "gpusaver._native",
    sources=["gpusaver/_native.c"],
    include_dirs=[numpy.get_include()],
    define_macros=[("NPY_TARGET_VERSION", "NPY_1_24_API_VERSION")],
    extra_compile_args=["-O3", "-std=c11", "-fno-strict-aliasing"],
)

setup(ext_modules=[native], cmdclass={"build_py": BuildPyWithKernels})
