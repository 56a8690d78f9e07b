"""The building blocks of the GPT-NeoX model: rotary embedding, the Linear every layer uses,
the V-DProj attention, the MLP and the transformer layer.

Module names and tensor layouts follow Hugging Face's GPT-NeoX, so that its checkpoints load
1:1 (see gpt_neox.py for the state dict).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..ops import compressed_kv_attention, compressed_v_attention, decode_linear, rotary
from .config import VDProjConfig, check_attention_shape, check_latent_ranks, rope_dims

# ---------------------------------------------------------------------------------------------
# Rotary embedding (GPT-NeoX style: rotate_half on the first rotary_ndims of each head)


def rotary_cos_sin(positions: torch.Tensor, rotary_ndims: int, base: float):
    """cos, sin of shape positions.shape + (1, rotary_ndims), in float32.

    inv_freq is recomputed here (it is tiny) instead of kept as a buffer, so that casting the
    model to bf16 never rounds it.
    """
    exponent = torch.arange(0, rotary_ndims, 2, device=positions.device,
                            dtype=torch.int64).float() / rotary_ndims
    inv_freq = 1.0 / (base ** exponent)
    freqs = positions.float().unsqueeze(-1) * inv_freq
    emb = torch.cat((freqs, freqs), dim=-1).unsqueeze(-2)  # broadcast over heads
    return emb.cos(), emb.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (B, T, H, D); rotates the first cos.shape[-1] dims, passes the rest through.

    GPT-NeoX's x * cos + rotate_half(x) * sin, with rotate_half(x) = [-x2, x1] for the halves
    x1, x2 of the rotated dims, in fewer ops: a decode step calls this twice per layer on a
    few hundred numbers, where each op's dispatch costs more than its arithmetic. [x2, x1] is
    one roll, and negating the first half of the product after the multiply gives the same
    bits as negating x2 before it. Keys rotated whole (the latent model's rotary keys) need no
    concatenation either. bench/RESULTS.md has the time per call before and after."""
    rot = cos.shape[-1]
    if rot == 0:
        return x
    if cos.dtype != x.dtype:
        cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    whole = rot == x.shape[-1]
    x_rot = x if whole else x[..., :rot]
    turned = x_rot.roll(rot // 2, -1) * sin
    turned[..., :rot // 2].neg_()
    rotated = x_rot * cos + turned
    return rotated if whole else torch.cat((rotated, x[..., rot:]), dim=-1)


def apply_rotary_pair(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """(apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)); in one kernel call with the same
    bits where the CPU kernel takes them (ops/rotary.py: no gradient needed, as in decoding)."""
    if cos.shape[-1] > 0 and rotary.kernel_takes(q, k, cos, sin):
        return rotary.rotary_pair(q, k, cos, sin)
    return apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)


# ---------------------------------------------------------------------------------------------
# Attention


class Linear(nn.Linear):
    """nn.Linear (same parameters and state dict) whose forward is ops.decode_linear, which
    runs the CPU decode kernel where it pays and F.linear everywhere else."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return decode_linear(x, self.weight, self.bias)


def split_fused_qkv(t: torch.Tensor, num_heads: int):
    """query_key_value's weight (3*H*D, in) or bias (3*H*D,) -> (its query and key rows,
    (2*H*D, ...), head by head [q | k]; its value rows (H*D, ...)). GPT-NeoX fuses the three
    projections per head, [q | k | v], so each part is gathered across the heads."""
    rest = t.shape[1:]
    per_head = t.reshape(num_heads, 3, -1, *rest)
    return per_head[:, :2].reshape(-1, *rest), per_head[:, 2].reshape(-1, *rest)


def fused_qkv_parts(t: torch.Tensor, num_heads: int, rope_dims: int = 0) -> dict:
    """query_key_value's weight (3*H*D, in) or bias (3*H*D,) split by role, each part head by
    head ((H*width, ...)): "q", "k", "v", and the rotary / non-rotary parts of the queries and
    keys, "q_rope", "q_nope", "k_rope", "k_nope" (the first rope_dims dims of each head
    and the rest)."""
    rest = t.shape[1:]
    per_head = t.reshape(num_heads, 3, -1, *rest)

    def rows(role, dims=slice(None)):
        return per_head[:, role, dims].reshape(-1, *rest)

    rope, nope = slice(0, rope_dims), slice(rope_dims, None)
    return {"q": rows(0), "k": rows(1), "v": rows(2), "q_rope": rows(0, rope),
            "q_nope": rows(0, nope), "k_rope": rows(1, rope), "k_nope": rows(1, nope)}


PAIR_MODULES = ("v_compress", "v_restore", "k_compress", "k_restore")


def is_projection_pair(param_name: str) -> bool:
    """Whether a parameter belongs to a compress/restore pair (what V-DProj adds to GPT-NeoX:
    v_compress / v_restore and, with latent keys, k_compress / k_restore)."""
    return any(f".{m}." in param_name for m in PAIR_MODULES)


class CompressedVAttention(nn.Module):
    """GPT-NeoX attention whose value path is v_compress -> (cache) -> v_restore.

    With v_rank=None it is GPT-NeoX's plain attention (no v_compress / v_restore).
    Training and uncached forward passes call ops.compressed_v_attention (restore on read
    inside the op); cached passes hand q, k, v to the cache object, which calls
    ops.compressed_attn_with_kvcache (compress on write, restore on read).

    Latent keys (SPEC 3b; config.py lists the valid combinations): with k_rank the
    non-rotary part of every head's key, k_nope (H*Dn, Dn = head_dim - rope_dims), goes
    through k_compress (Linear(H*Dn, k_rank)) into a latent that k_restore (Linear(k_rank,
    H*Dn)) restores, absorbed into the query by ops.compressed_kv_attention; the first
    rope_dims dims of each head's key (those rotary rotates, config.py) stay whole. With
    joint_kv the keys share the value latent: v_compress is Linear(H*Dn + H*D, v_rank) on
    [k_nope | v], k_restore is Linear(v_rank, H*Dn), and there is no k_compress. k_restore's
    bias cancels in the softmax (the ops take none); it only matters for the reconstruction
    loss.
    max_positions is accepted for GPT-NeoX's signature only: the rotary angles are computed
    for any position, so there is no table to size.
    """

    def __init__(self, hidden_size: int, num_heads: int, v_rank: Optional[int] = None,
                 rotary_pct: float = 0.25, rotary_base: float = 10000.0,
                 max_positions: int = 2048, bias: bool = True, v_bias: bool = True,
                 k_rank: Optional[int] = None, joint_kv: bool = False):
        super().__init__()
        check_attention_shape(hidden_size, num_heads, rotary_pct, rotary_base)
        self.hidden_size, self.num_heads = hidden_size, num_heads
        self.head_dim = hidden_size // num_heads
        self.v_rank, self.k_rank, self.joint_kv = v_rank, k_rank, joint_kv
        self.rotary_ndims = int(self.head_dim * rotary_pct)
        self.rope_dims = rope_dims(self.rotary_ndims)
        check_latent_ranks(v_rank, k_rank, joint_kv, self.head_dim, self.rope_dims)
        self.rotary_base = rotary_base
        self.backend = "auto"  # passed to the functional ops; tests force "reference"
        self.query_key_value = Linear(hidden_size, 3 * hidden_size, bias=bias)
        nope = num_heads * (self.head_dim - self.rope_dims)
        if v_rank is not None:
            self.v_compress = Linear(hidden_size + (nope if joint_kv else 0), v_rank,
                                     bias=v_bias)
            self.v_restore = Linear(v_rank, hidden_size, bias=v_bias)
        if k_rank is not None:
            self.k_compress = Linear(nope, k_rank, bias=v_bias)
        if self.latent_keys:
            self.k_restore = Linear(self.key_rank, nope, bias=v_bias)
        self.dense = Linear(hidden_size, hidden_size, bias=bias)
        # What a cache for this layer must store (cache.check_fits; fixed with the ranks):
        # ("full",), ("values", v_rank) or ("latent", v_rank, k_rank (None: joint), Dr).
        self.cache_layout = (("full",) if v_rank is None else
                             ("latent", v_rank, k_rank, self.rope_dims) if self.latent_keys
                             else ("values", v_rank))

    @property
    def compressed(self) -> bool:
        return self.v_rank is not None

    @property
    def latent_keys(self) -> bool:
        return self.k_rank is not None or self.joint_kv

    @property
    def key_rank(self) -> Optional[int]:
        """Width of the keys' latent: k_rank, or v_rank when it is shared (joint_kv)."""
        return self.v_rank if self.joint_kv else self.k_rank

    def project_qkv(self, x, cos, sin):
        """x (B, T, H*D) -> q, k (B, T, H, D) with rotary applied, v (B, T, H*D)."""
        b, t, _ = x.shape
        # GPT-NeoX's fused layout: per head, [q | k | v] along the last dim.
        qkv = self.query_key_value(x).view(b, t, self.num_heads, 3 * self.head_dim)
        d = self.head_dim
        q, k, v = qkv[..., :d], qkv[..., d:2 * d], qkv[..., 2 * d:]
        q, k = apply_rotary_pair(q, k, cos, sin)
        return q, k, v.reshape(b, t, self.hidden_size)

    def compress(self, k, v):
        """The latents of the new tokens: (K_c (B, T, k_rank) or None, V_c (B, T, v_rank)),
        and k_nope (B, T, H*Dn) (None without latent keys)."""
        if not self.latent_keys:
            return None, self.v_compress(v), None
        k_nope = k[..., self.rope_dims:].reshape(*k.shape[:2], -1)
        if self.joint_kv:
            return None, self.v_compress(torch.cat((k_nope, v), -1)), k_nope
        return self.k_compress(k_nope), self.v_compress(v), k_nope

    def forward(self, x, cos=None, sin=None, cache=None, layer_idx: int = 0,
                want_recon: bool = False):
        """x (B, T, H*D); cos, sin from rotary_cos_sin (the model computes them once for all
        layers; None: positions 0 .. T-1, or with a cache cache.seqlens[b] + 0 .. T-1).
        Returns (out (B, T, H*D), recon): recon is None, or, when want_recon and the layer is
        compressed, the reconstruction losses in float32, {"v": mean((V - V_r)^2)} plus "k":
        mean((k_nope - k_nope_r)^2) with latent keys."""
        b, t, _ = x.shape
        if cos is None:  # the new tokens' positions: after what the cache holds
            positions = (cache.new_token_positions(t).to(x.device) if cache is not None
                         else torch.arange(t, device=x.device).unsqueeze(0))
            cos, sin = rotary_cos_sin(positions, self.rotary_ndims, self.rotary_base)
        q, k, v = self.project_qkv(x, cos, sin)
        recon = None
        if cache is not None:
            cache.check_fits(layer_idx, self)
            o = cache.attend(layer_idx, q, k, v, self)
        elif self.compressed:
            o, recon = self._compressed_attention(q, k, v, want_recon)
        else:
            o = F.scaled_dot_product_attention(
                q.transpose(1, 2), k.transpose(1, 2),
                v.view(b, t, self.num_heads, self.head_dim).transpose(1, 2),
                is_causal=True).transpose(1, 2)
        return self.dense(o.reshape(b, t, self.hidden_size).to(x.dtype)), recon

    def _compressed_attention(self, q, k, v, want_recon: bool):
        """Training / uncached attention through the package ops, and the recon losses."""
        k_c, v_c, k_nope = self.compress(k, v)
        dt = v_c.dtype  # under autocast the parameters stay fp32: give the op one dtype
        w_r = self.v_restore.weight.to(dt)
        b_r = self.v_restore.bias.to(dt) if self.v_restore.bias is not None else None
        if self.latent_keys:
            o = compressed_kv_attention(q.to(dt), k[..., :self.rope_dims].to(dt), k_c, v_c,
                                        self.k_restore.weight.to(dt), w_r, b_r, causal=True,
                                        backend=self.backend)
        else:
            o = compressed_v_attention(q.to(dt), k.to(dt), v_c, w_r, b_r, causal=True,
                                       backend=self.backend)
        if not want_recon:
            return o, None
        recon = {"v": F.mse_loss(self.v_restore(v_c).float(), v.float())}
        if self.latent_keys:
            k_lat = v_c if self.joint_kv else k_c
            recon["k"] = F.mse_loss(self.k_restore(k_lat).float(), k_nope.float())
        return o, recon


# ---------------------------------------------------------------------------------------------
# Transformer layer


class GPTNeoXMLP(nn.Module):
    def __init__(self, hidden_size, intermediate_size):
        super().__init__()
        self.dense_h_to_4h = Linear(hidden_size, intermediate_size)
        self.dense_4h_to_h = Linear(intermediate_size, hidden_size)

    def forward(self, x):
        up = self.dense_h_to_4h  # exact (erf) GELU, applied by the decode kernel where it runs
        return self.dense_4h_to_h(decode_linear(x, up.weight, up.bias, gelu=True))


class GPTNeoXLayer(nn.Module):
    def __init__(self, config: VDProjConfig):
        super().__init__()
        self.use_parallel_residual = config.use_parallel_residual
        self.input_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.post_attention_layernorm = nn.LayerNorm(config.hidden_size,
                                                     eps=config.layer_norm_eps)
        self.attention = CompressedVAttention(
            config.hidden_size, config.num_heads, config.v_rank, config.rotary_pct,
            config.rotary_base, config.max_positions, config.attention_bias, config.v_bias,
            config.k_rank, config.joint_kv)
        self.mlp = GPTNeoXMLP(config.hidden_size, config.intermediate_size)

    def forward(self, x, cos, sin, cache=None, layer_idx=0, want_recon=False):
        attn, recon = self.attention(self.input_layernorm(x), cos, sin, cache, layer_idx,
                                     want_recon)
        if self.use_parallel_residual:  # x + attn(ln1(x)) + mlp(ln2(x))
            return x + attn + self.mlp(self.post_attention_layernorm(x)), recon
        x = x + attn
        return x + self.mlp(self.post_attention_layernorm(x)), recon
