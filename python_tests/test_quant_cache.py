"""Quantized caches (SPEC 3c): int8 and float8_e4m3fn cache tensors with float32 per-row scales,
on compressed_attn_with_kvcache (V-only) and compressed_kv_attn_with_kvcache (latent keys).

The expected outputs are computed here, independently of vdproj_ext.ops.reference: the caches
as the op left them are dequantized (stored.float() * scale, the SPEC's definition), restored,
and attended over in float64. Every slot past a sequence's valid length holds NaN (int8, which
has no NaN: -128, which quantize-on-write never stores) and so does every unused scale, so a
read there shows up as NaN. Also checked: the written rows (rotary keys bitwise equal to
quantize_rows, latents within one quantization step), layouts that mix float and quantized
caches, bad input (one message on both backends, nothing written), overflow, torch.library
opcheck, and the kernels' vectorized conversions on every byte value under every
instruction-set build (VDPROJ_CPU_ISA, in subprocesses).
"""
import math

import pytest
import torch

from conftest import TOLERANCES, rel_error
from helpers import (assert_same_error_on_every_backend, make_latent_step, make_step,
                     replace_args, run_python)
from vdproj_ext import compressed_attn_with_kvcache, compressed_kv_attn_with_kvcache
from vdproj_ext.ops.backend import load_kernels
from vdproj_ext.ops.quant import quantize_rows

load_kernels()  # defines torch.ops.vdproj_ext.*, which the raw-op tests call

E4M3 = torch.float8_e4m3fn
QUANT_DTYPES = [torch.int8, E4M3]
QUANT_IDS = ["int8", "e4m3"]
MODEL_DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
MODEL_IDS = ["f32", "bf16", "fp16", "f64"]
BACKENDS = ["ext", "reference"]
# Tiny shapes: one thread is as fast, and does not collapse under load (see one_thread)
pytestmark = pytest.mark.usefixtures("one_thread")

INT8_UNUSED = -128  # quantize-on-write clamps to +-127, so a -128 read past the prefix shows
SCALE_OF = {"k_cache": "k_scale", "krope_cache": "krope_scale", "kc_cache": "kc_scale",
            "vc_cache": "vc_scale"}

# Odd sizes: heads, head dim, key and value latent ranks, slots.
B, H, D, RK, RV, TMAX = 3, 3, 24, 11, 19, 13
# (seqlens, Tq, Tnew, causal): decode with one new token, a chunk of new tokens that fills a
# sequence to Tmax, reads without new tokens (one sequence empty: its rows are zeros, one full).
CASES = {
    "decode": ([5, 0, 9], 1, 1, True),
    "chunk": ([0, 4, 10], 3, 3, True),
    "read": ([6, 0, 13], 2, 0, True),
    "chunk-full": ([7, 1, 0], 2, 2, False),
}


# ---------------------------------------------------------------------------------------------
# Inputs: caches with random valid prefixes, NaN past them; the op's other arguments


def is_quantized(dtype):
    return dtype in QUANT_DTYPES


def unused_cache(shape, dtype):
    if dtype == torch.int8:
        return torch.full(shape, INT8_UNUSED, dtype=dtype)
    return torch.full(shape, float("nan")).to(dtype)


def random_stored(shape, dtype, g):
    """Stored values whose dequantized magnitudes are about 1 with random_scale's scales."""
    if dtype == torch.int8:
        return torch.randint(-127, 128, shape, generator=g, dtype=torch.int8)
    x = torch.randn(shape, generator=g, dtype=torch.float64)
    if dtype == E4M3:
        return (x * 100).clamp(-448, 448).to(dtype)
    return x.to(dtype)


def random_scale(shape, g):
    return (torch.rand(shape, generator=g) + 0.5) / 100


def make_caches(shapes, storage, lens, g):
    """{cache name: tensor, scale name: float32 scale or None}: random rows in each sequence's
    first lens[b] slots, unused (NaN) everywhere else, scales included."""
    out = {}
    for name, shape in shapes.items():
        dtype = storage[name]
        if shape is None:  # the joint latent: no kc_cache
            out[name], out[SCALE_OF[name]] = None, None
            continue
        cache = unused_cache(shape, dtype)
        scale = torch.full(shape[:-1], float("nan")) if is_quantized(dtype) else None
        for b, n in enumerate(lens):
            cache[b, :n] = random_stored((n, *shape[2:]), dtype, g)
            if scale is not None:
                scale[b, :n] = random_scale((n, *shape[2:-1]), g)
        out[name], out[SCALE_OF[name]] = cache, scale
    return out


def make_args(storage, model_dtype, case, rope_dim=None, joint=False, seed=0, heads=H,
              head_dim=D, k_rank=RK, v_rank=RV, t_max=TMAX):
    """All arguments of one call, as a dict, on the CPU. rope_dim None: the V-only op (k_cache,
    vc_cache); else the latent-key op. storage: cache name -> its dtype (None: the model's)."""
    lens, tq, t_new, causal = CASES[case] if isinstance(case, str) else case
    b, h, d = len(lens), heads, head_dim
    if rope_dim is None:
        shapes = dict(k_cache=(b, t_max, h, d), vc_cache=(b, t_max, v_rank))
        step = make_step(b, tq, t_new, h, d, v_rank, "cpu", model_dtype, seed=seed + 1)
    else:
        shapes = dict(krope_cache=(b, t_max, h, rope_dim),
                      kc_cache=None if joint else (b, t_max, k_rank),
                      vc_cache=(b, t_max, v_rank))
        step = make_latent_step(b, tq, t_new, h, d, rope_dim, k_rank, v_rank, "cpu",
                                model_dtype, joint=joint, seed=seed + 1)
    storage = {n: (storage.get(n) or model_dtype) for n in shapes}
    caches = make_caches(shapes, storage, lens, torch.Generator().manual_seed(seed))
    return dict(step, **caches, cache_seqlens=torch.tensor(lens, dtype=torch.int32),
                causal=causal)


def uniform_storage(dtype):
    return {n: dtype for n in SCALE_OF}


def call(a, backend, **kw):
    common = dict(k=a["k"], v=a["v"], w_c=a["w_c"], b_c=a["b_c"], cache_seqlens=a["cache_seqlens"],
                  causal=a["causal"], backend=backend, **kw)
    if "k_cache" in a:
        return compressed_attn_with_kvcache(a["q"], a["k_cache"], a["vc_cache"], a["w_r"],
                                            a["b_r"], k_scale=a["k_scale"],
                                            vc_scale=a["vc_scale"], **common)
    return compressed_kv_attn_with_kvcache(
        a["q"], a["krope_cache"], a["kc_cache"], a["vc_cache"], a["w_kr"], a["w_r"], a["b_r"],
        w_kc=a["w_kc"], b_kc=a["b_kc"], krope_scale=a["krope_scale"], kc_scale=a["kc_scale"],
        vc_scale=a["vc_scale"], **common)


def state_names(a):
    """The tensors the op may write: the caches and their scales."""
    return [n for n in (*SCALE_OF, *SCALE_OF.values())
            if isinstance(a.get(n), torch.Tensor) and a[n].device.type != "meta"]


def as_bytes(t):
    return t.contiguous().view(torch.uint8)


def snapshot(a):
    return {n: a[n].clone() for n in state_names(a)}


def assert_nothing_written(a, before):
    for name, old in before.items():
        assert torch.equal(as_bytes(a[name]), as_bytes(old)), name


# ---------------------------------------------------------------------------------------------
# The float64 truth, written here


def dequantize64(cache, scale):
    """What the attention uses (SPEC 3c: stored.float() * scale), in float64."""
    if scale is None:
        return cache.double()
    return (cache.float() * scale.unsqueeze(-1)).double()


def attend64(q, keys, values, total_lens, causal, softmax_scale):
    """Softmax attention of each sequence over its first total_lens[b] keys, in float64.
    q (B, Tq, H, D); keys and values (B, T, H, D). Rows that see no key are zeros."""
    q = q.double()
    tq = q.shape[1]
    out = torch.zeros(q.shape, dtype=torch.float64)
    for b, tk in enumerate(total_lens):
        if tk == 0:
            continue
        scores = torch.einsum("ihd,jhd->hij", q[b], keys[b, :tk]) * softmax_scale
        if causal:  # bottom-right aligned: query i sees key j iff j <= i + tk - tq
            i = torch.arange(tq)[:, None]
            j = torch.arange(tk)[None, :]
            scores = scores.masked_fill(j > i + tk - tq, -math.inf)
        p = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # a fully masked row: zeros
        out[b] = torch.einsum("hij,jhd->ihd", p, values[b, :tk])
    return out


def expected_output(a, softmax_scale=None):
    """The float64 output over the caches as they are now (after the op's append)."""
    d = a["q"].shape[-1]
    scale = d ** -0.5 if softmax_scale is None else softmax_scale
    t_new = 0 if a["k"] is None else a["k"].shape[1]
    total = [n + t_new for n in a["cache_seqlens"].tolist()]
    heads = a["q"].shape[2]
    latent_v = dequantize64(a["vc_cache"], a["vc_scale"])
    b_r = 0.0 if a["b_r"] is None else a["b_r"].double()
    values = (latent_v @ a["w_r"].double().T + b_r).unflatten(-1, (heads, d))
    if "k_cache" in a:
        keys = dequantize64(a["k_cache"], a["k_scale"])
    else:
        joint = a["kc_cache"] is None
        latent_k = latent_v if joint else dequantize64(a["kc_cache"], a["kc_scale"])
        nope = (latent_k @ a["w_kr"].double().T).unflatten(-1, (heads, -1))
        keys = torch.cat([dequantize64(a["krope_cache"], a["krope_scale"]), nope], dim=-1)
    return attend64(a["q"], keys, values, total, a["causal"], scale)


def new_latents64(a):
    """{cache name: (B, Tnew, R) float64} the latents of the new tokens (compress-on-write)."""
    s = {n: (a[n].double() if a.get(n) is not None else None)
         for n in ("k", "v", "w_kc", "b_kc", "w_c", "b_c")}
    if "k_cache" in a:
        return dict(vc_cache=s["v"] @ s["w_c"].T + (0.0 if s["b_c"] is None else s["b_c"]))
    k_nope = s["k"][..., a["krope_cache"].shape[-1]:].flatten(-2)
    b_c = 0.0 if s["b_c"] is None else s["b_c"]
    if a["kc_cache"] is None:
        return dict(vc_cache=torch.cat([k_nope, s["v"]], -1) @ s["w_c"].T + b_c)
    b_kc = 0.0 if s["b_kc"] is None else s["b_kc"]
    return dict(kc_cache=k_nope @ s["w_kc"].T + b_kc, vc_cache=s["v"] @ s["w_c"].T + b_c)


def quant_step(units, dtype):
    """The spacing of the stored grid at magnitude `units` (in units of the scale)."""
    if dtype == torch.int8:
        return torch.ones_like(units)
    # e4m3: 3 mantissa bits; subnormals below 2**-6 are spaced 2**-9
    return torch.exp2(torch.floor(torch.log2(units)).clamp(min=-6) - 3)


# ---------------------------------------------------------------------------------------------
# 1. Outputs against float64


def check_output(a, out, model_dtype):
    assert out.dtype == model_dtype and out.shape == a["q"].shape
    want = expected_output(a)
    assert torch.isfinite(out).all()
    assert rel_error(out, want) < TOLERANCES[model_dtype], rel_error(out, want)
    for b, n in enumerate(a["cache_seqlens"].tolist()):
        if n == 0 and a["k"] is None:  # nothing cached, nothing new: zeros
            assert torch.equal(out[b], torch.zeros_like(out[b]))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("model_dtype", MODEL_DTYPES, ids=MODEL_IDS)
@pytest.mark.parametrize("cache_dtype", QUANT_DTYPES, ids=QUANT_IDS)
def test_v_only_output_against_float64(cache_dtype, model_dtype, case, backend):
    a = make_args(uniform_storage(cache_dtype), model_dtype, case)
    check_output(a, call(a, backend), model_dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("rope_dim", [0, 8, 16])
@pytest.mark.parametrize("joint", [False, True], ids=["separate", "joint"])
@pytest.mark.parametrize("model_dtype", MODEL_DTYPES, ids=MODEL_IDS)
@pytest.mark.parametrize("cache_dtype", QUANT_DTYPES, ids=QUANT_IDS)
def test_latent_output_against_float64(cache_dtype, model_dtype, joint, rope_dim, case, backend):
    a = make_args(uniform_storage(cache_dtype), model_dtype, case, rope_dim, joint)
    check_output(a, call(a, backend), model_dtype)


# The CPU kernels score a pair of keys for 8 heads at a time, and switch to compiled-in loops
# for per-head key widths of 0, 16, 32 and 64 (the V-only op's head dim, or Dr): 8 and 9 heads
# (a group of 8, then one), at those widths and at an odd one.
@pytest.mark.parametrize("case", ["decode", "chunk-full"])
@pytest.mark.parametrize("heads, head_dim, rope_dim", [
    (8, 64, None), (9, 32, None), (9, 40, None), (8, 64, 16), (9, 64, 32), (8, 48, 0),
    (9, 24, 8)], ids=["v8-d64", "v9-d32", "v9-d40", "h8-dr16", "h9-dr32", "h8-dr0", "h9-dr8"])
@pytest.mark.parametrize("cache_dtype", [*QUANT_DTYPES, torch.bfloat16, torch.float32],
                         ids=[*QUANT_IDS, "bf16", "fp32"])
def test_wide_head_groups_against_float64(cache_dtype, heads, head_dim, rope_dim, case):
    check_one_storage_against_float64(cache_dtype, case, rope_dim, heads=heads,
                                      head_dim=head_dim)


def check_one_storage_against_float64(cache_dtype, case, rope_dim, **shape):
    """The ext op with every cache stored as cache_dtype (a float32 model for a quantized one,
    else a model of that dtype) against float64."""
    quantized = is_quantized(cache_dtype)
    model_dtype = torch.float32 if quantized else cache_dtype
    storage = uniform_storage(cache_dtype) if quantized else {}
    a = make_args(storage, model_dtype, case, rope_dim, **shape)
    check_output(a, call(a, "ext"), model_dtype)


# Several key blocks of 64 with ragged ends, and ranks wide enough for every column tile of the
# rank update (int8's 4 rows x 3 vectors with AVX2, bf16's pairs of vectors) and its tails.
LONG_CASES = {"decode": ([150, 37, 129], 1, 1, True), "chunk": ([70, 0, 131], 3, 3, True)}


@pytest.mark.parametrize("case", list(LONG_CASES))
@pytest.mark.parametrize("rope_dim", [None, 16], ids=["v-only", "latent"])
@pytest.mark.parametrize("cache_dtype", [*QUANT_DTYPES, torch.bfloat16, torch.float16,
                                         torch.float32], ids=[*QUANT_IDS, "bf16", "fp16", "fp32"])
def test_long_caches_wide_ranks_against_float64(cache_dtype, rope_dim, case):
    check_one_storage_against_float64(cache_dtype, LONG_CASES[case], rope_dim, heads=8,
                                      head_dim=64, k_rank=37, v_rank=43, t_max=160)


# The absorbed query's rank update at a K_c rank wider than its widest row tile (twelve
# vectors: 96 float32 columns with AVX2, 192 with AVX-512) with every rest: 3 query rows alone
# (decode) and 9 (a group of four rows, twice, and one alone).
@pytest.mark.parametrize("case", list(LONG_CASES))
@pytest.mark.parametrize("cache_dtype", [torch.int8, torch.bfloat16, torch.float32],
                         ids=["int8", "bf16", "fp32"])
def test_wide_latent_rank_against_float64(cache_dtype, case):
    check_one_storage_against_float64(cache_dtype, LONG_CASES[case], 16, heads=8, head_dim=64,
                                      k_rank=403, v_rank=43, t_max=160)


# ---------------------------------------------------------------------------------------------
# 2. The rows an append writes


def check_written_rows(a, before):
    """Per-head keys (k, or k's rotary dims) as quantize_rows writes them, bitwise (a float
    cache: k itself); latents within one quantization step of the float64 compress, their scales
    within float32 rounding (a float cache: within float32 rounding); every other slot and
    scale byte-for-byte as it was."""
    t_new = a["k"].shape[1]
    key_name = "k_cache" if "k_cache" in a else "krope_cache"
    latents = new_latents64(a)
    for b, n in enumerate(a["cache_seqlens"].tolist()):
        rows = slice(n, n + t_new)
        for name in state_names(a):
            assert torch.equal(as_bytes(a[name][b, :n]), as_bytes(before[name][b, :n])), name
            assert torch.equal(as_bytes(a[name][b, n + t_new:]),
                               as_bytes(before[name][b, n + t_new:])), name
        new_keys = a["k"][b, ..., :a[key_name].shape[-1]]
        check_key_rows(a[key_name][b, rows], a[SCALE_OF[key_name]], (b, rows), new_keys)
        for name, exact in latents.items():
            check_latent_rows(a[name][b, rows], a[SCALE_OF[name]], (b, rows), exact[b])


def check_key_rows(stored, scales, index, new_keys):
    if scales is None:
        assert torch.equal(stored, new_keys.to(stored.dtype))
        return
    want, want_scale = quantize_rows(new_keys, stored.dtype)
    assert torch.equal(as_bytes(stored), as_bytes(want))
    assert torch.equal(as_bytes(scales[index]), as_bytes(want_scale))


def check_latent_rows(stored, scales, index, exact):
    if scales is None:
        tol = max(TOLERANCES[stored.dtype], 1e-6)
        assert rel_error(stored, exact) < tol
        return
    scale = scales[index]
    _, want_scale = quantize_rows(exact, stored.dtype)
    torch.testing.assert_close(scale, want_scale, rtol=1e-5, atol=0)
    units = stored.double().abs()
    step = quant_step(torch.maximum(units, exact.abs() / want_scale.double()[:, None]),
                      stored.dtype)
    # one step of the grid, and what a scale 1e-5 off does to the largest stored values
    bound = (step + 1e-5 * units) * want_scale.double()[:, None]
    err = (dequantize64(stored, scale) - exact).abs()
    assert (err <= bound).all(), (err - bound).max()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", ["decode", "chunk", "chunk-full"])
@pytest.mark.parametrize("model_dtype", MODEL_DTYPES, ids=MODEL_IDS)
@pytest.mark.parametrize("cache_dtype", QUANT_DTYPES, ids=QUANT_IDS)
def test_v_only_written_rows(cache_dtype, model_dtype, case, backend):
    a = make_args(uniform_storage(cache_dtype), model_dtype, case)
    before = snapshot(a)
    call(a, backend)
    check_written_rows(a, before)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", ["decode", "chunk"])
@pytest.mark.parametrize("rope_dim", [0, 8, 16])
@pytest.mark.parametrize("joint", [False, True], ids=["separate", "joint"])
@pytest.mark.parametrize("model_dtype", MODEL_DTYPES, ids=MODEL_IDS)
@pytest.mark.parametrize("cache_dtype", QUANT_DTYPES, ids=QUANT_IDS)
def test_latent_written_rows(cache_dtype, model_dtype, joint, rope_dim, case, backend):
    a = make_args(uniform_storage(cache_dtype), model_dtype, case, rope_dim, joint)
    before = snapshot(a)
    call(a, backend)
    check_written_rows(a, before)


# ---------------------------------------------------------------------------------------------
# 3. Layouts that mix float and quantized caches (None: the model's dtype)

MIXED = {
    "v-only float keys": (dict(k_cache=None, vc_cache=torch.int8), None, False),
    "v-only int8 keys e4m3 values": (dict(k_cache=torch.int8, vc_cache=E4M3), None, False),
    "float rope int8 latents": (dict(krope_cache=None, kc_cache=torch.int8,
                                     vc_cache=torch.int8), 8, False),
    "e4m3 rope int8 latents": (dict(krope_cache=E4M3, kc_cache=torch.int8,
                                    vc_cache=torch.int8), 16, False),
    "int8 rope float latents": (dict(krope_cache=torch.int8, kc_cache=None,
                                     vc_cache=None), 8, False),
    "int8 rope float key latent e4m3 values": (dict(krope_cache=torch.int8, kc_cache=None,
                                                    vc_cache=E4M3), 8, False),
    "e4m3 rope int8 joint": (dict(krope_cache=E4M3, vc_cache=torch.int8), 8, True),
    "float rope e4m3 joint": (dict(krope_cache=None, vc_cache=E4M3), 16, True),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", ["decode", "chunk", "read"])
@pytest.mark.parametrize("model_dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("layout", list(MIXED))
def test_mixed_layouts(layout, model_dtype, case, backend):
    storage, rope_dim, joint = MIXED[layout]
    a = make_args(storage, model_dtype, case, rope_dim, joint)
    before = snapshot(a)
    out = call(a, backend)
    check_output(a, out, model_dtype)
    if a["k"] is not None:
        check_written_rows(a, before)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("scale_name, rope_dim", [
    ("k_scale", None), ("vc_scale", None),
    ("krope_scale", 16), ("kc_scale", 16), ("vc_scale", 16)])
def test_nan_scale_inside_the_prefix_is_data(scale_name, rope_dim, backend):
    """A scale is cache data, as the stored values are: a NaN one at a position the attention
    reads makes that sequence's output NaN, as float math on the dequantized row does, and
    leaves the other sequences' outputs exactly as they were (the NaN tails never count)."""
    a = make_args(uniform_storage(torch.int8), torch.float32, "read", rope_dim)
    clean = call(a, backend)
    a[scale_name][0, 2] = float("nan")  # sequence 0 holds 6 rows; both its queries see row 2
    out = call(a, backend)
    assert out[0].isnan().any()
    assert torch.equal(out[1:], clean[1:])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("value", [float("inf"), float("-inf")])
def test_infinite_latent_key_scale_gives_the_float_math(value, backend):
    """The kernels multiply a finite K_c scale into the finished partial sums rather than into
    each value. An infinite one must still give the float math on the dequantized row: here
    its products are +inf and -inf, so the score is NaN. Applied late, the scale would meet
    partial sums that are all positive (AVX2's 8 lanes), and -inf would mask the key, giving a
    finite output."""
    a = make_args(uniform_storage(torch.int8), torch.float32, "read", 16, k_rank=16)
    a["q"] = a["q"].abs() + 0.5  # absorbed queries all positive, of similar sizes
    a["w_kr"] = a["w_kr"].abs() + 0.5
    a["kc_cache"][0, 2] = torch.tensor([100] * 8 + [-1] * 8, dtype=torch.int8)
    finite_scales = a["kc_scale"].clone()
    a["kc_scale"][0, 2] = value
    out = call(a, backend)
    assert out[0].isnan().all()
    assert torch.equal(out[1:], call(replace_args(a, kc_scale=finite_scales), backend)[1:])


# ---------------------------------------------------------------------------------------------
# 4. Bad input: the same message from the Python checks (reference) and the C++ checks (ext),
# naming the argument, and nothing written

ERR_CASE = ([3, 0, 9], 2, 2, True)
V_SHAPE = rf"\({B}, {TMAX}, {H}\)"
LATENT_SHAPE = rf"\({B}, {TMAX}\)"


def float_cache_of(a, name):
    return torch.full(a[name].shape, float("nan"), dtype=a["q"].dtype)


def cache_dtype_case(name, dtype):
    """A cache of an unsupported dtype (its scale still given)."""
    return (lambda a: replace_args(a, **{name: a[name].float().to(dtype)}), TypeError,
            rf"{name} must have dtype torch.float32 like q, or be quantized")


def scale_cases(cache_name, shape):
    s = SCALE_OF[cache_name]
    return {
        f"{s} missing": (lambda a: replace_args(a, **{s: None}), ValueError,
                         rf"{s} \(float32, shape {shape}\) is required: {cache_name} is"),
        f"{s} for a float cache": (lambda a: replace_args(a, **{cache_name: float_cache_of(
            a, cache_name)}), ValueError, rf"{s} must be None: {cache_name} is torch.float32"),
        f"{s} shape": (lambda a: replace_args(a, **{s: a[s][:, :-1]}), ValueError,
                       rf"{s} must have shape {shape}"),
        f"{s} rank": (lambda a: replace_args(a, **{s: a[s][..., None]}), ValueError,
                      rf"{s} must be {scale_rank(cache_name)}-D"),
        f"{s} float64": (lambda a: replace_args(a, **{s: a[s].double()}), TypeError,
                         rf"{s} must have dtype torch.float32, got torch.float64"),
        f"{s} float16": (lambda a: replace_args(a, **{s: a[s].half()}), TypeError,
                         rf"{s} must have dtype torch.float32, got torch.float16"),
        f"{s} device": (lambda a: replace_args(a, **{s: a[s].to("meta")}), ValueError,
                        rf"{s} must be on cpu"),
        f"{s} not a tensor": (lambda a: replace_args(a, **{s: a[s].tolist()}), TypeError,
                              rf"{s} must be a torch.Tensor"),
        f"{s} expanded": (lambda a: replace_args(a, **{s: a[s][:1].expand_as(a[s])}),
                          ValueError, rf"{s} has elements that share memory"),
    }


def scale_rank(cache_name):
    return 3 if cache_name in ("k_cache", "krope_cache") else 2


def cache_dtype_cases(names):
    cases = {}
    for name in names:
        for dtype in (torch.uint8, torch.float8_e5m2, torch.int16, torch.float64,
                      torch.bfloat16):
            cases[f"{name} {str(dtype)[6:]}"] = cache_dtype_case(name, dtype)
    return cases


V_ONLY_BAD = {**scale_cases("k_cache", V_SHAPE), **scale_cases("vc_cache", LATENT_SHAPE),
              **cache_dtype_cases(["k_cache", "vc_cache"])}
LATENT_BAD = {**scale_cases("krope_cache", V_SHAPE), **scale_cases("kc_cache", LATENT_SHAPE),
              **scale_cases("vc_cache", LATENT_SHAPE),
              **cache_dtype_cases(["krope_cache", "kc_cache", "vc_cache"])}
JOINT_BAD = {
    "kc_scale with the joint latent": (
        lambda a: replace_args(a, kc_scale=torch.ones(B, TMAX)), ValueError,
        r"kc_scale must be None: kc_cache is None, not quantized"),
    **scale_cases("vc_cache", LATENT_SHAPE),
}
# (op, storage): V-only int8 keys with e4m3 values; latent e4m3 rope with int8 latents
BAD_SETUPS = {"v-only": (None, False, dict(k_cache=torch.int8, vc_cache=E4M3), V_ONLY_BAD),
              "latent": (8, False, dict(krope_cache=E4M3, kc_cache=torch.int8,
                                        vc_cache=torch.int8), LATENT_BAD),
              "joint": (8, True, dict(krope_cache=torch.int8, vc_cache=E4M3), JOINT_BAD)}
BAD_CASES = [(setup, case) for setup, (*_, table) in BAD_SETUPS.items() for case in table]


@pytest.mark.parametrize("setup,case", BAD_CASES, ids=[f"{s}: {c}" for s, c in BAD_CASES])
def test_bad_input_same_error_on_every_backend_writes_nothing(setup, case):
    rope_dim, joint, storage, table = BAD_SETUPS[setup]
    mutate, exc, pattern = table[case]
    a = mutate(make_args(storage, torch.float32, ERR_CASE, rope_dim, joint))
    before = snapshot(a)
    assert_same_error_on_every_backend(lambda backend: call(a, backend), BACKENDS,
                                       lambda: assert_nothing_written(a, before))
    with pytest.raises(exc, match=pattern):
        call(a, "ext")
    assert_nothing_written(a, before)


# ---------------------------------------------------------------------------------------------
# 5. Overflow writes nothing, also through the raw ops (the C++ checks alone)

OVERFLOW_SETUPS = {"v-only": (None, False), "latent": (8, False), "joint": (0, True)}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("setup", list(OVERFLOW_SETUPS))
@pytest.mark.parametrize("cache_dtype", QUANT_DTYPES, ids=QUANT_IDS)
def test_overflow_writes_nothing(cache_dtype, setup, backend):
    rope_dim, joint = OVERFLOW_SETUPS[setup]
    a = make_args(uniform_storage(cache_dtype), torch.float32, ([TMAX - 3, 0, 4], 2, 4, True),
                  rope_dim, joint)  # 10 + 4 > 13
    before = snapshot(a)
    with pytest.raises(ValueError, match=rf"would overflow the cache of Tmax={TMAX}"):
        call(a, backend)
    assert_nothing_written(a, before)
    if backend == "ext":
        with pytest.raises(ValueError, match="overflow"):
            raw_op(a)
        assert_nothing_written(a, before)


def raw_op(a, softmax_scale=0.3):
    if "k_cache" in a:
        return torch.ops.vdproj_ext.kvcache_attention(
            a["q"], a["k_cache"], a["vc_cache"], a["w_r"], a["b_r"], a["k"], a["v"], a["w_c"],
            a["b_c"], a["cache_seqlens"], a["causal"], softmax_scale, a["k_scale"],
            a["vc_scale"])
    return torch.ops.vdproj_ext.ckv_kvcache_attention(
        a["q"], a["krope_cache"], a["kc_cache"], a["vc_cache"], a["w_kr"], a["w_r"], a["b_r"],
        a["k"], a["v"], a["w_kc"], a["b_kc"], a["w_c"], a["b_c"], a["cache_seqlens"],
        a["causal"], softmax_scale, a["krope_scale"], a["kc_scale"], a["vc_scale"])


# ---------------------------------------------------------------------------------------------
# 6. torch.library.opcheck with quantized caches and scales


def without_nan(a):
    """opcheck compares whole caches and scales between runs, so no NaN anywhere."""
    for name in state_names(a):
        t = a[name]
        if t.is_floating_point() and t.dtype != E4M3:
            a[name] = t.nan_to_num(1.0)
        elif t.dtype == E4M3:
            a[name] = t.float().nan_to_num(0.0).to(E4M3)
    return a


@pytest.mark.parametrize("setup", list(OVERFLOW_SETUPS))
@pytest.mark.parametrize("cache_dtype", QUANT_DTYPES, ids=QUANT_IDS)
def test_opcheck(cache_dtype, setup):
    rope_dim, joint = OVERFLOW_SETUPS[setup]
    for case in ("chunk", "read"):
        a = without_nan(make_args(uniform_storage(cache_dtype), torch.float32, case, rope_dim,
                                  joint))
        if "k_cache" in a:
            op = torch.ops.vdproj_ext.kvcache_attention.default
            args = (a["q"], a["k_cache"], a["vc_cache"], a["w_r"], a["b_r"], a["k"], a["v"],
                    a["w_c"], a["b_c"], a["cache_seqlens"], a["causal"], 0.3, a["k_scale"],
                    a["vc_scale"])
        else:
            op = torch.ops.vdproj_ext.ckv_kvcache_attention.default
            args = (a["q"], a["krope_cache"], a["kc_cache"], a["vc_cache"], a["w_kr"],
                    a["w_r"], a["b_r"], a["k"], a["v"], a["w_kc"], a["b_kc"], a["w_c"],
                    a["b_c"], a["cache_seqlens"], a["causal"], 0.3, a["krope_scale"],
                    a["kc_scale"], a["vc_scale"])
        # torch's SchemaCheckMode compares tensors with arithmetic that float8 lacks ("mul" not
        # implemented for Float8_e4m3fn); the int8 runs check the same schema's mutations.
        utils = [u for u in ("test_schema", "test_autograd_registration", "test_faketensor",
                             "test_aot_dispatch_dynamic")
                 if not (u == "test_schema" and cache_dtype == E4M3)]
        torch.library.opcheck(op, args, test_utils=utils)


# ---------------------------------------------------------------------------------------------
# 7. Every stored value through the kernels' conversions, under every instruction-set build
#
# One sequence of two cached keys: key 0 holds the values under test, key 1 zeros. The values
# go in twice, as key 0's row (H, D) and as value latent row 0 (R = H*D, restored by the
# identity), value row 1 being their negation (int8: zeros). Query i of head h is one-hot on
# dim i, scaled so that its score is about +-1: the output then carries each key element in
# its own query's P0 - P1, and each value element in its own column. With only key 0 visible
# (cache_seqlens = 1, P0 = 1) the output is value row 0 itself, exactly.


def every_e4m3():
    """The 254 finite float8_e4m3fn bit patterns (0x7F and 0xFF are NaN), as (2, 127)."""
    bits = [b for b in range(256) if b & 0x7F != 0x7F]
    return torch.tensor(bits, dtype=torch.uint8).view(E4M3).reshape(2, 127)


def every_int8():
    """-128 .. 127 and a 0: (1, 257), a length no vector width divides."""
    return torch.cat([torch.arange(-128, 128), torch.zeros(1)]).to(torch.int8).reshape(1, 257)


def special_half(dtype):
    """Subnormals, +-0, the extremes and ordinary values of bf16 or fp16, as (2, 45)."""
    info = torch.finfo(dtype)
    tiny, sub = info.tiny, info.smallest_normal * info.eps  # smallest normal, subnormal
    special = [0.0, -0.0, sub, -sub, 3 * sub, tiny - sub, -(tiny - sub), tiny / 2, tiny,
               -tiny, info.max, -info.max, info.max / 3, 1.0, -1.0, 2.0 ** -20]
    g = torch.Generator().manual_seed(5)
    ordinary = torch.randn(90 - len(special), generator=g, dtype=torch.float64) * 10
    values = torch.cat([torch.tensor(special, dtype=torch.float64), ordinary])
    return values.to(dtype).reshape(2, 45)


def readout_args(stored, model_dtype):
    h, d = stored.shape
    cache_dtype = stored.dtype
    quantized = is_quantized(cache_dtype)
    # slot 2 is unused: NaN for the quantized dtypes (int8: -128 with a NaN scale), inf else
    unused_k = unused_cache((h, d), cache_dtype) if quantized else torch.full((h, d), math.inf)
    negated = (torch.zeros_like(stored) if cache_dtype == torch.int8
               else (-stored.float()).to(cache_dtype))
    k_cache = torch.stack([stored, torch.zeros_like(stored), unused_k.to(cache_dtype)])[None]
    vc_cache = k_cache.flatten(-2).clone()
    vc_cache[0, 1] = negated.flatten()
    a = dict(k_cache=k_cache, vc_cache=vc_cache, k_scale=None, vc_scale=None)
    if quantized:
        a["k_scale"] = torch.tensor([0.75, 1.0, math.nan])[None, :, None].repeat(1, 1, h)
        a["vc_scale"] = torch.tensor([[1.25, 1.25, math.nan]])
    keys = dequantize64(a["k_cache"], a["k_scale"])[0, 0]  # (h, d)
    # the query scale that makes each score about +-1, a power of two within reach of the
    # model dtype (and of float32 once multiplied by softmax_scale and log2(e))
    lim = min(60, int(math.log2(torch.finfo(model_dtype).max)) - 2)
    power = (-torch.log2(keys.abs())).round().nan_to_num(0.0, posinf=0.0).clamp(-lim, lim)
    q = torch.zeros(1, d, h, d, dtype=torch.float64)
    for i in range(d):
        q[0, i, :, i] = torch.exp2(power[:, i])
    a.update(q=q.to(model_dtype), w_r=torch.eye(h * d, dtype=model_dtype), b_r=None, k=None,
             v=None, w_c=None, b_c=None, causal=False)
    return a


def check_every_stored_value(stored, model_dtype, rtol):
    a = readout_args(stored, model_dtype)
    # only key 0 visible: the output is value row 0, exactly
    one = dict(a, cache_seqlens=torch.tensor([1], dtype=torch.int32))
    out = call(one, "ext", softmax_scale=2.0)
    row = dequantize64(a["vc_cache"], a["vc_scale"])[0, 0].to(model_dtype)
    want = row.reshape(stored.shape)[None, None].expand_as(out)
    assert torch.equal(out, want), (stored.dtype, (out.double() - want.double()).abs().max())
    # both keys: each key element in its query's score
    two = dict(a, cache_seqlens=torch.tensor([2], dtype=torch.int32))
    out = call(two, "ext", softmax_scale=2.0)
    want = expected_output(two, softmax_scale=2.0)
    tiny = torch.finfo(model_dtype).smallest_normal * torch.finfo(model_dtype).eps
    torch.testing.assert_close(out.double(), want, rtol=rtol, atol=tiny,
                               msg=lambda m: f"{stored.dtype} keys: {m}")


def check_every_stored_value_latent(stored):
    """The same values in the rotary keys and both latents of the latent-key op, against float64
    at float32 tolerance (random queries and restores)."""
    h, d = stored.shape
    g = torch.Generator().manual_seed(3)
    rank = h * d
    k_rope = stored[None, None].repeat(1, 2, 1, 1)
    latent = stored.flatten()[None, None].repeat(1, 2, 1)
    scale = dict(krope_scale=torch.full((1, 2, h), 0.5), kc_scale=torch.full((1, 2), 0.25),
                 vc_scale=torch.full((1, 2), 0.125))
    a = dict(q=torch.randn(1, 3, h, d + 5, generator=g), krope_cache=k_rope, kc_cache=latent,
             vc_cache=latent.clone(), w_kr=torch.randn(h * 5, rank, generator=g) / rank,
             w_r=torch.randn(h * (d + 5), rank, generator=g) / rank, b_r=None, k=None, v=None,
             w_kc=None, b_kc=None, w_c=None, b_c=None, causal=False,
             cache_seqlens=torch.tensor([2], dtype=torch.int32), **scale)
    out = call(a, "ext")
    want = expected_output(a)
    assert rel_error(out, want) < 1e-5, (stored.dtype, rel_error(out, want))


def check_conversions(flush_denormal=False):
    """Every check of section 7 in this process (run under each VDPROJ_CPU_ISA). With
    flush_denormal (torch.set_flush_denormal(True): denormals read as zero) the quantized codes
    only: e4m3's subnormals are ordinary values once scaled, which an upcast passing a float32
    denormal through a multiply would read as zero in this mode (the kernels' first one did).
    bf16 / fp16 subnormals are float32 denormals themselves, which that mode flushes in any
    float32 arithmetic."""
    torch.set_flush_denormal(flush_denormal)
    for stored in (every_e4m3(), every_int8()):
        check_every_stored_value(stored, torch.float32, rtol=1e-5)
        check_every_stored_value_latent(stored)
    if not flush_denormal:
        check_every_stored_value(special_half(torch.bfloat16), torch.bfloat16, rtol=2 ** -7)
        check_every_stored_value(special_half(torch.float16), torch.float16, rtol=2 ** -10)


@pytest.mark.parametrize("flush_denormal", [False, True], ids=["normal", "flush_denormal"])
@pytest.mark.parametrize("isa", ["baseline", "avx2", None], ids=["baseline", "avx2", "default"])
def test_every_stored_value_under_every_instruction_set(isa, flush_denormal):
    script = f"import test_quant_cache as t; t.check_conversions({flush_denormal}); print('ok')"
    assert "ok" in run_python(["-c", script], VDPROJ_CPU_ISA=isa)


# ---------------------------------------------------------------------------------------------
# quantize_into: rows computed outside the kvcache ops (a folded model's) quantized into a cache


@pytest.mark.parametrize("cache_dtype", QUANT_DTYPES, ids=QUANT_IDS)
@pytest.mark.parametrize("value_dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("row_shape", [(5, 13), (19,)], ids=["per-head", "latent"])
def test_quantize_into_writes_what_write_rows_writes(cache_dtype, value_dtype, row_shape):
    """The compiled quantize_into and the Python write_rows write the same bytes and scales at
    cache_seqlens[b] onwards (ragged, one sequence ending at Tmax), and nothing else; the cache
    a strided view, as KVCache's (B, Tmax, H, D) views of (B, H, Tmax, D) storage are."""
    from vdproj_ext.ops.quant import write_rows
    g = torch.Generator().manual_seed(5)
    batch, t_max, t_new = 3, 11, 2
    lens = torch.tensor([0, 9, 4], dtype=torch.int32)
    values = (torch.randn(batch, t_new, *row_shape, generator=g) * 3).to(value_dtype)
    values[1, 0] = 0  # an all-zero row: scale 1
    storage = torch.full((batch, *row_shape[:-1], t_max, row_shape[-1]), float("nan"))
    caches, scales = [], []
    for _ in range(2):
        view = storage.to(cache_dtype).movedim(-2, 1) if len(row_shape) == 2 else \
            storage.to(cache_dtype)
        caches.append(view)
        scales.append(torch.full(view.shape[:-1], float("nan")))
    torch.ops.vdproj_ext.quantize_into(caches[0], scales[0], values, lens)
    positions = lens.long()[:, None] + torch.arange(t_new)
    rows = torch.arange(batch)[:, None].expand_as(positions)
    write_rows(caches[1], scales[1], (rows, positions), values)
    assert torch.equal(caches[0].view(torch.uint8), caches[1].view(torch.uint8))
    assert torch.equal(scales[0].isnan(), scales[1].isnan())
    assert torch.equal(scales[0].nan_to_num(), scales[1].nan_to_num())
    assert (scales[0][1, 9] == 1.0).all()  # the all-zero row
    assert scales[0].isnan().sum() == scales[0].numel() - batch * t_new * scales[0][0, 0].numel()


def test_quantize_into_rejects_overflow_and_writes_nothing():
    cache = torch.zeros(2, 4, 8, dtype=torch.int8)
    scale = torch.ones(2, 4)
    before = cache.clone(), scale.clone()
    with pytest.raises(ValueError, match="overflow the cache of Tmax=4"):
        torch.ops.vdproj_ext.quantize_into(cache, scale, torch.randn(2, 2, 8),
                                           torch.tensor([1, 3], dtype=torch.int32))
    with pytest.raises(ValueError, match="scale must have shape"):
        torch.ops.vdproj_ext.quantize_into(cache, torch.ones(2, 5), torch.randn(2, 1, 8),
                                           torch.tensor([0, 0], dtype=torch.int32))
    with pytest.raises(TypeError, match="cache must be torch.int8 or torch.float8_e4m3fn"):
        torch.ops.vdproj_ext.quantize_into(cache.float(), scale, torch.randn(2, 1, 8),
                                           torch.tensor([0, 0], dtype=torch.int32))
    assert torch.equal(cache, before[0]) and torch.equal(scale, before[1])


# ---------------------------------------------------------------------------------------------
# 8. The CUDA kernels (skipped without a GPU): the outputs and written rows of sections 1 and 2,
# on shapes the kernels take (head_dim 64; with a quantized cache every row width a multiple of
# 16) and a cache long enough for several blocks of rows; the caches go to the GPU, the checks
# run on what comes back.

CUDA_CASES = {  # (seqlens, Tq, Tnew, causal), Tmax 203
    "decode": ([117, 0, 202], 1, 1, True),
    "chunk": ([0, 41, 200], 3, 3, True),
    "read": ([150, 0, 203], 2, 0, True),
    "chunk-full": ([77, 1, 0], 2, 2, False),
}
CUDA_LAYOUTS = {"v-only": (None, False), "latent-dr16": (16, False), "latent-dr0": (0, False),
                "joint-dr16": (16, True)}


def on_device(a, device):
    return {n: (t.to(device) if isinstance(t, torch.Tensor) else t) for n, t in a.items()}


def takes_kernel_path(g):
    from vdproj_ext.ops import routing
    if "k_cache" in g:
        return not routing.kvcache_uses_batched_aten(g["q"], g["k_cache"], g["vc_cache"],
                                                     g["w_r"], g["k"], g["v"], g["w_c"])
    return not routing.ckv_kvcache_uses_batched_aten(
        g["q"], g["krope_cache"], g["kc_cache"], g["vc_cache"], g["w_r"], g["k"], g["v"],
        g["w_kc"], g["w_c"])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("case", list(CUDA_CASES))
@pytest.mark.parametrize("layout", list(CUDA_LAYOUTS))
@pytest.mark.parametrize("model_dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("cache_dtype", QUANT_DTYPES, ids=QUANT_IDS)
def test_cuda_kernels_against_float64(cache_dtype, model_dtype, layout, case):
    rope_dim, joint = CUDA_LAYOUTS[layout]
    a = make_args(uniform_storage(cache_dtype), model_dtype, CUDA_CASES[case], rope_dim, joint,
                  heads=8, head_dim=64, k_rank=96, v_rank=144, t_max=203)
    before = snapshot(a)
    g = on_device(a, "cuda")
    assert takes_kernel_path(g), "the CUDA kernels should take this case"
    out = call(g, "ext")
    torch.cuda.synchronize()
    a = on_device(g, "cpu")
    check_output(a, out.cpu(), model_dtype)
    if a["k"] is not None:
        check_written_rows(a, before)
