#!/usr/bin/env bash
# One-shot GPU check for a machine with one NVIDIA GPU (written for an H200) and a CUDA build of
# torch already installed; needs no network. Every step has its own time limit, cut further to
# what is left of GPU_CHECK_BUDGET seconds (default 540: a lease's 10-minute command limit, less
# the transfers); a step with too little time left is skipped and says so. In order:
#   0. a toolchain probe (bench/toolchain/): the first C++ compiler whose small module, loaded
#      into torch's process, builds c10 messages and throws c10 errors cleanly builds the package
#   1. build and install the package: pip install --no-build-isolation --no-deps .
#   2. the CUDA tests (python_tests/test_cuda.py), every failure listed (no -x)
#   3. the GPU benchmarks (bench/bench_gpu.py: decode, latent-key decode, quantized-cache decode,
#      training); the table is rewritten after every row, so a time limit keeps what was measured
#   4. the device-parametrized tests on cuda (test_attention, test_kvcache, test_latent_ops,
#      test_cache, test_generate) and the quantized caches' CUDA tests (test_quant_cache)
#   5. compute-sanitizer memcheck and racecheck on small decode and training cases (V-only and
#      latent keys; decode also with int8 and float8_e4m3fn caches, appends included)
#   6. Nsight Compute (clocks as found) on the decode kernels of bench/gpu_ncu_workload.py:
#      duration, DRAM and SM throughput, occupancy, launch sizes ($OUT/ncu_summary.txt)
# A summary of the steps is printed last. Results and logs go to $OUT when set (the device
# tool's output folder), else bench/: gpu_check.log, gpu_results.md, ncu_decode.ncu-rep and
# ncu_summary.txt.
# Usage: bash bench/gpu_check.sh
set -uo pipefail
REPO="$(cd "$(dirname "$0")/.." && pwd)"
cd "$REPO"
export CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}"
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}"
export MAX_JOBS="${MAX_JOBS:-12}" PYTHONUNBUFFERED=1
# The installed _C or nothing: a JIT build of the sources would spend the lease compiling.
export VDPROJ_EXT_NO_JIT=1
BUDGET="${GPU_CHECK_BUDGET:-540}"
PY="${PYTHON:-python3}"
RESULTS="${OUT:-$REPO/bench}"
mkdir -p "$RESULTS"
LOG="$RESULTS/gpu_check.log"
: >"$LOG"
start=$(date +%s)
stamp() { echo "== [$(( $(date +%s) - start ))s] $*" | tee -a "$LOG"; }
status=0
SUMMARY=()
note() { SUMMARY+=("$*"); echo "-- $*" | tee -a "$LOG"; }
# limit MAX: MAX seconds, or what is left of the budget (less 15 s for the summary) if less;
# prints 0 when under 20 s are left, and the step is then skipped.
limit() {
  local left=$(( BUDGET - ($(date +%s) - start) - 15 ))
  (( left < 20 )) && { echo 0; return; }
  echo $(( left < $1 ? left : $1 ))
}
# run_step NAME MAX CMD...: CMD under timeout, its output appended to the log; noted as passed,
# FAILED (exit code), TIMED OUT or SKIPPED in the summary.
run_step() {
  local name="$1" secs t0 rc
  secs=$(limit "$2"); shift 2
  if (( secs == 0 )); then note "SKIPPED  $name (budget spent)"; status=1; return 1; fi
  t0=$(date +%s)
  timeout "$secs" "$@" >>"$LOG" 2>&1; rc=$?
  if (( rc == 0 )); then note "passed   $name ($(( $(date +%s) - t0 ))s)"; return 0; fi
  if (( rc == 124 )); then note "TIMED OUT $name (limit ${secs}s)"; else
    note "FAILED   $name (exit $rc, $(( $(date +%s) - t0 ))s)"; fi
  status=1; return 1
}

stamp "environment"
{ nvidia-smi -L; "$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name() if torch.cuda.is_available() else 'NO GPU')"; "$CUDA_HOME/bin/nvcc" --version | tail -1; } 2>&1 | tee -a "$LOG"

stamp "0. toolchain probe: c10 messages and exceptions from a module each compiler builds (CC=${CC:-} CXX=${CXX:-})"
# The extension built by the image's default compiler crashed on its first error message on
# the 2026-12-04 lease; build with the first compiler whose probe module does not.
CANDIDATES=("${CXX:-c++}")
for c in /usr/bin/g++ /usr/bin/g++-1[0-9]; do [[ -x "$c" ]] && CANDIDATES+=("$c"); done
if PROBE_CHOICE=/tmp/vdproj_cxx timeout 120 bash "$REPO/bench/toolchain/probe.sh" "$PY" \
    "${CANDIDATES[@]}" 2>&1 | tee -a "$LOG"; then
  chosen="$(cat /tmp/vdproj_cxx)"
  if [[ "$chosen" != "${CXX:-c++}" ]]; then
    export CXX="$chosen" CC="${chosen/%g++/gcc}"
    [[ -x "$CC" ]] || export CC="${chosen%/*}/gcc"
  fi
  note "toolchain: building with CXX=${CXX:-c++} CC=${CC:-cc}"
else
  note "toolchain: no compiler passed the probe; building with the default"
fi

stamp "1. build: pip install --no-build-isolation --no-deps . (TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST, MAX_JOBS=$MAX_JOBS)"
if ! run_step "build" 300 "$PY" -m pip install --no-build-isolation --no-deps --no-index -q .; then
  tail -60 "$LOG"; printf '%s\n' "${SUMMARY[@]}"; exit 1
fi
# Run from outside the source tree so the installed package (with _C) is imported.
cd /tmp
"$PY" -c "import json, vdproj_ext; print(json.dumps(vdproj_ext.backend_info()))" 2>&1 | tee -a "$LOG"

stamp "2. CUDA tests: python_tests/test_cuda.py"
PYTEST=("$PY" -m pytest -q -rfE -p no:cacheprovider --benchmark-disable)
run_step "test_cuda.py" 150 "${PYTEST[@]}" "$REPO/python_tests/test_cuda.py"
grep -E "^(FAILED|ERROR) | in [0-9.]+s" "$LOG" | tail -25

stamp "3. GPU benchmarks"
run_step "bench_gpu.py" 170 "$PY" "$REPO/bench/bench_gpu.py" --out "$RESULTS"
grep -E "FAILED|^  (decode|latent|int8|float8|train)" "$LOG" | tail -25

stamp "4. device-parametrized tests on cuda, and the quantized caches' CUDA tests"
run_step "tests -k cuda" 120 "${PYTEST[@]}" -k cuda \
  "$REPO/python_tests/test_attention.py" "$REPO/python_tests/test_kvcache.py" \
  "$REPO/python_tests/test_latent_ops.py" "$REPO/python_tests/test_quant_cache.py" \
  "$REPO/python_tests/test_cache.py" "$REPO/python_tests/test_generate.py"
grep -E "^(FAILED|ERROR) | in [0-9.]+s" "$LOG" | tail -25

stamp "5. compute-sanitizer (memcheck, racecheck) on small cases"
SAN="$(command -v compute-sanitizer || echo "$CUDA_HOME/bin/compute-sanitizer")"
SMALL='
import torch, vdproj_ext
from vdproj_ext import ops
from vdproj_ext.ops.backend import load_kernels
load_kernels()  # registers torch.ops.vdproj_ext.*
dev, dt = "cuda", torch.bfloat16
torch.manual_seed(0)
B, T, H, D, R = 2, 300, 8, 64, 320
kc = torch.full((B, T + 8, H, D), float("nan"), device=dev, dtype=dt)
vc = torch.full((B, T + 8, R), float("nan"), device=dev, dtype=dt)
kc[:, :T] = torch.randn(B, T, H, D, device=dev).to(dt); vc[:, :T] = torch.randn(B, T, R, device=dev).to(dt)
q = torch.randn(B, 1, H, D, device=dev, dtype=dt); wr = torch.randn(H * D, R, device=dev, dtype=dt) / 20
wc = torch.randn(R, H * D, device=dev, dtype=dt) / 20
k1 = torch.randn(B, 1, H, D, device=dev, dtype=dt); v1 = torch.randn(B, 1, H * D, device=dev, dtype=dt)
lens = torch.tensor([T - 1, 17], dtype=torch.int32, device=dev)
o = torch.ops.vdproj_ext.kvcache_attention(q, kc, vc, wr, None, k1, v1, wc, None, lens, True, 0.125)
lens1 = torch.tensor([T, 4], dtype=torch.int32, device=dev)
o1 = torch.ops.vdproj_ext.kvcache_attention(q[:1], kc[:1], vc[:1], wr, None, None, None, None, None, lens1[:1], True, 0.125)
x = [torch.randn(1, 40, 2, 64, device=dev, dtype=dt), torch.randn(1, 50, 2, 64, device=dev, dtype=dt), torch.randn(1, 50, 64, device=dev, dtype=dt), torch.randn(128, 64, device=dev, dtype=dt)]
x = [t.requires_grad_() for t in x]
out = ops.CompressedVAttentionFunction.apply(*x, None, True, 0.125, "ext")
out.float().sum().backward()
# Latent keys (Dr=16, Rk=192): decode with append (separate and joint latents), training.
Dr, Rk = 16, 192
kr = torch.full((B, T + 8, H, Dr), float("nan"), device=dev, dtype=dt); kr[:, :T] = torch.randn(B, T, H, Dr, device=dev).to(dt)
kl = torch.full((B, T + 8, Rk), float("nan"), device=dev, dtype=dt); kl[:, :T] = torch.randn(B, T, Rk, device=dev).to(dt)
wkr = torch.randn(H * (D - Dr), Rk, device=dev, dtype=dt) / 20; wkrj = torch.randn(H * (D - Dr), R, device=dev, dtype=dt) / 20
wkc = torch.randn(Rk, H * (D - Dr), device=dev, dtype=dt) / 20; wcj = torch.randn(R, H * (2 * D - Dr), device=dev, dtype=dt) / 20
ol = torch.ops.vdproj_ext.ckv_kvcache_attention(q, kr, kl, vc, wkr, wr, None, k1, v1, wkc, None, wc, None, lens, True, 0.125)
oj = torch.ops.vdproj_ext.ckv_kvcache_attention(q, kr, None, vc, wkrj, wr, None, k1, v1, None, None, wcj, None, lens1, True, 0.125)
y = [torch.randn(1, 40, 2, 64, device=dev, dtype=dt), torch.randn(1, 50, 2, Dr, device=dev, dtype=dt), torch.randn(1, 50, Rk, device=dev, dtype=dt), torch.randn(1, 50, 64, device=dev, dtype=dt), torch.randn(2 * (64 - Dr), Rk, device=dev, dtype=dt) / 20, torch.randn(128, 64, device=dev, dtype=dt)]
y = [t.requires_grad_() for t in y]
outl = ops.CompressedKVAttentionFunction.apply(*y, None, True, 0.125, "ext")
outl.float().sum().backward()
# Quantized caches (SPEC 3c), int8 and e4m3, both ops with an append; NaN scales past the prefix.
from vdproj_ext.ops.quant import quantize_rows
qok = []
for cd in (torch.int8, torch.float8_e4m3fn):
    def qz(*shape):
        s, sc = quantize_rows(torch.randn(*shape, device=dev), cd)
        sc[:, T:] = float("nan")
        return s, sc
    qk, qks = qz(B, T + 8, H, D); qv, qvs = qz(B, T + 8, R)
    qr, qrs = qz(B, T + 8, H, Dr); ql, qls = qz(B, T + 8, Rk)
    oq = torch.ops.vdproj_ext.kvcache_attention(q, qk, qv, wr, None, k1, v1, wc, None, lens, True, 0.125, qks, qvs)
    oql = torch.ops.vdproj_ext.ckv_kvcache_attention(q, qr, ql, qv, wkr, wr, None, k1, v1, wkc, None, wc, None, lens, True, 0.125, qrs, qls, qvs)
    oqj = torch.ops.vdproj_ext.ckv_kvcache_attention(q, qr, None, qv, wkrj, wr, None, k1, v1, None, None, wcj, None, lens1, True, 0.125, qrs, None, qvs)
    qok += [torch.isfinite(t).all().item() for t in (oq, oql, oqj)]
torch.cuda.synchronize()
print("quantized decode ok", qok)
print("sanitizer case ok", torch.isfinite(o).all().item(), torch.isfinite(o1).all().item(), torch.isfinite(out).all().item(),
      torch.isfinite(ol).all().item(), torch.isfinite(oj).all().item(), torch.isfinite(outl).all().item())
'
if [[ -x "$SAN" ]]; then
  for tool in memcheck racecheck; do
    run_step "compute-sanitizer $tool" 90 "$SAN" --tool "$tool" --error-exitcode 9 \
      --print-limit 20 "$PY" -c "$SMALL" || grep -E "=========" "$LOG" | tail -20
  done
else
  note "SKIPPED  compute-sanitizer (not found)"
fi

stamp "6. Nsight Compute on the decode kernels (bench/gpu_ncu_workload.py), if time is left"
NCU="$(command -v ncu || echo /usr/local/cuda/bin/ncu)"
if [[ -x "$NCU" ]]; then
  # Clocks as found (--clock-control none): the lease must not change the card's settings.
  run_step "ncu" 90 "$NCU" --clock-control none --target-processes all \
    -k regex:"attn_fwd|latent_attn|latent_query|combine|restore" \
    --section SpeedOfLight --section Occupancy --section LaunchStats \
    -o "$RESULTS/ncu_decode" -f "$PY" "$REPO/bench/gpu_ncu_workload.py" &&
    "$NCU" --import "$RESULTS/ncu_decode.ncu-rep" --print-summary per-kernel \
      >"$RESULTS/ncu_summary.txt" 2>&1
  [[ -f "$RESULTS/ncu_summary.txt" ]] &&
    grep -E "^  [a-z_]+kernel|Duration|DRAM Throughput|Memory Throughput|Achieved Occupancy|Registers Per|Grid Size" \
      "$RESULTS/ncu_summary.txt" | head -60
else
  note "SKIPPED  ncu (not found)"
fi

stamp "done (status $status); log: $LOG, table: $RESULTS/gpu_results.md"
[[ -f "$RESULTS/gpu_results.md" ]] && cat "$RESULTS/gpu_results.md"
echo; echo "== summary"; printf '%s\n' "${SUMMARY[@]}"
exit $status
