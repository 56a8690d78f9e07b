"""torch.library registration of the compiled ops: fake (meta) kernels and the autograd formula.

The ops themselves are defined in C++ (schemas in csrc/vdproj_ops.cpp, under
torch.ops.vdproj_ext). Registering their fake kernels lets torch.library.opcheck pass and
torch.compile trace through them; registering the autograd of cva_forward makes a direct
torch.ops call differentiable. CompressedVAttentionFunction (attention.py) saves and
differentiates the kernel forward with the same two helpers as the registered formula.
"""
from __future__ import annotations

import torch

_registered = False


def save_for_kernel_backward(ctx, q, k, v_c, w_r, b_r, causal, softmax_scale, lse, ctx_c):
    """What the cva_backward kernel needs from a cva_forward call."""
    ctx.save_for_backward(q, k, v_c, w_r, lse, ctx_c)
    ctx.causal, ctx.softmax_scale, ctx.has_bias = causal, softmax_scale, b_r is not None


def kernel_backward(ctx, grad_out):
    """Gradients (q, k, v_c, w_r, b_r) of cva_forward by the cva_backward kernel."""
    q, k, v_c, w_r, lse, ctx_c = ctx.saved_tensors
    dq, dk, dvc, dwr, dbr = torch.ops.vdproj_ext.cva_backward(
        grad_out.contiguous(), q, k, v_c, w_r, lse, ctx_c, ctx.causal, ctx.softmax_scale)
    return dq, dk, dvc, dwr, (dbr if ctx.has_bias else None)


def _register_fakes():
    @torch.library.register_fake("vdproj_ext::cva_forward")
    def _cva_forward_fake(q, k, v_c, w_r, b_r, causal, softmax_scale):
        batch, tq, heads, head_dim = q.shape
        rank = v_c.shape[-1]
        out = q.new_empty((batch, tq, heads, head_dim))
        lse = q.new_empty((batch, heads, tq), dtype=torch.float32)
        ctx_c = q.new_empty((batch, tq, heads, rank))
        return out, lse, ctx_c

    @torch.library.register_fake("vdproj_ext::cva_backward")
    def _cva_backward_fake(grad_out, q, k, v_c, w_r, softmax_lse, ctx_c, causal, softmax_scale):
        return (torch.empty_like(q), torch.empty_like(k), torch.empty_like(v_c),
                torch.empty_like(w_r), w_r.new_empty((w_r.shape[0],)))

    @torch.library.register_fake("vdproj_ext::kvcache_attention")
    def _kvcache_fake(q, k_cache, vc_cache, w_r, b_r, k, v, w_c, b_c, cache_seqlens, causal,
                      softmax_scale):
        return torch.empty_like(q)

    @torch.library.register_fake("vdproj_ext::decode_linear")
    def _decode_linear_fake(x, weight, bias):
        return x.new_empty((*x.shape[:-1], weight.shape[0]))


def _setup_context(ctx, inputs, output):
    q, k, v_c, w_r, b_r, causal, softmax_scale = inputs
    _, lse, ctx_c = output
    save_for_kernel_backward(ctx, q, k, v_c, w_r, b_r, causal, softmax_scale, lse, ctx_c)
    ctx.mark_non_differentiable(lse, ctx_c)


def _backward(ctx, grad_out, _grad_lse, _grad_ctx):
    return (*kernel_backward(ctx, grad_out), None, None)  # no gradient for causal, scale


def register_torch_library():
    """Register once, after the extension has defined the ops."""
    global _registered
    if _registered:
        return
    _registered = True
    _register_fakes()
    torch.library.register_autograd("vdproj_ext::cva_forward", _backward,
                                    setup_context=_setup_context)
