"""Build: CMake compiles csrc/ into the extension module ``dpkern._C``.

Knobs (environment):
  DPKERN_SKIP_CUDA=1     install without the CUDA extension (pure Python + Triton)
  DPKERN_CUDA_ARCHS      CMake CUDA architectures, default "80;90"
  MAX_JOBS               parallel compile jobs
With no nvcc on PATH (or CUDACXX / CUDA_HOME), the extension is skipped with a warning;
``dpkern.cuda_available()`` then reports why.
"""
import os
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


def _find_nvcc():
    for cand in (os.environ.get("CUDACXX"),
                 os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin", "nvcc"),
                 shutil.which("nvcc")):
        if cand and os.path.exists(cand):
            return cand
    return None


class CMakeExtension(Extension):
    def __init__(self, name):
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    def build_extension(self, ext):
        nvcc = _find_nvcc()
        if os.environ.get("DPKERN_SKIP_CUDA") == "1" or nvcc is None:
            why = "DPKERN_SKIP_CUDA=1" if nvcc else "no nvcc found"
            print(f"dpkern: skipping the CUDA extension ({why})", file=sys.stderr)
            return
        import pybind11

        out_dir = Path(self.get_ext_fullpath(ext.name)).resolve().parent
        build_dir = Path(self.build_temp).resolve() / "cmake"
        build_dir.mkdir(parents=True, exist_ok=True)
        archs = os.environ.get("DPKERN_CUDA_ARCHS", "80;90")
        cfg = ["-S", str(ROOT), "-B", str(build_dir),
               f"-DCMAKE_CUDA_COMPILER={nvcc}",
               f"-DDPKERN_CUDA_ARCHS={archs}",
               f"-DPython_EXECUTABLE={sys.executable}",
               f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
               f"-DDPKERN_OUTPUT_DIR={out_dir}",
               "-DCMAKE_BUILD_TYPE=Release"]
        if shutil.which("ninja"):
            cfg += ["-G", "Ninja"]
        subprocess.check_call(["cmake", *cfg])
        jobs = os.environ.get("MAX_JOBS", str(os.cpu_count() or 1))
        subprocess.check_call(["cmake", "--build", str(build_dir), "-j", jobs])


setup(
    packages=["dpkern", "dpkern.kernels"] + [
        "dpkern." + str(p.relative_to(ROOT / "dpkern")).replace(os.sep, ".")
        for p in sorted((ROOT / "dpkern").rglob("*")) if p.is_dir() and (p / "__init__.py").exists()
    ],
    # kernels/ sits at the top level of the repository and installs as dpkern.kernels
    package_dir={"dpkern": "dpkern", "dpkern.kernels": "kernels"},
    ext_modules=[CMakeExtension("dpkern._C")],
    cmdclass={"build_ext": CMakeBuild},
)
