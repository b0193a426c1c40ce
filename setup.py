"""Build script: setuptools drives CMake for the compiled module ``vlmfast._C``.

Environment switches (all optional):

* ``VLMFAST_SKIP_CPP=1``      pure-Python install, no compiled module (the ``cpp``/``cuda`` backends report
  themselves unavailable and everything runs on Triton or the torch reference).
* ``VLMFAST_WITH_CUDA=0``     never compile the CUDA sources, even when nvcc is found (default: compile them
  when CMake finds nvcc).
* ``VLMFAST_CUDA_ARCHS``      CUDA architectures, default ``80;90`` (A100, H100/H200).
* ``VLMFAST_BUILD_TYPE``      CMake build type, default ``Release``.
* ``CMAKE_ARGS``              extra arguments handed to CMake as they are.
* ``CMAKE_BUILD_PARALLEL_LEVEL`` parallel compile jobs (default: number of CPUs).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


def _version() -> str:
    text = (ROOT / "vlmfast" / "_version.py").read_text()
    match = re.search(r'__version__\s*=\s*"([^"]+)"', text)
    if match is None:
        raise RuntimeError("vlmfast/_version.py does not define __version__")
    return match.group(1)


class CMakeExtension(Extension):
    def __init__(self, name: str, sourcedir: Path) -> None:
        super().__init__(name, sources=[])
        self.sourcedir = str(sourcedir)


class CMakeBuild(build_ext):
    def build_extension(self, ext: CMakeExtension) -> None:  # type: ignore[override]
        cmake = shutil.which("cmake")
        if cmake is None:
            raise RuntimeError("building vlmfast._C needs CMake >= 3.18 on PATH (or set VLMFAST_SKIP_CPP=1)")
        extdir = Path(self.get_ext_fullpath(ext.name)).parent.resolve()
        build_type = os.environ.get("VLMFAST_BUILD_TYPE", "Debug" if self.debug else "Release")
        with_cuda = os.environ.get("VLMFAST_WITH_CUDA", "1").strip().lower() not in ("0", "off", "false", "no")
        import pybind11

        cmake_args = [
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={extdir}{os.sep}",
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY_{build_type.upper()}={extdir}{os.sep}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
            f"-DCMAKE_BUILD_TYPE={build_type}",
            f"-DVLMFAST_VERSION={_version()}",
            f"-DVLMFAST_WITH_CUDA={'ON' if with_cuda else 'OFF'}",
            f"-DCMAKE_CUDA_ARCHITECTURES={os.environ.get('VLMFAST_CUDA_ARCHS', '80;90')}",
        ]
        if shutil.which("ninja"):
            cmake_args.append("-GNinja")
        if os.environ.get("CMAKE_ARGS"):
            cmake_args += [a for a in os.environ["CMAKE_ARGS"].split(" ") if a]
        jobs = os.environ.get("CMAKE_BUILD_PARALLEL_LEVEL", str(os.cpu_count() or 2))
        build_temp = Path(self.build_temp) / ext.name
        build_temp.mkdir(parents=True, exist_ok=True)
        subprocess.run([cmake, ext.sourcedir, *cmake_args], cwd=build_temp, check=True)
        subprocess.run([cmake, "--build", ".", "--config", build_type, "--parallel", jobs], cwd=build_temp, check=True)


skip_cpp = os.environ.get("VLMFAST_SKIP_CPP", "0").strip().lower() in ("1", "on", "true", "yes")

setup(
    version=_version(),
    packages=find_packages(include=["vlmfast", "vlmfast.*"]) + ["vlmfast.kernels"],
    package_dir={"vlmfast.kernels": "kernels"},
    package_data={"vlmfast.models": ["configs/*.json"]},
    include_package_data=True,
    ext_modules=[] if skip_cpp else [CMakeExtension("vlmfast._C", ROOT)],
    cmdclass={"build_ext": CMakeBuild},
    zip_safe=False,
)
