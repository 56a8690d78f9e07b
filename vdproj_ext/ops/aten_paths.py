"""Device-independent implementations built from ATen ops, for inputs the fused kernels do not
take (routing.py decides when). Same semantics as the reference; fast, batched, no host sync.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from . import reference
from .quant import dequantize, write_rows


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


def _write_positions(cache_seqlens, t_new):
    """(rows, pos), both (B, Tnew): cache_seqlens[b] onwards, for one indexed write of all
    sequences at once."""
    pos = cache_seqlens.long()[:, None] + torch.arange(t_new, device=cache_seqlens.device)
    rows = torch.arange(pos.shape[0], device=pos.device)[:, None].expand_as(pos)
    return rows, pos


def _append_new_tokens(k_cache, vc_cache, k, v, w_c, b_c, cache_seqlens, k_scale, vc_scale):
    """Compress-on-write at cache_seqlens[b] onwards, every sequence in one indexed write
    (quantized with per-row scales where a cache is, SPEC 3c)."""
    index = _write_positions(cache_seqlens, k.shape[1])
    write_rows(k_cache, k_scale, index, k)
    write_rows(vc_cache, vc_scale, index, reference.compressed_rows(v, w_c, b_c, vc_scale))


def _as_read(cache, cache_scale, acc):
    """A cache as the attention reads it: itself, or its dequantized values (NaN tails stay
    NaN and are masked with torch.where like a float cache's)."""
    return cache if cache is None or cache_scale is None else dequantize(cache, cache_scale, acc)


def _visible_keys(total, t_max, tq, causal):
    """valid (B, Tmax): cache rows inside each sequence's length; allowed (B, 1, Tq, Tmax): the
    keys each query sees (bottom-right causal within the sequence's length)."""
    j = torch.arange(t_max, device=total.device)
    valid = j[None, :] < total[:, None]
    allowed = valid[:, None, None, :]
    if causal:
        i = torch.arange(tq, device=total.device)
        limit = i[None, :, None] + (total - tq)[:, None, None]                 # (B, Tq, 1)
        allowed = allowed & (j[None, None, :] <= limit)[:, None]
    return valid, allowed


def _attend_restore_on_read(scores, allowed, valid, vc_cache, w_r, b_r, out_dtype):
    """Softmax over the visible keys, weights times the compressed values (rows past a length
    masked with torch.where, so NaN tails never leak), then the restore (SPEC section 1)."""
    batch, heads, tq, _ = scores.shape
    rank = vc_cache.shape[-1]
    vv = torch.where(valid[:, :, None], vc_cache, 0).to(scores.dtype)
    # A row with no visible key is NaN here and zeroed below; a NaN from the inputs stays.
    probs = torch.softmax(scores.masked_fill(~allowed, float("-inf")), dim=-1)
    ctx = torch.einsum("bhij,bjr->bihr", probs, vv)
    out = torch.einsum("bihr,hdr->bihd", ctx, w_r.to(scores.dtype).reshape(heads, -1, rank))
    if b_r is not None:
        out = out + b_r.to(scores.dtype).view(heads, -1)
    seen = allowed.any(-1).transpose(1, 2)                                    # (B, Tq, H)
    return torch.where(seen[..., None], out, 0).to(out_dtype)


def batched_kvcache_attention(q, k_cache, vc_cache, w_r, b_r, k, v, w_c, b_c, cache_seqlens,
                              causal, scale, k_scale=None, vc_scale=None):
    """compressed_attn_with_kvcache with batched ATen ops over the whole cache: positions past
    each sequence's length are masked with torch.where (so NaN tails never leak), and the
    attention weights multiply the compressed values before the restore (SPEC section 1)."""
    t_new = 0 if k is None else k.shape[1]
    if t_new:
        _append_new_tokens(k_cache, vc_cache, k, v, w_c, b_c, cache_seqlens, k_scale, vc_scale)
    valid, allowed = _visible_keys(cache_seqlens.long() + t_new, k_cache.shape[1], q.shape[1],
                                   causal)
    acc = reference.accumulation_dtype(q.dtype)
    k_cache, vc_cache = _as_read(k_cache, k_scale, acc), _as_read(vc_cache, vc_scale, acc)
    kk = torch.where(valid[:, :, None, None], k_cache, 0).to(acc)
    scores = torch.einsum("bihd,bjhd->bhij", q.to(acc), kk) * scale
    return _attend_restore_on_read(scores, allowed, valid, vc_cache, w_r, b_r, q.dtype)


# ---------------------------------------------------------------------------------------------
# Latent keys (SPEC 3b): what the ops run on CUDA tensors the kernels do not take (routing.py).


def restore_keys_then_sdpa(q, k_rope, k_c, v_c, w_kr, w_r, b_r, causal, scale):
    """compressed_kv_attention as: restore the keys' non-rotary part with one GEMM, then
    restore_then_sdpa; differentiable through autograd (k_c None: the joint latent)."""
    k_full = reference.restore_keys(k_rope, k_c if k_c is not None else v_c, w_kr)
    return restore_then_sdpa(q, k_full, v_c, w_r, b_r, causal, scale)


def _append_latent_tokens(krope_cache, kc_cache, vc_cache, k, v, w_kc, b_kc, w_c, b_c,
                          cache_seqlens, scales):
    """Compress-on-write of the rotary keys and the latents, every sequence in one write each
    (scales: krope, kc and vc scales, None for a float cache)."""
    index = _write_positions(cache_seqlens, k.shape[1])
    krope_scale, kc_scale, vc_scale = scales
    rope_dim = krope_cache.shape[-1]
    k_nope = k[..., rope_dim:].flatten(-2)
    write_rows(krope_cache, krope_scale, index, k[..., :rope_dim])
    if kc_cache is None:
        joint = reference.compressed_rows(torch.cat([k_nope, v], -1), w_c, b_c, vc_scale)
        write_rows(vc_cache, vc_scale, index, joint)
        return
    write_rows(kc_cache, kc_scale, index, reference.compressed_rows(k_nope, w_kc, b_kc, kc_scale))
    write_rows(vc_cache, vc_scale, index, reference.compressed_rows(v, w_c, b_c, vc_scale))


def _absorbed_scores(q, krope_cache, k_lat_cache, w_kr, valid, acc):
    """q_rope . k_rope + (q_nope @ w_kr[h]) . K_lat per head: the restore absorbed into the
    query, so the key latent is read once for all heads (masked rows read as zeros)."""
    heads, rope_dim = q.shape[2], krope_cache.shape[-1]
    q_ = q.to(acc)
    k_rope = torch.where(valid[:, :, None, None], krope_cache, 0).to(acc)
    k_lat = torch.where(valid[:, :, None], k_lat_cache, 0).to(acc)
    w_kr_heads = w_kr.to(acc).reshape(heads, -1, k_lat.shape[-1])              # (H, Dn, Rk)
    q_lat = torch.einsum("bihn,hnr->bihr", q_[..., rope_dim:], w_kr_heads)
    return (torch.einsum("bihd,bjhd->bhij", q_[..., :rope_dim], k_rope)
            + torch.einsum("bihr,bjr->bhij", q_lat, k_lat))


def batched_latent_kvcache_attention(q, krope_cache, kc_cache, vc_cache, w_kr, w_r, b_r, k, v,
                                     w_kc, b_kc, w_c, b_c, cache_seqlens, causal, scale,
                                     krope_scale=None, kc_scale=None, vc_scale=None):
    """compressed_kv_attn_with_kvcache with batched ATen ops over the whole cache, no host
    sync: as batched_kvcache_attention, with the absorbed latent-key scores."""
    t_new = 0 if k is None else k.shape[1]
    if t_new:
        _append_latent_tokens(krope_cache, kc_cache, vc_cache, k, v, w_kc, b_kc, w_c, b_c,
                              cache_seqlens, (krope_scale, kc_scale, vc_scale))
    valid, allowed = _visible_keys(cache_seqlens.long() + t_new, krope_cache.shape[1],
                                   q.shape[1], causal)
    acc = reference.accumulation_dtype(q.dtype)
    krope_cache = _as_read(krope_cache, krope_scale, acc)
    kc_cache, vc_cache = _as_read(kc_cache, kc_scale, acc), _as_read(vc_cache, vc_scale, acc)
    k_lat_cache = kc_cache if kc_cache is not None else vc_cache
    scores = _absorbed_scores(q, krope_cache, k_lat_cache, w_kr, valid, acc) * scale
    return _attend_restore_on_read(scores, allowed, valid, vc_cache, w_r, b_r, q.dtype)
