"""Build script for vdproj_ext.

Two ways in:
  * `pip install --no-build-isolation .` with torch importable: compiles `vdproj_ext._C`
    ahead of time (C++ CPU kernels always; CUDA kernels when torch has CUDA and nvcc exists).
  * plain `pip install .` (build isolation, no torch in the build env): ships the C++/CUDA
    sources inside the package; `vdproj_ext.bindings` compiles them on first use with
    torch.utils.cpp_extension.load and ninja, against the torch found at run time.
Either way the kernel sources travel with the package as `vdproj_ext/_csrc`.
"""
import importlib.util
import json
import os
import shutil

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py

ROOT = os.path.dirname(os.path.abspath(__file__))
CSRC = os.path.join(ROOT, "csrc")


def _load_build_config():
    """vdproj_ext/bindings/build_config.py, by path: the package itself needs torch to import."""
    path = os.path.join(ROOT, "vdproj_ext", "bindings", "build_config.py")
    spec = importlib.util.spec_from_file_location("vdproj_build_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


try:  # torch is only importable without build isolation
    import torch
    from torch.utils import cpp_extension
except ImportError:
    torch = None


def cuda_wanted():
    if torch is None or torch.version.cuda is None or os.environ.get("VDPROJ_FORCE_CPU") == "1":
        return False
    home = cpp_extension.CUDA_HOME
    return home is not None and os.path.exists(os.path.join(home, "bin", "nvcc"))


def build_info(with_cuda):
    if torch is None:
        return {"aot": False}
    archs = os.environ.get("TORCH_CUDA_ARCH_LIST", "") if with_cuda else ""
    return {"aot": True, "torch_version": torch.__version__, "with_cuda": with_cuda,
            "cuda_version": torch.version.cuda if with_cuda else None, "cuda_archs": archs}


class BuildPyWithSources(build_py):
    """Copy csrc/ into the package so an installed wheel can JIT-compile it later."""

    def run(self):
        super().run()
        pkg = os.path.join(self.build_lib, "vdproj_ext")
        shutil.copytree(CSRC, os.path.join(pkg, "_csrc"), dirs_exist_ok=True)
        with open(os.path.join(pkg, "_build_info.json"), "w") as f:
            json.dump(build_info(WITH_CUDA), f, indent=1)


WITH_CUDA = cuda_wanted()
ext_modules, cmdclass = [], {"build_py": BuildPyWithSources}
if torch is not None:
    build_config = _load_build_config()
    sources = build_config.sources("csrc", WITH_CUDA)  # relative paths, as setuptools wants
    flags = build_config.compile_flags("csrc", WITH_CUDA)
    if WITH_CUDA:
        ext = cpp_extension.CUDAExtension(
            "vdproj_ext._C", sources,
            extra_compile_args={"cxx": flags["cxx"], "nvcc": flags["nvcc"]},
            extra_link_args=flags["ldflags"])
    else:
        ext = cpp_extension.CppExtension(
            "vdproj_ext._C", sources, extra_compile_args={"cxx": flags["cxx"]},
            extra_link_args=flags["ldflags"])
    ext_modules.append(ext)
    cmdclass["build_ext"] = cpp_extension.BuildExtension.with_options(use_ninja=True)

setup(
    name="vdproj_ext",
    version="0.1.0",
    description="V-DProj: compressed-V KV cache attention kernels for PyTorch",
    packages=find_packages(include=["vdproj_ext", "vdproj_ext.*"]),
    python_requires=">=3.9",
    install_requires=["torch>=2.4", "numpy", "ninja", "tqdm", "matplotlib", "tokenizers"],
    extras_require={"convert": ["transformers", "safetensors"],
                    "test": ["pytest", "pytest-benchmark"]},
    entry_points={"console_scripts": [
        "vdproj-train=vdproj_ext.train:main",
        "vdproj-generate=vdproj_ext.generate:main",
        "vdproj-study=vdproj_ext.study:main",
    ]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    zip_safe=False,
)
