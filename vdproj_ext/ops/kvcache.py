"""compressed_attn_with_kvcache: decode and append, inference only (SPEC section 3)."""
from __future__ import annotations

import torch

from . import aten_paths, checks, reference, routing
from .backend import inference_only, resolve_backend


def _contiguous(*tensors):
    return [t.contiguous() if t is not None else None for t in tensors]


@inference_only
def compressed_attn_with_kvcache(q, k_cache, vc_cache, w_r, b_r=None, *, k=None, v=None,
                                 w_c=None, b_c=None, cache_seqlens, causal=True,
                                 softmax_scale=None, backend="auto", k_scale=None, vc_scale=None):
    """Compress-on-write of (k, v) into the cache, then restore-on-read attention (SPEC 3).
    A quantized cache (int8 or float8_e4m3fn) comes with its float32 scales, k_scale (B, Tmax,
    H) and vc_scale (B, Tmax): new rows are quantized as they are written (SPEC 3c). Scales are
    cache data, as compressed_kv_attn_with_kvcache says: never read past a sequence's length."""
    args = (q, k_cache, vc_cache, w_r, b_r, k, v, w_c, b_c, cache_seqlens, k_scale, vc_scale)
    straight_to_kernel = routing.cpu_kernel_takes(
        "kvcache_attention", backend, (q, k_cache, vc_cache, w_r, cache_seqlens),
        (b_r, k, v, w_c, b_c, k_scale, vc_scale))
    if not straight_to_kernel:  # else the kernel checks ranks and devices in C++
        checks.check_kvcache_ranks_and_devices(*args)
    checks.check_flag("causal", causal)
    # (q.dim() != 4 reaches here only straight to the kernel, which reports it first)
    scale = checks.check_softmax_scale(softmax_scale, q.shape[-1] if q.dim() == 4 else 1)
    if straight_to_kernel:
        return torch.ops.vdproj_ext.kvcache_attention(*args[:10], causal, scale, *args[10:])
    chosen = resolve_backend(backend, q.device)
    if chosen == "reference":
        _check_for_python_path(*args)
        return reference.compressed_attn_with_kvcache(
            q, k_cache, vc_cache, w_r, b_r, k=k, v=v, w_c=w_c, b_c=b_c,
            cache_seqlens=cache_seqlens, causal=causal, softmax_scale=scale, k_scale=k_scale,
            vc_scale=vc_scale)
    # The caches are written in place, so they are passed as they are.
    q, w_r, b_r, k, v, w_c, b_c = _contiguous(q, w_r, b_r, k, v, w_c, b_c)
    if q.device.type == "cuda" and routing.kvcache_uses_batched_aten(q, k_cache, vc_cache, w_r,
                                                                     k, v, w_c):
        _check_for_python_path(*args)
        return aten_paths.batched_kvcache_attention(q, k_cache, vc_cache, w_r, b_r, k, v, w_c,
                                                    b_c, cache_seqlens, causal, scale, k_scale,
                                                    vc_scale)
    # The kernels check the rest themselves (csrc/, same messages), lengths before any write.
    return torch.ops.vdproj_ext.kvcache_attention(
        q, k_cache, vc_cache, w_r, b_r, k, v, w_c, b_c, cache_seqlens, causal, scale, k_scale,
        vc_scale)


@inference_only
def attend_values_cache(q, k_cache, vc_cache, w_r, b_r, k, v, w_c, b_c, cache_seqlens, backend,
                        k_scale, vc_scale):
    """compressed_attn_with_kvcache (causal, default softmax scale) for the cache objects of
    models/cache.py, which allocated the cache tensors themselves and checked the step's new
    tokens before calling: on the CPU kernels the op straight away (the kernel runs every check
    in C++, with the same messages), everywhere else the public function. As
    latent_kvcache.attend_latent_cache, which says why."""
    if q.device.type == "cpu" and resolve_backend(backend, q.device) == "ext":
        return torch.ops.vdproj_ext.kvcache_attention(
            q.contiguous(), k_cache, vc_cache, *_contiguous(w_r, b_r, k, v, w_c, b_c),
            cache_seqlens, True, checks.check_softmax_scale(None, q.shape[-1]), k_scale, vc_scale)
    return compressed_attn_with_kvcache(
        q, k_cache, vc_cache, w_r, b_r, k=k, v=v, w_c=w_c, b_c=b_c, cache_seqlens=cache_seqlens,
        causal=True, backend=backend, k_scale=k_scale, vc_scale=vc_scale)


def _check_for_python_path(q, k_cache, vc_cache, w_r, b_r, k, v, w_c, b_c, cache_seqlens,
                           k_scale, vc_scale):
    """What the kernels would check in C++: dtypes, shapes, strides, and the lengths' range."""
    checks.check_kvcache_dtypes_and_shapes(q, k_cache, vc_cache, w_r, b_r, k, v, w_c, b_c,
                                           cache_seqlens, k_scale, vc_scale)
    checks.check_seqlens_range(cache_seqlens, k_cache.shape[1], 0 if k is None else k.shape[1])
