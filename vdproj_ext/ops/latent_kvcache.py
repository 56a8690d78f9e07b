"""compressed_kv_attn_with_kvcache: latent keys, decode and append, inference only (SPEC 3b)."""
from __future__ import annotations

import torch

from . import aten_paths, checks, reference, routing
from .backend import inference_only
from .kvcache import _contiguous


@inference_only
def compressed_kv_attn_with_kvcache(q, krope_cache, kc_cache, vc_cache, w_kr, w_r, b_r=None, *,
                                    k=None, v=None, w_kc=None, b_kc=None, w_c=None, b_c=None,
                                    cache_seqlens, causal=True, softmax_scale=None,
                                    backend="auto", krope_scale=None, kc_scale=None,
                                    vc_scale=None):
    """Compress-on-write of the new tokens (k's rotary dims into krope_cache, the key and value
    latents, or the joint latent when kc_cache is None), then attention over each sequence's
    valid prefix with the key restore absorbed into the query and restore-on-read (SPEC 3b).
    Quantized caches (int8 or float8_e4m3fn) come with their float32 scales: krope_scale
    (B, Tmax, H), kc_scale and vc_scale (B, Tmax) (SPEC 3c). Scales are cache data, like the
    stored values: those past a sequence's length are never read (NaN there is harmless), and
    one inside it gives what float math on the dequantized row gives (NaN for a NaN scale)."""
    args = (q, krope_cache, kc_cache, vc_cache, w_kr, w_r, b_r, k, v, w_kc, b_kc, w_c, b_c,
            cache_seqlens, krope_scale, kc_scale, vc_scale)
    straight_to_kernel = routing.cpu_kernel_takes(
        "ckv_kvcache_attention", backend, (q, krope_cache, vc_cache, w_kr, w_r, cache_seqlens),
        (kc_cache, b_r, k, v, w_kc, b_kc, w_c, b_c, krope_scale, kc_scale, vc_scale))
    if not straight_to_kernel:  # else the kernel checks ranks and devices in C++
        checks.check_latent_kvcache_ranks_and_devices(*args)
    checks.check_flag("causal", causal)
    # (q.dim() != 4 reaches here only straight to the kernel, which reports it first)
    scale = checks.check_softmax_scale(softmax_scale, q.shape[-1] if q.dim() == 4 else 1)
    if straight_to_kernel:
        return torch.ops.vdproj_ext.ckv_kvcache_attention(*args[:14], causal, scale, *args[14:])
    path = routing.latent_path(backend, q.device, "ckv_kvcache_attention")
    if path == "reference":
        _check_for_python_path(*args)
        return reference.compressed_kv_attn_with_kvcache(
            q, krope_cache, kc_cache, vc_cache, w_kr, w_r, b_r, k=k, v=v, w_kc=w_kc, b_kc=b_kc,
            w_c=w_c, b_c=b_c, cache_seqlens=cache_seqlens, causal=causal, softmax_scale=scale,
            krope_scale=krope_scale, kc_scale=kc_scale, vc_scale=vc_scale)
    # The caches are written in place, so they are passed as they are.
    q, w_kr, w_r, b_r, k, v, w_kc, b_kc, w_c, b_c = _contiguous(q, w_kr, w_r, b_r, k, v, w_kc,
                                                                 b_kc, w_c, b_c)
    if path == "kernel" and q.device.type == "cuda" and routing.ckv_kvcache_uses_batched_aten(
            q, krope_cache, kc_cache, vc_cache, w_r, k, v, w_kc, w_c):
        path = "aten"
    if path == "aten":
        _check_for_python_path(*args)
        return aten_paths.batched_latent_kvcache_attention(
            q, krope_cache, kc_cache, vc_cache, w_kr, w_r, b_r, k, v, w_kc, b_kc, w_c, b_c,
            cache_seqlens, causal, scale, krope_scale, kc_scale, vc_scale)
    # The kernels check the rest themselves (csrc/, same messages), lengths before any write.
    return torch.ops.vdproj_ext.ckv_kvcache_attention(
        q, krope_cache, kc_cache, vc_cache, w_kr, w_r, b_r, k, v, w_kc, b_kc, w_c, b_c,
        cache_seqlens, causal, scale, krope_scale, kc_scale, vc_scale)


@inference_only
def attend_latent_cache(q, krope_cache, kc_cache, vc_cache, w_kr, w_r, b_r, k, v, w_kc, b_kc,
                        w_c, b_c, cache_seqlens, backend, krope_scale, kc_scale, vc_scale):
    """compressed_kv_attn_with_kvcache (causal, default softmax scale) for the cache objects of
    models/cache.py, which allocated the cache tensors themselves and checked the step's new
    tokens before calling. On the CPU kernels it calls the op straight away: the Python checks
    and keyword handling cost a few percent of a short-context decode step at batch 1
    (bench/RESULTS.md), and the kernel runs every check again in C++, with the same messages.
    Everywhere else it is the public function."""
    if q.device.type == "cpu" and routing.latent_path(backend, q.device,
                                                      "ckv_kvcache_attention") == "kernel":
        return torch.ops.vdproj_ext.ckv_kvcache_attention(
            q.contiguous(), krope_cache, kc_cache, vc_cache,
            *_contiguous(w_kr, w_r, b_r, k, v, w_kc, b_kc, w_c, b_c), cache_seqlens, True,
            checks.check_softmax_scale(None, q.shape[-1]), krope_scale, kc_scale, vc_scale)
    return compressed_kv_attn_with_kvcache(
        q, krope_cache, kc_cache, vc_cache, w_kr, w_r, b_r, k=k, v=v, w_kc=w_kc, b_kc=b_kc,
        w_c=w_c, b_c=b_c, cache_seqlens=cache_seqlens, causal=True, backend=backend,
        krope_scale=krope_scale, kc_scale=kc_scale, vc_scale=vc_scale)


def _check_for_python_path(q, krope_cache, kc_cache, vc_cache, w_kr, w_r, b_r, k, v, w_kc, b_kc,
                           w_c, b_c, cache_seqlens, krope_scale, kc_scale, vc_scale):
    """What the kernels would check in C++: dtypes, shapes, strides, and the lengths' range."""
    checks.check_latent_kvcache_dtypes_and_shapes(q, krope_cache, kc_cache, vc_cache, w_kr, w_r,
                                                  b_r, k, v, w_kc, b_kc, w_c, b_c, cache_seqlens,
                                                  krope_scale, kc_scale, vc_scale)
    checks.check_seqlens_range(cache_seqlens, krope_cache.shape[1],
                               0 if k is None else k.shape[1])
