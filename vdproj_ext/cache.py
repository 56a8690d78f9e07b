"""KV caches for incremental decoding with VDProjForCausalLM.

Two caches share one interface, so the model (and the decode benchmark) can swap them:

* `CompressedKVCache`: per layer a key cache (B, Tmax, H, D) and a compressed value cache
  (B, Tmax, R), in the layouts of SPEC section 2. `attend` runs
  `compressed_attn_with_kvcache`: the new values are compressed as they are written
  (compress-on-write) and restored after the softmax-weighted sum (restore-on-read).
* `KVCache`: the plain uncompressed cache, keys and values (B, H, Tmax, D) per layer, attended
  with torch's scaled_dot_product_attention. It is the baseline of the decode benchmark, so
  it takes the fastest path torch offers (no mask at all when every sequence has the same
  length, which is the case in the benchmark).

Interface (both):
    cache.seqlens        int32 (B,) on the cache's device: valid tokens per sequence
    cache.max_len        Tmax
    cache.nbytes         bytes of all buffers
    cache.advance(n)     seqlens += n (an int, or an int tensor (B,) per sequence)
    cache.reset()        seqlens = 0 (buffers are not cleared; invalid slots are never read)
    cache.attend(layer_idx, q, k, v, attn_module) -> o (B, T, H, D)
        q, k (B, T, H, D) with rotary applied, v (B, T, H*D). Writes the T new tokens of
        every sequence b at positions seqlens[b] .. seqlens[b] + T - 1 and attends over the
        first seqlens[b] + T positions, causal and bottom-right aligned. seqlens is NOT
        advanced here (the model advances it once after the last layer).
Ragged batches work through seqlens: sequences may hold different numbers of tokens; slots at
or beyond a sequence's length are never read.

`fold_v_compress(model)` returns an inference copy of a compressed model whose value
projection yields V_c directly (v_compress folded in); its layers call
`CompressedKVCache.attend_compressed(layer_idx, q, k, v_c, attn_module)` instead of attend.
"""
from __future__ import annotations

from typing import Union

import torch
import torch.nn.functional as F

from .ops import compressed_attn_with_kvcache

__all__ = ["CompressedKVCache", "KVCache", "CacheOverflowError", "kv_cache_nbytes",
           "FoldedVAttention", "fold_v_compress"]


def kv_cache_nbytes(num_layers, batch_size, max_len, num_heads, head_dim, v_rank,
                    element_size=4) -> int:
    """Bytes a cache of this shape holds (what `.nbytes` reports), without allocating it:
    per token and layer H*D keys plus v_rank compressed values, or H*D values when v_rank
    is None (the uncompressed KVCache)."""
    per_token = num_heads * head_dim + (num_heads * head_dim if v_rank is None else v_rank)
    return num_layers * batch_size * max_len * per_token * element_size


class CacheOverflowError(ValueError):
    """Raised when appending tokens would pass the cache's max_len (nothing is written)."""


def _check_positive_int(name, value, allow_zero=False):
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < 0 or (value == 0 and not allow_zero):
        raise ValueError(f"{name} must be {'>= 0' if allow_zero else '> 0'}, got {value}")


class _CacheBase:
    """Bookkeeping shared by both caches: lengths, overflow checks, sizes."""

    def __init__(self, num_layers, batch_size, max_len, num_heads, head_dim, *, dtype, device):
        _check_positive_int("num_layers", num_layers)
        _check_positive_int("batch_size", batch_size)
        _check_positive_int("max_len", max_len)
        _check_positive_int("num_heads", num_heads)
        _check_positive_int("head_dim", head_dim)
        dtype = torch.get_default_dtype() if dtype is None else dtype
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise TypeError(f"dtype must be a floating torch.dtype, got {dtype!r}")
        self.num_layers, self.batch_size, self.max_len = num_layers, batch_size, max_len
        self.num_heads, self.head_dim = num_heads, head_dim
        self.dtype, self.device = dtype, torch.device(device if device is not None else "cpu")
        self.seqlens = torch.zeros(batch_size, dtype=torch.int32, device=self.device)

    # -- lengths -------------------------------------------------------------------------------
    def advance(self, n: Union[int, torch.Tensor]) -> None:
        """seqlens += n, n an int or an integer tensor of shape (B,) (per sequence)."""
        if isinstance(n, torch.Tensor):
            if n.dtype.is_floating_point or n.dtype == torch.bool:
                raise TypeError(f"advance(n): n must be an integer tensor, got {n.dtype}")
            if n.dim() > 1 or (n.dim() == 1 and n.shape[0] != self.batch_size):
                raise ValueError(f"advance(n): n must be a scalar or of shape "
                                 f"({self.batch_size},), got {tuple(n.shape)}")
            n = n.to(device=self.device, dtype=torch.int32)
        elif isinstance(n, bool) or not isinstance(n, int):
            raise TypeError(f"advance(n): n must be an int or an int tensor, got {type(n).__name__}")
        new = self.seqlens + n
        lo, hi = (int(x) for x in torch.aminmax(new))
        if lo < 0 or hi > self.max_len:
            raise CacheOverflowError(
                f"{type(self).__name__}.advance({n if isinstance(n, int) else 'tensor'}) would "
                f"move seqlens to [{lo}, {hi}], outside [0, max_len={self.max_len}]")
        self.seqlens.copy_(new)

    def reset(self) -> None:
        self.seqlens.zero_()

    def _check_room(self, t_new: int) -> None:
        hi = int(self.seqlens.max()) if self.batch_size > 0 else 0
        if hi + t_new > self.max_len:
            raise CacheOverflowError(
                f"{type(self).__name__} overflow: appending {t_new} token(s) to a sequence that "
                f"already holds {hi} would exceed the cache's max_len={self.max_len}; nothing was "
                f"written. Create the cache with a larger max_len "
                f"(model.new_cache(batch_size, max_len)).")

    def _check_layer(self, layer_idx):
        if isinstance(layer_idx, bool) or not isinstance(layer_idx, int) or \
                not 0 <= layer_idx < self.num_layers:
            raise IndexError(f"layer_idx must be an int in [0, {self.num_layers}), got {layer_idx!r}")

    def _check_qkv(self, q, k, v):
        expect = (self.batch_size, q.shape[1] if q.dim() == 4 else -1, self.num_heads,
                  self.head_dim)
        if q.dim() != 4 or tuple(q.shape) != expect:
            raise ValueError(f"q must have shape (B={self.batch_size}, T, H={self.num_heads}, "
                             f"D={self.head_dim}) for this cache, got {tuple(q.shape)}")
        if k is None or v is None:
            raise ValueError("k and v (the new tokens) are required by cache.attend")
        if tuple(k.shape) != tuple(q.shape):
            raise ValueError(f"k must have shape {tuple(q.shape)} like q, got {tuple(k.shape)}")
        hd = self.num_heads * self.head_dim
        if tuple(v.shape) != (q.shape[0], q.shape[1], hd):
            raise ValueError(f"v must have shape {(q.shape[0], q.shape[1], hd)}, "
                             f"got {tuple(v.shape)}")

    @property
    def nbytes(self) -> int:
        """Bytes of all key/value buffers (the (B,) seqlens bookkeeping is not counted)."""
        return sum(t.numel() * t.element_size() for t in self._buffers())

    def bytes_per_token(self) -> int:
        """Cache bytes one token occupies over all layers."""
        return sum(t.numel() * t.element_size() for t in self._buffers()) // \
            (self.batch_size * self.max_len)

    def __repr__(self):
        return (f"{type(self).__name__}(layers={self.num_layers}, batch={self.batch_size}, "
                f"max_len={self.max_len}, dtype={self.dtype}, device={self.device}, "
                f"nbytes={self.nbytes})")


class CompressedKVCache(_CacheBase):
    """Key cache (B, Tmax, H, D) and compressed value cache (B, Tmax, R) per layer."""

    def __init__(self, num_layers, batch_size, max_len, num_heads, head_dim, v_rank, *,
                 dtype=None, device=None, backend=None):
        super().__init__(num_layers, batch_size, max_len, num_heads, head_dim, dtype=dtype,
                         device=device)
        _check_positive_int("v_rank", v_rank)
        # backend None: follow the attention module's `backend` attribute (model.set_backend).
        self.v_rank, self.backend = v_rank, backend
        shape_k = (batch_size, max_len, num_heads, head_dim)
        self.k_cache = [torch.zeros(shape_k, dtype=self.dtype, device=self.device)
                        for _ in range(num_layers)]
        self.vc_cache = [torch.zeros((batch_size, max_len, v_rank), dtype=self.dtype,
                                     device=self.device) for _ in range(num_layers)]

    def _buffers(self):
        return self.k_cache + self.vc_cache

    def attend(self, layer_idx, q, k, v, attn_module):
        self._check_layer(layer_idx)
        self._check_qkv(q, k, v)
        self._check_room(k.shape[1])
        comp, rest = attn_module.v_compress, attn_module.v_restore
        return compressed_attn_with_kvcache(
            q, self.k_cache[layer_idx], self.vc_cache[layer_idx], rest.weight, rest.bias,
            k=k, v=v, w_c=comp.weight, b_c=comp.bias, cache_seqlens=self.seqlens, causal=True,
            softmax_scale=getattr(attn_module, "softmax_scale", None),
            backend=self.backend or getattr(attn_module, "backend", "auto"))


    def attend_compressed(self, layer_idx, q, k, v_c, attn_module):
        """attend() for a layer whose value projection already yields V_c (see
        fold_v_compress): writes k and v_c (B, T, R) as given, then restore-on-read attention
        over the first seqlens[b] + T positions."""
        self._check_layer(layer_idx)
        batch, t_new = q.shape[0], q.shape[1]
        if tuple(k.shape) != tuple(q.shape) or q.dim() != 4 or \
                tuple(q.shape[2:]) != (self.num_heads, self.head_dim) or batch != self.batch_size:
            raise ValueError(f"q and k must have shape (B={self.batch_size}, T, "
                             f"H={self.num_heads}, D={self.head_dim}), got {tuple(q.shape)} and "
                             f"{tuple(k.shape)}")
        if tuple(v_c.shape) != (batch, t_new, self.v_rank):
            raise ValueError(f"v_c must have shape {(batch, t_new, self.v_rank)}, got "
                             f"{tuple(v_c.shape)}")
        self._check_room(t_new)
        pos = self.seqlens.long().unsqueeze(1) + torch.arange(t_new, device=q.device)
        rows = torch.arange(batch, device=q.device).unsqueeze(1)
        self.k_cache[layer_idx][rows, pos] = k.to(self.dtype)
        self.vc_cache[layer_idx][rows, pos] = v_c.to(self.dtype)
        rest = attn_module.v_restore
        # k=None: the op only reads; Tk = seqlens + T keeps the bottom-right causal alignment.
        return compressed_attn_with_kvcache(
            q, self.k_cache[layer_idx], self.vc_cache[layer_idx], rest.weight, rest.bias,
            cache_seqlens=self.seqlens + t_new, causal=True,
            softmax_scale=getattr(attn_module, "softmax_scale", None),
            backend=self.backend or getattr(attn_module, "backend", "auto"))


class KVCache(_CacheBase):
    """Uncompressed keys and values, stored (B, H, Tmax, D) per layer for SDPA.

    `k_cache[l]` and `v_cache[l]` are (B, Tmax, H, D) views of that storage, like the
    compressed cache's k_cache.

    Slots past a sequence's length are masked, not skipped, when a batch is ragged: they must
    hold finite values (they do: buffers start at zero and only the model writes them), since
    a NaN key survives masking inside SDPA. The compressed cache never reads them at all.
    """

    def __init__(self, num_layers, batch_size, max_len, num_heads, head_dim, *, dtype=None,
                 device=None):
        super().__init__(num_layers, batch_size, max_len, num_heads, head_dim, dtype=dtype,
                         device=device)
        # (B, H, Tmax, D): each head's keys are contiguous rows, which SDPA reads fastest.
        shape = (batch_size, num_heads, max_len, head_dim)
        self._k = [torch.zeros(shape, dtype=self.dtype, device=self.device)
                   for _ in range(num_layers)]
        self._v = [torch.zeros(shape, dtype=self.dtype, device=self.device)
                   for _ in range(num_layers)]
        self.k_cache = [t.transpose(1, 2) for t in self._k]
        self.v_cache = [t.transpose(1, 2) for t in self._v]

    def _buffers(self):
        return self._k + self._v

    @torch.no_grad()
    def attend(self, layer_idx, q, k, v, attn_module=None):
        self._check_layer(layer_idx)
        self._check_qkv(q, k, v)
        batch, t_new, heads, head_dim = q.shape
        self._check_room(t_new)
        kc, vc = self._k[layer_idx], self._v[layer_idx]
        k_new = k.transpose(1, 2).to(kc.dtype)                     # (B, H, T, D)
        v_new = v.view(batch, t_new, heads, head_dim).transpose(1, 2).to(vc.dtype)
        lengths = self.seqlens.tolist()
        start, uniform = lengths[0], all(n == lengths[0] for n in lengths)
        scale = getattr(attn_module, "softmax_scale", None)
        q_ = q.transpose(1, 2)
        if uniform:
            end = start + t_new
            kc[:, :, start:end] = k_new
            vc[:, :, start:end] = v_new
            keys, values = kc[:, :, :end], vc[:, :, :end]
            if t_new == 1 or start == 0:
                # One query sees every key; or prefill, where top-left == bottom-right causal.
                o = F.scaled_dot_product_attention(q_, keys, values, is_causal=t_new > 1,
                                                   scale=scale)
            else:
                mask = torch.ones(t_new, end, dtype=torch.bool, device=q.device).tril(start)
                o = F.scaled_dot_product_attention(q_, keys, values, attn_mask=mask,
                                                   scale=scale)
        else:
            # Ragged: scatter the new tokens at each sequence's own offset, then mask
            # per sequence (key j visible to new token i of sequence b iff j <= seqlens[b] + i).
            pos = self.seqlens.long().unsqueeze(1) + torch.arange(t_new, device=q.device)
            rows = torch.arange(batch, device=q.device).unsqueeze(1)
            self.k_cache[layer_idx][rows, pos] = k.to(kc.dtype)
            self.v_cache[layer_idx][rows, pos] = v_new.transpose(1, 2)
            end = max(lengths) + t_new
            j = torch.arange(end, device=q.device)
            mask = (j.view(1, 1, end) <= pos.unsqueeze(-1)).unsqueeze(1)  # (B, 1, T, end)
            o = F.scaled_dot_product_attention(q_, kc[:, :, :end], vc[:, :, :end],
                                               attn_mask=mask, scale=scale)
        return o.transpose(1, 2)


# ---------------------------------------------------------------------------------------------
# Inference: folding v_compress into the value projection


class FoldedVAttention(torch.nn.Module):
    """Inference-only form of a compressed CompressedVAttention: v_compress folded into the
    value projection, since w_c (W_v x + b_v) + b_c = (w_c W_v) x + (w_c b_v + b_c). One Linear
    maps x to q, k (GPT-NeoX's per-head layout) and V_c; V (H*D wide) is never computed, and
    the cache stores V_c as given (CompressedKVCache.attend_compressed).

    Measured in bench/bench_decode.py (pythia-70m shape, CPU float32): about 3% more decode
    tokens/s than the unfolded model. A snapshot: later changes to the source module's
    weights are not seen (fold again after training).
    """

    def __init__(self, attn):
        super().__init__()
        if not getattr(attn, "compressed", False):
            raise ValueError("only a compressed attention layer (v_rank set) can be folded")
        h, d, hd = attn.num_heads, attn.head_dim, attn.hidden_size
        self.num_heads, self.head_dim, self.hidden_size = h, d, hd
        self.v_rank, self.backend = attn.v_rank, attn.backend
        qkv = attn.query_key_value
        w = qkv.weight.detach().view(h, 3, d, -1)
        w_c = attn.v_compress.weight.detach()
        w_v = w[:, 2].reshape(hd, -1)
        weight = torch.cat((w[:, :2].reshape(2 * hd, -1), w_c @ w_v))
        bias = None
        if qkv.bias is not None or attn.v_compress.bias is not None:
            b = (qkv.bias.detach().view(h, 3, d) if qkv.bias is not None
                 else w.new_zeros(h, 3, d))
            b_vc = w_c @ b[:, 2].reshape(hd)
            if attn.v_compress.bias is not None:
                b_vc = b_vc + attn.v_compress.bias.detach()
            bias = torch.cat((b[:, :2].reshape(2 * hd), b_vc))
        from .model import Linear
        self.qk_vc = Linear(weight.shape[1], weight.shape[0], bias=bias is not None,
                            device=weight.device, dtype=weight.dtype)
        with torch.no_grad():
            self.qk_vc.weight.copy_(weight)
            if bias is not None:
                self.qk_vc.bias.copy_(bias)
        self.v_restore, self.dense = attn.v_restore, attn.dense

    compressed = True

    def forward(self, x, cos, sin, cache=None, layer_idx: int = 0, want_recon: bool = False):
        from .model import apply_rotary
        from .ops import compressed_v_attention
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
    import copy
    if model.config.v_rank is None:
        raise ValueError("fold_v_compress needs a compressed model (config.v_rank is set)")
    out = model if inplace else copy.deepcopy(model)
    for layer in out.gpt_neox.layers:
        if not isinstance(layer.attention, FoldedVAttention):
            layer.attention = FoldedVAttention(layer.attention)
    return out.eval()
