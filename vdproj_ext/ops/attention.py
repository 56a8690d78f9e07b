"""compressed_v_attention: training and prefill, differentiable (SPEC section 3)."""
from __future__ import annotations

import torch

from . import aten_paths, checks, reference, routing
from .backend import resolve_backend
from .library import kernel_backward, save_for_kernel_backward


def reference_backward(ctx, grad_out, reference_op=reference.compressed_v_attention):
    """Gradients of reference_op (its tensor inputs saved, None for an absent one), by
    recomputing it under torch.func.vjp, which torch.compile(fullgraph=True) traces (a nested
    torch.autograd.grad is a graph break)."""
    saved = ctx.saved_tensors
    present = [i for i, t in enumerate(saved) if t is not None]

    def op(*tensors):
        args = list(saved)
        for i, t in zip(present, tensors):
            args[i] = t
        return reference_op(*args, causal=ctx.causal, softmax_scale=ctx.softmax_scale)

    _, vjp = torch.func.vjp(op, *(saved[i] for i in present))
    grads = iter(vjp(grad_out))
    return tuple(next(grads) if t is not None else None for t in saved)


class CompressedVAttentionFunction(torch.autograd.Function):
    """Autograd wrapper running the compiled kernels (backend "ext") or the reference.

    apply(q, k, v_c, w_r, b_r, causal, softmax_scale, backend) with inputs already checked.
    """

    @staticmethod
    def forward(ctx, q, k, v_c, w_r, b_r, causal, softmax_scale, backend):
        ctx.backend = backend
        if backend == "ext":
            out, lse, ctx_c = torch.ops.vdproj_ext.cva_forward(
                q, k, v_c, w_r, b_r, causal, softmax_scale)
            save_for_kernel_backward(ctx, q, k, v_c, w_r, b_r, causal, softmax_scale, lse, ctx_c)
            return out
        ctx.causal, ctx.softmax_scale = causal, softmax_scale
        ctx.save_for_backward(q, k, v_c, w_r, b_r)
        return reference.compressed_v_attention(q, k, v_c, w_r, b_r, causal=causal,
                                                softmax_scale=softmax_scale)

    @staticmethod
    def backward(ctx, grad_out):
        if ctx.backend == "ext":
            grads = kernel_backward(ctx, grad_out)
        else:
            grads = reference_backward(ctx, grad_out)
        return (*grads, None, None, None)  # no gradient for causal, softmax_scale, backend


def compressed_v_attention(q, k, v_c, w_r, b_r=None, *, causal=False, softmax_scale=None,
                           backend="auto"):
    """Attention whose values are restored from a compressed representation (SPEC section 3).

    q, k: (B, Tq, H, D), (B, Tk, H, D); v_c: (B, Tk, R); w_r: (H*D, R); b_r: (H*D,) or None.
    Returns o (B, Tq, H, D). Differentiable with respect to q, k, v_c, w_r and b_r.
    """
    checks.check_attention_ranks_and_devices(q, k, v_c, w_r, b_r)
    checks.check_flag("causal", causal)
    scale = checks.check_softmax_scale(softmax_scale, q.shape[-1])
    chosen = resolve_backend(backend, q.device)
    if chosen == "ext" and q.device.type == "cuda":
        needs_grad = torch.is_grad_enabled() and any(
            t is not None and t.requires_grad for t in (q, k, v_c, w_r, b_r))
        if routing.cva_uses_restore_then_sdpa(q, k, v_c, needs_grad):
            checks.check_attention_dtypes_and_shapes(q, k, v_c, w_r, b_r)
            return aten_paths.restore_then_sdpa(q, k, v_c, w_r, b_r, causal, scale)
    if chosen == "reference":
        checks.check_attention_dtypes_and_shapes(q, k, v_c, w_r, b_r)
    else:  # the kernels check the rest themselves (csrc/, same messages)
        q, k, v_c, w_r = (t.contiguous() for t in (q, k, v_c, w_r))
        b_r = b_r.contiguous() if b_r is not None else None
    return CompressedVAttentionFunction.apply(q, k, v_c, w_r, b_r, causal, scale, chosen)
