"""Quantized caches in the model (SPEC 3c and 4): new_cache(cache_dtype=) for every layout, its
bytes (scales included), cached logits and generation through int8 / float8_e4m3fn caches, the
folded path writing what the ops write, and the orthogonal rotation of the latents."""
import copy

import pytest
import torch
from torch import nn

from conftest import rel_error
from helpers import logits_through_cache
from vdproj_ext.cli.generate import _cache_line, parse_args
from vdproj_ext.models import (CompressedKVCache, KVCache, LatentKVCache, VDProjConfig,
                               VDProjForCausalLM, kv_cache_nbytes, rotate_latents,
                               rotation_matrix)
from vdproj_ext.ops.quant import QUANT_MAX, dequantize

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py

QUANT = [torch.int8, torch.float8_e4m3fn]
# The smoke preset: 2 layers, H=2 heads of D=16, Dr=8 rotary dims (H*Dn = 16), R=20.
LAYOUTS = {"v_only": dict(), "separate": dict(k_rank=12), "joint": dict(joint_kv=True),
           "uncompressed": dict(v_rank=None)}
# Per token and layer: (cached values, scales) counted by hand from SPEC 3b / 3c.
SMOKE_ROWS = {"v_only": (2 * 16 + 20, 2 + 1), "separate": (2 * 8 + 12 + 20, 2 + 2),
              "joint": (2 * 8 + 20, 2 + 1), "uncompressed": (2 * 2 * 16, 2 * 2)}
CACHE_CLASS = {"v_only": CompressedKVCache, "separate": LatentKVCache, "joint": LatentKVCache,
               "uncompressed": KVCache}
# Relative error of logits through a quantized cache against the float cache. Each stored
# value is off by at most half a step: int8 0.5/127 = 0.4% of its row's absmax, e4m3 2^-4 = 6%
# of itself (3 mantissa bits), which test_cached_logits_close_to_float_cache checks exactly
# in layer 0. The rounding errors are independent across channels and tokens, so they average
# down through the softmax-weighted sums and the restore: the smoke model's logits move by
# 2-4e-4 (int8) and 1.0-1.5e-3 (e4m3) relative. The bounds leave about 5x.
LOGIT_TOL = {torch.int8: 2e-3, torch.float8_e4m3fn: 8e-3}


def _model(layout, dtype=torch.float32, backend="auto", seed=0, sharpen=False):
    cfg = VDProjConfig.preset("smoke", **LAYOUTS[layout])
    model = VDProjForCausalLM(cfg, init_seed=seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):  # every bias matters (HF-style init zeroes them)
                p.normal_(0.0, 0.1)
        if sharpen:  # peaked next-token distributions, so greedy choices are clear
            model.embed_out.weight.mul_(30)
            for attn in model.attention_modules():
                attn.query_key_value.weight.mul_(8)
    return model.to(dtype).eval().set_backend(backend)


def _bytes(t):
    """A tensor's raw bytes, for exact comparisons of any dtype (float8 included)."""
    return t.contiguous().view(torch.uint8)


# ---------------------------------------------------------------------------------------------
# new_cache: buffers, scales, bytes


@pytest.mark.parametrize("cache_dtype", [None] + QUANT)
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_new_cache_buffers_scales_and_nbytes(layout, cache_dtype):
    model = _model(layout)
    cfg = model.config
    batch, max_len = 3, 7
    cache = model.new_cache(batch, max_len, cache_dtype=cache_dtype)
    assert type(cache) is CACHE_CLASS[layout] and cache.cache_dtype == cache_dtype
    assert all(t.dtype == (cache_dtype or torch.float32) for t in cache.buffers())
    assert all(t.shape[:2] == (batch, max_len) for t in cache.buffers())
    values, scale_rows = SMOKE_ROWS[layout]
    if cache_dtype is None:
        assert cache.scales() == []
        per_token = 4 * values
    else:
        # one float32 scale per stored row: (B, Tmax, H) per head, (B, Tmax) per latent
        heads, latents = {"v_only": (1, 1), "separate": (1, 2), "joint": (1, 1),
                          "uncompressed": (2, 0)}[layout]
        expect = sorted([(batch, max_len, 2)] * heads + [(batch, max_len)] * latents)
        per_layer = sorted(tuple(s.shape) for s in cache.scales()[::cfg.num_layers])
        assert len(cache.scales()) == cfg.num_layers * len(expect)
        assert per_layer == expect
        assert all(s.dtype == torch.float32 for s in cache.scales())
        per_token = values + 4 * scale_rows
        assert str(cache_dtype) in repr(cache)
    assert cache.nbytes == cfg.num_layers * batch * max_len * per_token
    assert cache.bytes_per_token() == cfg.num_layers * per_token
    assert cache.nbytes == kv_cache_nbytes(None, batch, max_len, None, None, None, 4,
                                           config=cfg, cache_dtype=cache_dtype)
    if layout in ("v_only", "uncompressed"):  # the shape arguments, without a config
        assert cache.nbytes == kv_cache_nbytes(cfg.num_layers, batch, max_len, cfg.num_heads,
                                               cfg.head_dim, cfg.v_rank, 4,
                                               cache_dtype=cache_dtype)


@pytest.mark.parametrize("cache_dtype", QUANT)
def test_pythia70m_kv_quantized_cache_is_680_bytes_per_token_and_layer(cache_dtype):
    """SPEC 3c / issue 11: 640 values + 4 * (H + 2) scale bytes, H = 8."""
    cfg = VDProjConfig.preset("pythia-70m-kv")
    cache = LatentKVCache(6, 2, 5, 8, 64, 320, rope_dims=16, k_rank=192,
                          cache_dtype=cache_dtype)
    assert cache.nbytes == 6 * 2 * 5 * 680
    assert kv_cache_nbytes(None, 2, 5, None, None, None, config=cfg,
                           cache_dtype=cache_dtype) == cache.nbytes
    assert kv_cache_nbytes(6, 1, 1, 8, 64, 320, cache_dtype=cache_dtype) == 6 * (832 + 36)


def test_fully_latent_keys_store_no_rotary_scales():
    """Dr = 0: the rotary-key tensor is empty, so it is neither quantized nor scaled."""
    cache = LatentKVCache(1, 2, 4, 2, 16, 20, rope_dims=0, k_rank=12, cache_dtype=torch.int8)
    assert cache.krope_scale == [None] and cache.krope_cache[0].dtype == torch.float32
    assert cache.nbytes == 2 * 4 * (12 + 20 + 4 * 2)


@pytest.mark.parametrize("bad", [torch.float16, torch.float32, torch.int32, "int8", 8])
def test_bad_cache_dtype_errors(bad):
    model = _model("v_only")
    with pytest.raises(ValueError, match=r"cache_dtype must be None .*torch\.int8 or "
                                         r"torch\.float8_e4m3fn"):
        model.new_cache(1, 4, cache_dtype=bad)
    with pytest.raises(ValueError, match="cache_dtype"):
        KVCache(1, 1, 4, 2, 16, cache_dtype=bad)
    with pytest.raises(ValueError, match="cache_dtype"):
        kv_cache_nbytes(1, 1, 4, 2, 16, None, cache_dtype=bad)
    with pytest.raises(ValueError, match="use_cache"):
        model.generate(torch.zeros(1, 2, dtype=torch.long), 2, use_cache=False,
                       cache_dtype=torch.int8)


# ---------------------------------------------------------------------------------------------
# Cached logits and generation


@pytest.mark.parametrize("folded", [False, True])
@pytest.mark.parametrize("cache_dtype", QUANT)
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_cached_logits_close_to_float_cache(layout, cache_dtype, folded):
    model = _model(layout)
    if folded:
        if model.config.v_rank is None:
            pytest.skip("an uncompressed model has nothing to fold")
        model = model.prepare_for_inference()
    ids = torch.randint(0, model.config.vocab_size, (2, 14))
    ref = logits_through_cache(model, ids, model.new_cache(2, 14), [6, 9])
    quant = model.new_cache(2, 14, cache_dtype=cache_dtype)
    got = logits_through_cache(model, ids, quant, [6, 9])
    err = rel_error(got, ref)
    assert 1e-6 < err < LOGIT_TOL[cache_dtype], err  # quantized, and only by its step
    assert quant.seqlens.tolist() == [14, 14]
    # Layer 0 reads identical inputs in both runs: each stored value is then the float cache's
    # rounded to the nearest step (int8: scale = absmax / 127, rounding off by <= scale / 2).
    float_cache = model.new_cache(2, 14)
    with torch.no_grad():
        model(ids, cache=float_cache)
    exact, stored = float_cache.buffers()[0], quant.buffers()[0]
    scale = quant.scales()[0]
    deq = dequantize(stored, scale, torch.float32)
    if cache_dtype == torch.int8:
        bound = scale.unsqueeze(-1) * (0.5 + 1e-3)
    else:  # e4m3: 3 mantissa bits, half an ulp is 2^-4 relative (subnormals: 2^-10 * scale)
        bound = exact.abs() * 2.0 ** -4 * (1 + 1e-3) + scale.unsqueeze(-1) * 2.0 ** -10
    assert bool(((deq - exact).abs() <= bound).all())
    amax = exact.abs().amax(-1)
    assert torch.allclose(scale, amax / QUANT_MAX[cache_dtype], rtol=1e-5)


@pytest.mark.parametrize("cache_dtype", [None] + QUANT)
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_generate_with_every_cache_dtype(layout, cache_dtype):
    """Greedy generation through a quantized cache, ragged prompts (left padding) included,
    mostly picks the float cache's tokens on a model with clear greedy choices."""
    model = _model(layout, sharpen=True)
    ids = torch.randint(0, model.config.vocab_size, (3, 9))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # a shorter prompt, left padded: ragged cache lengths while decoding
    steps = 10
    ref = model.generate(ids, steps, attention_mask=mask)
    out = model.generate(ids, steps, attention_mask=mask, cache_dtype=cache_dtype)
    assert out.shape == (3, 9 + steps) and torch.equal(out[:, :9], ids)
    agree = (out[:, 9:] == ref[:, 9:]).float().mean().item()
    assert agree >= (1.0 if cache_dtype is None else 0.75), agree


# ---------------------------------------------------------------------------------------------
# The folded path writes what the op writes


class _Pairs(nn.Module):
    """Selection matrices as compress projections (each latent channel copies one input
    column), so V_c is exact in any order of summation: the op's compress-on-write and the
    folded path then quantize identical rows."""

    def __init__(self, width_k, width_v, k_rank, v_rank, hd, joint, g):
        super().__init__()

        def select(width, rank):
            lin = nn.Linear(width, rank)
            with torch.no_grad():
                lin.weight.zero_()
                lin.weight[torch.arange(rank), torch.randperm(width, generator=g)[:rank]] = 1.0
                lin.bias.zero_()
            return lin

        self.v_compress = select(width_v + (width_k if joint else 0), v_rank)
        self.v_restore = nn.Linear(v_rank, hd)
        if k_rank is not None:
            self.k_compress = select(width_k, k_rank)
        if width_k:
            self.k_restore = nn.Linear(v_rank if joint else k_rank, width_k)
        self.backend = "auto"


@pytest.mark.parametrize("cache_dtype", QUANT)
@pytest.mark.parametrize("layout", ["v_only", "separate", "joint"])
def test_folded_path_writes_the_same_bytes_as_the_op(layout, cache_dtype):
    g = torch.Generator().manual_seed(1)
    b, t, h, d, dr, rk, r = 2, 5, 2, 16, 8, 12, 20
    dn = d - dr
    latent = layout != "v_only"
    attn = _Pairs(h * dn if latent else 0, h * d, rk if layout == "separate" else None, r,
                  h * d, layout == "joint", g)
    q, k = torch.randn(b, t, h, d, generator=g), torch.randn(b, t, h, d, generator=g)
    v = torch.randn(b, t, h * d, generator=g)
    with torch.no_grad():
        k_nope = k[..., dr:].reshape(b, t, h * dn)
        if layout == "v_only":
            caches = [CompressedKVCache(1, b, 8, h, d, r, cache_dtype=cache_dtype)
                      for _ in range(2)]
            new = (k, attn.v_compress(v))
        else:
            caches = [LatentKVCache(1, b, 8, h, d, r, rope_dims=dr, cache_dtype=cache_dtype,
                                    k_rank=rk if layout == "separate" else None)
                      for _ in range(2)]
            if layout == "joint":
                latents = (None, attn.v_compress(torch.cat((k_nope, v), -1)))
            else:
                latents = (attn.k_compress(k_nope), attn.v_compress(v))
            new = (k[..., :dr], latents)
        for cache in caches:
            cache.seqlens.copy_(torch.tensor([1, 3], dtype=torch.int32))  # ragged writes
        o_op = caches[0].attend(0, q, k, v, attn)
        o_folded = caches[1].attend_compressed(0, q, *new, attn)
    for i, (x, y) in enumerate(zip(caches[0].buffers(), caches[1].buffers())):
        assert torch.equal(_bytes(x), _bytes(y)), i
    for x, y in zip(caches[0].scales(), caches[1].scales()):
        assert torch.equal(x, y)
    assert rel_error(o_folded, o_op) < 1e-5


# ---------------------------------------------------------------------------------------------
# Rotation of the latents


def test_rotation_matrices():
    for rank, block in [(320, 64), (192, 64), (80, 16), (48, 16), (8, 8)]:
        q = rotation_matrix(rank)
        assert torch.allclose(q @ q.T, torch.eye(rank, dtype=torch.float64), atol=1e-14)
        assert torch.allclose(q.abs()[:block, :block],
                              torch.full((block, block), block ** -0.5, dtype=torch.float64))
        assert int((q != 0).sum()) == rank * block  # block diagonal
    for rank in (20, 12, 7):  # no power-of-2 factor >= 8: seeded random orthogonal
        q = rotation_matrix(rank, seed=3)
        assert torch.allclose(q @ q.T, torch.eye(rank, dtype=torch.float64), atol=1e-13)
        assert torch.equal(q, rotation_matrix(rank, seed=3))
        assert not torch.equal(q, rotation_matrix(rank, seed=4))
    with pytest.raises(ValueError, match="kind"):
        rotation_matrix(64, "haar")
    with pytest.raises(ValueError, match="rank"):
        rotation_matrix(0)


@pytest.mark.parametrize("fold", ["before", "after"])
@pytest.mark.parametrize("kind", ["hadamard", "random"])
@pytest.mark.parametrize("layout", ["v_only", "separate", "joint"])
def test_rotation_keeps_logits_float64(layout, kind, fold):
    model = _model(layout, torch.float64, backend="reference")
    ids = torch.randint(0, model.config.vocab_size, (2, 12))
    with torch.no_grad():
        ref = model(ids).logits
    rotated = copy.deepcopy(model)
    if fold == "after":  # rotate the folded projection's latent rows
        rotated.prepare_for_inference()
    rotate_latents(rotated, kind)
    if fold == "before":
        rotated.prepare_for_inference()
    with torch.no_grad():
        got = rotated(ids).logits
        folded_only = copy.deepcopy(model).prepare_for_inference()
        before = folded_only.gpt_neox.layers[0].attention.v_restore.weight
        after = rotated.gpt_neox.layers[0].attention.v_restore.weight
    assert (before - after).abs().max() > 1e-2  # the pairs did change
    assert rel_error(got, ref) < 1e-12


@pytest.mark.parametrize("cache_dtype", QUANT)
@pytest.mark.parametrize("layout", ["v_only", "separate", "joint"])
def test_rotation_keeps_quantized_cache_logits_close(layout, cache_dtype):
    model = _model(layout)
    ids = torch.randint(0, model.config.vocab_size, (2, 12))
    ref = logits_through_cache(model, ids, model.new_cache(2, 12), [5])
    rotated = rotate_latents(copy.deepcopy(model)).prepare_for_inference()
    got = logits_through_cache(rotated, ids, rotated.new_cache(2, 12, cache_dtype=cache_dtype),
                               [5])
    assert rel_error(got, ref) < LOGIT_TOL[cache_dtype]


@pytest.mark.parametrize("kind", ["hadamard", "random"])
@pytest.mark.parametrize("layout", ["v_only", "separate", "joint"])
def test_rotation_same_before_or_after_fold(layout, kind):
    """Each latent gets the same matrix whether rotate_latents runs before or after
    prepare_for_inference. The smoke ranks (R=20, Rk=12) have no power-of-2 factor >= 8, so
    even "hadamard" draws seeded random matrices here: a seed tied to the latents' order
    (V, K unfolded; K, V folded) would swap them between the two orders. Same weights, so
    the same int8 cache rows and logits."""
    model = _model(layout)
    rotate_fold = rotate_latents(copy.deepcopy(model), kind, seed=5).prepare_for_inference()
    fold_rotate = rotate_latents(copy.deepcopy(model).prepare_for_inference(), kind, seed=5)
    for a, b in zip(rotate_fold.attention_modules(), fold_rotate.attention_modules()):
        for name in ("fused", "v_restore", "k_restore"):
            if hasattr(a, name):
                wa, wb = getattr(a, name).weight, getattr(b, name).weight
                assert rel_error(wa, wb) < 1e-6, name
    # and the rotation did change the key latent's pair (not both orders a no-op)
    plain = copy.deepcopy(model).prepare_for_inference()
    attn = plain.gpt_neox.layers[0].attention
    if layout == "separate":
        assert rel_error(fold_rotate.gpt_neox.layers[0].attention.k_restore.weight,
                         attn.k_restore.weight) > 1e-2
    ids = torch.randint(0, model.config.vocab_size, (2, 12),
                        generator=torch.Generator().manual_seed(0))
    got = [logits_through_cache(m, ids, m.new_cache(2, 12, cache_dtype=torch.int8), [5])
           for m in (rotate_fold, fold_rotate)]
    assert rel_error(got[0], got[1]) < 1e-5


def test_rotation_needs_a_compressed_model():
    with pytest.raises(ValueError, match="v_rank"):
        rotate_latents(_model("uncompressed"))
    with pytest.raises(ValueError, match="kind"):
        rotate_latents(_model("v_only"), "haar")


# ---------------------------------------------------------------------------------------------
# The CLI


def test_cli_cache_dtype():
    args = parse_args(["--checkpoint", "x.pt", "--prompt", "a", "--cache-dtype", "fp8"])
    assert args.cache_dtype == "fp8"
    assert parse_args(["--checkpoint", "x.pt", "--prompt", "a"]).cache_dtype == "model"
    with pytest.raises(SystemExit):
        parse_args(["--checkpoint", "x.pt", "--prompt", "a", "--cache-dtype", "int4"])
    cfg = VDProjConfig.preset("pythia-70m-kv")
    line = _cache_line(cfg, 10, torch.float32, torch.int8)
    assert f"{6 * 10 * 680} bytes" in line and "torch.int8" in line
