"""CUDA routing: on a CUDA tensor with the "ext" backend, which implementation runs.

  * compressed_attn_with_kvcache runs the fused kernels of csrc/cuda/ when the extension says
    they take the inputs, else aten_paths.batched_kvcache_attention (same semantics, on the GPU).
  * compressed_v_attention runs the absorbed kernels (cva_forward / cva_backward) or
    aten_paths.restore_then_sdpa: the latter when the kernels do not take the inputs, and by
    shape otherwise (an algorithm choice, below).

What the kernels accept (dtypes, head_dim, rank, alignment, shared memory on this device) is
the extension's to say: cuda_kernel_support in csrc/cuda. Nothing here repeats those limits.

On the CPU the decode ops call their kernel without the Python checks when every argument is a
CPU tensor (cpu_kernel_takes): the kernel runs the same checks in C++.

The latent-key ops (SPEC 3b) pick between their kernels, the ATen paths and the reference with
latent_path (below), on every device; on CUDA the kernels run when the extension says they take
the inputs (ckv_uses_restore_keys_then_sdpa, ckv_kvcache_uses_batched_aten), as above.
"""
from __future__ import annotations

import torch

from .. import bindings
from .backend import has_kernel, resolve_backend

_CPU = torch.device("cpu")

# The absorbed kernel spends 2*(D+R) CUDA-core flops per (query, key, head); restore-then-SDPA
# spends 4*D tensor-core flops plus one (Tk x R x H*D) GEMM, so it wins once Tq*Tk is large.
# Measured on an H200 (bench/RESULTS.md, 2026-12-04; bf16, B=8, H=8, D=64, R=320, forward +
# backward): at Tq = Tk = 128, this threshold, the absorbed kernels were already 4.2x slower.
# Smaller shapes are unmeasured, so the threshold stays until bench/bench_gpu.py measures them.
_CVA_COMPOSITE_MIN_QK = 128 * 128


def cuda_kernel_unsupported(op, q, rank, vector_loaded, t_new=0, backward=False, rope_dim=0,
                            k_rank=0) -> str:
    """Why the fused CUDA kernels of `op` ("cva", "kvcache", "ckv" or "ckv_kvcache") cannot
    take these inputs, or "" when they can. vector_loaded: the inputs the kernels read with
    16-byte vector loads, exactly as the op will receive them (the extension's docstring lists
    them per op). rope_dim, k_rank: the latent keys' Dr and Rk (0: the joint latent)."""
    return bindings.load().cuda_kernel_support(op, q, rank, list(vector_loaded), t_new, backward,
                                               rope_dim=rope_dim, k_rank=k_rank)


def cva_uses_restore_then_sdpa(q, k, v_c, needs_grad=False) -> bool:
    # Contiguous inputs reach the kernel as they are (possibly a view at an odd offset); the
    # others are copied by .contiguous() into fresh, aligned memory.
    as_passed = [t for t in (k, v_c) if t.is_contiguous()]
    if cuda_kernel_unsupported("cva", q, v_c.shape[-1], as_passed, 0, needs_grad):
        return True
    return q.shape[1] * k.shape[1] >= _CVA_COMPOSITE_MIN_QK


def kvcache_uses_batched_aten(q, k_cache, vc_cache, w_r, k, v, w_c) -> bool:
    """The arguments as the kernel would receive them (q, w_r, k, v, w_c made contiguous)."""
    t_new = 0 if k is None else k.shape[1]
    return bool(cuda_kernel_unsupported("kvcache", q, vc_cache.shape[-1],
                                        [k_cache, vc_cache, w_r, k, v, w_c], t_new, False))


def ckv_uses_restore_keys_then_sdpa(q, k_rope, k_c, v_c, needs_grad=False) -> bool:
    """compressed_kv_attention on CUDA: the ATen path when the ckv kernels do not take the
    inputs, and by shape otherwise (the same algorithm choice as compressed_v_attention)."""
    as_passed = [t for t in (k_rope, k_c, v_c) if t is not None and t.is_contiguous()]
    if cuda_kernel_unsupported("ckv", q, v_c.shape[-1], as_passed, 0, needs_grad,
                               rope_dim=k_rope.shape[-1], k_rank=_key_rank(k_c)):
        return True
    return q.shape[1] * k_rope.shape[1] >= _CVA_COMPOSITE_MIN_QK


def ckv_kvcache_uses_batched_aten(q, krope_cache, kc_cache, vc_cache, w_r, k, v, w_kc,
                                  w_c) -> bool:
    """The arguments as the kernel would receive them (q, w_r, k, v, w_kc, w_c contiguous)."""
    t_new = 0 if k is None else k.shape[1]
    return bool(cuda_kernel_unsupported(
        "ckv_kvcache", q, vc_cache.shape[-1], [krope_cache, kc_cache, vc_cache, w_r, k, v, w_kc,
                                               w_c],
        t_new, False, rope_dim=krope_cache.shape[-1], k_rank=_key_rank(kc_cache)))


def _key_rank(key_latent) -> int:
    """Rk of a separate key latent, 0 for the joint latent (as cuda_kernel_support takes it)."""
    return 0 if key_latent is None else key_latent.shape[-1]


_latent_paths: dict = {}


def cpu_kernel_takes(op, backend, required, optional) -> bool:
    """Whether a decode op (`op`, one of the kvcache ops) calls its CPU kernel straight away:
    every required argument a CPU tensor, every optional one None or a CPU tensor, and the
    kernel built and chosen by `backend`. The CPU kernels check ranks, devices, dtypes,
    shapes, strides and lengths in C++ (csrc/common/checks.h), in the order and with the
    messages of checks.py, before writing anything; so such a call skips the Python checks:
    12-15 us a call with the interpreter's and torch's paths out of cache (as between a
    model's layers), 3-4 us with them in cache, 6-10% of a batch-1 step at context 256
    (bench/RESULTS.md). Anything else takes the checked path, which reports it."""
    for t in required:
        if not isinstance(t, torch.Tensor) or not t.is_cpu:
            return False
    for t in optional:
        if t is not None and (not isinstance(t, torch.Tensor) or not t.is_cpu):
            return False
    if op == "ckv_kvcache_attention":
        return latent_path(backend, _CPU, op) == "kernel"
    return resolve_backend(backend, _CPU) == "ext"


def latent_path(backend, device, op) -> str:
    """_choose_latent_path, memoized per (backend, device type, op): what it reads is fixed
    once the kernels are loaded (has_kernel), and it runs on every decode step of every
    layer."""
    key = (backend, device.type, op) if isinstance(backend, str) else None
    path = _latent_paths.get(key)
    if path is None:
        path = _choose_latent_path(backend, device, op)
        if key is not None:
            _latent_paths[key] = path
    return path


def _choose_latent_path(backend, device, op) -> str:
    """Which implementation of a latent-key op (SPEC 3b) runs: "kernel" (the compiled `op`),
    "aten" (aten_paths, batched) or "reference".

    On CUDA a build without the latent-key kernels runs the ATen path; with them, the ops ask
    the extension whether the kernels take the inputs (the functions above) and run the ATen
    path when they do not. On CPU a build without the ckv_* ops falls back to the reference
    under "auto" and says so under "ext".
    """
    if resolve_backend(backend, device) == "reference":
        return "reference"
    if has_kernel(device.type, op):
        return "kernel"
    if device.type == "cuda":
        return "aten"
    if backend == "auto":
        return "reference"
    raise RuntimeError(f"backend='ext' requested for a {device.type} tensor, but the loaded "
                       f"vdproj_ext kernels have no {op} (built before the latent-key ops; "
                       f"rebuild the extension)")
