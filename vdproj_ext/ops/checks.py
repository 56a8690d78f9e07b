"""Input checks of the public ops. Every message names the argument and what was expected.

These messages are the canonical ones: the C++ checks of the kernels (csrc/, shared by the CPU
and CUDA wrappers) raise the same exception type with the same text, so a bad input reads the
same whichever backend meets it first.

The checks come in two groups:
  * ranks and devices (`check_*_ranks_and_devices`): what the Python layer itself reads before
    it picks a path (q's head_dim and device, the ranks the CUDA routing looks at). A mixed
    device must be caught here: the dispatcher would send the call to the kernel of the
    highest-priority device (a meta tensor would run the fake kernel and return garbage).
  * dtypes, shapes, strides and lengths (`check_*_dtypes_and_shapes`, `check_seqlens_range`):
    run here for the reference and ATen paths; on the kernel path the C++ checks do them.
"""
from __future__ import annotations

import math
import numbers

import torch

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


# ---------------------------------------------------------------------------------------------
# Single arguments


def check_tensor(name, t, ndim, optional=False):
    if t is None:
        if optional:
            return
        raise TypeError(f"{name} must be a tensor, got None")
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(t.shape)}")


def check_shape(name, t, expected):
    if t is not None and tuple(t.shape) != tuple(expected):
        raise ValueError(f"{name} must have shape {tuple(expected)}, got {tuple(t.shape)}")


def check_flag(name, value):
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")


def check_softmax_scale(softmax_scale, head_dim) -> float:
    """The scale to use: head_dim ** -0.5 when None, else a finite real number."""
    if softmax_scale is None:
        return head_dim ** -0.5
    if isinstance(softmax_scale, bool) or not isinstance(softmax_scale, numbers.Real):
        raise TypeError(f"softmax_scale must be a float or None, got {type(softmax_scale).__name__}")
    scale = float(softmax_scale)
    if not math.isfinite(scale):
        raise ValueError(f"softmax_scale must be finite, got {scale}")
    return scale


# ---------------------------------------------------------------------------------------------
# Groups of arguments: the first named tensor is the one the others must match


def check_same_device(named):
    named = [(n, t) for n, t in named if t is not None]
    first_name, first = named[0]
    for name, t in named[1:]:
        if t.device != first.device:
            raise ValueError(f"{name} must be on {first.device} like {first_name}, "
                             f"got {t.device}")


def check_same_dtype(named):
    named = [(n, t) for n, t in named if t is not None]
    first_name, first = named[0]
    if first.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"{first_name} must be float32, float16 or bfloat16, got {first.dtype}")
    for name, t in named[1:]:
        if t.dtype != first.dtype:
            raise TypeError(f"{name} must have dtype {first.dtype} like {first_name}, "
                            f"got {t.dtype}")


# ---------------------------------------------------------------------------------------------
# compressed_v_attention


def check_attention_ranks_and_devices(q, k, v_c, w_r, b_r):
    check_tensor("q", q, 4)
    check_tensor("k", k, 4)
    check_tensor("v_c", v_c, 3)
    check_tensor("w_r", w_r, 2)
    check_tensor("b_r", b_r, 1, optional=True)
    check_same_device([("q", q), ("k", k), ("v_c", v_c), ("w_r", w_r), ("b_r", b_r)])


def check_attention_dtypes_and_shapes(q, k, v_c, w_r, b_r):
    check_same_dtype([("q", q), ("k", k), ("v_c", v_c), ("w_r", w_r), ("b_r", b_r)])
    batch, _, heads, head_dim = q.shape
    tk = k.shape[1]
    check_shape("k", k, (batch, tk, heads, head_dim))
    rank = v_c.shape[-1]
    check_shape("v_c", v_c, (batch, tk, rank))
    check_shape("w_r", w_r, (heads * head_dim, rank))
    check_shape("b_r", b_r, (heads * head_dim,))


# ---------------------------------------------------------------------------------------------
# compressed_attn_with_kvcache


def check_kvcache_ranks_and_devices(q, k_cache, vc_cache, w_r, b_r, k, v, w_c, b_c,
                                    cache_seqlens):
    check_tensor("q", q, 4)
    check_tensor("k_cache", k_cache, 4)
    check_tensor("vc_cache", vc_cache, 3)
    check_tensor("w_r", w_r, 2)
    check_tensor("b_r", b_r, 1, optional=True)
    check_tensor("k", k, 4, optional=True)
    check_tensor("v", v, 3, optional=True)
    check_tensor("w_c", w_c, 2, optional=True)
    check_tensor("b_c", b_c, 1, optional=True)
    if not isinstance(cache_seqlens, torch.Tensor):
        raise TypeError(f"cache_seqlens must be an int32 tensor of shape ({q.shape[0]},), "
                        f"got {type(cache_seqlens).__name__}")
    check_same_device([("q", q), ("k_cache", k_cache), ("vc_cache", vc_cache), ("w_r", w_r),
                       ("b_r", b_r), ("k", k), ("v", v), ("w_c", w_c), ("b_c", b_c),
                       ("cache_seqlens", cache_seqlens)])


def check_kvcache_dtypes_and_shapes(q, k_cache, vc_cache, w_r, b_r, k, v, w_c, b_c,
                                    cache_seqlens):
    check_same_dtype([("q", q), ("k_cache", k_cache), ("vc_cache", vc_cache), ("w_r", w_r),
                      ("b_r", b_r), ("k", k), ("v", v), ("w_c", w_c), ("b_c", b_c)])
    batch, _, heads, head_dim = q.shape
    max_len, rank = k_cache.shape[1], vc_cache.shape[-1]
    check_shape("k_cache", k_cache, (batch, max_len, heads, head_dim))
    check_shape("vc_cache", vc_cache, (batch, max_len, rank))
    check_shape("w_r", w_r, (heads * head_dim, rank))
    check_shape("b_r", b_r, (heads * head_dim,))
    for name, cache in (("k_cache", k_cache), ("vc_cache", vc_cache)):
        if cache.stride(-1) != 1:
            raise ValueError(f"{name} must have a unit stride in its last dimension "
                             f"(got strides {cache.stride()}); it is written in place")
    _check_new_tokens(k, v, w_c, b_c, batch, heads, head_dim, rank)
    if cache_seqlens.dtype != torch.int32:
        raise TypeError(f"cache_seqlens must have dtype torch.int32, got {cache_seqlens.dtype}")
    if tuple(cache_seqlens.shape) != (batch,):
        raise ValueError(f"cache_seqlens must have shape ({batch},), "
                         f"got {tuple(cache_seqlens.shape)}")


def _check_new_tokens(k, v, w_c, b_c, batch, heads, head_dim, rank):
    if (k is None) != (v is None):
        raise ValueError("k and v must be given together (new tokens to append) or both None")
    if k is None:
        return
    t_new = k.shape[1]
    check_shape("k", k, (batch, t_new, heads, head_dim))
    check_shape("v", v, (batch, t_new, heads * head_dim))
    if w_c is None:
        raise ValueError("w_c (shape (R, H*D)) is required when new k and v are given")
    check_shape("w_c", w_c, (rank, heads * head_dim))
    check_shape("b_c", b_c, (rank,))


def check_seqlens_range(cache_seqlens, max_len, t_new):
    """0 <= cache_seqlens and cache_seqlens + t_new <= Tmax, before anything is written."""
    # Reading the lengths is data-dependent (a host sync on CUDA); under torch.compile the
    # Python paths go without.
    if cache_seqlens.numel() == 0 or torch.compiler.is_compiling():
        return
    lo, hi = (int(x) for x in torch.aminmax(cache_seqlens))
    if lo < 0 or hi > max_len:
        raise ValueError(f"cache_seqlens must lie in [0, {max_len}] (the cache's Tmax), "
                         f"got values in [{lo}, {hi}]")
    if hi + t_new > max_len:
        raise ValueError(f"writing {t_new} new tokens at cache_seqlens (max {hi}) would "
                         f"overflow the cache of Tmax={max_len}; nothing was written")
