"""Device-independent implementations built from ATen ops, for inputs the fused kernels do not
take (routing.py decides when). Same semantics as the reference; fast, batched, no host sync.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from . import reference


def restore_then_sdpa(q, k, v_c, w_r, b_r, causal, scale):
    """compressed_v_attention as: restore V with one GEMM, then scaled_dot_product_attention
    (flash or memory-efficient where available); differentiable through autograd.

    SDPA's is_causal is top-left aligned, the SPEC's causal is bottom-right aligned: equal when
    Tq == Tk; for Tq > Tk the first Tq - Tk rows see no key (zeros) and the rest is square
    causal; for Tq < Tk an explicit bottom-right mask is used.
    """
    batch, tq, heads, head_dim = q.shape
    tk = k.shape[1]
    if tq == 0 or tk == 0 or batch == 0:
        return reference.compressed_v_attention(q, k, v_c, w_r, b_r, causal=causal,
                                                softmax_scale=scale)
    v_r = reference.restore_values(v_c, w_r, b_r, heads)
    qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v_r.transpose(1, 2)  # (B, H, T, D)
    sdpa = F.scaled_dot_product_attention
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


def _append_new_tokens(k_cache, vc_cache, k, v, w_c, b_c, cache_seqlens):
    """Compress-on-write at cache_seqlens[b] onwards, every sequence in one indexed write."""
    pos = cache_seqlens.long()[:, None] + torch.arange(k.shape[1], device=k.device)  # (B, Tnew)
    rows = torch.arange(k.shape[0], device=k.device)[:, None].expand_as(pos)
    k_cache[rows, pos] = k
    vc_cache[rows, pos] = reference.compress_values(v, w_c, b_c).to(vc_cache.dtype)


def batched_kvcache_attention(q, k_cache, vc_cache, w_r, b_r, k, v, w_c, b_c, cache_seqlens,
                              causal, scale):
    """compressed_attn_with_kvcache with batched ATen ops over the whole cache: positions past
    each sequence's length are masked with torch.where (so NaN tails never leak), and the
    attention weights multiply the compressed values before the restore (SPEC section 1)."""
    batch, tq, heads, head_dim = q.shape
    t_max, rank = k_cache.shape[1], vc_cache.shape[-1]
    t_new = 0 if k is None else k.shape[1]
    if t_new:
        _append_new_tokens(k_cache, vc_cache, k, v, w_c, b_c, cache_seqlens)
    total = cache_seqlens.long() + t_new                                       # (B,)
    acc = reference.accumulation_dtype(q.dtype)
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
