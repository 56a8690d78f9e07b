"""Public functional API (SPEC section 3): input checks, backend dispatch and autograd.

The compiled ops live under torch.ops.vdproj_ext (schemas in csrc/vdproj_ops.cpp). This
module registers their fake (meta) implementations and autograd formula with torch.library,
so that opcheck passes and torch.compile can trace through them.
"""
from __future__ import annotations

import functools
import math
import numbers
from typing import Optional

import torch

from . import reference
from . import bindings as _loader

BACKENDS = ("auto", "ext", "reference")
SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)

# ---------------------------------------------------------------------------------------------
# Loading the extension and choosing a backend


def _ops():
    """torch.ops.vdproj_ext once the kernels are loaded, else None."""
    if _loader.load() is None:
        return None
    _register_torch_library()
    return torch.ops.vdproj_ext


_kernel_built: dict = {}


@torch.compiler.assume_constant_result  # fixed once loaded; lets torch.compile skip the lock
def _has_kernel(device_type: str, op: str = "cva_forward") -> bool:
    """Whether compiled kernels exist for this device type (memoized: a hot-path check)."""
    if (device_type, op) not in _kernel_built:
        key = {"cpu": "CPU", "cuda": "CUDA"}.get(device_type)
        _kernel_built[device_type, op] = (
            _ops() is not None and key is not None
            and torch._C._dispatch_has_kernel_for_dispatch_key(f"vdproj_ext::{op}", key))
    return _kernel_built[device_type, op]


def _resolve_backend(backend: str, device: torch.device) -> str:
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "reference":
        return "reference"
    if _has_kernel(device.type):
        return "ext"
    if backend == "auto":
        return "reference"
    status = _loader.status()
    why = status["reason"] or f"it was built without {device.type.upper()} kernels"
    raise RuntimeError(f"backend='ext' requested for a {device.type} tensor, but the "
                       f"vdproj_ext kernels are unavailable: {why}")


def backend_info() -> dict:
    """What was compiled, against which torch, and what backend='auto' picks per device."""
    module = _loader.load()
    status = _loader.status()
    built = module.build_info() if module is not None else {}
    cpu, cuda = _has_kernel("cpu"), _has_kernel("cuda")
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
        "auto_backend": {"cpu": "ext" if cpu else "reference",
                         "cuda": "ext" if cuda else "reference"},
        "cuda_available": torch.cuda.is_available(),
    }


# ---------------------------------------------------------------------------------------------
# Input checks. Every message names the argument and what was expected.


def _check_tensor(name, t, ndim, optional=False):
    if t is None:
        if optional:
            return
        raise TypeError(f"{name} must be a tensor, got None")
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(t.shape)}")


def _check_shape(name, t, expected):
    if t is not None and tuple(t.shape) != tuple(expected):
        raise ValueError(f"{name} must have shape {tuple(expected)}, got {tuple(t.shape)}")


def _check_same_dtype_device(named):
    named = [(n, t) for n, t in named if t is not None]
    first_name, first = named[0]
    if first.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"{first_name} must be float32, float16 or bfloat16, got {first.dtype}")
    for name, t in named[1:]:
        if t.dtype != first.dtype:
            raise TypeError(f"{name} must have dtype {first.dtype} like {first_name}, "
                            f"got {t.dtype}")
        if t.device != first.device:
            raise ValueError(f"{name} must be on {first.device} like {first_name}, "
                             f"got {t.device}")


def _check_scale(softmax_scale, head_dim):
    if softmax_scale is None:
        return head_dim ** -0.5
    if isinstance(softmax_scale, bool) or not isinstance(softmax_scale, numbers.Real):
        raise TypeError(f"softmax_scale must be a float or None, got {type(softmax_scale).__name__}")
    scale = float(softmax_scale)
    if not math.isfinite(scale):
        raise ValueError(f"softmax_scale must be finite, got {scale}")
    return scale


def _check_flag(name, value):
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")


def _check_attention_inputs(q, k, v_c, w_r, b_r):
    _check_tensor("q", q, 4)
    _check_tensor("k", k, 4)
    _check_tensor("v_c", v_c, 3)
    _check_tensor("w_r", w_r, 2)
    _check_tensor("b_r", b_r, 1, optional=True)
    _check_same_dtype_device([("q", q), ("k", k), ("v_c", v_c), ("w_r", w_r), ("b_r", b_r)])
    batch, _, heads, head_dim = q.shape
    tk = k.shape[1]
    _check_shape("k", k, (batch, tk, heads, head_dim))
    rank = v_c.shape[-1]
    _check_shape("v_c", v_c, (batch, tk, rank))
    _check_shape("w_r", w_r, (heads * head_dim, rank))
    _check_shape("b_r", b_r, (heads * head_dim,))


# ---------------------------------------------------------------------------------------------
# compressed_v_attention: training / prefill, differentiable


class CompressedVAttentionFunction(torch.autograd.Function):
    """Autograd wrapper dispatching to the compiled kernels or to the reference."""

    @staticmethod
    def forward(ctx, q, k, v_c, w_r, b_r, causal, softmax_scale, backend):
        ctx.causal, ctx.softmax_scale, ctx.backend = causal, softmax_scale, backend
        ctx.has_bias = b_r is not None
        if backend == "ext":
            out, lse, ctx_c = torch.ops.vdproj_ext.cva_forward(
                q, k, v_c, w_r, b_r, causal, softmax_scale)
            ctx.save_for_backward(q, k, v_c, w_r, lse, ctx_c)
        else:
            out = reference.compressed_v_attention(q, k, v_c, w_r, b_r, causal=causal,
                                                   softmax_scale=softmax_scale)
            ctx.save_for_backward(q, k, v_c, w_r, b_r)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        if ctx.backend == "ext":
            q, k, v_c, w_r, lse, ctx_c = ctx.saved_tensors
            dq, dk, dvc, dwr, dbr = torch.ops.vdproj_ext.cva_backward(
                grad_out.contiguous(), q, k, v_c, w_r, lse, ctx_c, ctx.causal,
                ctx.softmax_scale)
        else:  # differentiate the reference by recomputing it with autograd on
            q, k, v_c, w_r, b_r = ctx.saved_tensors
            inputs = [t.detach().requires_grad_() for t in (q, k, v_c, w_r)]
            bias = b_r.detach().requires_grad_() if b_r is not None else None
            with torch.enable_grad():
                out = reference.compressed_v_attention(*inputs, bias, causal=ctx.causal,
                                                       softmax_scale=ctx.softmax_scale)
                grads = torch.autograd.grad(out, inputs + ([bias] if bias is not None else []),
                                            grad_out, allow_unused=True)
            dq, dk, dvc, dwr = grads[:4]
            dbr = grads[4] if bias is not None else None
        return dq, dk, dvc, dwr, (dbr if ctx.has_bias else None), None, None, None


def compressed_v_attention(q, k, v_c, w_r, b_r=None, *, causal=False, softmax_scale=None,
                           backend="auto"):
    """Attention whose values are restored from a compressed representation (SPEC section 3).

    q, k: (B, Tq, H, D), (B, Tk, H, D); v_c: (B, Tk, R); w_r: (H*D, R); b_r: (H*D,) or None.
    Returns o (B, Tq, H, D). Differentiable with respect to q, k, v_c, w_r and b_r.
    """
    _check_attention_inputs(q, k, v_c, w_r, b_r)
    _check_flag("causal", causal)
    scale = _check_scale(softmax_scale, q.shape[-1])
    chosen = _resolve_backend(backend, q.device)
    needs_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (q, k, v_c, w_r, b_r))
    if (chosen == "ext" and q.device.type == "cuda"
            and _cuda_cva_use_composite(q, k, v_c, needs_grad)):
        return _cuda_composite_cva(q, k, v_c, w_r, b_r, causal, scale)  # see "CUDA routing"
    if chosen == "ext":
        q, k, v_c, w_r = (t.contiguous() for t in (q, k, v_c, w_r))
        b_r = b_r.contiguous() if b_r is not None else None
    return CompressedVAttentionFunction.apply(q, k, v_c, w_r, b_r, causal, scale, chosen)


# ---------------------------------------------------------------------------------------------
# compressed_attn_with_kvcache: decode / append, inference only


def _check_kvcache_inputs(q, k_cache, vc_cache, w_r, b_r, k, v, w_c, b_c, cache_seqlens):
    _check_tensor("q", q, 4)
    _check_tensor("k_cache", k_cache, 4)
    _check_tensor("vc_cache", vc_cache, 3)
    _check_tensor("w_r", w_r, 2)
    _check_tensor("b_r", b_r, 1, optional=True)
    _check_same_dtype_device([("q", q), ("k_cache", k_cache), ("vc_cache", vc_cache),
                              ("w_r", w_r), ("b_r", b_r), ("k", k), ("v", v), ("w_c", w_c),
                              ("b_c", b_c)])
    batch, _, heads, head_dim = q.shape
    max_len, rank = k_cache.shape[1], vc_cache.shape[-1]
    _check_shape("k_cache", k_cache, (batch, max_len, heads, head_dim))
    _check_shape("vc_cache", vc_cache, (batch, max_len, rank))
    _check_shape("w_r", w_r, (heads * head_dim, rank))
    _check_shape("b_r", b_r, (heads * head_dim,))
    for name, cache in (("k_cache", k_cache), ("vc_cache", vc_cache)):
        if cache.stride(-1) != 1:
            raise ValueError(f"{name} must have a unit stride in its last dimension "
                             f"(got strides {cache.stride()}); it is written in place")
    if (k is None) != (v is None):
        raise ValueError("k and v must be given together (new tokens to append) or both None")
    t_new = 0
    if k is not None:
        _check_tensor("k", k, 4)
        _check_tensor("v", v, 3)
        t_new = k.shape[1]
        _check_shape("k", k, (batch, t_new, heads, head_dim))
        _check_shape("v", v, (batch, t_new, heads * head_dim))
        if w_c is None:
            raise ValueError("w_c (shape (R, H*D)) is required when new k and v are given")
        _check_tensor("w_c", w_c, 2)
        _check_tensor("b_c", b_c, 1, optional=True)
        _check_shape("w_c", w_c, (rank, heads * head_dim))
        _check_shape("b_c", b_c, (rank,))
    if not isinstance(cache_seqlens, torch.Tensor):
        raise TypeError(f"cache_seqlens must be an int32 tensor of shape ({batch},), "
                        f"got {type(cache_seqlens).__name__}")
    if cache_seqlens.dtype != torch.int32:
        raise TypeError(f"cache_seqlens must have dtype torch.int32, got {cache_seqlens.dtype}")
    if tuple(cache_seqlens.shape) != (batch,):
        raise ValueError(f"cache_seqlens must have shape ({batch},), "
                         f"got {tuple(cache_seqlens.shape)}")
    if cache_seqlens.device != q.device:
        raise ValueError(f"cache_seqlens must be on {q.device} like q, got {cache_seqlens.device}")


def _check_seqlens_range(cache_seqlens, max_len, t_new):
    """0 <= cache_seqlens and cache_seqlens + t_new <= Tmax. Only for the paths without a check
    of their own: the compiled kernels (CPU and CUDA) check the lengths in C++ before writing
    anything, so a decode step there does not pay for a second read (on CUDA, a second sync)."""
    # Reading the lengths is data-dependent; under torch.compile the reference path goes
    # without (the compiled kernels still check).
    if cache_seqlens.numel() == 0 or torch.compiler.is_compiling():
        return
    lo, hi = (int(x) for x in torch.aminmax(cache_seqlens))
    if lo < 0 or hi > max_len:
        raise ValueError(f"cache_seqlens must lie in [0, {max_len}] (the cache's Tmax), "
                         f"got values in [{lo}, {hi}]")
    if hi + t_new > max_len:
        raise ValueError(f"writing {t_new} new tokens at cache_seqlens (max {hi}) would "
                         f"overflow the cache of Tmax={max_len}; nothing was written")


@torch.no_grad()
def compressed_attn_with_kvcache(q, k_cache, vc_cache, w_r, b_r=None, *, k=None, v=None,
                                 w_c=None, b_c=None, cache_seqlens, causal=True,
                                 softmax_scale=None, backend="auto"):
    """Compress-on-write of (k, v) into the cache, then restore-on-read attention (SPEC 3)."""
    _check_kvcache_inputs(q, k_cache, vc_cache, w_r, b_r, k, v, w_c, b_c, cache_seqlens)
    _check_flag("causal", causal)
    scale = _check_scale(softmax_scale, q.shape[-1])
    chosen = _resolve_backend(backend, q.device)
    t_new = 0 if k is None else k.shape[1]
    if chosen == "reference":
        _check_seqlens_range(cache_seqlens, k_cache.shape[1], t_new)
        return reference.compressed_attn_with_kvcache(
            q, k_cache, vc_cache, w_r, b_r, k=k, v=v, w_c=w_c, b_c=b_c,
            cache_seqlens=cache_seqlens, causal=causal, softmax_scale=scale)
    contig = [t.contiguous() if t is not None else None for t in (q, w_r, b_r, k, v, w_c, b_c)]
    q_, w_r_, b_r_, k_, v_, w_c_, b_c_ = contig
    # The kernels read the caches, w_r, k, v and w_c with 16-byte vector loads: a contiguous view
    # at an odd offset (passed through by .contiguous()) must take the generic path too.
    if q.device.type == "cuda" and _cuda_kernel_unsupported(
            q_, vc_cache, k_cache, vc_cache, w_r_, k_, v_, w_c_, t_new=t_new):
        _check_seqlens_range(cache_seqlens, k_cache.shape[1], t_new)
        return _cuda_generic_kvcache(q, k_cache, vc_cache, w_r, b_r, k, v, w_c, b_c,
                                     cache_seqlens, causal, scale)  # see "CUDA routing"
    return torch.ops.vdproj_ext.kvcache_attention(
        q_, k_cache, vc_cache, w_r_, b_r_, k_, v_, w_c_, b_c_, cache_seqlens, causal, scale)


# ---------------------------------------------------------------------------------------------
# CUDA routing (issue 3, CUDA kernels). On a CUDA tensor with the "ext" backend:
#   * compressed_attn_with_kvcache runs the fused kernels of csrc/cuda/ when they take the shape
#     (head_dim 64 or 128, R a multiple of 8 up to 1024, float32/float16/bfloat16, caches with
#     16-byte aligned rows); any other shape runs a vectorized ATen version on the GPU
#     (_cuda_generic_kvcache), with the same semantics.
#   * compressed_v_attention picks by shape (_cuda_cva_use_composite): the absorbed kernel
#     (cva_forward / cva_backward) or "restore V with one GEMM, then torch SDPA".

_CUDA_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_CUDA_MAX_RANK = 1024  # csrc/cuda/vdproj_cuda.h kMaxRank

# PLACEHOLDER until measured on a GPU (bench/bench_gpu.py prints both paths side by side): the
# absorbed kernel spends 2*(D+R) CUDA-core flops per (query, key, head); restore-then-SDPA spends
# 4*D tensor-core flops plus one (Tk x R x H*D) GEMM, so it should win once Tq*Tk is large.
_CVA_COMPOSITE_MIN_QK = 128 * 128


@torch.compiler.assume_constant_result  # a device property: fixed for the process
def _cuda_smem_optin(index: int) -> int:
    """Shared memory one block may opt in to on CUDA device `index` (bytes)."""
    props = torch.cuda.get_device_properties(index)
    return int(getattr(props, "shared_memory_per_block_optin", 48 * 1024))


@functools.lru_cache(maxsize=256)  # a decode loop asks for the same shape every step
def _cuda_kernel_smem_bytes(dtype: str, tq: int, heads: int, head_dim: int, rank: int,
                            t_new: int) -> tuple:
    return tuple(_loader.load().cuda_kernel_smem_bytes(dtype, tq, heads, head_dim, rank, t_new))


def _cuda_smem_too_large(q, rank, t_new, backward) -> Optional[str]:
    """Which kernel's dynamic shared memory exceeds the device's per-block limit, or None.

    The sizes come from the extension (csrc/cuda/cuda_api.cpp kernel_smem_bytes, computed from
    the kernels' own layouts); such shapes would make the kernels raise, e.g. float32 with
    head_dim 128 and R >= 112 on an A100, so they take the ATen paths instead.
    """
    _, tq, heads, head_dim = q.shape
    limit = _cuda_smem_optin(q.device.index if q.device.index is not None
                             else torch.cuda.current_device())
    attention, compress, bwd = _cuda_kernel_smem_bytes(str(q.dtype).replace("torch.", ""),
                                                       tq, heads, head_dim, rank, t_new)
    for name, nbytes in (("attention", attention), ("compress-on-write", compress),
                         ("backward", bwd if backward else 0)):
        if nbytes > limit:
            return f"the {name} kernel needs {nbytes} bytes of shared memory (device: {limit})"
    return None


def _cuda_kernel_unsupported(q, v_c, *vector_tensors, t_new=0, backward=False) -> Optional[str]:
    """Why the CUDA kernels cannot take these inputs, or None when they can."""
    head_dim, rank = q.shape[-1], v_c.shape[-1]
    if q.dtype not in _CUDA_KERNEL_DTYPES:
        return f"dtype {q.dtype}"
    if head_dim not in (64, 128):
        return f"head_dim {head_dim} (kernels: 64 or 128)"
    if rank == 0 or rank % 8 != 0 or rank > _CUDA_MAX_RANK:
        return f"rank R={rank} (kernels: a multiple of 8, at most {_CUDA_MAX_RANK})"
    if q.shape[0] > 65535:
        return f"batch {q.shape[0]} (kernel grids: at most 65535)"
    for t in vector_tensors:  # read with 16-byte vector loads
        if t is None or t.numel() == 0:
            continue
        if t.data_ptr() % 16 or any(size > 1 and stride * t.element_size() % 16
                                    for size, stride in zip(t.shape[:-1], t.stride()[:-1])):
            return "an input whose rows are not 16-byte aligned"
    return _cuda_smem_too_large(q, rank, t_new, backward)


def _cuda_cva_use_composite(q, k, v_c, needs_grad=False) -> bool:
    """Shape-based algorithm choice for compressed_v_attention on CUDA (threshold: placeholder)."""
    if _cuda_kernel_unsupported(q, v_c, backward=needs_grad) is not None:
        return True
    # Contiguous inputs are passed as they are: a view at an odd offset is not 16-byte aligned.
    if any(t.is_contiguous() and t.numel() and t.data_ptr() % 16 for t in (q, k, v_c)):
        return True
    return q.shape[1] * k.shape[1] >= _CVA_COMPOSITE_MIN_QK


def _cuda_composite_cva(q, k, v_c, w_r, b_r, causal, scale):
    """Restore V with one GEMM, then flash/efficient SDPA; differentiable through autograd.

    SDPA's is_causal is top-left aligned, the SPEC's causal is bottom-right aligned: equal when
    Tq == Tk; for Tq > Tk the first Tq - Tk rows see no key (zeros) and the rest is square
    causal; for Tq < Tk an explicit bottom-right mask is used.
    """
    batch, tq, heads, head_dim = q.shape
    tk = k.shape[1]
    if tq == 0 or tk == 0 or batch == 0:
        return reference.compressed_v_attention(q, k, v_c, w_r, b_r, causal=causal,
                                                softmax_scale=scale)
    v_r = torch.nn.functional.linear(v_c, w_r, b_r).view(batch, tk, heads, head_dim)
    qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v_r.transpose(1, 2)  # (B, H, T, D)
    sdpa = torch.nn.functional.scaled_dot_product_attention
    if not causal:
        o = sdpa(qt, kt, vt, scale=scale)
    elif tq == tk:
        o = sdpa(qt, kt, vt, is_causal=True, scale=scale)
    elif tq > tk:
        tail = sdpa(qt[:, :, tq - tk:], kt, vt, is_causal=True, scale=scale)
        o = torch.cat([tail.new_zeros(batch, heads, tq - tk, head_dim), tail], dim=2)
    else:
        o = sdpa(qt, kt, vt, attn_mask=reference.causal_mask(tq, tk, q.device), scale=scale)
    return o.transpose(1, 2)


def _cuda_generic_kvcache(q, k_cache, vc_cache, w_r, b_r, k, v, w_c, b_c, cache_seqlens,
                          causal, scale):
    """compressed_attn_with_kvcache for shapes the CUDA kernels do not take: batched ATen ops,
    no host sync. Invalid cache positions are masked (torch.where), so NaN tails never leak."""
    batch, tq, heads, head_dim = q.shape
    t_max, rank = k_cache.shape[1], vc_cache.shape[-1]
    t_new = 0 if k is None else k.shape[1]
    lens = cache_seqlens.long()
    if t_new:
        pos = lens[:, None] + torch.arange(t_new, device=q.device)           # (B, Tnew)
        rows = torch.arange(batch, device=q.device)[:, None].expand_as(pos)
        k_cache[rows, pos] = k
        vc_cache[rows, pos] = torch.nn.functional.linear(v, w_c, b_c).to(vc_cache.dtype)
    total = lens + t_new                                                       # (B,)
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    j = torch.arange(t_max, device=q.device)
    valid = j[None, :] < total[:, None]                                        # (B, Tmax)
    kk = torch.where(valid[:, :, None, None], k_cache, 0).to(acc)
    vv = torch.where(valid[:, :, None], vc_cache, 0).to(acc)
    scores = torch.einsum("bihd,bjhd->bhij", q.to(acc), kk) * scale
    allowed = valid[:, None, None, :]
    if causal:
        i = torch.arange(tq, device=q.device)
        limit = i[None, :, None] + (total - tq)[:, None, None]                 # (B, Tq, 1)
        allowed = allowed & (j[None, None, :] <= limit)[:, None]
    probs = torch.softmax(scores.masked_fill(~allowed, float("-inf")), dim=-1).nan_to_num(0.0)
    ctx = torch.einsum("bhij,bjr->bihr", probs, vv)
    out = torch.einsum("bihr,hdr->bihd", ctx, w_r.to(acc).view(heads, head_dim, rank))
    if b_r is not None:
        out = out + b_r.to(acc).view(heads, head_dim)
    seen = allowed.any(-1).transpose(1, 2)                                    # (B, Tq, H)
    return torch.where(seen[..., None], out, 0).to(q.dtype)


# ---------------------------------------------------------------------------------------------
# decode_linear: the linear layers of a CPU decode step

DECODE_LINEAR_MAX_ROWS = 16  # from 32 rows on, CPU BLAS is faster (bench/cpu_linear.py)


def _use_decode_linear(x, weight, bias) -> bool:
    if x.device.type != "cpu" or x.dtype not in (torch.float32, torch.float64):
        return False
    if x.dim() == 0 or weight.dim() != 2 or weight.dtype != x.dtype or not weight.is_contiguous():
        return False
    if bias is not None and (bias.dtype != x.dtype or bias.dim() != 1):
        return False
    if x.numel() > DECODE_LINEAR_MAX_ROWS * max(1, x.shape[-1]):
        return False
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad
                                    or (bias is not None and bias.requires_grad)):
        return False  # the kernel has no backward
    if torch.is_autocast_enabled("cpu") or torch.compiler.is_compiling():
        return False  # autocast casts inside F.linear; compiled graphs have their own GEMMs
    return _has_kernel("cpu", "decode_linear")


def decode_linear(x: torch.Tensor, weight: torch.Tensor,
                  bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """F.linear(x, weight, bias), with the CPU kernel for decode-sized inputs.

    A decode step multiplies a few rows (one token per sequence) by each weight matrix, so it
    streams the weights: the LM head of pythia-70m alone is 103 MB in float32. CPU BLAS reaches
    35-55% of the machine's read bandwidth on that shape at 8 rows; the kernel, which
    prefetches the weight rows ahead, about 90% (bench/cpu_linear.py). It runs for CPU float32/float64 inputs
    of at most DECODE_LINEAR_MAX_ROWS rows with a contiguous weight when no gradient is needed;
    every other call is F.linear, so this is a drop-in replacement.
    """
    if _use_decode_linear(x, weight, bias):
        return torch.ops.vdproj_ext.decode_linear(x, weight, bias)
    return torch.nn.functional.linear(x, weight, bias)


# ---------------------------------------------------------------------------------------------
# torch.library registration: fake kernels and the autograd formula of cva_forward

_registered = False


def _register_torch_library():
    global _registered
    if _registered:
        return
    _registered = True

    @torch.library.register_fake("vdproj_ext::cva_forward")
    def _cva_forward_fake(q, k, v_c, w_r, b_r, causal, softmax_scale):
        batch, tq, heads, head_dim = q.shape
        rank = v_c.shape[-1]
        out = q.new_empty((batch, tq, heads, head_dim))
        lse = q.new_empty((batch, heads, tq), dtype=torch.float32)
        ctx_c = q.new_empty((batch, tq, heads, rank))
        return out, lse, ctx_c

    @torch.library.register_fake("vdproj_ext::cva_backward")
    def _cva_backward_fake(grad_out, q, k, v_c, w_r, softmax_lse, ctx_c, causal, softmax_scale):
        return (torch.empty_like(q), torch.empty_like(k), torch.empty_like(v_c),
                torch.empty_like(w_r), w_r.new_empty((w_r.shape[0],)))

    @torch.library.register_fake("vdproj_ext::kvcache_attention")
    def _kvcache_fake(q, k_cache, vc_cache, w_r, b_r, k, v, w_c, b_c, cache_seqlens, causal,
                      softmax_scale):
        return torch.empty_like(q)

    @torch.library.register_fake("vdproj_ext::decode_linear")
    def _decode_linear_fake(x, weight, bias):
        return x.new_empty((*x.shape[:-1], weight.shape[0]))

    def _setup_context(ctx, inputs, output):
        q, k, v_c, w_r, b_r, causal, softmax_scale = inputs
        _, lse, ctx_c = output
        ctx.save_for_backward(q, k, v_c, w_r, lse, ctx_c)
        ctx.causal, ctx.softmax_scale, ctx.has_bias = causal, softmax_scale, b_r is not None
        ctx.mark_non_differentiable(lse, ctx_c)

    def _backward(ctx, grad_out, _grad_lse, _grad_ctx):
        q, k, v_c, w_r, lse, ctx_c = ctx.saved_tensors
        dq, dk, dvc, dwr, dbr = torch.ops.vdproj_ext.cva_backward(
            grad_out.contiguous(), q, k, v_c, w_r, lse, ctx_c, ctx.causal, ctx.softmax_scale)
        return dq, dk, dvc, dwr, (dbr if ctx.has_bias else None), None, None

    torch.library.register_autograd("vdproj_ext::cva_forward", _backward,
                                    setup_context=_setup_context)
