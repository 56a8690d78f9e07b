#!/usr/bin/env bash
# One-shot GPU check for a machine with one NVIDIA GPU (written for an H200) and a CUDA build of
# torch already installed; needs no network. In order, each step time-limited (total < 8 min):
#   1. build and install the package: pip install --no-build-isolation --no-deps .
#   2. the CUDA tests (python_tests/test_cuda.py, and the device-parametrized tests on cuda)
#   3. compute-sanitizer memcheck and racecheck on small decode and training cases (V-only and
#      latent keys; decode also with int8 and float8_e4m3fn caches, appends included)
#   4. the GPU benchmarks (bench/bench_gpu.py: decode, latent-key decode, quantized-cache decode,
#      training), which print the results table last
# Results and logs go to $OUT when set (the device tool's output folder), else bench/.
# Usage: bash bench/gpu_check.sh
set -uo pipefail
REPO="$(cd "$(dirname "$0")/.." && pwd)"
cd "$REPO"
export CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}"
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}"
export MAX_JOBS="${MAX_JOBS:-8}" PYTHONUNBUFFERED=1
PY="${PYTHON:-python3}"
RESULTS="${OUT:-$REPO/bench}"
mkdir -p "$RESULTS"
LOG="$RESULTS/gpu_check.log"
: >"$LOG"
start=$(date +%s)
stamp() { echo "== [$(( $(date +%s) - start ))s] $*" | tee -a "$LOG"; }
status=0
fail() { echo "!! $*" | tee -a "$LOG"; status=1; }

stamp "environment"
{ nvidia-smi -L; "$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name() if torch.cuda.is_available() else 'NO GPU')"; "$CUDA_HOME/bin/nvcc" --version | tail -1; } 2>&1 | tee -a "$LOG"

stamp "1. build: pip install --no-build-isolation --no-deps . (TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST)"
if ! timeout 240 "$PY" -m pip install --no-build-isolation --no-deps --no-index -q . >>"$LOG" 2>&1; then
  tail -40 "$LOG"; fail "build failed"; exit 1
fi
# Run from outside the source tree so the installed package (with _C) is imported.
cd /tmp
"$PY" -c "import json, vdproj_ext; print(json.dumps(vdproj_ext.backend_info()))" 2>&1 | tee -a "$LOG"

stamp "2. CUDA tests"
if ! timeout 240 "$PY" -m pytest -q -x -p no:cacheprovider --benchmark-disable \
    "$REPO/python_tests/test_cuda.py" >>"$LOG" 2>&1; then fail "test_cuda.py failed"; fi
tail -5 "$LOG"
if ! timeout 90 "$PY" -m pytest -q -p no:cacheprovider --benchmark-disable -k cuda \
    "$REPO/python_tests/test_attention.py" "$REPO/python_tests/test_kvcache.py" \
    "$REPO/python_tests/test_latent_ops.py" >>"$LOG" 2>&1; then
  fail "device-parametrized tests failed on cuda"; fi
tail -3 "$LOG"

stamp "3. compute-sanitizer (memcheck, racecheck) on small cases"
SAN="$(command -v compute-sanitizer || echo "$CUDA_HOME/bin/compute-sanitizer")"
SMALL='
import torch, vdproj_ext
from vdproj_ext import ops
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
    if timeout 90 "$SAN" --tool "$tool" --error-exitcode 9 --print-limit 20 "$PY" -c "$SMALL" >>"$LOG" 2>&1; then
      echo "compute-sanitizer $tool: clean" | tee -a "$LOG"
    else
      fail "compute-sanitizer $tool reported errors (or timed out)"; tail -30 "$LOG"
    fi
  done
else
  echo "compute-sanitizer not found; skipped" | tee -a "$LOG"
fi

stamp "4. GPU benchmarks"
if ! timeout 180 "$PY" "$REPO/bench/bench_gpu.py" --out "$RESULTS" 2>&1 | tee -a "$LOG"; then
  fail "benchmark failed"; fi

stamp "done (status $status); log: $LOG, table: $RESULTS/gpu_results.md"
exit $status
