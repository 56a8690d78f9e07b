"""torch.library registration of the compiled ops: fake (meta) kernels and the autograd formula.

The ops themselves are defined in C++ (schemas in csrc/bindings.cpp, under
torch.ops.vdproj_ext). Registering their fake kernels lets torch.library.opcheck pass and
torch.compile trace through them; registering the autograd of cva_forward makes a direct
torch.ops call differentiable. CompressedVAttentionFunction (attention.py) saves and
differentiates the kernel forward with the same two helpers as the registered formula.

The latent-key ops (ckv_forward, ckv_backward, ckv_kvcache_attention; SPEC 3b) are registered
the same way, by CompressedKVAttentionFunction (latent_attention.py) and its two helpers here,
but only when the loaded extension defines them (an older build does not).
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


def saved_context_dtype(q):
    """The dtype of the latent context a forward op saves for its backward (csrc/common/checks.h
    check_backward_extras): accumulation precision, float32 (float64 for float64 inputs), as
    reference.accumulation_dtype, which this module cannot import (reference -> quant ->
    backend -> library would be a cycle)."""
    return torch.float64 if q.dtype == torch.float64 else torch.float32


def _register_fakes():
    @torch.library.register_fake("vdproj_ext::cva_forward")
    def _cva_forward_fake(q, k, v_c, w_r, b_r, causal, softmax_scale):
        batch, tq, heads, head_dim = q.shape
        rank = v_c.shape[-1]
        out = q.new_empty((batch, tq, heads, head_dim))
        lse = q.new_empty((batch, heads, tq), dtype=torch.float32)
        ctx_c = q.new_empty((batch, tq, heads, rank), dtype=saved_context_dtype(q))
        return out, lse, ctx_c

    @torch.library.register_fake("vdproj_ext::cva_backward")
    def _cva_backward_fake(grad_out, q, k, v_c, w_r, softmax_lse, ctx_c, causal, softmax_scale):
        return (torch.empty_like(q), torch.empty_like(k), torch.empty_like(v_c),
                torch.empty_like(w_r), w_r.new_empty((w_r.shape[0],)))

    @torch.library.register_fake("vdproj_ext::kvcache_attention")
    def _kvcache_fake(q, k_cache, vc_cache, w_r, b_r, k, v, w_c, b_c, cache_seqlens, causal,
                      softmax_scale, k_scale=None, vc_scale=None):
        return torch.empty_like(q)

    if op_defined("quantize_into"):
        @torch.library.register_fake("vdproj_ext::quantize_into")
        def _quantize_into_fake(cache, scale, values, cache_seqlens):
            return None

    @torch.library.register_fake("vdproj_ext::decode_linear")
    def _decode_linear_fake(x, weight, bias, gelu=False):
        return x.new_empty((*x.shape[:-1], weight.shape[0]))

    if op_defined("rotary_pair"):
        @torch.library.register_fake("vdproj_ext::rotary_pair")
        def _rotary_pair_fake(q, k, cos, sin):
            return q.new_empty(q.shape), k.new_empty(k.shape)


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
    _register_latent_fakes()
    if op_defined("ckv_forward") and op_defined("ckv_backward"):
        torch.library.register_autograd("vdproj_ext::ckv_forward", _latent_backward,
                                        setup_context=_latent_setup_context)


# ---------------------------------------------------------------------------------------------
# Latent keys: ckv_forward / ckv_backward / ckv_kvcache_attention


def op_defined(op) -> bool:
    """Whether the loaded extension defines vdproj_ext::`op` (builds before issue 10 do not)."""
    return hasattr(torch.ops.vdproj_ext, op)


def save_for_latent_kernel_backward(ctx, inputs, lse, ctx_c):
    """What the ckv_backward kernel needs from a ckv_forward call; inputs are ckv_forward's
    (q, k_rope, k_c, v_c, w_kr, w_r, b_r, causal, softmax_scale)."""
    q, k_rope, k_c, v_c, w_kr, w_r, b_r, causal, softmax_scale = inputs
    ctx.save_for_backward(q, k_rope, k_c, v_c, w_kr, w_r, lse, ctx_c)
    ctx.causal, ctx.softmax_scale = causal, softmax_scale
    ctx.has_bias, ctx.joint = b_r is not None, k_c is None


def latent_kernel_backward(ctx, grad_out):
    """Gradients (q, k_rope, k_c, v_c, w_kr, w_r, b_r) of ckv_forward by the ckv_backward kernel.
    With the joint latent there is no k_c: its key gradient is already in grad_v_c."""
    q, k_rope, k_c, v_c, w_kr, w_r, lse, ctx_c = ctx.saved_tensors
    dq, dk_rope, dk_c, dv_c, dw_kr, dw_r, db_r = torch.ops.vdproj_ext.ckv_backward(
        grad_out.contiguous(), q, k_rope, k_c, v_c, w_kr, w_r, lse, ctx_c, ctx.causal,
        ctx.softmax_scale)
    return (dq, dk_rope, None if ctx.joint else dk_c, dv_c, dw_kr, dw_r,
            db_r if ctx.has_bias else None)


def _ckv_forward_fake(q, k_rope, k_c, v_c, w_kr, w_r, b_r, causal, softmax_scale):
    batch, tq, heads, head_dim = q.shape
    out = q.new_empty((batch, tq, heads, head_dim))
    lse = q.new_empty((batch, heads, tq), dtype=torch.float32)
    ctx_c = q.new_empty((batch, tq, heads, v_c.shape[-1]), dtype=saved_context_dtype(q))
    return out, lse, ctx_c


def _ckv_backward_fake(grad_out, q, k_rope, k_c, v_c, w_kr, w_r, softmax_lse, ctx_c, causal,
                       softmax_scale):
    grad_k_c = torch.empty_like(k_c) if k_c is not None else v_c.new_empty((0,))
    return (torch.empty_like(q), torch.empty_like(k_rope), grad_k_c, torch.empty_like(v_c),
            torch.empty_like(w_kr), torch.empty_like(w_r), w_r.new_empty((w_r.shape[0],)))


def _ckv_kvcache_fake(q, krope_cache, kc_cache, vc_cache, w_kr, w_r, b_r, k, v, w_kc, b_kc, w_c,
                      b_c, cache_seqlens, causal, softmax_scale, krope_scale=None, kc_scale=None,
                      vc_scale=None):
    return torch.empty_like(q)


def _register_latent_fakes():
    """The fake kernel of each ckv_* op the loaded extension defines."""
    for op, fake in (("ckv_forward", _ckv_forward_fake), ("ckv_backward", _ckv_backward_fake),
                     ("ckv_kvcache_attention", _ckv_kvcache_fake)):
        if op_defined(op):
            torch.library.register_fake(f"vdproj_ext::{op}", fake)


def _latent_setup_context(ctx, inputs, output):
    _, lse, ctx_c = output
    save_for_latent_kernel_backward(ctx, inputs, lse, ctx_c)
    ctx.mark_non_differentiable(lse, ctx_c)


def _latent_backward(ctx, grad_out, _grad_lse, _grad_ctx):
    return (*latent_kernel_backward(ctx, grad_out), None, None)  # no gradient for causal, scale
