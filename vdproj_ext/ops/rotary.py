"""rotary_pair: GPT-NeoX's rotary embedding on a step's queries and keys in one CPU kernel call.

models/layers.py's apply_rotary computes it with about seven ATen ops per tensor, twice a
layer. At decode sizes each op's dispatch costs more than its arithmetic: a batch-1 step of
pythia-70m spent about 0.5 ms of 10 in them (bench/RESULTS.md). The kernel
(csrc/cpu/rotary_ops.cpp) gives the same bits, so the model uses it wherever it may: CPU
tensors, no gradient needed (it has no backward), outside torch.compile.
"""
from __future__ import annotations

import torch

from .backend import has_kernel

_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def kernel_takes(q, k, cos, sin) -> bool:
    """Whether rotary_pair may stand in for apply_rotary on q and on k."""
    if not (q.is_cpu and k.is_cpu and cos.is_cpu and sin.is_cpu):
        return False
    if q.dtype not in _DTYPES or k.dtype != q.dtype:
        return False
    if cos.dtype != torch.float32 or sin.dtype != torch.float32:
        return False
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad):
        return False
    return not torch.compiler.is_compiling() and has_kernel("cpu", "rotary_pair")


def rotary_pair(q, k, cos, sin):
    """(apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)) in one kernel call, as new
    contiguous tensors. q (B, T, Hq, Dq), k (B, T, Hk, Dk); cos and sin float32, broadcastable
    to (B, T, 1, rotary_dims) as models.layers.rotary_cos_sin makes them."""
    shape = (q.shape[0], q.shape[1], 1, cos.shape[-1])
    return torch.ops.vdproj_ext.rotary_pair(q, k, cos.expand(shape), sin.expand(shape))
