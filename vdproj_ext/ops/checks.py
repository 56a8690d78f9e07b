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

from .quant import check_cache_dtype, check_scale_tensor

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
    first_name, device = None, None
    for name, t in named:
        if t is None:
            continue
        if device is None:
            first_name, device = name, t.device
        elif t.device != device:
            raise ValueError(f"{name} must be on {device} like {first_name}, got {t.device}")


def check_same_dtype(named):
    named = [(n, t) for n, t in named if t is not None]
    first_name, first = named[0]
    if first.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"{first_name} must be float32, float16, bfloat16 or float64, "
                        f"got {first.dtype}")
    for name, t in named[1:]:
        if t.dtype != first.dtype:
            raise TypeError(f"{name} must have dtype {first.dtype} like {first_name}, "
                            f"got {t.dtype}")


# ---------------------------------------------------------------------------------------------
# The caches and lengths of the kvcache ops


def check_restore_and_new_token_ranks(w_r, b_r, k, v, w_c, b_c):
    check_tensor("w_r", w_r, 2)
    check_tensor("b_r", b_r, 1, optional=True)
    check_tensor("k", k, 4, optional=True)
    check_tensor("v", v, 3, optional=True)
    check_tensor("w_c", w_c, 2, optional=True)
    check_tensor("b_c", b_c, 1, optional=True)


def check_seqlens_is_tensor(cache_seqlens, batch):
    if not isinstance(cache_seqlens, torch.Tensor):
        raise TypeError(f"cache_seqlens must be an int32 tensor of shape ({batch},), "
                        f"got {type(cache_seqlens).__name__}")


def check_seqlens_dtype_and_shape(cache_seqlens, batch):
    if cache_seqlens.dtype != torch.int32:
        raise TypeError(f"cache_seqlens must have dtype torch.int32, got {cache_seqlens.dtype}")
    if tuple(cache_seqlens.shape) != (batch,):
        raise ValueError(f"cache_seqlens must have shape ({batch},), "
                         f"got {tuple(cache_seqlens.shape)}")


def check_written_in_place(named_caches):
    """The caches are written in place through their last dimension: it must be unit-stride."""
    for name, cache in named_caches:
        if cache is not None and cache.stride(-1) != 1:
            raise ValueError(f"{name} must have a unit stride in its last dimension "
                             f"(got strides {cache.stride()}); it is written in place")


def check_no_shared_elements(named_written):
    """Tensors written in place need one memory location per element: in a view with a stride
    of 0 (as expand gives) one batch row's new tokens would overwrite another's."""
    for name, t in named_written:
        if t is not None and any(st == 0 and n > 1 for st, n in zip(t.stride(), t.shape)):
            raise ValueError(f"{name} has elements that share memory (shape {tuple(t.shape)}, "
                             f"strides {t.stride()}, as from expand); new tokens are written "
                             f"into it in place, so pass a tensor that owns each element "
                             f"(for example .contiguous())")


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
                                    cache_seqlens, k_scale=None, vc_scale=None):
    check_tensor("q", q, 4)
    check_tensor("k_cache", k_cache, 4)
    check_tensor("vc_cache", vc_cache, 3)
    check_restore_and_new_token_ranks(w_r, b_r, k, v, w_c, b_c)
    check_tensor("k_scale", k_scale, 3, optional=True)
    check_tensor("vc_scale", vc_scale, 2, optional=True)
    check_seqlens_is_tensor(cache_seqlens, q.shape[0])
    check_same_device([("q", q), ("k_cache", k_cache), ("vc_cache", vc_cache), ("w_r", w_r),
                       ("b_r", b_r), ("k", k), ("v", v), ("w_c", w_c), ("b_c", b_c),
                       ("cache_seqlens", cache_seqlens), ("k_scale", k_scale),
                       ("vc_scale", vc_scale)])


def check_model_and_cache_dtypes(model_named, cache_named):
    """The model's tensors share q's dtype; each cache has it too, or is quantized (SPEC 3c)."""
    check_same_dtype(model_named)
    q = model_named[0][1]
    for name, cache in cache_named:
        check_cache_dtype(name, cache, q.dtype)


def check_cache_scales(named):
    """(scale name, scale, cache name, cache, rows shape) per cache tensor (SPEC 3c)."""
    for scale_name, scale, cache_name, cache, rows in named:
        check_scale_tensor(scale_name, scale, cache_name, cache, rows)


def check_kvcache_dtypes_and_shapes(q, k_cache, vc_cache, w_r, b_r, k, v, w_c, b_c,
                                    cache_seqlens, k_scale=None, vc_scale=None):
    check_model_and_cache_dtypes(
        [("q", q), ("w_r", w_r), ("b_r", b_r), ("k", k), ("v", v), ("w_c", w_c), ("b_c", b_c)],
        [("k_cache", k_cache), ("vc_cache", vc_cache)])
    batch, _, heads, head_dim = q.shape
    max_len, rank = k_cache.shape[1], vc_cache.shape[-1]
    check_shape("k_cache", k_cache, (batch, max_len, heads, head_dim))
    check_shape("vc_cache", vc_cache, (batch, max_len, rank))
    check_shape("w_r", w_r, (heads * head_dim, rank))
    check_shape("b_r", b_r, (heads * head_dim,))
    check_written_in_place((("k_cache", k_cache), ("vc_cache", vc_cache)))
    check_cache_scales([("k_scale", k_scale, "k_cache", k_cache, (batch, max_len, heads)),
                        ("vc_scale", vc_scale, "vc_cache", vc_cache, (batch, max_len))])
    _check_new_tokens(k, v, w_c, b_c, batch, heads, head_dim, rank)
    if k is not None:
        check_no_shared_elements([("k_cache", k_cache), ("vc_cache", vc_cache),
                                  ("k_scale", k_scale), ("vc_scale", vc_scale)])
    check_seqlens_dtype_and_shape(cache_seqlens, batch)


def check_new_kv(k, v, batch, heads, head_dim) -> bool:
    """k (B, Tnew, H, D) and v (B, Tnew, H*D) together or neither; whether they are given."""
    if (k is None) != (v is None):
        raise ValueError("k and v must be given together (new tokens to append) or both None")
    if k is None:
        return False
    t_new = k.shape[1]
    check_shape("k", k, (batch, t_new, heads, head_dim))
    check_shape("v", v, (batch, t_new, heads * head_dim))
    return True


def _check_new_tokens(k, v, w_c, b_c, batch, heads, head_dim, rank):
    if not check_new_kv(k, v, batch, heads, head_dim):
        return
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


# ---------------------------------------------------------------------------------------------
# Latent keys (SPEC section 3b): compressed_kv_attention and compressed_kv_attn_with_kvcache.
# Dr (rotary dims per head) is read from k_rope / krope_cache; the key latent is k_c / kc_cache,
# or the value latent itself when that is None (the joint latent).


def check_rope_dim(name, rope_dim, head_dim):
    """0 <= Dr < D: at least one non-rotary dimension per head is compressed."""
    if not 0 <= rope_dim < head_dim:
        raise ValueError(f"{name} must have 0 <= Dr < D rotary dims in its last dimension "
                         f"(D={head_dim}, q's head_dim), got Dr={rope_dim}")


def check_latent_attention_ranks_and_devices(q, k_rope, k_c, v_c, w_kr, w_r, b_r):
    check_tensor("q", q, 4)
    check_tensor("k_rope", k_rope, 4)
    check_tensor("k_c", k_c, 3, optional=True)
    check_tensor("v_c", v_c, 3)
    check_tensor("w_kr", w_kr, 2)
    check_tensor("w_r", w_r, 2)
    check_tensor("b_r", b_r, 1, optional=True)
    check_same_device([("q", q), ("k_rope", k_rope), ("k_c", k_c), ("v_c", v_c),
                       ("w_kr", w_kr), ("w_r", w_r), ("b_r", b_r)])


def check_latent_attention_dtypes_and_shapes(q, k_rope, k_c, v_c, w_kr, w_r, b_r):
    check_same_dtype([("q", q), ("k_rope", k_rope), ("k_c", k_c), ("v_c", v_c),
                      ("w_kr", w_kr), ("w_r", w_r), ("b_r", b_r)])
    _check_latent_shapes(("k_rope", k_rope), ("k_c", k_c), ("v_c", v_c), w_kr, w_r, b_r,
                         q.shape)


def _check_latent_shapes(rope, key_latent, value_latent, w_kr, w_r, b_r, q_shape):
    """The shapes both latent ops share. rope, key_latent, value_latent: (name, tensor) of the
    rotary keys (B, T, H, Dr), the key latent (B, T, Rk) (tensor None: the joint latent) and
    the value latent (B, T, Rv), T being Tk or Tmax. Returns (Dr, Rk, Rv)."""
    batch, _, heads, head_dim = q_shape
    (rope_name, rope_t), (k_name, k_lat), (v_name, v_lat) = rope, key_latent, value_latent
    length, rope_dim = rope_t.shape[1], rope_t.shape[-1]
    check_rope_dim(rope_name, rope_dim, head_dim)
    v_rank = v_lat.shape[-1]
    k_rank = k_lat.shape[-1] if k_lat is not None else v_rank
    check_shape(rope_name, rope_t, (batch, length, heads, rope_dim))
    check_shape(k_name, k_lat, (batch, length, k_rank))
    check_shape(v_name, v_lat, (batch, length, v_rank))
    check_shape("w_kr", w_kr, (heads * (head_dim - rope_dim), k_rank))
    check_shape("w_r", w_r, (heads * head_dim, v_rank))
    check_shape("b_r", b_r, (heads * head_dim,))
    return rope_dim, k_rank, v_rank


def check_latent_kvcache_ranks_and_devices(q, krope_cache, kc_cache, vc_cache, w_kr, w_r, b_r,
                                           k, v, w_kc, b_kc, w_c, b_c, cache_seqlens,
                                           krope_scale=None, kc_scale=None, vc_scale=None):
    check_tensor("q", q, 4)
    check_tensor("krope_cache", krope_cache, 4)
    check_tensor("kc_cache", kc_cache, 3, optional=True)
    check_tensor("vc_cache", vc_cache, 3)
    check_tensor("w_kr", w_kr, 2)
    check_restore_and_new_token_ranks(w_r, b_r, k, v, w_c, b_c)
    check_tensor("w_kc", w_kc, 2, optional=True)
    check_tensor("b_kc", b_kc, 1, optional=True)
    check_tensor("krope_scale", krope_scale, 3, optional=True)
    check_tensor("kc_scale", kc_scale, 2, optional=True)
    check_tensor("vc_scale", vc_scale, 2, optional=True)
    check_seqlens_is_tensor(cache_seqlens, q.shape[0])
    check_same_device([("q", q), ("krope_cache", krope_cache), ("kc_cache", kc_cache),
                       ("vc_cache", vc_cache), ("w_kr", w_kr), ("w_r", w_r), ("b_r", b_r),
                       ("k", k), ("v", v), ("w_kc", w_kc), ("b_kc", b_kc), ("w_c", w_c),
                       ("b_c", b_c), ("cache_seqlens", cache_seqlens),
                       ("krope_scale", krope_scale), ("kc_scale", kc_scale),
                       ("vc_scale", vc_scale)])


def check_latent_kvcache_dtypes_and_shapes(q, krope_cache, kc_cache, vc_cache, w_kr, w_r, b_r,
                                           k, v, w_kc, b_kc, w_c, b_c, cache_seqlens,
                                           krope_scale=None, kc_scale=None, vc_scale=None):
    check_model_and_cache_dtypes(
        [("q", q), ("w_kr", w_kr), ("w_r", w_r), ("b_r", b_r), ("k", k), ("v", v),
         ("w_kc", w_kc), ("b_kc", b_kc), ("w_c", w_c), ("b_c", b_c)],
        [("krope_cache", krope_cache), ("kc_cache", kc_cache), ("vc_cache", vc_cache)])
    batch, _, heads, head_dim = q.shape
    rope_dim, k_rank, v_rank = _check_latent_shapes(
        ("krope_cache", krope_cache), ("kc_cache", kc_cache), ("vc_cache", vc_cache), w_kr, w_r,
        b_r, q.shape)
    check_written_in_place((("krope_cache", krope_cache), ("kc_cache", kc_cache),
                            ("vc_cache", vc_cache)))
    max_len = krope_cache.shape[1]
    check_cache_scales(
        [("krope_scale", krope_scale, "krope_cache", krope_cache, (batch, max_len, heads)),
         ("kc_scale", kc_scale, "kc_cache", kc_cache, (batch, max_len)),
         ("vc_scale", vc_scale, "vc_cache", vc_cache, (batch, max_len))])
    _check_new_latent_tokens(k, v, w_kc, b_kc, w_c, b_c, kc_cache is None,
                             (batch, heads, head_dim, rope_dim, k_rank, v_rank))
    if k is not None:
        check_no_shared_elements([("krope_cache", krope_cache), ("kc_cache", kc_cache),
                                  ("vc_cache", vc_cache), ("krope_scale", krope_scale),
                                  ("kc_scale", kc_scale), ("vc_scale", vc_scale)])
    check_seqlens_dtype_and_shape(cache_seqlens, batch)


def _check_new_latent_tokens(k, v, w_kc, b_kc, w_c, b_c, joint, dims):
    """The new tokens and their compress weights: w_kc/b_kc (separate latents) or none of them
    (joint latent, where w_c compresses [k_nope | v]), checked whether or not k is given."""
    batch, heads, head_dim, rope_dim, k_rank, v_rank = dims
    nope = heads * (head_dim - rope_dim)
    if joint and (w_kc is not None or b_kc is not None):
        name = "w_kc" if w_kc is not None else "b_kc"
        raise ValueError(f"{name} must be None with the joint latent (kc_cache is None): "
                         f"w_c compresses [k_nope | v] into vc_cache")
    if not check_new_kv(k, v, batch, heads, head_dim):
        return
    if not joint:
        if w_kc is None:
            raise ValueError("w_kc (shape (Rk, H*Dn)) is required when new k and v are given "
                             "with a separate key latent (kc_cache)")
        check_shape("w_kc", w_kc, (k_rank, nope))
        check_shape("b_kc", b_kc, (k_rank,))
    if w_c is None:
        width = "H*D" if not joint else "H*Dn + H*D"
        raise ValueError(f"w_c (shape (R, {width})) is required when new k and v are given")
    check_shape("w_c", w_c, (v_rank, nope + heads * head_dim if joint else heads * head_dim))
    check_shape("b_c", b_c, (v_rank,))
