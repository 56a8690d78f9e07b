"""compressed_attn_with_kvcache with backend="ext": compress-on-write and restore-on-read.

Caches are NaN beyond each sequence's valid length, so any read past it shows up as NaN in
the output. Written slots are checked (k exactly, v_c against the reference compress), and
every slot not written must still be NaN afterwards.
"""
import pytest
import torch

from conftest import TOLERANCES, rel_error
from helpers import make_cache, make_step, run_kvcache, to_float64
from vdproj_ext import reference


def check_slots(k_cache, vc_cache, step, seqlens, t_new, t_max, dtype):
    """k written exactly, v_c written to tolerance, every other slot past the prefix NaN."""
    if t_new:
        v_c_new = reference.compress_values(step["v"].double(), step["w_c"].double(),
                                            step["b_c"].double() if step["b_c"] is not None
                                            else None)
    for i, n in enumerate(seqlens.tolist()):
        if t_new:
            assert torch.equal(k_cache[i, n:n + t_new], step["k"][i])
            written = vc_cache[i, n:n + t_new]
            assert rel_error(written, v_c_new[i]) < max(TOLERANCES[dtype], 1e-6)
        assert torch.isnan(k_cache[i, n + t_new:]).all()
        assert torch.isnan(vc_cache[i, n + t_new:]).all()


# (B, Tmax, H, D, R, seqlens, Tq, Tnew)
CASES = [
    (3, 40, 3, 24, 37, [17, 0, 33], 1, 1),       # decode step with append, one empty sequence
    (3, 40, 3, 24, 37, [17, 5, 40], 1, 0),       # pure read, one sequence full
    (2, 90, 2, 16, 21, [0, 30], 5, 5),           # prefill-like chunk appended
    (2, 90, 2, 16, 21, [10, 41], 3, 0),          # several queries, no append
    (2, 700, 4, 32, 50, [700, 313], 1, 0),       # long: flash-decoding splits, partial blocks
    (2, 160, 5, 8, 13, [0, 80], 70, 70),         # Tq > one tile; Tq > cached for sequence 0
    (2, 3000, 4, 32, 50, [2999, 1777], 1, 1),    # big enough for both threads and 4 splits
]
CASE_IDS = ["decode-append", "read-only", "chunk-append", "multi-q", "long-split", "prefill",
            "threads-split"]


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("layout", ["contiguous", "strided"])
def test_float32_against_reference(device, case, causal, layout):
    b, t_max, h, d, r, lens, tq, t_new = case
    seqlens = torch.tensor(lens, dtype=torch.int32, device=device)
    k_cache, vc_cache = make_cache(b, t_max, h, d, r, lens, device, torch.float32, layout)
    k64, vc64 = k_cache.double().clone(), vc_cache.double().clone()
    step = make_step(b, tq, t_new, h, d, r, device, torch.float32)
    out = run_kvcache(step, k_cache, vc_cache, seqlens, causal, "ext")
    ref = run_kvcache(to_float64(step), k64, vc64, seqlens, causal, "reference")
    assert out.dtype == torch.float32 and out.shape == (b, tq, h, d)
    assert torch.isfinite(out).all()
    assert rel_error(out, ref) < 1e-5
    assert torch.equal(seqlens.cpu(), torch.tensor(lens, dtype=torch.int32))  # not advanced
    check_slots(k_cache, vc_cache, step, seqlens.cpu(), t_new, t_max, torch.float32)


def test_decode_sequence_matches_full_attention(device):
    """Appending one token at a time gives the same outputs as one causal call."""
    b, h, d, r, t = 2, 4, 16, 24, 37
    step = make_step(b, t, t, h, d, r, device, torch.float32)
    k_cache, vc_cache = make_cache(b, t + 3, h, d, r, [0, 0], device, torch.float32)
    outs = []
    for i in range(t):
        one = dict(step, q=step["q"][:, i:i + 1], k=step["k"][:, i:i + 1], v=step["v"][:, i:i + 1])
        seqlens = torch.full((b,), i, dtype=torch.int32, device=device)
        outs.append(run_kvcache(one, k_cache, vc_cache, seqlens, True, "ext"))
    k64, vc64 = make_cache(b, t + 3, h, d, r, [0, 0], device, torch.float64)
    ref = run_kvcache(to_float64(step), k64, vc64,
                      torch.zeros(b, dtype=torch.int32, device=device), True, "reference")
    assert rel_error(torch.cat(outs, 1), ref) < 1e-5


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_low_precision_within_twice_reference_error(device, dtype):
    b, t_max, h, d, r, lens, tq, t_new = 3, 300, 4, 24, 37, [150, 0, 297], 2, 2
    seqlens = torch.tensor(lens, dtype=torch.int32, device=device)
    k_cache, vc_cache = make_cache(b, t_max, h, d, r, lens, device, dtype)
    k_ref, vc_ref = k_cache.clone(), vc_cache.clone()
    step = make_step(b, tq, t_new, h, d, r, device, dtype)
    out = run_kvcache(step, k_cache, vc_cache, seqlens, True, "ext")
    ref_low = run_kvcache(step, k_ref, vc_ref, seqlens, True, "reference")
    # float64 truth on the same low-precision cache contents (after the append).
    exact = run_kvcache(to_float64(dict(step, k=None, v=None, w_c=None, b_c=None)),
                        k_ref.double(), vc_ref.double(), seqlens + t_new, True, "reference")
    assert out.dtype == dtype
    err, ref_err = rel_error(out, exact), rel_error(ref_low, exact)
    assert err <= 2 * ref_err, (err, ref_err)
    assert err < TOLERANCES[dtype]
    check_slots(k_cache, vc_cache, step, seqlens.cpu(), t_new, t_max, dtype)


def test_float64_native(device):
    b, t_max, h, d, r, lens = 2, 50, 3, 8, 11, [20, 49]
    seqlens = torch.tensor(lens, dtype=torch.int32, device=device)
    k_cache, vc_cache = make_cache(b, t_max, h, d, r, lens, device, torch.float64)
    k_ref, vc_ref = k_cache.clone(), vc_cache.clone()
    step = make_step(b, 1, 1, h, d, r, device, torch.float64)
    out = run_kvcache(step, k_cache, vc_cache, seqlens, True, "ext")
    ref = run_kvcache(step, k_ref, vc_ref, seqlens, True, "reference")
    assert rel_error(out, ref) < 1e-12
    assert torch.equal(k_cache.nan_to_num(7.0), k_ref.nan_to_num(7.0))
    assert rel_error(vc_cache[:, :50].nan_to_num(0.0), vc_ref[:, :50].nan_to_num(0.0)) < 1e-14


def test_empty_and_zero_sizes(device):
    # B = 0, and every sequence empty with nothing appended (rows see no key -> zeros).
    step = make_step(0, 1, 1, 2, 8, 5, device, torch.float32)
    k_cache, vc_cache = make_cache(0, 4, 2, 8, 5, [], device, torch.float32)
    out = run_kvcache(step, k_cache, vc_cache, torch.zeros(0, dtype=torch.int32, device=device),
                      True, "ext")
    assert out.shape == (0, 1, 2, 8)
    step = make_step(2, 3, 0, 2, 8, 5, device, torch.float32)
    k_cache, vc_cache = make_cache(2, 4, 2, 8, 5, [0, 0], device, torch.float32)
    out = run_kvcache(step, k_cache, vc_cache, torch.zeros(2, dtype=torch.int32, device=device),
                      True, "ext")
    assert torch.equal(out, torch.zeros_like(out))


def test_overflow_raises_and_writes_nothing(device):
    b, t_max, h, d, r = 2, 8, 2, 8, 5
    lens = [3, 7]
    seqlens = torch.tensor(lens, dtype=torch.int32, device=device)
    k_cache, vc_cache = make_cache(b, t_max, h, d, r, lens, device, torch.float32)
    before = (k_cache.clone(), vc_cache.clone())
    step = make_step(b, 2, 2, h, d, r, device, torch.float32)
    with pytest.raises((ValueError, RuntimeError), match="overflow"):
        run_kvcache(step, k_cache, vc_cache, seqlens, True, "ext")
    if device.type == "cpu":  # the C++ check itself, bypassing the Python validation
        with pytest.raises(ValueError, match="overflow"):
            torch.ops.vdproj_ext.kvcache_attention(
                step["q"], k_cache, vc_cache, step["w_r"], step["b_r"], step["k"], step["v"],
                step["w_c"], step["b_c"], seqlens, True, 0.3)
        with pytest.raises(ValueError, match=r"cache_seqlens must lie in \[0, 8\]"):
            torch.ops.vdproj_ext.kvcache_attention(
                step["q"], k_cache, vc_cache, step["w_r"], step["b_r"], None, None, None, None,
                torch.tensor([3, -1], dtype=torch.int32), True, 0.3)
        with pytest.raises(TypeError, match="int32"):
            torch.ops.vdproj_ext.kvcache_attention(
                step["q"], k_cache, vc_cache, step["w_r"], step["b_r"], None, None, None, None,
                seqlens.long(), True, 0.3)
    assert torch.equal(k_cache.nan_to_num(7.0), before[0].nan_to_num(7.0))
    assert torch.equal(vc_cache.nan_to_num(7.0), before[1].nan_to_num(7.0))
