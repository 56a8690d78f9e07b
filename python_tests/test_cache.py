"""CompressedKVCache and KVCache: sizes, in-place writes, attention against the reference,
ragged lengths, overflow and bad input."""
import pytest
import torch
from torch import nn

from conftest import TOLERANCES, rel_error
from vdproj_ext import reference
from vdproj_ext.models import CacheOverflowError, CompressedKVCache, KVCache, LatentKVCache
from vdproj_ext.ops.quant import write_rows


class _Attn(nn.Module):
    """Just the parts of CompressedVAttention that a cache reads."""

    def __init__(self, hd, rank, dtype, device):
        super().__init__()
        self.v_compress = nn.Linear(hd, rank).to(device, dtype)
        self.v_restore = nn.Linear(rank, hd).to(device, dtype)
        self.backend = "auto"


def _make(kind, layers, batch, max_len, heads, head_dim, rank, dtype, device):
    if kind == "compressed":
        return CompressedKVCache(layers, batch, max_len, heads, head_dim, rank, dtype=dtype,
                                 device=device)
    return KVCache(layers, batch, max_len, heads, head_dim, dtype=dtype, device=device)


def test_nbytes_ratio_pythia70m_shape():
    # 6 layers, 8 heads of 64, R = 320: 512 + 320 = 832 values per token and layer, not 1024.
    comp = CompressedKVCache(6, 2, 128, 8, 64, 320, dtype=torch.float32)
    full = KVCache(6, 2, 128, 8, 64, dtype=torch.float32)
    assert comp.nbytes == 6 * 2 * 128 * (512 + 320) * 4
    assert full.nbytes == 6 * 2 * 128 * 1024 * 4
    assert comp.nbytes / full.nbytes == 832 / 1024
    assert 1 - comp.nbytes / full.nbytes == pytest.approx(0.1875)
    assert comp.bytes_per_token() == 6 * 832 * 4
    half = CompressedKVCache(6, 2, 128, 8, 64, 320, dtype=torch.bfloat16)
    assert half.nbytes * 2 == comp.nbytes


def test_layouts_and_views():
    comp = CompressedKVCache(2, 3, 10, 4, 8, 5, dtype=torch.float32)
    assert comp.k_cache[1].shape == (3, 10, 4, 8) and comp.vc_cache[1].shape == (3, 10, 5)
    assert comp.seqlens.dtype == torch.int32 and comp.seqlens.tolist() == [0, 0, 0]
    full = KVCache(2, 3, 10, 4, 8, dtype=torch.float32)
    assert full.k_cache[0].shape == (3, 10, 4, 8) and full.v_cache[0].shape == (3, 10, 4, 8)
    full.k_cache[0][1, 2, 3] = 7.0  # the (B, Tmax, H, D) views alias the storage
    assert full._k[0][1, 3, 2].eq(7.0).all()


@pytest.mark.parametrize("kind", ["compressed", "full"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("lengths,t_new", [([5, 5, 5], 1), ([0, 0, 0], 4), ([3, 7, 0], 1),
                                           ([4, 1, 6], 3), ([6, 6, 6], 2)])
def test_attend_matches_reference(kind, dtype, lengths, t_new, device):
    torch.manual_seed(1)
    b, tmax, h, d, r = len(lengths), 12, 3, 8, 11
    hd = h * d
    attn = _Attn(hd, r, dtype, device)
    cache = _make(kind, 2, b, tmax, h, d, r, dtype, device)
    k_hist = torch.randn(b, tmax, h, d, dtype=dtype, device=device)
    v_hist = torch.randn(b, tmax, hd, dtype=dtype, device=device)
    layer = 1
    with torch.no_grad():
        vc_hist = attn.v_compress(v_hist)
        # Unused slots: NaN for the compressed cache (never read); large finite garbage for
        # the uncompressed one (masked inside SDPA, see KVCache's docstring).
        if kind == "compressed":
            cache.k_cache[layer].fill_(float("nan"))
            cache.vc_cache[layer].fill_(float("nan"))
        else:
            cache.k_cache[layer].fill_(1e4)
            cache.v_cache[layer].fill_(-1e4)
        for i, n in enumerate(lengths):
            cache.k_cache[layer][i, :n] = k_hist[i, :n]
            if kind == "compressed":
                cache.vc_cache[layer][i, :n] = vc_hist[i, :n]
            else:
                cache.v_cache[layer][i, :n] = v_hist[i, :n].view(n, h, d)
    cache.seqlens.copy_(torch.tensor(lengths, dtype=torch.int32))
    q = torch.randn(b, t_new, h, d, dtype=dtype, device=device)
    k = torch.randn(b, t_new, h, d, dtype=dtype, device=device)
    v = torch.randn(b, t_new, hd, dtype=dtype, device=device)
    out = cache.attend(layer, q, k, v, attn)
    assert out.shape == (b, t_new, h, d)
    assert cache.seqlens.tolist() == lengths  # attend does not advance

    w_c, b_c = attn.v_compress.weight.double(), attn.v_compress.bias.double()
    w_r, b_r = attn.v_restore.weight.double(), attn.v_restore.bias.double()
    for i, n in enumerate(lengths):
        keys = torch.cat((k_hist[i, :n], k[i])).double()
        vals = torch.cat((v_hist[i, :n], v[i])).double()
        if kind == "compressed":  # restore(compress(v))
            vals = (vals @ w_c.T + b_c) @ w_r.T + b_r
        allowed = reference.causal_mask(t_new, n + t_new, device)
        expected = reference.attention(q[i:i + 1].double(), keys[None], vals.view(1, -1, h, d),
                                       allowed, d ** -0.5)
        assert rel_error(out[i:i + 1], expected) < 10 * TOLERANCES[dtype], (i, n)
        # the new tokens were written in place, at the sequence's own offset
        assert torch.equal(cache.k_cache[layer][i, n:n + t_new], k[i])
    assert torch.isfinite(out).all()
    other = 0  # the other layer is untouched
    assert cache.k_cache[other].abs().sum() == 0


@pytest.mark.parametrize("kind", ["compressed", "full"])
def test_overflow_raises_and_writes_nothing(kind):
    cache = _make(kind, 1, 2, 6, 2, 4, 3, torch.float32, "cpu")
    attn = _Attn(8, 3, torch.float32, "cpu")
    cache.seqlens.copy_(torch.tensor([2, 5], dtype=torch.int32))
    before = cache.k_cache[0].clone()
    q = torch.randn(2, 2, 2, 4)
    with pytest.raises(CacheOverflowError, match="max_len=6"):
        cache.attend(0, q, q.clone(), torch.randn(2, 2, 8), attn)
    assert torch.equal(cache.k_cache[0], before)
    with pytest.raises(ValueError, match="overflow"):  # CacheOverflowError is a ValueError
        cache.attend(0, q, q.clone(), torch.randn(2, 2, 8), attn)
    # one more token fits
    cache.attend(0, q[:, :1], q[:, :1].clone(), torch.randn(2, 1, 8), attn)
    with pytest.raises(CacheOverflowError, match="max_len"):
        cache.advance(2)
    cache.advance(1)
    assert cache.seqlens.tolist() == [3, 6]


@pytest.mark.parametrize("kind", ["compressed", "full"])
def test_new_tokens_follow_seqlens_changed_between_calls(kind):
    """The caches plan a step's writes once for all layers (_step_plan); the plan must follow
    seqlens written in place, replaced, or a different T, exactly like a cache seeing those
    lengths for the first time."""
    import copy
    torch.manual_seed(3)
    b, tmax, h, d, r = 2, 12, 2, 4, 3
    attn = _Attn(h * d, r, torch.float32, "cpu")
    cache = _make(kind, 2, b, tmax, h, d, r, torch.float32, "cpu")
    with torch.no_grad():
        for t in cache.buffers():
            t.normal_()

    def step(t_new, expect_at):
        fresh = copy.deepcopy(cache)
        fresh._plan = None
        q, k = torch.randn(2, b, t_new, h, d).unbind(0)
        v = torch.randn(b, t_new, h * d)
        out = cache.attend(1, q, k, v, attn)
        assert torch.equal(out, fresh.attend(1, q, k, v, attn))
        for i, at in enumerate(expect_at):
            assert torch.equal(cache.k_cache[1][i, at:at + t_new], k[i]), (i, at)
        if kind == "compressed":  # a folded layer's call, which writes in Python
            v_c = torch.randn(b, t_new, r)
            out = cache.attend_compressed(0, q, k, v_c, attn)
            assert torch.equal(out, fresh.attend_compressed(0, q, k, v_c, attn))
            for i, at in enumerate(expect_at):
                assert torch.equal(cache.vc_cache[0][i, at:at + t_new], v_c[i]), (i, at)
        else:
            cache.attend(0, q, k, v, attn)  # the other layer, same step: same slots
        for i, at in enumerate(expect_at):
            assert torch.equal(cache.k_cache[0][i, at:at + t_new], k[i]), (i, at)

    cache.seqlens.fill_(2)
    step(1, [2, 2])
    cache.seqlens[1] = 4  # written in place: ragged now
    step(1, [2, 4])
    replaced = torch.tensor([5, 5], dtype=torch.int32)
    while replaced._version < cache.seqlens._version:  # the same version count as the old one
        replaced.add_(0)
    cache.seqlens = replaced
    step(1, [5, 5])
    step(2, [5, 5])  # another T
    cache.advance(3)
    step(1, [8, 8])
    cache.seqlens.fill_(tmax)
    with pytest.raises(CacheOverflowError):
        step(1, [tmax, tmax])


@pytest.mark.parametrize("kind", ["compressed", "full"])
def test_advance_and_reset(kind):
    cache = _make(kind, 2, 3, 8, 2, 4, 3, torch.float32, "cpu")
    cache.advance(2)
    cache.advance(torch.tensor([1, 0, 3]))
    assert cache.seqlens.tolist() == [3, 2, 5] and cache.seqlens.dtype == torch.int32
    with pytest.raises(CacheOverflowError):
        cache.advance(torch.tensor([-4, 0, 0]))
    with pytest.raises(TypeError):
        cache.advance(1.5)
    with pytest.raises(ValueError, match="shape"):
        cache.advance(torch.tensor([1, 1]))
    cache.reset()
    assert cache.seqlens.tolist() == [0, 0, 0]
    assert cache.max_len == 8


def test_bad_arguments():
    with pytest.raises(ValueError, match="max_len"):
        CompressedKVCache(2, 1, 0, 2, 4, 3, dtype=torch.float32)
    with pytest.raises(TypeError, match="v_rank"):
        CompressedKVCache(2, 1, 4, 2, 4, 2.5, dtype=torch.float32)
    with pytest.raises(TypeError, match="dtype"):
        KVCache(2, 1, 4, 2, 4, dtype=torch.int32)
    cache = KVCache(2, 1, 4, 2, 4, dtype=torch.float32)
    q = torch.randn(1, 1, 2, 4)
    with pytest.raises(IndexError, match="layer_idx"):
        cache.attend(2, q, q, torch.randn(1, 1, 8))
    with pytest.raises(ValueError, match="q must have shape"):
        cache.attend(0, torch.randn(1, 1, 3, 4), q, torch.randn(1, 1, 8))
    with pytest.raises(ValueError, match="v must have shape"):
        cache.attend(0, q, q, torch.randn(1, 1, 7))


def test_model_new_cache_kinds():
    from vdproj_ext import VDProjConfig, VDProjForCausalLM
    cfg = VDProjConfig.preset("smoke")
    comp = VDProjForCausalLM(cfg).new_cache(2, 16)
    full = VDProjForCausalLM(cfg.replace(v_rank=None)).new_cache(2, 16)
    assert isinstance(comp, CompressedKVCache) and isinstance(full, KVCache)
    hd = cfg.hidden_size
    assert comp.nbytes / full.nbytes == (hd + cfg.v_rank) / (2 * hd)


# The smoke preset's compressed layouts: values only, latent keys, and the joint latent.
COMPRESSED_LAYOUTS = {"v_rank": dict(v_rank=20), "latent": dict(k_rank=12, v_rank=20),
                      "joint": dict(joint_kv=True, v_rank=20)}


@pytest.mark.parametrize("layout", sorted(COMPRESSED_LAYOUTS))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64])
def test_compressed_new_cache_refuses_a_dtype_other_than_the_models(layout, dtype):
    """The compressed caches' fused ops need the cache in the model's dtype; new_cache refuses
    another dtype up front (a ValueError naming both and cache_dtype=) instead of handing out
    a cache that every forward then rejects. The model's own dtype, given or not, works."""
    from vdproj_ext import VDProjConfig, VDProjForCausalLM
    model = VDProjForCausalLM(VDProjConfig.preset("smoke", **COMPRESSED_LAYOUTS[layout]))
    with pytest.raises(ValueError, match=r"dtype=torch\.(bfloat16|float64).*torch\.float32"
                                         r".*cache_dtype="):
        model.new_cache(2, 8, dtype=dtype)
    ids = torch.randint(0, model.config.vocab_size, (2, 5))
    for same in (None, torch.float32):
        cache = model.new_cache(2, 8, dtype=same)
        assert cache.dtype == torch.float32
        with torch.no_grad():
            model(ids, cache=cache)
        assert cache.seqlens.tolist() == [5, 5]


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-5), (torch.bfloat16, 3e-2)])
def test_uncompressed_new_cache_stores_another_dtype(dtype, tol):
    """The uncompressed KVCache may store its rows in another dtype than the model's (it casts
    them back before SDPA): a float32 model's cached logits through such a cache match the
    float64 model's full forward to the storage dtype's precision."""
    from helpers import logits_through_cache
    from vdproj_ext import VDProjConfig, VDProjForCausalLM
    model = VDProjForCausalLM(VDProjConfig.preset("smoke", v_rank=None), init_seed=1).eval()
    ids = torch.randint(0, model.config.vocab_size, (2, 11))
    cache = model.new_cache(2, 11, dtype=dtype)
    assert all(t.dtype == dtype for t in cache.buffers())
    got = logits_through_cache(model, ids, cache, [6])
    with torch.no_grad():
        expected = model.double()(ids).logits
    assert got.dtype == torch.float32
    assert rel_error(got, expected) < tol


@pytest.mark.parametrize("v_rank", [320, None])
def test_kv_cache_nbytes_without_allocating(v_rank):
    from vdproj_ext.models import kv_cache_nbytes
    shape = (3, 2, 17, 4, 8)
    cache = (CompressedKVCache(*shape, v_rank, dtype=torch.float16) if v_rank
             else KVCache(*shape, dtype=torch.float16))
    assert kv_cache_nbytes(*shape, v_rank, 2) == cache.nbytes


class _LatentAttn(nn.Module):
    """The parts of a latent-key CompressedVAttention that LatentKVCache.attend reads."""

    def __init__(self, h, d, dr, k_rank, v_rank, dtype):
        super().__init__()
        nope = h * (d - dr)
        self.k_compress = nn.Linear(nope, k_rank).to(dtype)
        self.k_restore = nn.Linear(k_rank, nope).to(dtype)
        self.v_compress = nn.Linear(h * d, v_rank).to(dtype)
        self.v_restore = nn.Linear(v_rank, h * d).to(dtype)
        self.backend = "auto"


@pytest.mark.parametrize("cache_dtype", [None, torch.int8])
@pytest.mark.parametrize("layout", ["values", "latent"])
def test_cache_calls_equal_the_public_ops(layout, cache_dtype):
    # The caches call the CPU kernels without the public functions' Python checks
    # (ops.kvcache.attend_values_cache, ops.latent_kvcache.attend_latent_cache): same result,
    # bit for bit, as the public function on a copy of the cache, written rows included.
    from vdproj_ext import compressed_attn_with_kvcache, compressed_kv_attn_with_kvcache
    torch.manual_seed(3)
    b, tmax, h, d, dr, rk, rv, t_new = 3, 13, 3, 8, 2, 7, 11, 2
    lengths = torch.tensor([4, 0, 9], dtype=torch.int32)
    if layout == "values":
        cache = CompressedKVCache(1, b, tmax, h, d, rv, cache_dtype=cache_dtype)
        attn = _Attn(h * d, rv, torch.float32, "cpu")
    else:
        cache = LatentKVCache(1, b, tmax, h, d, rv, rope_dims=dr, k_rank=rk,
                              cache_dtype=cache_dtype)
        attn = _LatentAttn(h, d, dr, rk, rv, torch.float32)
    for t, s in cache.stored_tensors():  # finite history, NaN never read past the lengths
        write_rows(t, s, (slice(None), slice(0, tmax)), torch.randn(t.shape))
    cache.seqlens.copy_(lengths)
    before = [(t.clone(), None if s is None else s.clone()) for t, s in cache.stored_tensors()]
    q, k = torch.randn(b, t_new, h, d), torch.randn(b, t_new, h, d)
    v = torch.randn(b, t_new, h * d)
    with torch.no_grad():
        out = cache.attend(0, q, k, v, attn)
        after = [(t.clone(), None if s is None else s.clone()) for t, s in cache.stored_tensors()]
        for (t, s), (t0, s0) in zip(cache.stored_tensors(), before):  # back to the history
            t.copy_(t0)
            if s is not None:
                s.copy_(s0)
        scales = cache._layer_scales(0) if layout == "latent" else dict(
            k_scale=cache.k_scale[0], vc_scale=cache.vc_scale[0])
        if layout == "values":
            want = compressed_attn_with_kvcache(
                q, cache.k_cache[0], cache.vc_cache[0], attn.v_restore.weight,
                attn.v_restore.bias, k=k, v=v, w_c=attn.v_compress.weight,
                b_c=attn.v_compress.bias, cache_seqlens=lengths, **scales)
        else:
            want = compressed_kv_attn_with_kvcache(
                q, cache.krope_cache[0], cache.kc_cache[0], cache.vc_cache[0],
                attn.k_restore.weight, attn.v_restore.weight, attn.v_restore.bias, k=k, v=v,
                w_kc=attn.k_compress.weight, b_kc=attn.k_compress.bias,
                w_c=attn.v_compress.weight, b_c=attn.v_compress.bias, cache_seqlens=lengths,
                **scales)
    assert torch.equal(out, want)
    for (t, s), (t1, s1) in zip(cache.stored_tensors(), after):
        assert torch.equal(t, t1) and (s is None or torch.equal(s, s1))


@pytest.mark.parametrize("layout", ["values", "latent"])
def test_cache_call_with_a_mismatched_layer_raises_and_writes_nothing(layout):
    # Without the Python checks the kernel's own checks name the argument, before any write.
    b, tmax, h, d, dr, rk, rv = 2, 6, 2, 8, 2, 5, 7
    if layout == "values":
        cache = CompressedKVCache(1, b, tmax, h, d, rv)
        attn = _Attn(h * d, rv, torch.float64, "cpu")  # float64 weights, float32 cache
        match = "w_r must have dtype torch.float32 like q"
    else:
        cache = LatentKVCache(1, b, tmax, h, d, rv, rope_dims=dr, k_rank=rk)
        attn = _LatentAttn(h, d, dr, rk, rv, torch.float32)
        attn.k_restore = nn.Linear(rk + 1, h * (d - dr))  # w_kr one column too wide
        match = "w_kr"
    cache.seqlens.fill_(3)
    before = [t.clone() for t, _ in cache.stored_tensors()]
    q = torch.randn(b, 1, h, d)
    with torch.no_grad(), pytest.raises((TypeError, ValueError), match=match):
        cache.attend(0, q, torch.randn(b, 1, h, d), torch.randn(b, 1, h * d), attn)
    assert all(torch.equal(t, t0) for (t, _), t0 in zip(cache.stored_tensors(), before))


@pytest.mark.parametrize("preset", ["smoke", "smoke-kv"])
def test_folded_model_cast_after_its_cache_raises_and_writes_nothing(preset):
    # A folded layer writes its latents into the cache itself before the op runs: a model cast
    # to another dtype after new_cache must be refused before that write, not after it.
    from vdproj_ext import VDProjConfig, VDProjForCausalLM
    cfg = VDProjConfig.preset(preset)
    model = VDProjForCausalLM(cfg, init_seed=0).eval().prepare_for_inference()
    cache = model.new_cache(2, 16)
    before = [t.clone() for t in cache.buffers()]
    model.to(torch.float64)
    with torch.no_grad(), pytest.raises(TypeError, match="q must have dtype torch.float32"):
        model(torch.randint(0, cfg.vocab_size, (2, 3)), cache=cache)
    assert all(torch.equal(t, t0) for t, t0 in zip(cache.buffers(), before))
    assert cache.seqlens.tolist() == [0, 0]
