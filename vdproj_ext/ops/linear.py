"""decode_linear: F.linear with the row policy for the decode-sized linears of a CPU model.

A decode step multiplies a few rows (one token per sequence) by each weight matrix, so it
streams the weights. How best to do that depends on the row count M (bench/cpu_linear.py,
figures in bench/RESULTS.md):
  * M <= kernel_max_rows(): the decode_linear kernel, which prefetches weight rows ahead of
    use (up to 32 rows in the AVX-512 build, 16 otherwise: the extension says);
  * M <= WEIGHT_MAJOR_MAX_ROWS: CPU BLAS as W @ x.T (the weight as the long, untransposed
    operand), which BLAS runs faster than x @ W.T at these sizes on every pythia-70m linear;
  * otherwise (or with autograd, autocast, torch.compile, other dtypes or devices): F.linear.
The model calls decode_linear for every linear, the LM head included.
"""
from __future__ import annotations

import functools
from typing import Optional

import torch
import torch.nn.functional as F

from .. import bindings
from .backend import has_kernel

WEIGHT_MAJOR_MAX_ROWS = 64  # measured up to here (decode steps of batch <= 64)


@functools.cache
def kernel_max_rows() -> int:
    """Up to how many rows the decode_linear kernel beats BLAS, as the loaded extension's
    build reports it (csrc/cpu/dispatch.h; memoized: every decode step's linears ask); 0
    without the kernel."""
    if not has_kernel("cpu", "decode_linear"):
        return 0
    return bindings.load().build_info().get("decode_linear_max_rows", 16)


def _decode_sized_cpu_call(x, weight, bias) -> bool:
    """Whether a fast path may replace F.linear at all (row count aside)."""
    if x.device.type != "cpu" or x.dtype not in (torch.float32, torch.float64):
        return False
    if x.dim() == 0 or weight.dim() != 2 or weight.dtype != x.dtype or not weight.is_contiguous():
        return False
    if bias is not None and (bias.dtype != x.dtype or bias.dim() != 1):
        return False
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad
                                    or (bias is not None and bias.requires_grad)):
        return False  # the kernel has no backward; training keeps F.linear's layout
    # autocast casts inside F.linear; compiled graphs have their own GEMMs
    return not (torch.is_autocast_enabled("cpu") or torch.compiler.is_compiling())


def choose_path(x, weight, bias) -> str:
    """"kernel", "weight-major" or "F.linear" for this call."""
    if not _decode_sized_cpu_call(x, weight, bias):
        return "F.linear"
    rows = x.numel() // max(1, x.shape[-1])
    if rows <= kernel_max_rows():
        return "kernel"
    if rows <= WEIGHT_MAJOR_MAX_ROWS:
        return "weight-major"
    return "F.linear"


def _weight_major_linear(x, weight, bias):
    """(W @ x.T).T (+ bias), returned as that transposed view: same values as F.linear."""
    flat_t = x.reshape(-1, x.shape[-1]).T
    y_t = torch.addmm(bias[:, None], weight, flat_t) if bias is not None else weight @ flat_t
    return y_t.T.reshape(*x.shape[:-1], weight.shape[0])


def decode_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
                  *, gelu: bool = False) -> torch.Tensor:
    """F.linear(x, weight, bias), computed the fastest measured way for decode-sized CPU inputs;
    with gelu=True, F.gelu of it (exact, erf GELU: a GPT-NeoX MLP's first layer).

    A drop-in replacement: same values (to rounding), dtype, shape and autograd as F.linear.
    The kernel runs for CPU float32/float64 inputs of at most kernel_max_rows() rows with a
    contiguous weight when no gradient is needed, and applies the GELU itself (one op call
    instead of two; its own erfc, within 4.3e-7 of the exact GELU relative to each element in
    float32, where F.gelu's error grows to all of the value below x = -5); up to
    WEIGHT_MAJOR_MAX_ROWS rows under the same conditions BLAS computes W @ x.T (the result is
    then a non-contiguous view, unless gelu); every other call is F.linear.
    """
    path = choose_path(x, weight, bias)
    if path == "kernel":
        return torch.ops.vdproj_ext.decode_linear(x, weight, bias, gelu)
    if path == "weight-major":
        y = _weight_major_linear(x, weight, bias)
    else:
        y = F.linear(x, weight, bias)
    return F.gelu(y) if gelu else y
