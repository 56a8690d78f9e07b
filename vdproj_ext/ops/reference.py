"""Pure-PyTorch reference implementation of the V-DProj ops: the definition of the math.

This file is the executable form of SPEC sections 1-3b. It favours clarity over speed: values
are restored to full width first, then ordinary attention runs over them. Every compiled kernel
is tested against these functions evaluated in float64.

float16 and bfloat16 inputs are upcast once to float32, computed there, and the result is rounded
once to the input dtype, as the kernels and FlashAttention's test reference do; float32 and
float64 inputs are computed in their own dtype.

Shapes (FlashAttention KV-cache conventions):
    q (B, Tq, H, D), k (B, Tk, H, D), v_c (B, Tk, R), w_r (H*D, R), b_r (H*D,)
    k_cache (B, Tmax, H, D), vc_cache (B, Tmax, R), cache_seqlens int32 (B,)
"""
from __future__ import annotations

from typing import Optional

import torch

from .quant import dequantize, write_rows


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the math runs in: float64 stays float64, everything else is float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _upcast(dtype: torch.dtype, *tensors):
    return [t.to(dtype) if t is not None else None for t in tensors]


def restore_values(v_c: torch.Tensor, w_r: torch.Tensor, b_r: Optional[torch.Tensor],
                   num_heads: int) -> torch.Tensor:
    """V_r = V_c @ w_r.T + b_r, split into heads: (B, T, R) -> (B, T, H, D)."""
    v_r = torch.nn.functional.linear(v_c, w_r, b_r)
    return v_r.unflatten(-1, (num_heads, -1))


def causal_mask(tq: int, tk: int, device=None) -> torch.Tensor:
    """Bottom-right aligned causal mask: query i sees key j iff j <= i + tk - tq."""
    i = torch.arange(tq, device=device).unsqueeze(1)
    j = torch.arange(tk, device=device).unsqueeze(0)
    return j <= i + (tk - tq)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
              allowed: Optional[torch.Tensor], softmax_scale: float) -> torch.Tensor:
    """Plain softmax attention in (B, T, H, D) layout, in the inputs' dtype.

    `allowed` broadcasts to (B, H, Tq, Tk); True marks a visible key. A query row that sees
    no key returns zeros (not NaN), as the SPEC requires.
    """
    scores = torch.einsum("bihd,bjhd->bhij", q, k) * softmax_scale
    if allowed is not None:
        scores = scores.masked_fill(~allowed, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    if allowed is not None:
        # Rows with every key masked are all -inf and softmax gives NaN there: zeros. A NaN
        # that comes from the inputs stays NaN, as in float math.
        probs = probs.masked_fill(~allowed.any(-1, keepdim=True), 0.0)
    return torch.einsum("bhij,bjhd->bihd", probs, v)


def compressed_v_attention(q, k, v_c, w_r, b_r=None, *, causal=False, softmax_scale=None):
    """o[b, i, h] = sum_j P[b, h, i, j] * (v_c[b, j] @ w_r[h].T + b_r[h])."""
    num_heads, head_dim = q.shape[2], q.shape[3]
    scale = head_dim ** -0.5 if softmax_scale is None else softmax_scale
    acc = accumulation_dtype(q.dtype)
    q_, k_, v_c_, w_r_, b_r_ = _upcast(acc, q, k, v_c, w_r, b_r)
    v_r = restore_values(v_c_, w_r_, b_r_, num_heads)
    allowed = causal_mask(q.shape[1], k.shape[1], q.device) if causal else None
    # A row without visible keys gets all-zero weights, so it returns zeros, bias included.
    return attention(q_, k_, v_r, allowed, scale).to(q.dtype)


def compress_values(v: torch.Tensor, w_c: torch.Tensor, b_c: Optional[torch.Tensor]) -> torch.Tensor:
    """V_c = V @ w_c.T + b_c: (B, T, H*D) -> (B, T, R), rounded once to v's dtype."""
    acc = accumulation_dtype(v.dtype)
    return torch.nn.functional.linear(*_upcast(acc, v, w_c, b_c)).to(v.dtype)


def compressed_attn_with_kvcache(q, k_cache, vc_cache, w_r, b_r=None, *, k=None, v=None,
                                 w_c=None, b_c=None, cache_seqlens, causal=True,
                                 softmax_scale=None, k_scale=None, vc_scale=None):
    """Append (k, compress(v)) at cache_seqlens, then attend over each sequence's valid prefix.

    Mutates k_cache and vc_cache in place; never reads positions past a sequence's length.
    A quantized cache (SPEC 3c) comes with its scale: new rows are quantized as they are
    written, and the attention runs on the dequantized values.
    """
    head_dim = q.shape[3]
    scale = head_dim ** -0.5 if softmax_scale is None else softmax_scale
    t_new = 0 if k is None else k.shape[1]
    lengths = [int(n) for n in cache_seqlens.tolist()]
    if k is not None:
        v_c_new = compressed_rows(v, w_c, b_c, vc_scale)
        for b, start in enumerate(lengths):
            rows = (b, slice(start, start + t_new))
            write_rows(k_cache, k_scale, rows, k[b])
            write_rows(vc_cache, vc_scale, rows, v_c_new[b])
    out = q.new_zeros(q.shape)
    for b, start in enumerate(lengths):
        tk = start + t_new
        if tk == 0:
            continue  # nothing cached and nothing new: every row sees no key
        out[b:b + 1] = compressed_v_attention(
            q[b:b + 1], _read(k_cache, k_scale, b, tk, q.dtype),
            _read(vc_cache, vc_scale, b, tk, q.dtype), w_r, b_r, causal=causal,
            softmax_scale=scale)
    return out


def compressed_rows(x, w, bias, cache_scale):
    """The new latent rows to write: rounded to x's dtype for a float cache; kept in
    accumulation precision for a quantized one (quantized once from there)."""
    if cache_scale is None:
        return compress_values(x, w, bias)
    acc = accumulation_dtype(x.dtype)
    return torch.nn.functional.linear(*_upcast(acc, x, w, bias))


def _read(cache, cache_scale, b, length, dtype):
    """The first `length` rows of sequence b: a view of a float cache, or the dequantized rows
    of a quantized one, in accumulation precision (the math upcasts everything to it anyway,
    and rounding them to a bf16 model's dtype first would lose what the kernels keep)."""
    if cache is None:
        return None
    rows = cache[b:b + 1, :length]
    if cache_scale is None:
        return rows
    return dequantize(rows, cache_scale[b:b + 1, :length], accumulation_dtype(dtype))


# ---------------------------------------------------------------------------------------------
# Latent keys (SPEC section 3b). Keys are [k_rope | k_nope] per head; k_nope of all heads is
# compressed to one latent K_c (or shares the value latent: the joint latent). The reference
# restores K's non-rotary part and V to full width, then runs the plain attention above; the
# kernels absorb w_kr into the query instead (same math, see the SPEC).
#
#     q (B, Tq, H, D), k_rope (B, Tk, H, Dr), k_c (B, Tk, Rk) or None, v_c (B, Tk, Rv),
#     w_kr (H*Dn, Rk), w_r (H*D, Rv), b_r (H*D,), Dn = D - Dr
#     krope_cache (B, Tmax, H, Dr), kc_cache (B, Tmax, Rk) or None, vc_cache (B, Tmax, Rv)


def restore_keys(k_rope: torch.Tensor, k_lat: torch.Tensor, w_kr: torch.Tensor) -> torch.Tensor:
    """Full keys [k_rope | K_lat @ w_kr.T] per head: (B, T, H, D). No b_kr: the softmax cancels it."""
    k_nope = torch.nn.functional.linear(k_lat, w_kr).unflatten(-1, (k_rope.shape[2], -1))
    return torch.cat([k_rope, k_nope], dim=-1)


def compressed_kv_attention(q, k_rope, k_c, v_c, w_kr, w_r, b_r=None, *, causal=False,
                            softmax_scale=None):
    """compressed_v_attention over keys restored from (k_rope, k_c), or from (k_rope, v_c) with
    the joint latent (k_c None)."""
    num_heads, head_dim = q.shape[2], q.shape[3]
    scale = head_dim ** -0.5 if softmax_scale is None else softmax_scale
    acc = accumulation_dtype(q.dtype)
    q_, k_rope_, k_c_, v_c_, w_kr_, w_r_, b_r_ = _upcast(acc, q, k_rope, k_c, v_c, w_kr, w_r, b_r)
    k_full = restore_keys(k_rope_, k_c_ if k_c is not None else v_c_, w_kr_)
    v_r = restore_values(v_c_, w_r_, b_r_, num_heads)
    allowed = causal_mask(q.shape[1], k_rope.shape[1], q.device) if causal else None
    return attention(q_, k_full, v_r, allowed, scale).to(q.dtype)


def compress_keys(k: torch.Tensor, w_kc: torch.Tensor, b_kc: Optional[torch.Tensor],
                  rope_dim: int) -> torch.Tensor:
    """K_c = k_nope @ w_kc.T + b_kc: (B, T, H, D) -> (B, T, Rk), rounded once to k's dtype."""
    return compress_values(k[..., rope_dim:].flatten(-2), w_kc, b_kc)


def compress_joint(k: torch.Tensor, v: torch.Tensor, w_c: torch.Tensor,
                   b_c: Optional[torch.Tensor], rope_dim: int) -> torch.Tensor:
    """The joint latent L = [k_nope | v] @ w_c.T + b_c: (B, T, R), rounded once to v's dtype."""
    return compress_values(torch.cat([k[..., rope_dim:].flatten(-2), v], dim=-1), w_c, b_c)


def append_latent_tokens(krope_cache, kc_cache, vc_cache, k, v, w_kc, b_kc, w_c, b_c,
                         lengths, krope_scale=None, kc_scale=None, vc_scale=None):
    """Compress-on-write of the new tokens at lengths[b] onwards: k's rotary part as it is, the
    key latent (separate) and the value latent, or the joint latent alone (each quantized when
    its cache is)."""
    rope_dim, t_new = krope_cache.shape[-1], k.shape[1]
    k_nope = k[..., rope_dim:].flatten(-2)
    if kc_cache is not None:
        k_c_new = compressed_rows(k_nope, w_kc, b_kc, kc_scale)
        v_c_new = compressed_rows(v, w_c, b_c, vc_scale)
    else:
        v_c_new = compressed_rows(torch.cat([k_nope, v], dim=-1), w_c, b_c, vc_scale)
    for b, start in enumerate(lengths):
        rows = (b, slice(start, start + t_new))
        write_rows(krope_cache, krope_scale, rows, k[b, :, :, :rope_dim])
        if kc_cache is not None:
            write_rows(kc_cache, kc_scale, rows, k_c_new[b])
        write_rows(vc_cache, vc_scale, rows, v_c_new[b])


def compressed_kv_attn_with_kvcache(q, krope_cache, kc_cache, vc_cache, w_kr, w_r, b_r=None, *,
                                    k=None, v=None, w_kc=None, b_kc=None, w_c=None, b_c=None,
                                    cache_seqlens, causal=True, softmax_scale=None,
                                    krope_scale=None, kc_scale=None, vc_scale=None):
    """Append the new tokens (rotary keys and latents) at cache_seqlens, then attend over each
    sequence's valid prefix. Mutates the caches in place; never reads past a sequence's length.
    Quantized caches (SPEC 3c) come with their scales, as for compressed_attn_with_kvcache."""
    head_dim = q.shape[3]
    scale = head_dim ** -0.5 if softmax_scale is None else softmax_scale
    t_new = 0 if k is None else k.shape[1]
    lengths = [int(n) for n in cache_seqlens.tolist()]
    if k is not None:
        append_latent_tokens(krope_cache, kc_cache, vc_cache, k, v, w_kc, b_kc, w_c, b_c, lengths,
                             krope_scale, kc_scale, vc_scale)
    out = q.new_zeros(q.shape)
    for b, start in enumerate(lengths):
        tk = start + t_new
        if tk == 0:
            continue  # nothing cached and nothing new: every row sees no key
        out[b:b + 1] = compressed_kv_attention(
            q[b:b + 1], _read(krope_cache, krope_scale, b, tk, q.dtype),
            _read(kc_cache, kc_scale, b, tk, q.dtype), _read(vc_cache, vc_scale, b, tk, q.dtype),
            w_kr, w_r, b_r, causal=causal, softmax_scale=scale)
    return out
