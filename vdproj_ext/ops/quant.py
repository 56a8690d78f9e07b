"""Quantized caches (SPEC 3c): the storage dtypes, absmax quantization of new rows, and the
checks of the scales that come with a quantized cache tensor.

A cache tensor (k_cache, krope_cache, kc_cache, vc_cache) is either in the model's dtype or
quantized: int8 or float8_e4m3fn with one float32 scale per stored row, (B, Tmax, H) for the
per-head key caches and (B, Tmax) for the latents. The value the attention uses is
stored.float() * scale[..., None].

Quantization (compress-on-write) is symmetric absmax per row, computed in float32:
    int8:   scale = max|x| / 127, stored = round(x / scale)      (round half to even)
    e4m3:   scale = max|x| / 448, stored = e4m3(x / scale)       (round to nearest even)
and a row of zeros gets scale 1. The kernels (csrc/) do the same float32 operations in the
same order, so a row they write equals what quantize_rows writes.
"""
from __future__ import annotations

import torch

QUANT_DTYPES = (torch.int8, torch.float8_e4m3fn)
# The largest stored magnitude of each dtype: absmax maps onto it.
QUANT_MAX = {torch.int8: 127.0, torch.float8_e4m3fn: 448.0}


def is_quantized(t) -> bool:
    return t is not None and t.dtype in QUANT_DTYPES


def quantize_rows(x: torch.Tensor, dtype: torch.dtype):
    """(stored, scale): x (..., n) quantized per row of its last dimension; scale (...,) float32."""
    x = x.float()
    if x.shape[-1] == 0:
        return x.to(dtype), torch.ones(x.shape[:-1], dtype=torch.float32, device=x.device)
    amax = x.abs().amax(dim=-1)
    scale = amax / QUANT_MAX[dtype]
    scale = torch.where(amax == 0, torch.ones_like(scale), scale)
    y = x / scale.unsqueeze(-1)
    if dtype == torch.int8:
        return torch.round(y).clamp_(-127, 127).to(torch.int8), scale
    return y.to(dtype), scale


def dequantize(stored: torch.Tensor, scale, dtype: torch.dtype) -> torch.Tensor:
    """stored.float() * scale[..., None] in `dtype`; a float cache (scale None) is cast."""
    if scale is None:
        return stored.to(dtype)
    return (stored.float() * scale.unsqueeze(-1)).to(dtype)


def write_rows(cache, scale, index, values) -> None:
    """cache[index] = values, quantized with their own scales when the cache is (scale[index] =
    the new scales). index selects (B, T) rows, e.g. (rows, positions) or two slices."""
    if scale is None:
        cache[index] = values.to(cache.dtype)
        return
    stored, new_scale = quantize_rows(values, cache.dtype)
    cache[index] = stored
    scale[index] = new_scale


def write_rows_at(cache, scale, values, cache_seqlens) -> None:
    """write_rows into a quantized cache at positions cache_seqlens[b] + 0 .. T-1 of every
    sequence b: the compiled quantize_into on the CPU (one call, where write_rows runs about
    ten small ATen ops: 3% of a folded model's int8 decode step), write_rows elsewhere."""
    from .backend import has_kernel  # the kernels are loaded lazily
    if scale is not None and has_kernel(cache.device.type, "quantize_into"):
        torch.ops.vdproj_ext.quantize_into(cache, scale, values, cache_seqlens)
        return
    t_new = values.shape[1]
    positions = cache_seqlens.long()[:, None] + torch.arange(t_new, device=cache.device)
    rows = torch.arange(cache.shape[0], device=cache.device)[:, None].expand_as(positions)
    write_rows(cache, scale, (rows, positions), values)


# ---------------------------------------------------------------------------------------------
# Checks (the C++ checks of csrc/common/checks.h raise the same texts)


def check_cache_dtype(name, cache, model_dtype):
    """A cache tensor is in the model's dtype (q's) or quantized."""
    if cache is None or cache.dtype == model_dtype or cache.dtype in QUANT_DTYPES:
        return
    raise TypeError(f"{name} must have dtype {model_dtype} like q, or be quantized "
                    f"(torch.int8 or torch.float8_e4m3fn with {_scale_name(name)}), "
                    f"got {cache.dtype}")


def check_scale_tensor(scale_name, scale, cache_name, cache, row_shape):
    """The scale of one cache tensor: required (float32, row_shape, any strides: it is written
    in place through them) when the cache is quantized, and None when it is not. Its device is
    checked with the other inputs' (check_same_device)."""
    quantized = is_quantized(cache)
    if scale is None:
        if quantized:
            raise ValueError(f"{scale_name} (float32, shape {tuple(row_shape)}) is required: "
                             f"{cache_name} is {cache.dtype}")
        return
    if not isinstance(scale, torch.Tensor):
        raise TypeError(f"{scale_name} must be a torch.Tensor or None, "
                        f"got {type(scale).__name__}")
    if not quantized:
        got = "None" if cache is None else str(cache.dtype)
        raise ValueError(f"{scale_name} must be None: {cache_name} is {got}, not quantized "
                         f"(scales come with torch.int8 or torch.float8_e4m3fn caches)")
    if scale.dtype != torch.float32:
        raise TypeError(f"{scale_name} must have dtype torch.float32, got {scale.dtype}")
    if tuple(scale.shape) != tuple(row_shape):
        raise ValueError(f"{scale_name} must have shape {tuple(row_shape)}, "
                         f"got {tuple(scale.shape)}")


def _scale_name(cache_name: str) -> str:
    return cache_name.replace("_cache", "_scale")
