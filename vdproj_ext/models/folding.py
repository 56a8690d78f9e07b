"""Inference: folding the compress projections into the fused query/key/value projection.

w_c (W_v x + b_v) + b_c = (w_c W_v) x + (w_c b_v + b_c), so one Linear can map x to q, k and
V_c directly: V (H*D wide) is never computed, and the cache stores V_c as given
(`attend_compressed` of the caches). With latent keys k_compress folds the same way into the
non-rotary rows of the key projection, K_c = (w_kc W_knope) x + (w_kc b_knope + b_kc) (with the
joint latent, w_c folds into [W_knope; W_v] at once), so the fused Linear yields q, the rotary
keys and the latents, and k_nope is never computed either.

`VDProjForCausalLM.prepare_for_inference()` is the one call that applies these folds (in
place). bench/RESULTS.md has what they gain in decoding.
"""
from __future__ import annotations

import copy
from typing import List, Optional, Tuple

import torch
from torch import nn

from ..ops import compressed_kv_attention, compressed_v_attention
from .layers import Linear, apply_rotary_pair, fused_qkv_parts


def _affine(weight: torch.Tensor, bias: Optional[torch.Tensor]):
    return weight.detach(), (bias.detach() if bias is not None
                             else weight.new_zeros(weight.shape[0]))


def _compose(outer: nn.Linear, inner: Tuple[torch.Tensor, torch.Tensor]):
    """(W, b) of outer(inner(x)) for the affine map inner = (W_i, b_i)."""
    w_o, b_o = _affine(outer.weight, outer.bias)
    return w_o @ inner[0], w_o @ inner[1] + b_o


def _folded_projection(attn) -> Tuple[torch.Tensor, Optional[torch.Tensor], List[int]]:
    """Weight and bias (None when no folded Linear has one) of the Linear x -> [q (all heads)
    | keys kept whole (all heads: k, or only its rotary dims with latent keys) | the latents
    (K_c then V_c, or the joint latent)], and the widths of those latents."""
    qkv = attn.query_key_value
    dr = attn.rope_dims if attn.latent_keys else attn.head_dim
    w_parts = fused_qkv_parts(qkv.weight.detach(), attn.num_heads, dr)
    b_full = _affine(qkv.weight, qkv.bias)[1]
    b_parts = fused_qkv_parts(b_full, attn.num_heads, dr)

    def part(*names):
        return (torch.cat([w_parts[n] for n in names]), torch.cat([b_parts[n] for n in names]))

    if not attn.latent_keys:
        latents = [_compose(attn.v_compress, part("v"))]
    elif attn.joint_kv:
        latents = [_compose(attn.v_compress, part("k_nope", "v"))]
    else:
        latents = [_compose(attn.k_compress, part("k_nope")), _compose(attn.v_compress, part("v"))]
    head_w, head_b = part("q", "k_rope")
    weight = torch.cat([head_w] + [w for w, _ in latents])
    has_bias = any(lin is not None and lin.bias is not None for lin in
                   (qkv, attn.v_compress, getattr(attn, "k_compress", None)))
    bias = torch.cat([head_b] + [b for _, b in latents]) if has_bias else None
    return weight, bias, [w.shape[0] for w, _ in latents]


class FoldedVAttention(nn.Module):
    """Inference-only form of a compressed CompressedVAttention: v_compress (and k_compress,
    with latent keys) folded into the fused projection (see the module docstring). A
    snapshot: later changes to the source module's weights are not seen (fold again after
    training)."""

    def __init__(self, attn):
        super().__init__()
        if not getattr(attn, "compressed", False):
            raise ValueError("only a compressed attention layer (v_rank set) can be folded")
        self.num_heads, self.head_dim = attn.num_heads, attn.head_dim
        self.hidden_size, self.backend = attn.hidden_size, attn.backend
        self.latent_keys, self.joint_kv = attn.latent_keys, attn.joint_kv
        self.cache_layout = attn.cache_layout
        # per head, the key dims the cache keeps whole: all of them, or the rotary ones
        self.key_dims = attn.rope_dims if attn.latent_keys else attn.head_dim
        weight, bias, self.latent_widths = _folded_projection(attn)
        self.fused = Linear(weight.shape[1], weight.shape[0], bias=bias is not None,
                            device=weight.device, dtype=weight.dtype)
        with torch.no_grad():
            self.fused.weight.copy_(weight)
            if bias is not None:
                self.fused.bias.copy_(bias)
        self.v_restore, self.dense = attn.v_restore, attn.dense
        if attn.latent_keys:
            self.k_restore = attn.k_restore

    def forward(self, x, cos, sin, cache=None, layer_idx: int = 0, want_recon: bool = False):
        if want_recon:
            raise ValueError("a folded attention layer has no V to reconstruct (inference only)")
        if cache is not None:
            cache.check_fits(layer_idx, self)
        b, t, _ = x.shape
        h, d, hd, dk = self.num_heads, self.head_dim, self.hidden_size, self.key_dims
        q, k, *latents = self.fused(x).split([hd, h * dk, *self.latent_widths], -1)
        q, k = apply_rotary_pair(q.view(b, t, h, d), k.view(b, t, h, dk), cos, sin)
        if not self.latent_keys:
            if cache is not None:
                o = cache.attend_compressed(layer_idx, q, k, latents[0], self)
            else:
                o = compressed_v_attention(q, k, latents[0], self.v_restore.weight,
                                           self.v_restore.bias, causal=True, backend=self.backend)
        else:
            k_c, v_c = (None, latents[0]) if self.joint_kv else latents
            if cache is not None:
                o = cache.attend_compressed(layer_idx, q, k, (k_c, v_c), self)
            else:
                o = compressed_kv_attention(q, k, k_c, v_c, self.k_restore.weight,
                                            self.v_restore.weight, self.v_restore.bias,
                                            causal=True, backend=self.backend)
        return self.dense(o.reshape(b, t, hd).to(x.dtype)), None


def fold_v_compress(model, inplace: bool = False):
    """An inference copy of a compressed VDProjForCausalLM (or the model itself with
    inplace=True) whose attention layers are FoldedVAttention: v_compress, and with latent
    keys k_compress, folded into the fused projection. Logits and generate() are unchanged up
    to float rounding; training (reconstruction loss) is not supported. Layers already folded
    stay as they are. model.prepare_for_inference() is this, in place."""
    if model.config.v_rank is None:
        raise ValueError("fold_v_compress needs a compressed model (config.v_rank is set)")
    out = model if inplace else copy.deepcopy(model)
    for layer in out.gpt_neox.layers:
        if not isinstance(layer.attention, FoldedVAttention):
            layer.attention = FoldedVAttention(layer.attention)
    return out.eval()
