"""Find and load the compiled kernels, once, and remember why when that fails.

Order of attempts:
  1. `vdproj_ext._C`, compiled ahead of time by `pip install --no-build-isolation .`, but only
     if it was built against the torch that is running now (checked before importing it, so
     an ABI mismatch never surfaces as an undefined-symbol traceback).
  2. A JIT build of the shipped sources with torch.utils.cpp_extension.load (ninja), cached
     per torch version under $VDPROJ_EXT_CACHE or ~/.cache/vdproj_ext. This is what a plain
     `pip install .` uses, and what a torch upgrade falls back to.
Set VDPROJ_EXT_NO_JIT=1 to forbid step 2 (the reference backend is then used).
"""
from __future__ import annotations

import hashlib
import importlib
import json
import os
import threading
import warnings
from pathlib import Path

import torch

from . import build_config

_PKG_DIR = Path(__file__).resolve().parent.parent  # the vdproj_ext package
_lock = threading.Lock()
_state: dict = {}


def source_dir() -> Path:
    """The kernel sources: shipped inside the wheel, or csrc/ of a source checkout."""
    for candidate in (_PKG_DIR / "_csrc", _PKG_DIR.parent / "csrc"):
        if (candidate / build_config.FLAGS_FILE).exists():
            return candidate
    raise FileNotFoundError("vdproj_ext kernel sources not found (looked for _csrc/ and ../csrc/)")


def _aot_build_info() -> dict | None:
    path = _PKG_DIR / "_build_info.json"
    if not path.exists():
        return None
    with open(path) as f:
        return json.load(f)


def _try_aot():
    info = _aot_build_info()
    if info is not None and not info.get("aot", False):
        return None, "the installed wheel carries sources only (built with build isolation)"
    if info is not None and info.get("torch_version") != torch.__version__:
        return None, (f"vdproj_ext._C was built against torch {info.get('torch_version')} but "
                      f"torch {torch.__version__} is running")
    try:
        module = importlib.import_module("vdproj_ext._C")
    except ImportError as exc:
        return None, f"vdproj_ext._C could not be imported: {exc}"
    built = module.build_info().get("torch_version", "")
    if not torch.__version__.startswith(built):
        return None, f"vdproj_ext._C reports torch {built}, running torch {torch.__version__}"
    return module, None


def _try_jit():
    if os.environ.get("VDPROJ_EXT_NO_JIT") == "1":
        return None, "JIT compilation disabled by VDPROJ_EXT_NO_JIT=1"
    try:
        from torch.utils import cpp_extension
        src = source_dir()
        with_cuda = (torch.version.cuda is not None and torch.cuda.is_available()
                     and cpp_extension.CUDA_HOME is not None)
        sources = build_config.sources(src, with_cuda)
        flags = build_config.compile_flags(src, with_cuda)
        digest = hashlib.sha1()  # the flags, every source and every header
        for path in [str(src / build_config.FLAGS_FILE)] + sources + sorted(
                str(p) for p in src.rglob("*.h")):
            digest.update(Path(path).read_bytes())
        tag = f"{torch.__version__}-{'cuda' if with_cuda else 'cpu'}-{digest.hexdigest()[:12]}"
        name = "vdproj_ext_jit_" + hashlib.sha1(tag.encode()).hexdigest()[:10]
        root = Path(os.environ.get("VDPROJ_EXT_CACHE", Path.home() / ".cache" / "vdproj_ext"))
        build_dir = root / tag
        build_dir.mkdir(parents=True, exist_ok=True)
        module = cpp_extension.load(
            name=name, sources=sources, extra_cflags=flags["cxx"],
            extra_cuda_cflags=flags["nvcc"], extra_ldflags=flags["ldflags"],
            build_directory=str(build_dir), verbose=False)
        return module, None
    except Exception as exc:  # compiler missing, build error, ...
        return None, f"JIT build of the kernels failed: {type(exc).__name__}: {exc}"


def _namespace_taken() -> bool:
    """Whether some other library already defined the vdproj_ext op namespace (for example a
    CMake build loaded by hand): a second TORCH_LIBRARY(vdproj_ext) terminates the process."""
    return hasattr(torch.ops.vdproj_ext, "cva_forward")


def load(jit: bool = True):
    """Return the compiled module, or None; the reason for None is in `status()`.

    jit=False tries only the ahead-of-time build (an import, cheap enough for package import
    time) and remembers nothing when it is absent, so that a later load() may still build."""
    with _lock:
        if "module" in _state:
            return _state["module"]
        if _namespace_taken():
            if not jit:
                return None
            _state.update(module=None, origin=None, reason=(
                "torch.ops.vdproj_ext is already defined by another copy of the kernels loaded "
                "in this process; loading a second copy would abort it, so none was loaded"))
            return None
        module, aot_reason = _try_aot()
        if module is None and not jit:
            return None
        origin, reason = "aot", None
        if module is None:
            module, jit_reason = _try_jit()
            origin = "jit"
            if module is None:
                origin, reason = None, f"{aot_reason}; {jit_reason}"
            elif "sources only" not in aot_reason and _aot_build_info() is not None:
                warnings.warn(f"{aot_reason}; compiled the kernels for the running torch instead",
                              RuntimeWarning, stacklevel=3)
        _state.update(module=module, origin=origin, reason=reason)
        return module


def status() -> dict:
    load()
    return {"origin": _state["origin"], "reason": _state["reason"]}
