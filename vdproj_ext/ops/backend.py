"""Which implementation runs: loading the kernels, resolving `backend`, and backend_info()."""
from __future__ import annotations

import functools

import torch

from .. import bindings
from .library import op_defined, register_torch_library

BACKENDS = ("auto", "ext", "reference")

_DISPATCH_KEYS = {"cpu": "CPU", "cuda": "CUDA"}
_kernel_built: dict = {}


def load_kernels(jit: bool = True):
    """torch.ops.vdproj_ext once the compiled kernels are loaded (and registered), else None.
    jit=False: only an ahead-of-time build is loaded (bindings.load)."""
    if bindings.load(jit) is None:
        return None
    register_torch_library()
    return torch.ops.vdproj_ext


@torch.compiler.assume_constant_result  # fixed once loaded; lets torch.compile skip the lock
def has_kernel(device_type: str, op: str = "cva_forward") -> bool:
    """Whether compiled kernels exist for this device type (memoized: a hot-path check)."""
    if (device_type, op) not in _kernel_built:
        key = _DISPATCH_KEYS.get(device_type)
        # An older build may lack an op altogether (e.g. the latent-key ckv_* ops).
        _kernel_built[device_type, op] = (
            load_kernels() is not None and key is not None
            and op_defined(op)
            and torch._C._dispatch_has_kernel_for_dispatch_key(f"vdproj_ext::{op}", key))
    return _kernel_built[device_type, op]


def resolve_backend(backend: str, device: torch.device) -> str:
    """"ext" or "reference" for this device, or an error saying why "ext" is unavailable."""
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "reference":
        return "reference"
    if has_kernel(device.type):
        return "ext"
    if backend == "auto":
        return "reference"
    why = bindings.status()["reason"] or f"it was built without {device.type.upper()} kernels"
    raise RuntimeError(f"backend='ext' requested for a {device.type} tensor, but the "
                       f"vdproj_ext kernels are unavailable: {why}")


def backend_info() -> dict:
    """What was compiled, against which torch, and what backend='auto' picks per device."""
    module = bindings.load()
    status = bindings.status()
    built = module.build_info() if module is not None else {}
    cpu, cuda = has_kernel("cpu"), has_kernel("cuda")
    return {
        "torch_version": torch.__version__,
        "extension_loaded": module is not None,
        "extension_origin": status["origin"],  # "aot", "jit" or None
        "extension_error": status["reason"],
        "built_torch_version": built.get("torch_version"),
        "cpu_kernels": cpu,
        "cuda_kernels": cuda,
        "cuda_archs": [f"sm_{a // 10}" for a in built.get("cuda_archs", [])],
        "openmp": built.get("openmp", False),
        # int8 latent-key decode with AVX-512 VNNI integer dot products (csrc/cpu/int8_vnni.h)
        "cpu_int8_vnni": built.get("cpu_int8_vnni", False),
        "auto_backend": {"cpu": "ext" if cpu else "reference",
                         "cuda": "ext" if cuda else "reference"},
        "cuda_available": torch.cuda.is_available(),
    }


def inference_only(fn):
    """Grad mode off for an op that writes caches in place, at no cost when it is already off,
    as when decoding. Switched with torch._C._set_grad_enabled, the call torch.no_grad() makes
    inside: building and entering that context object cost about 30 us a call with the
    interpreter's paths out of cache, as between a model's layers (bench/RESULTS.md)."""
    @functools.wraps(fn)
    def call(*args, **kwargs):
        if not torch.is_grad_enabled():
            return fn(*args, **kwargs)
        torch._C._set_grad_enabled(False)
        try:
            return fn(*args, **kwargs)
        finally:
            torch._C._set_grad_enabled(True)
    return call
