"""KV caches for incremental decoding with VDProjForCausalLM.

Three caches share one interface, so the model (and the decode benchmark) can swap them:

* `CompressedKVCache`: per layer a key cache (B, Tmax, H, D) and a compressed value cache
  (B, Tmax, R), in the layouts of SPEC section 2. `attend` runs
  `compressed_attn_with_kvcache`: the new values are compressed as they are written
  (compress-on-write) and restored after the softmax-weighted sum (restore-on-read).
* `LatentKVCache`: latent keys as well (SPEC 3b): per layer the rotary keys (B, Tmax, H, Dr),
  the keys' latent K_c (B, Tmax, Rk) (none with the joint latent) and the value latent
  (B, Tmax, Rv). `attend` runs `compressed_kv_attn_with_kvcache`, which compresses the new
  tokens' k_nope and v as it writes them.
* `KVCache`: the plain uncompressed cache, keys and values (B, H, Tmax, D) per layer, attended
  with torch's scaled_dot_product_attention. It is the baseline of the decode benchmark, so
  it takes the fastest path torch offers (no mask at all when every sequence has the same
  length, which is the case in the benchmark).

Quantized caches (SPEC 3c): with cache_dtype torch.int8 or torch.float8_e4m3fn every cache
tensor of every layer is stored in that dtype, with one float32 absmax scale per stored row
next to it: (B, Tmax, H) for the per-head keys (k_cache, krope_cache, and KVCache's values),
(B, Tmax) for the latents (kc_cache, vc_cache). The compressed caches hand the scales to the
ops, whose kernels dequantize inside the attention. KVCache, the baseline, is unfused: it
dequantizes the valid prefix to the model's dtype and then runs SDPA, so its quantized form
saves memory but no time. A rotary-key cache with Dr = 0 holds nothing and stays in the
model's dtype, without scales.

Interface (all three):
    cache.seqlens        int32 (B,) on the cache's device: valid tokens per sequence
    cache.max_len        Tmax
    cache.cache_dtype    None (stored in dtype), torch.int8 or torch.float8_e4m3fn
    cache.nbytes         bytes of all buffers and scales
    cache.buffers()      the cached tensors of all layers, (B, Tmax, ...) each
    cache.scales()       their float32 scales (empty for a float cache)
    cache.advance(n)     seqlens += n (an int, or an int tensor (B,) per sequence)
    cache.reset()        seqlens = 0 (buffers are not cleared; invalid slots are never read)
    cache.new_token_positions(T) -> (B, T) positions seqlens[b] + 0 .. T-1
    cache.attend(layer_idx, q, k, v, attn_module) -> o (B, T, H, D)
        q, k (B, T, H, D) with rotary applied, v (B, T, H*D). Writes the T new tokens of
        every sequence b at positions seqlens[b] .. seqlens[b] + T - 1 and attends over the
        first seqlens[b] + T positions, causal and bottom-right aligned. seqlens is NOT
        advanced here (the model advances it once after the last layer).
Ragged batches work through seqlens: sequences may hold different numbers of tokens; slots at
or beyond a sequence's length are never read.

A folded model (folding.py) calls `attend_compressed` instead, which takes the latents (and
only the rotary keys, with latent keys) as the fused projection made them.

The compressed caches reach the ops through `ops.kvcache.attend_values_cache` and
`ops.latent_kvcache.attend_latent_cache`: the public functions, less their Python checks on the
CPU kernels (a cache's own tensors are valid by construction, the step's are checked here, and
the kernels check everything again in C++).
"""
from __future__ import annotations

from typing import Union

import torch
import torch.nn.functional as F

from ..ops.backend import inference_only
from ..ops.kvcache import attend_values_cache
from ..ops.latent_kvcache import attend_latent_cache
from ..ops.quant import QUANT_DTYPES, dequantize, write_rows, write_rows_at

SCALE_BYTES = 4  # one float32 per stored row of a quantized cache


def check_cache_dtype(cache_dtype) -> None:
    """cache_dtype is None (stored in the model's dtype) or one of the quantized dtypes."""
    if cache_dtype is None or (isinstance(cache_dtype, torch.dtype)
                               and cache_dtype in QUANT_DTYPES):
        return
    raise ValueError(f"cache_dtype must be None (stored in the model's dtype), torch.int8 or "
                     f"torch.float8_e4m3fn, got {cache_dtype!r}")


def _scale_rows_per_token(num_heads, v_rank, config) -> int:
    """Scales one token holds per layer in a quantized cache: one per head of every per-head
    key or value tensor, one per latent."""
    if config is not None and config.latent_keys:
        rope_rows = config.num_heads if config.rope_dims > 0 else 0  # Dr = 0: nothing stored
        return rope_rows + (1 if config.joint_kv else 2)
    if config is not None:
        num_heads, v_rank = config.num_heads, config.v_rank
    return 2 * num_heads if v_rank is None else num_heads + 1


def kv_cache_nbytes(num_layers, batch_size, max_len, num_heads, head_dim, v_rank,
                    element_size=4, *, config=None, cache_dtype=None) -> int:
    """Bytes a cache of this shape holds (what `.nbytes` reports), without allocating it:
    per token and layer H*D keys plus v_rank compressed values, or H*D values when v_rank
    is None (the uncompressed KVCache). With config (a VDProjConfig) the per-token count is
    config.cache_values_per_token() instead, which knows latent keys; the other shape
    arguments are then ignored but batch_size, max_len and element_size. With a quantized
    cache_dtype (torch.int8, torch.float8_e4m3fn) element_size is that dtype's (1) and the
    float32 scales are counted: per token and layer 4 bytes per head of each per-head tensor
    and per latent (pythia-70m-kv: 640 + 4 * (8 + 2) = 680 bytes)."""
    check_cache_dtype(cache_dtype)
    if config is not None:
        per_token, num_layers = config.cache_values_per_token(), config.num_layers
    else:
        per_token = num_heads * head_dim + (num_heads * head_dim if v_rank is None else v_rank)
    per_token_bytes = per_token * element_size
    if cache_dtype is not None:
        per_token_bytes = (per_token * torch.empty((), dtype=cache_dtype).element_size()
                           + SCALE_BYTES * _scale_rows_per_token(num_heads, v_rank, config))
    return num_layers * batch_size * max_len * per_token_bytes


def _describe_layout(layout: tuple) -> str:
    if layout[0] == "full":
        return "full keys and values"
    if layout[0] == "values":
        return f"full keys and a v_rank={layout[1]} value latent"
    _, v_rank, k_rank, rope = layout
    keys = (f"keys sharing the v_rank={v_rank} latent (joint)" if k_rank is None
            else f"a k_rank={k_rank} key latent and a v_rank={v_rank} value latent")
    return f"{rope} rotary dims per head, {keys}"


class CacheOverflowError(ValueError):
    """Raised when appending tokens would pass the cache's max_len (nothing is written)."""


def _check_positive_int(name, value, allow_zero=False):
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < 0 or (value == 0 and not allow_zero):
        raise ValueError(f"{name} must be {'>= 0' if allow_zero else '> 0'}, got {value}")


class _StepPlan:
    """One step's placement of T new tokens in a batch whose sequences hold `seqlens` tokens
    (see _CacheBase._step_plan): uniform (every sequence equally long: one slice) or ragged
    (positions (B, T) = seqlens[b] + 0 .. T-1, and slots = (rows, positions), an index of a
    (B, Tmax, ...) buffer), the longest length, and lengths_after = seqlens + T, the
    cache_seqlens of an op that only reads."""

    def __init__(self, seqlens: torch.Tensor, t_new: int):
        self.seqlens, self.version, self.t_new = seqlens, seqlens._version, t_new
        lengths = seqlens.tolist()
        self.start, self.longest = lengths[0], max(lengths)
        self.uniform = all(n == self.start for n in lengths)
        self.lengths_after = seqlens + t_new
        self.positions = self.slots = None
        if not self.uniform:
            self.positions = seqlens.long().unsqueeze(1) + torch.arange(t_new,
                                                                        device=seqlens.device)
            rows = torch.arange(len(lengths), device=seqlens.device).unsqueeze(1)
            self.slots = (rows, self.positions)


class _CacheBase:
    """Bookkeeping shared by the three caches: lengths, checks of the new tokens, sizes."""

    def __init__(self, num_layers, batch_size, max_len, num_heads, head_dim, *, dtype, device,
                 cache_dtype=None):
        check_cache_dtype(cache_dtype)
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
        self.cache_dtype = cache_dtype
        self.seqlens = torch.zeros(batch_size, dtype=torch.int32, device=self.device)
        self._plan = None  # the current decode step's _StepPlan

    def _allocate(self, *row_shape, quantize=True):
        """Per layer, a zero cache tensor (B, Tmax, *row_shape) stored in cache_dtype (dtype
        when it is None or quantize is False), and its scales (B, Tmax, *row_shape[:-1]),
        float32 ones (the scale of an all-zero row), or None for a float cache."""
        return self._allocate_shaped((self.batch_size, self.max_len, *row_shape), quantize)

    def _allocate_shaped(self, shape, quantize=True):
        """_allocate for any layout: tensors of `shape`, scales of shape[:-1]."""
        quantized = self.cache_dtype is not None and quantize
        stored = self.cache_dtype if quantized else self.dtype
        tensors = [torch.zeros(shape, dtype=stored, device=self.device)
                   for _ in range(self.num_layers)]
        scales = [torch.ones(shape[:-1], dtype=torch.float32, device=self.device)
                  if quantized else None for _ in range(self.num_layers)]
        return tensors, scales

    def scales(self):
        """The float32 scales of the quantized cache tensors of all layers (empty for a
        float cache)."""
        return [scale for per_layer in self._scale_lists() for scale in per_layer
                if scale is not None]

    def _scale_lists(self):
        """Each cache tensor's per-layer list of scales (entries None when not quantized)."""
        raise NotImplementedError

    def _buffer_lists(self):
        """Each cache tensor's per-layer list, in the order of _scale_lists (entries None for
        a tensor this layout does not have)."""
        raise NotImplementedError

    def stored_tensors(self):
        """(tensor (B, Tmax, ...), its scales or None) for every cache tensor of every layer:
        what a benchmark fills (quant.write_rows(tensor, scale, index, values))."""
        return [(t, s) for ts, ss in zip(self._buffer_lists(), self._scale_lists())
                for t, s in zip(ts, ss) if t is not None]

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
            raise TypeError(f"advance(n): n must be an int or an int tensor, "
                            f"got {type(n).__name__}")
        new = self.seqlens + n
        lo, hi = (int(x) for x in torch.aminmax(new))
        if lo < 0 or hi > self.max_len:
            raise CacheOverflowError(
                f"{type(self).__name__}.advance({n if isinstance(n, int) else 'tensor'}) would "
                f"move seqlens to [{lo}, {hi}], outside [0, max_len={self.max_len}]")
        self.seqlens.copy_(new)

    def reset(self) -> None:
        self.seqlens.zero_()

    def new_token_positions(self, t_new: int) -> torch.Tensor:
        """(B, T) positions where T new tokens go: seqlens[b] + 0 .. T-1."""
        return self.seqlens.long().unsqueeze(1) + torch.arange(t_new, device=self.device)

    def _step_plan(self, t_new: int) -> "_StepPlan":
        """Where the T new tokens go and the lengths after them, computed once per decode step
        and shared by all layers (each layer's own tolist, max and add cost a few microseconds
        apiece: several percent of a step at batch 1 and a short context). Recomputed whenever
        seqlens was written in place (its version counter) or replaced, or T changes."""
        plan = self._plan
        if (plan is None or plan.t_new != t_new or plan.seqlens is not self.seqlens
                or plan.version != self.seqlens._version):
            plan = self._plan = _StepPlan(self.seqlens, t_new)
        return plan

    def _write_new_tokens(self, buffer, scale, values, plan):
        """buffer (B, Tmax, ...) at seqlens[b] + 0 .. T-1 = values (B, T, ...); quantized with
        their own scales (SPEC 3c) when the buffer is (scale not None: the compiled
        quantize_into on the CPU)."""
        if scale is not None:
            write_rows_at(buffer, scale, values, self.seqlens)
        elif plan.uniform:  # one strided copy (an index_put would cost more)
            buffer.narrow(1, plan.start, plan.t_new).copy_(values)
        else:
            write_rows(buffer, scale, plan.slots, values)

    # -- checks of the T new tokens, before anything is written ---------------------------------
    def layout(self) -> tuple:
        """What this cache stores per token, as a layer's cache_layout describes it
        (CompressedVAttention)."""
        raise NotImplementedError

    def check_fits(self, layer_idx, attn_module) -> None:
        """The layer (CompressedVAttention or its folded form) must cache what this cache
        stores: another layout would be read wrongly (a plain KVCache under a compressed
        layer skips its pairs) or not at all. The layers call it before attending; attend()
        itself takes any module with the weights it reads."""
        need = attn_module.cache_layout  # fixed at construction: nothing derived per step
        if need != self.layout():
            raise ValueError(
                f"cache: this {type(self).__name__} stores {_describe_layout(self.layout())}, "
                f"but the attention layer (layer_idx={layer_idx}) caches "
                f"{_describe_layout(need)}; create the cache with the model's "
                f"new_cache(batch_size, max_len)")

    def _check_new_tokens(self, layer_idx, q, k, values, value_width, value_name,
                          model_dtype=False):
        """Checks of cache.attend's arguments: k like q, values (B, T, value_width). Returns
        the step's _StepPlan."""
        return self._check_step(layer_idx, q, {"k": (k, (self.num_heads, self.head_dim)),
                                               value_name: (values, (value_width,))},
                                model_dtype)

    def _check_step(self, layer_idx, q, new: dict, model_dtype=False):
        """layer_idx, q (B, T, H, D), the new tokens' tensors (name -> (tensor, its shape
        after (B, T))) and the room left, before anything is written. Returns the step's
        _StepPlan. model_dtype: q and the new tokens must also have the cache's dtype, for a
        caller that writes them itself before the op checks anything (attend_compressed: a
        copy into the cache would otherwise convert them silently, and the op then refuse)."""
        if isinstance(layer_idx, bool) or not isinstance(layer_idx, int) or \
                not 0 <= layer_idx < self.num_layers:
            raise IndexError(f"layer_idx must be an int in [0, {self.num_layers}), "
                             f"got {layer_idx!r}")
        expect = (self.batch_size, q.shape[1] if q.dim() == 4 else -1, self.num_heads,
                  self.head_dim)
        if q.dim() != 4 or tuple(q.shape) != expect:
            raise ValueError(f"q must have shape (B={self.batch_size}, T, H={self.num_heads}, "
                             f"D={self.head_dim}) for this cache, got {tuple(q.shape)}")
        for name, (t, tail) in new.items():
            if t is None:
                raise ValueError(f"{name} (the new tokens) is required by cache.attend")
            if tuple(t.shape) != (*q.shape[:2], *tail):
                raise ValueError(f"{name} must have shape {(*q.shape[:2], *tail)} (B, T like "
                                 f"q), got {tuple(t.shape)}")
        if model_dtype:
            for name, t in [("q", q)] + [(n, t) for n, (t, _) in new.items()]:
                if t.dtype != self.dtype:
                    raise TypeError(f"{name} must have dtype {self.dtype}, the dtype this cache "
                                    f"was created for, got {t.dtype}; nothing was written. "
                                    f"Create the cache with the model's new_cache(batch_size, "
                                    f"max_len) after casting the model")
        plan = self._step_plan(q.shape[1])
        hi = plan.longest
        if hi + q.shape[1] > self.max_len:
            raise CacheOverflowError(
                f"{type(self).__name__} overflow: appending {q.shape[1]} token(s) to a sequence "
                f"that already holds {hi} would exceed the cache's max_len={self.max_len}; "
                f"nothing was written. Create the cache with a larger max_len "
                f"(model.new_cache(batch_size, max_len)).")
        return plan

    # -- sizes -----------------------------------------------------------------------------------
    @property
    def nbytes(self) -> int:
        """Bytes of all key/value buffers and their scales (the (B,) seqlens bookkeeping is
        not counted)."""
        return sum(t.numel() * t.element_size() for t in self.buffers() + self.scales())

    def bytes_per_token(self) -> int:
        """Cache bytes one token occupies over all layers."""
        return self.nbytes // (self.batch_size * self.max_len)

    def __repr__(self):
        return (f"{type(self).__name__}(layers={self.num_layers}, batch={self.batch_size}, "
                f"max_len={self.max_len}, dtype={self.dtype}, cache_dtype="
                f"{self.cache_dtype or self.dtype}, device={self.device}, nbytes={self.nbytes})")


class CompressedKVCache(_CacheBase):
    """Key cache (B, Tmax, H, D) and compressed value cache (B, Tmax, R) per layer; quantized,
    with k_scale (B, Tmax, H) and vc_scale (B, Tmax) per layer (None entries otherwise)."""

    def __init__(self, num_layers, batch_size, max_len, num_heads, head_dim, v_rank, *,
                 dtype=None, device=None, cache_dtype=None):
        super().__init__(num_layers, batch_size, max_len, num_heads, head_dim, dtype=dtype,
                         device=device, cache_dtype=cache_dtype)
        _check_positive_int("v_rank", v_rank)
        self.v_rank = v_rank
        self.k_cache, self.k_scale = self._allocate(num_heads, head_dim)
        self.vc_cache, self.vc_scale = self._allocate(v_rank)

    def buffers(self):
        return self.k_cache + self.vc_cache

    def _scale_lists(self):
        return [self.k_scale, self.vc_scale]

    def _buffer_lists(self):
        return [self.k_cache, self.vc_cache]

    def layout(self) -> tuple:
        return ("values", self.v_rank)

    def attend(self, layer_idx, q, k, v, attn_module):
        """The op compresses v with attn_module.v_compress as it writes it (and quantizes the
        new rows of a quantized cache)."""
        self._check_new_tokens(layer_idx, q, k, v, self.num_heads * self.head_dim, "v")
        comp, rest = attn_module.v_compress, attn_module.v_restore
        return attend_values_cache(
            q, self.k_cache[layer_idx], self.vc_cache[layer_idx], rest.weight, rest.bias, k, v,
            comp.weight, comp.bias, self.seqlens, attn_module.backend, self.k_scale[layer_idx],
            self.vc_scale[layer_idx])

    def attend_compressed(self, layer_idx, q, k, v_c, attn_module):
        """attend() for a layer whose value projection already yields V_c (B, T, R) (see
        folding.py): writes k and v_c as given (quantized as SPEC 3c says, like the op would),
        then restore-on-read attention over the first seqlens[b] + T positions."""
        plan = self._check_new_tokens(layer_idx, q, k, v_c, self.v_rank, "v_c",
                                      model_dtype=True)
        k_scale, vc_scale = self.k_scale[layer_idx], self.vc_scale[layer_idx]
        self._write_new_tokens(self.k_cache[layer_idx], k_scale, k, plan)
        self._write_new_tokens(self.vc_cache[layer_idx], vc_scale, v_c, plan)
        rest = attn_module.v_restore
        # k=None: the op only reads; Tk = seqlens + T keeps the bottom-right causal alignment.
        return attend_values_cache(
            q, self.k_cache[layer_idx], self.vc_cache[layer_idx], rest.weight, rest.bias, None,
            None, None, None, plan.lengths_after, attn_module.backend, k_scale, vc_scale)


class LatentKVCache(_CacheBase):
    """Latent keys and values (SPEC 3b), per layer: krope_cache (B, Tmax, H, Dr), kc_cache
    (B, Tmax, k_rank) and vc_cache (B, Tmax, v_rank). k_rank=None is the joint latent: no
    kc_cache (its entries are None), vc_cache holds [k_nope | v]'s latent. Quantized, with
    krope_scale (B, Tmax, H), kc_scale and vc_scale (B, Tmax) per layer."""

    def __init__(self, num_layers, batch_size, max_len, num_heads, head_dim, v_rank, *,
                 rope_dims, k_rank=None, dtype=None, device=None, cache_dtype=None):
        super().__init__(num_layers, batch_size, max_len, num_heads, head_dim, dtype=dtype,
                         device=device, cache_dtype=cache_dtype)
        _check_positive_int("v_rank", v_rank)
        _check_positive_int("rope_dims", rope_dims, allow_zero=True)
        if rope_dims >= head_dim:
            raise ValueError(f"rope_dims must be < head_dim={head_dim} (latent keys need "
                             f"non-rotary dims), got {rope_dims}")
        if k_rank is not None:
            _check_positive_int("k_rank", k_rank)
        self.v_rank, self.k_rank, self.rope_dims = v_rank, k_rank, rope_dims
        # Dr = 0 stores nothing: that (empty) tensor stays in dtype, without scales.
        self.krope_cache, self.krope_scale = self._allocate(num_heads, rope_dims,
                                                            quantize=rope_dims > 0)
        if k_rank is not None:
            self.kc_cache, self.kc_scale = self._allocate(k_rank)
        else:
            self.kc_cache, self.kc_scale = [None] * num_layers, [None] * num_layers
        self.vc_cache, self.vc_scale = self._allocate(v_rank)

    @property
    def joint(self) -> bool:
        return self.k_rank is None

    def buffers(self):
        return self.krope_cache + [t for t in self.kc_cache if t is not None] + self.vc_cache

    def _scale_lists(self):
        return [self.krope_scale, self.kc_scale, self.vc_scale]

    def _buffer_lists(self):
        return [self.krope_cache, self.kc_cache, self.vc_cache]

    def _layer_scales(self, layer_idx) -> dict:
        return dict(krope_scale=self.krope_scale[layer_idx], kc_scale=self.kc_scale[layer_idx],
                    vc_scale=self.vc_scale[layer_idx])

    def layout(self) -> tuple:
        return ("latent", self.v_rank, self.k_rank, self.rope_dims)

    def attend(self, layer_idx, q, k, v, attn_module):
        """The op compresses k_nope with attn_module.k_compress (joint: [k_nope | v] with
        v_compress) and v with v_compress as it writes them (quantized, for a quantized
        cache)."""
        self._check_new_tokens(layer_idx, q, k, v, self.num_heads * self.head_dim, "v")
        comp, rest = attn_module.v_compress, attn_module.v_restore
        k_comp = None if self.joint else attn_module.k_compress
        scales = self._layer_scales(layer_idx)
        return attend_latent_cache(
            q, self.krope_cache[layer_idx], self.kc_cache[layer_idx], self.vc_cache[layer_idx],
            attn_module.k_restore.weight, rest.weight, rest.bias, k, v,
            k_comp.weight if k_comp is not None else None,
            k_comp.bias if k_comp is not None else None, comp.weight, comp.bias, self.seqlens,
            attn_module.backend, scales["krope_scale"], scales["kc_scale"], scales["vc_scale"])

    def attend_compressed(self, layer_idx, q, k_rope, latents, attn_module):
        """attend() for a folded layer (folding.py): k_rope (B, T, H, Dr) and latents =
        (K_c (B, T, k_rank) or None when joint, V_c (B, T, v_rank)) are written as given
        (quantized as SPEC 3c says, like the op would), then the op attends over the first
        seqlens[b] + T positions."""
        k_c, v_c = latents
        if self.joint and k_c is not None:
            raise ValueError("k_c must be None: this cache holds a joint latent (k_rank=None)")
        new = {"k_rope": (k_rope, (self.num_heads, self.rope_dims)),
               "v_c": (v_c, (self.v_rank,))}
        if not self.joint:
            new["k_c"] = (k_c, (self.k_rank,))
        plan = self._check_step(layer_idx, q, new, model_dtype=True)
        scales = self._layer_scales(layer_idx)
        self._write_new_tokens(self.krope_cache[layer_idx], scales["krope_scale"], k_rope, plan)
        if k_c is not None:
            self._write_new_tokens(self.kc_cache[layer_idx], scales["kc_scale"], k_c, plan)
        self._write_new_tokens(self.vc_cache[layer_idx], scales["vc_scale"], v_c, plan)
        rest = attn_module.v_restore
        return attend_latent_cache(
            q, self.krope_cache[layer_idx], self.kc_cache[layer_idx], self.vc_cache[layer_idx],
            attn_module.k_restore.weight, rest.weight, rest.bias, None, None, None, None, None,
            None, plan.lengths_after, attn_module.backend, scales["krope_scale"],
            scales["kc_scale"], scales["vc_scale"])


class KVCache(_CacheBase):
    """Uncompressed keys and values, stored (B, H, Tmax, D) per layer for SDPA.

    `k_cache[l]` and `v_cache[l]` are (B, Tmax, H, D) views of that storage, like the
    compressed cache's k_cache; quantized, `k_scale[l]` and `v_scale[l]` are (B, Tmax, H)
    views of (B, H, Tmax) scales: one per token and head.

    Slots past a sequence's length are masked, not skipped, when a batch is ragged: they must
    hold finite values (they do: buffers start at zero and only the model writes them), since
    a NaN key survives masking inside SDPA. The compressed cache never reads them at all.

    A quantized KVCache is the unfused baseline: each step dequantizes the valid prefix of
    the layer to the model's dtype and runs SDPA on that copy. It is smaller in memory, not
    faster (the dequantized copy costs more traffic than the float cache's read).
    """

    def __init__(self, num_layers, batch_size, max_len, num_heads, head_dim, *, dtype=None,
                 device=None, cache_dtype=None):
        super().__init__(num_layers, batch_size, max_len, num_heads, head_dim, dtype=dtype,
                         device=device, cache_dtype=cache_dtype)
        # (B, H, Tmax, D): each head's keys are contiguous rows, which SDPA reads fastest.
        shape = (batch_size, num_heads, max_len, head_dim)
        self._k, self._k_s = self._allocate_shaped(shape)
        self._v, self._v_s = self._allocate_shaped(shape)
        self.k_cache = [t.transpose(1, 2) for t in self._k]
        self.v_cache = [t.transpose(1, 2) for t in self._v]
        self.k_scale = [s.transpose(1, 2) if s is not None else None for s in self._k_s]
        self.v_scale = [s.transpose(1, 2) if s is not None else None for s in self._v_s]

    def buffers(self):
        return self.k_cache + self.v_cache  # the (B, Tmax, H, D) views

    def _scale_lists(self):
        return [self.k_scale, self.v_scale]

    def _buffer_lists(self):
        return [self.k_cache, self.v_cache]

    def _prefix(self, stored, scale, end, dtype):
        """The first `end` positions of a (B, H, Tmax, D) tensor in `dtype` (a view when it
        is a float cache, a dequantized copy when it is quantized)."""
        return dequantize(stored[:, :, :end], None if scale is None else scale[:, :, :end],
                          dtype)

    def layout(self) -> tuple:
        return ("full",)

    @inference_only  # not @torch.no_grad(), which enters a new context on every call
    def attend(self, layer_idx, q, k, v, attn_module=None):
        """attn_module is not needed: nothing is compressed."""
        plan = self._check_new_tokens(layer_idx, q, k, v, self.num_heads * self.head_dim, "v")
        batch, t_new, heads, head_dim = q.shape
        v = v.view(batch, t_new, heads, head_dim)
        start, uniform = plan.start, plan.uniform
        q_ = q.transpose(1, 2)
        # Ragged: the new tokens go at each sequence's own offset, then a mask per sequence
        # (key j visible to new token i of sequence b iff j <= seqlens[b] + i).
        end = plan.longest + t_new
        self._write_new_tokens(self.k_cache[layer_idx], self.k_scale[layer_idx], k, plan)
        self._write_new_tokens(self.v_cache[layer_idx], self.v_scale[layer_idx], v, plan)
        keys = self._prefix(self._k[layer_idx], self._k_s[layer_idx], end, q.dtype)
        values = self._prefix(self._v[layer_idx], self._v_s[layer_idx], end, q.dtype)
        if not uniform:
            j = torch.arange(end, device=q.device)
            mask = (j.view(1, 1, end) <= plan.positions.unsqueeze(-1)).unsqueeze(1)  # (B,1,T,end)
            o = F.scaled_dot_product_attention(q_, keys, values, attn_mask=mask)
        elif t_new == 1 or start == 0:
            # One query sees every key; or prefill, where top-left == bottom-right causal.
            o = F.scaled_dot_product_attention(q_, keys, values, is_causal=t_new > 1)
        else:
            mask = torch.ones(t_new, end, dtype=torch.bool, device=q.device).tril(start)
            o = F.scaled_dot_product_attention(q_, keys, values, attn_mask=mask)
        return o.transpose(1, 2)
