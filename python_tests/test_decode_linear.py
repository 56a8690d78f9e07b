"""vdproj_ext.decode_linear: the CPU streaming kernel for the linear layers of a decode step,
checked against a float64 reference, plus its row policy (kernel, W @ x.T, or F.linear)."""
import os

import pytest
import torch
import torch.nn.functional as F

from conftest import TOLERANCES, rel_error
from helpers import run_python
from vdproj_ext import VDProjConfig, VDProjForCausalLM
from vdproj_ext.ops import decode_linear, linear
from vdproj_ext.ops.backend import has_kernel, load_kernels

OP = None


def op():
    global OP
    if OP is None:
        assert load_kernels() is not None, "the compiled extension must be built for these tests"
        OP = torch.ops.vdproj_ext.decode_linear
    return OP


def reference(x, w, b):
    y = x.double() @ w.double().T
    return y + b.double() if b is not None else y


def exact_gelu(y):
    """x * Phi(x) in float64 through erfc, accurate in the negative tail (F.gelu's
    x * (1 + erf(x / sqrt(2))) / 2 cancels there: F.gelu(-10.24) is -0.0, not -7.0e-24)."""
    y = y.double()
    return 0.5 * y * torch.special.erfc(-y * 0.5 ** 0.5)


def gelu_error(got, want, dtype):
    """Elementwise relative error, against at least 6e-33 in float32: past x = -13.2 GELU is
    below float32's normal range (1.2e-38) and the kernel gives 0, an error of up to 1.2e-38,
    which against that floor is 2e-6."""
    floor = 5.9e-33 if dtype == torch.float32 else 1e-300
    return ((got.double() - want).abs() / want.abs().clamp_min(floor)).max().item()


# rows 1..17 cover every row-block template (1-8), the split into blocks of 8 and the
# two-weight-rows path (blocks of 8, N odd for a last single row); with AVX2, every tile of
# 1-3 weight rows (N mod 3 of 0, 1 and 2) by 1-4 x rows (M mod 4 of 0-3), its one-pass
# tile of one weight row by 5-7 x rows of at most 16 KiB, and pairs of weight rows by 8-16 x
# rows whose blocks of 8 fit 16 KiB (2 x 6 then 2 x 2 tiles per 8, up to 4 x rows a tile in a
# shorter last pass: 13 x 130, 12 x 256; N odd for a last single row: 8 x 48, 8 x 37, 8 x 77,
# and 12 x 256's last block of 45 rows after two of 128). K covers
# tails shorter than one vector, between vectors and past the unrolled loop, and x rows larger
# than L1. With AVX-512, blocks of 8 x rows load each x vector once into a register while the
# x rows fit in 16 KiB, and fold it into the multiply-adds past that (8 x 700, 16 x 1601); more
# than 8 x rows take their passes over blocks of 128 KiB of weight rows (12 x 256: two whole
# blocks of 128 rows and a last one of 45, odd), and 4-7 x rows past 16 KiB take K in chunks
# that fit it (5 x 2053: chunks of 816, 816 and 421 float32, blocks of 14, 14 and 9 rows).
SHAPES = [((1,), 1, 1), ((3,), 17, 5), ((2, 4), 33, 77), ((13,), 200, 130), ((16,), 64, 512),
          ((17,), 9, 31), ((8,), 515, 48), ((1, 5), 1000, 96), ((7,), 3, 300), ((6,), 31, 130),
          ((8,), 21, 37), ((2, 8), 11, 1601), ((8,), 13, 700), ((12,), 301, 256),
          ((5,), 37, 2053)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("lead,n,k", SHAPES)
@pytest.mark.parametrize("with_bias", [True, False])
def test_kernel_matches_float64(dtype, lead, n, k, with_bias):
    x = torch.randn(*lead, k, dtype=dtype)
    w = torch.randn(n, k, dtype=dtype)
    b = torch.randn(n, dtype=dtype) if with_bias else None
    y = op()(x, w, b)
    assert y.shape == (*lead, n) and y.dtype == dtype
    assert rel_error(y, reference(x, w, b)) < TOLERANCES[dtype]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("lead,n,k", SHAPES)
def test_kernel_gelu_matches_float64(dtype, lead, n, k):
    """gelu=True: the linear as without it (checked above), then exact GELU of each element to
    float64 accuracy relative to the element (judged on the kernel's own linear output, since
    near GELU's zero the linear's rounding alone is a large relative error): every row path,
    N odd so a vector loop's scalar tail runs, outputs far into GELU's negative tail."""
    x = torch.randn(*lead, k, dtype=dtype)
    w = torch.randn(n, k, dtype=dtype) * (4.0 / max(1, k) ** 0.5)
    b = torch.randn(n, dtype=dtype)
    y = op()(x, w, b, True)
    linear_out = op()(x, w, b, False)
    assert y.shape == (*lead, n) and y.dtype == dtype
    assert rel_error(linear_out, reference(x, w, b)) < TOLERANCES[dtype]
    err = gelu_error(y, exact_gelu(linear_out), dtype)
    assert err < (1e-12 if dtype == torch.float64 else 2e-6), err


def test_kernel_gelu_special_values():
    """Through a 1 x 1 identity weight, GELU itself: its far tails, zeros, subnormals, inf, NaN."""
    v = torch.tensor([-float("inf"), -40.0, -13.1, -12.0, -5.5, -1.0, -1e-3, -0.0, 0.0, 1e-40,
                      1e-3, 0.5, 2.0, 7.0, 30.0, float("inf"), float("nan")] * 3)
    for dtype in (torch.float32, torch.float64):
        x = v.to(dtype).reshape(-1, 1)
        y = op()(x, torch.ones(1, 1, dtype=dtype), None, True)
        want = exact_gelu(x)
        finite = want.isfinite()
        rel = gelu_error(y[finite], want[finite], dtype)
        assert rel < (1e-12 if dtype == torch.float64 else 2e-6), (dtype, rel)
        assert torch.equal(y.isnan(), want.isnan()) and torch.equal(y.isinf(), want.isinf())
        assert torch.equal(y.isnan(), F.gelu(x).isnan())  # -inf: NaN, as F.gelu gives


def test_kernel_many_threads_and_large_rows():
    """Large enough to run on every thread: each thread's range of weight rows and its
    prefetch clamp at the range end."""
    w = torch.randn(4099, 512)
    for rows in (8, 16):
        x = torch.randn(rows, 512)
        assert rel_error(op()(x, w, None), reference(x, w, None)) < TOLERANCES[torch.float32]


@pytest.mark.parametrize("isa", ["baseline", "avx2"])
@pytest.mark.skipif("VDPROJ_CPU_ISA" in os.environ, reason="already under a chosen build")
def test_kernel_in_lower_instruction_set_builds(isa):
    """The float64 checks above again under a lower build (VDPROJ_CPU_ISA), in a subprocess:
    each build has its own row blocks (AVX2 tiles of 3 x 4, 1 x 5-7, or 2 x 6 and 2 x 2 per 8
    x rows; pairs against 8 x rows else) and its own row limit for the kernel (16 below AVX-512)."""
    out = run_python(["-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:randomly",
                      os.path.abspath(__file__), "-k",
                      "kernel_matches or kernel_gelu or many_threads or routing_uses_kernel"],
                     timeout=600, VDPROJ_CPU_ISA=isa)
    assert " passed" in out and "failed" not in out


def test_kernel_empty_and_views():
    w, b = torch.randn(5, 0), torch.randn(5)
    torch.testing.assert_close(op()(torch.randn(3, 0), w, b), b.expand(3, 5))
    assert op()(torch.randn(0, 4), torch.randn(5, 4), None).shape == (0, 5)
    # Non-contiguous x and weight are copied by the op; the results stay exact.
    x = torch.randn(6, 40)[:, ::2]
    wt = torch.randn(20, 9).T
    assert rel_error(op()(x, wt, None), reference(x, wt, None)) < TOLERANCES[torch.float32]


def test_kernel_rejects_bad_input():
    x, w = torch.randn(2, 4), torch.randn(3, 4)
    with pytest.raises(RuntimeError, match="x must be float32 or float64"):
        op()(x.half(), w.half(), None)
    with pytest.raises(RuntimeError, match="weight must have dtype"):
        op()(x, w.double(), None)
    with pytest.raises(RuntimeError, match="weight must have shape"):
        op()(x, torch.randn(3, 5), None)
    with pytest.raises(RuntimeError, match="weight must be 2-D"):
        op()(x, torch.randn(3, 4, 1), None)
    with pytest.raises(RuntimeError, match="bias must have shape"):
        op()(x, w, torch.randn(4))


def test_opcheck():
    x, w, b = torch.randn(3, 7), torch.randn(11, 7), torch.randn(11)
    torch.library.opcheck(torch.ops.vdproj_ext.decode_linear.default, (x, w, b))
    torch.library.opcheck(torch.ops.vdproj_ext.decode_linear.default, (x, w, None))
    torch.library.opcheck(torch.ops.vdproj_ext.decode_linear.default, (x, w, b, True))


# ---------------------------------------------------------------------------------------------
# Row policy: decode_linear == F.linear everywhere, the kernel and W @ x.T only where they apply


def test_routing_uses_kernel_only_where_it_applies():
    w, b = torch.randn(10, 6), torch.randn(10)
    path = linear.choose_path
    with torch.no_grad():
        top = linear.kernel_max_rows()  # where BLAS starts to win: 32 with AVX-512, else 16
        lowered = os.environ.get("VDPROJ_CPU_ISA") in ("avx2", "baseline")
        assert top == 16 if lowered else top in (16, 32)
        assert path(torch.randn(top, 6), w, b) == "kernel"
        assert path(torch.randn(2, 8, 6), w, b) == "kernel"
        assert path(torch.randn(top + 1, 6), w, b) == "weight-major"
        assert path(torch.randn(8, 8, 6), w, b) == "weight-major"
        assert path(torch.randn(65, 6), w, b) == "F.linear"
        assert path(torch.randn(2, 6).half(), w.half(), b.half()) == "F.linear"
        assert path(torch.randn(2, 6), torch.randn(6, 10).T, b) == "F.linear"
        assert path(torch.randn(40, 6), torch.randn(6, 10).T, b) == "F.linear"
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert path(torch.randn(2, 6), w, b) == "F.linear"
            assert path(torch.randn(40, 6), w, b) == "F.linear"
    wg = w.clone().requires_grad_()
    assert path(torch.randn(2, 6), wg, b) == "F.linear"       # needs a gradient
    assert path(torch.randn(40, 6), wg, b) == "F.linear"
    with torch.no_grad():
        assert path(torch.randn(2, 6), wg, b) == "kernel"


def test_decode_linear_keeps_gradients_and_autocast():
    x = torch.randn(3, 6, dtype=torch.float64, requires_grad=True)
    w = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    b = torch.randn(4, dtype=torch.float64, requires_grad=True)
    torch.autograd.gradcheck(decode_linear, (x, w, b))
    torch.autograd.gradcheck(lambda *a: decode_linear(*a, gelu=True), (x, w, b))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = decode_linear(torch.randn(2, 6), torch.randn(4, 6))
    assert y.dtype == torch.bfloat16  # as F.linear under autocast


@pytest.mark.parametrize("rows", [1, 5, 16, 17, 32, 33, 40, 64, 65])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_decode_linear_equals_f_linear(rows, dtype):
    x, w, b = (torch.randn(rows, 33, dtype=dtype), torch.randn(21, 33, dtype=dtype),
               torch.randn(21, dtype=dtype))
    with torch.no_grad():
        for bias in (b, None):
            y = decode_linear(x, w, bias)
            assert y.shape == (rows, 21) and y.dtype == dtype
            torch.testing.assert_close(y, F.linear(x, w, bias), rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(decode_linear(x, w, bias, gelu=True),
                                       F.gelu(F.linear(x, w, bias)), rtol=1e-5, atol=1e-5)
        x3 = x.reshape(1, rows, 33)  # leading dimensions are kept
        torch.testing.assert_close(decode_linear(x3, w, b), F.linear(x3, w, b),
                                   rtol=1e-5, atol=1e-5)


def test_model_decode_same_with_and_without_kernel(monkeypatch):
    """A cached decode step gives the same logits through the kernel as through F.linear."""
    cfg = VDProjConfig.preset("smoke")
    model = VDProjForCausalLM(cfg, init_seed=0).eval()
    ids = torch.randint(0, cfg.vocab_size, (3, 6))

    def run():
        cache = model.new_cache(3, 8)
        with torch.no_grad():
            model(ids[:, :5], cache=cache)
            return model(ids[:, 5:], cache=cache).logits

    calls = []
    monkeypatch.setattr(linear, "choose_path", lambda *a: calls.append(1) or (
        "kernel" if has_kernel("cpu", "decode_linear") else "F.linear"))
    with_kernel = run()
    assert calls
    monkeypatch.setattr(linear, "choose_path", lambda *a: "F.linear")
    without = run()
    torch.testing.assert_close(with_kernel, without, rtol=1e-5, atol=1e-5)
