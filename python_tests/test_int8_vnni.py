"""The int8 latent-key decode's AVX-512 VNNI path (csrc/cpu/int8_vnni.h): integer dot products,
the float side (the query; the softmax weights times the V_c scales) split into three 8-bit
digits. Where the CPU has VNNI, a call with one query per sequence over separate int8 latents
whose shapes suit it (heads a multiple of 4, H*Dr, Rk and Rv multiples of 64) takes it.

Checked here on such shapes: the output against float64 (the caches dequantized here, NaN past
every prefix), with ragged lengths that end inside a 16-key group and inside a 256-key block,
several flash-decoding splits, one and two threads; inputs the integer form hands back to the
float32 FMA path (non-finite scales, weights too small for their digits), which must give what
that path gives; and the switch that turns the path off (benchmarks' A/B).
"""
from contextlib import contextmanager

import pytest
import torch

from conftest import TOLERANCES, rel_error
from helpers import run_python
from test_quant_cache import call, check_output, expected_output, make_args, uniform_storage
from vdproj_ext import backend_info, bindings

SUPPORTED = bool(backend_info()["extension_loaded"]
                 and bindings.load().build_info().get("cpu_int8_vnni_supported", False))
pytestmark = [pytest.mark.usefixtures("one_thread"),
              pytest.mark.skipif(not SUPPORTED, reason="this CPU has no AVX-512 VNNI")]

INT8 = uniform_storage(torch.int8)
# (heads, head_dim, rope_dim, k_rank, v_rank): pythia-70m-kv, narrow rotary dims, four heads,
# no rotary dims, three blocks of four heads
SHAPES = {"pythia": (8, 64, 16, 192, 320), "dr8": (8, 24, 8, 64, 64),
          "h4": (4, 32, 16, 128, 128), "dr0": (8, 40, 0, 64, 192),
          "h12": (12, 24, 16, 128, 64)}
# (seqlens, Tq, Tnew, causal), t_max: decode into ragged sequences (one empty, one ending
# mid-group, one past a block), and a read of one long sequence (several splits)
CASES = {"decode-ragged": (([0, 1, 3, 17, 300, 530], 1, 1, True), 600),
         "read-long": (([777], 1, 0, True), 800)}


@contextmanager
def fma_path():
    """The float32 FMA path for the duration (the VNNI path off)."""
    kernels = bindings.load()
    previous = kernels._set_cpu_int8_vnni(False)
    try:
        yield
    finally:
        kernels._set_cpu_int8_vnni(previous)


def args_for(shape, case, seed=0):
    heads, head_dim, rope_dim, k_rank, v_rank = SHAPES[shape]
    spec, t_max = CASES[case]
    return make_args(INT8, torch.float32, spec, rope_dim, heads=heads, head_dim=head_dim,
                     k_rank=k_rank, v_rank=v_rank, t_max=t_max, seed=seed)


def clone_args(a):
    return {n: (v.clone() if isinstance(v, torch.Tensor) else v) for n, v in a.items()}


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("shape", list(SHAPES))
def test_against_float64(shape, case, threads):
    assert backend_info()["cpu_int8_vnni"], "the VNNI path should be on by default here"
    a = args_for(shape, case)
    b = clone_args(a)  # the same call for the FMA path (the decode appends to the caches)
    torch.set_num_threads(threads)
    out = call(a, "ext")
    with fma_path():
        out_fma = call(b, "ext")
    check_output(a, out, torch.float32)
    check_output(b, out_fma, torch.float32)
    # both within float32 rounding of the float64 truth, so within it of each other too
    assert rel_error(out, out_fma) < TOLERANCES[torch.float32]


def plant(a, name, b, j, value, head=None):
    """Sets scale `name` of sequence b's valid key j (all heads, or one) to value."""
    scale = a[name]
    assert j < a["cache_seqlens"][b], "a planted value must be in a valid slot"
    if head is None:
        scale[b, j] = value
    else:
        scale[b, j, head] = value


SPECIAL = {
    # a non-finite scale: the float math gives NaN (or inf) for that sequence
    "kc-inf": lambda a: plant(a, "kc_scale", 3, 5, float("inf")),
    "krope-nan": lambda a: plant(a, "krope_scale", 4, 290, float("nan"), head=2),
    "vc-inf": lambda a: plant(a, "vc_scale", 5, 400, float("inf")),
    # zero scales are finite: the integer form takes them
    "vc-zero": lambda a: plant(a, "vc_scale", 5, 7, 0.0),
    "kc-zero": lambda a: plant(a, "kc_scale", 4, 16, 0.0),
}


@pytest.mark.parametrize("special", list(SPECIAL))
def test_handed_back_inputs_match_the_fma_path(special):
    a = args_for("pythia", "decode-ragged", seed=3)
    SPECIAL[special](a)
    b = clone_args(a)
    out = call(a, "ext")
    with fma_path():
        want = call(b, "ext")
    assert torch.equal(out.isnan(), want.isnan())
    assert torch.equal(out.isinf(), want.isinf())
    finite = torch.isfinite(want)
    if special.endswith("zero"):
        assert finite.all()
        check_output(a, out, torch.float32)
    else:
        assert not finite.all(), "the planted value should reach the output"
    assert rel_error(out[finite], want[finite]) < TOLERANCES[torch.float32]


@pytest.mark.parametrize("keys", ["all", "one-split"])
def test_weights_too_small_for_their_digits(keys):
    """V_c scales near 1e-35 make every softmax weight times its row's scale smaller than the
    digits carry (1e-30): those rows take the float32 rank update, block by block. With all
    keys so scaled the output is made of them alone, so a wrong fallback would show."""
    a = args_for("pythia", "read-long", seed=5)
    rows = slice(None) if keys == "all" else slice(256, 512)
    a["vc_scale"][0, rows] *= 1e-33
    b = clone_args(a)
    out = call(a, "ext")
    with fma_path():
        want = call(b, "ext")
    check_output(a, out, torch.float32)
    assert rel_error(out, want) < TOLERANCES[torch.float32]


def test_nonfinite_query_takes_the_fma_path():
    a = args_for("h4", "decode-ragged", seed=7)
    a["q"][2, 0, 1, 3] = float("inf")
    b = clone_args(a)
    out = call(a, "ext")
    with fma_path():
        want = call(b, "ext")
    assert torch.equal(out.isnan(), want.isnan())
    assert not torch.isfinite(out[2]).all()
    assert torch.isfinite(out[3]).all()
    keep = torch.isfinite(want)
    assert rel_error(out[keep], want[keep]) < TOLERANCES[torch.float32]


def test_the_switch():
    kernels = bindings.load()
    assert kernels._set_cpu_int8_vnni(False) is True
    assert backend_info()["cpu_int8_vnni"] is False
    assert kernels._set_cpu_int8_vnni(True) is False
    assert backend_info()["cpu_int8_vnni"] is True
    with pytest.raises(TypeError):
        kernels._set_cpu_int8_vnni("yes")


def test_environment_turns_it_off():
    script = "from vdproj_ext import backend_info; print(backend_info()['cpu_int8_vnni'])"
    assert run_python(["-c", script], VDPROJ_INT8_VNNI="0").strip() == "False"


def test_float64_expected_sees_every_valid_key():
    """Guards the checks above: the float64 truth changes when one valid V_c row changes."""
    a = args_for("dr8", "decode-ragged")
    before = expected_output(a)
    a["vc_cache"][5, 299] = -a["vc_cache"][5, 299]
    assert not torch.allclose(expected_output(a)[5], before[5])
