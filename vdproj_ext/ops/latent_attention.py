"""compressed_kv_attention: latent keys, training and prefill, differentiable (SPEC 3b)."""
from __future__ import annotations

import torch

from . import aten_paths, checks, reference, routing
from .attention import reference_backward
from .library import latent_kernel_backward, save_for_latent_kernel_backward


class CompressedKVAttentionFunction(torch.autograd.Function):
    """Autograd wrapper running the ckv_forward / ckv_backward kernels (backend "ext") or the
    reference.

    apply(q, k_rope, k_c, v_c, w_kr, w_r, b_r, causal, softmax_scale, backend) with inputs
    already checked; k_c None is the joint latent.
    """

    @staticmethod
    def forward(ctx, q, k_rope, k_c, v_c, w_kr, w_r, b_r, causal, softmax_scale, backend):
        ctx.backend = backend
        inputs = (q, k_rope, k_c, v_c, w_kr, w_r, b_r, causal, softmax_scale)
        if backend == "ext":
            out, lse, ctx_c = torch.ops.vdproj_ext.ckv_forward(*inputs)
            save_for_latent_kernel_backward(ctx, inputs, lse, ctx_c)
            return out
        ctx.causal, ctx.softmax_scale = causal, softmax_scale
        ctx.save_for_backward(q, k_rope, k_c, v_c, w_kr, w_r, b_r)
        return reference.compressed_kv_attention(q, k_rope, k_c, v_c, w_kr, w_r, b_r,
                                                 causal=causal, softmax_scale=softmax_scale)

    @staticmethod
    def backward(ctx, grad_out):
        if ctx.backend == "ext":
            grads = latent_kernel_backward(ctx, grad_out)
        else:
            # autograd adds up the joint latent's two uses of v_c (key and value latent)
            grads = reference_backward(ctx, grad_out, reference.compressed_kv_attention)
        return (*grads, None, None, None)  # no gradient for causal, softmax_scale, backend


def compressed_kv_attention(q, k_rope, k_c, v_c, w_kr, w_r, b_r=None, *, causal=False,
                            softmax_scale=None, backend="auto"):
    """Attention over latent keys and compressed values (SPEC 3b).

    q (B, Tq, H, D); k_rope (B, Tk, H, Dr), the rotary dims of each head's keys, 0 <= Dr < D;
    k_c (B, Tk, Rk), the keys' latent, or None for the joint latent (then v_c serves as both);
    v_c (B, Tk, Rv); w_kr (H*Dn, Rk), Dn = D - Dr; w_r (H*D, Rv); b_r (H*D,) or None.
    Returns o (B, Tq, H, D). Differentiable with respect to q, k_rope, k_c, v_c, w_kr, w_r, b_r.
    """
    inputs = (q, k_rope, k_c, v_c, w_kr, w_r, b_r)
    checks.check_latent_attention_ranks_and_devices(*inputs)
    checks.check_flag("causal", causal)
    scale = checks.check_softmax_scale(softmax_scale, q.shape[-1])
    path = routing.latent_path(backend, q.device, "ckv_forward")
    if path == "kernel" and q.device.type == "cuda":
        needs_grad = torch.is_grad_enabled() and any(
            t is not None and t.requires_grad for t in inputs)
        if routing.ckv_uses_restore_keys_then_sdpa(q, k_rope, k_c, v_c, needs_grad):
            path = "aten"
    if path == "kernel":  # the kernels check the rest themselves (csrc/, same messages)
        inputs = [t.contiguous() if t is not None else None for t in inputs]
        return CompressedKVAttentionFunction.apply(*inputs, causal, scale, "ext")
    checks.check_latent_attention_dtypes_and_shapes(*inputs)
    if path == "aten":
        return aten_paths.restore_keys_then_sdpa(*inputs, causal, scale)
    return CompressedKVAttentionFunction.apply(*inputs, causal, scale, "reference")
