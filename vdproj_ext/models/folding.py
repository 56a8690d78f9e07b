"""Inference: folding v_compress into the value projection.

w_c (W_v x + b_v) + b_c = (w_c W_v) x + (w_c b_v + b_c), so one Linear can map x to q, k and
V_c directly: V (H*D wide) is never computed, and the cache stores V_c as given
(CompressedKVCache.attend_compressed). bench/RESULTS.md has what it gains in decoding.
"""
from __future__ import annotations

import copy

import torch
from torch import nn

from ..ops import compressed_v_attention
from .layers import Linear, apply_rotary, split_fused_qkv


def _folded_projection(attn):
    """Weight and bias (None when neither query_key_value nor v_compress has one) of the Linear
    x -> [q and k in GPT-NeoX's per-head layout | V_c]."""
    qkv, comp = attn.query_key_value, attn.v_compress
    w_qk, w_v = split_fused_qkv(qkv.weight.detach(), attn.num_heads)
    w_c = comp.weight.detach()
    weight = torch.cat((w_qk, w_c @ w_v))
    if qkv.bias is None and comp.bias is None:
        return weight, None
    fused_bias = qkv.bias.detach() if qkv.bias is not None else w_v.new_zeros(w_v.shape[0] * 3)
    b_qk, b_v = split_fused_qkv(fused_bias, attn.num_heads)
    b_vc = w_c @ b_v
    if comp.bias is not None:
        b_vc = b_vc + comp.bias.detach()
    return weight, torch.cat((b_qk, b_vc))


class FoldedVAttention(nn.Module):
    """Inference-only form of a compressed CompressedVAttention: v_compress folded into the
    value projection (see the module docstring). A snapshot: later changes to the source
    module's weights are not seen (fold again after training)."""

    def __init__(self, attn):
        super().__init__()
        if not getattr(attn, "compressed", False):
            raise ValueError("only a compressed attention layer (v_rank set) can be folded")
        self.num_heads, self.head_dim = attn.num_heads, attn.head_dim
        self.hidden_size, self.backend = attn.hidden_size, attn.backend
        weight, bias = _folded_projection(attn)
        self.qk_vc = Linear(weight.shape[1], weight.shape[0], bias=bias is not None,
                            device=weight.device, dtype=weight.dtype)
        with torch.no_grad():
            self.qk_vc.weight.copy_(weight)
            if bias is not None:
                self.qk_vc.bias.copy_(bias)
        self.v_restore, self.dense = attn.v_restore, attn.dense

    def forward(self, x, cos, sin, cache=None, layer_idx: int = 0, want_recon: bool = False):
        if want_recon:
            raise ValueError("a folded attention layer has no V to reconstruct (inference only)")
        b, t, _ = x.shape
        h, d, hd = self.num_heads, self.head_dim, self.hidden_size
        y = self.qk_vc(x)
        qk = y[..., :2 * hd].view(b, t, h, 2 * d)
        q, k = apply_rotary(qk[..., :d], cos, sin), apply_rotary(qk[..., d:], cos, sin)
        v_c = y[..., 2 * hd:]
        if cache is not None:
            o = cache.attend_compressed(layer_idx, q, k, v_c, self)
        else:
            o = compressed_v_attention(q, k, v_c, self.v_restore.weight, self.v_restore.bias,
                                       causal=True, backend=self.backend)
        return self.dense(o.reshape(b, t, hd).to(x.dtype)), None


def fold_v_compress(model, inplace: bool = False):
    """An inference copy of a compressed VDProjForCausalLM (or the model itself with
    inplace=True) whose attention layers are FoldedVAttention. Logits and generate() are
    unchanged up to float rounding; training (reconstruction loss) is not supported."""
    if model.config.v_rank is None:
        raise ValueError("fold_v_compress needs a compressed model (config.v_rank is set)")
    out = model if inplace else copy.deepcopy(model)
    for layer in out.gpt_neox.layers:
        if not isinstance(layer.attention, FoldedVAttention):
            layer.attention = FoldedVAttention(layer.attention)
    return out.eval()
