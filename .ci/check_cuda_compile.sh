#!/usr/bin/env bash
# Compile-only check of a CUDA build on a machine without a GPU (and with a CPU build of torch):
# every source of the CUDA build as csrc/build_flags.json lists it, with its flags: the .cu files
# through nvcc for sm_80 and sm_90, the .cpp files through the host compiler with -fsyntax-only.
# Fails on any error; nvcc warnings about the kernels themselves (e.g. stack use, unreachable
# code) are treated as errors.
# Usage: .ci/check_cuda_compile.sh [-j N]   (default 2 parallel jobs, ~1-1.5 GB each)
set -euo pipefail
cd "$(dirname "$0")/.."

JOBS=2
if [[ "${1:-}" == "-j" ]]; then JOBS="$2"; fi
NVCC="${NVCC:-${CUDA_HOME:-/usr/local/cuda}/bin/nvcc}"
CUDA_INC="$(dirname "$(dirname "$NVCC")")/include"
PY="${PYTHON:-python}"
if [[ -x .venv/bin/python && -z "${PYTHON:-}" ]]; then PY=.venv/bin/python; fi
[[ -x "$NVCC" ]] || { echo "check_cuda_compile: nvcc not found at $NVCC" >&2; exit 1; }

read -r -a TORCH_INC < <("$PY" -c "
from torch.utils.cpp_extension import include_paths
print(' '.join('-I' + p for p in include_paths()))")
PYINC="-I$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["include"])')"
ABI="$("$PY" -c 'import torch; print(int(torch._C._GLIBCXX_USE_CXX11_ABI))')"
# Sources and flags of a CUDA build, from csrc/build_flags.json.
build_config() { "$PY" vdproj_ext/bindings/build_config.py csrc "$1" cuda; }
mapfile -t SOURCES < <(build_config sources)
mapfile -t BUILD_NVCC < <(build_config nvcc)
mapfile -t BUILD_CXX < <(build_config cxx)

OUT="$(mktemp -d)"
trap 'rm -rf "$OUT"' EXIT
# The same defines torch's cpp_extension passes to nvcc, so the check matches a real build.
NVCC_FLAGS=(-c "${BUILD_NVCC[@]}"
  -gencode arch=compute_80,code=sm_80 -gencode arch=compute_90,code=sm_90
  -DC10_CUDA_NO_CMAKE_CONFIGURE_FILE
  -D__CUDA_NO_HALF_OPERATORS__ -D__CUDA_NO_HALF_CONVERSIONS__
  -D__CUDA_NO_BFLOAT16_CONVERSIONS__ -D__CUDA_NO_HALF2_OPERATORS__
  -D_GLIBCXX_USE_CXX11_ABI="$ABI" -Xcompiler -fPIC
  --Werror cross-execution-space-call --Werror reorder -Werror all-warnings
  -Xptxas -v
  "${TORCH_INC[@]}" "$PYINC")
# torch's and CUDA's headers as system headers: -Werror applies to our code only.
CXX_FLAGS=(-fsyntax-only "${BUILD_CXX[@]}" -Wall -Wextra -Werror -Wno-unused-parameter
  -DC10_CUDA_NO_CMAKE_CONFIGURE_FILE
  -DTORCH_EXTENSION_NAME=_C -D_GLIBCXX_USE_CXX11_ABI="$ABI"
  "${TORCH_INC[@]/#-I/-isystem}" "${PYINC/#-I/-isystem}" -isystem "$CUDA_INC")

compile_one() {
  local src="$1" name start rc
  name="$(basename "$src")"
  start=$(date +%s)
  if [[ "$src" == *.cu ]]; then
    "$NVCC" "${NVCC_FLAGS[@]}" "$src" -o "$OUT/$name.o" >"$OUT/$name.log" 2>&1 && rc=0 || rc=$?
  else
    "${CXX:-g++}" "${CXX_FLAGS[@]}" "$src" >"$OUT/$name.log" 2>&1 && rc=0 || rc=$?
  fi
  echo "$rc $(( $(date +%s) - start ))" >"$OUT/$name.status"
}

echo "check_cuda_compile: $("$NVCC" --version | tail -1); torch headers from $("$PY" -c 'import torch; print(torch.__version__)'); ${#SOURCES[@]} files, $JOBS jobs"
T0=$(date +%s)
running=0
for src in "${SOURCES[@]}"; do
  compile_one "$src" &
  running=$((running + 1))
  if (( running >= JOBS )); then wait -n; running=$((running - 1)); fi
done
wait

fail=0
for src in "${SOURCES[@]}"; do
  name="$(basename "$src")"
  read -r rc secs <"$OUT/$name.status"
  if [[ "$rc" == 0 ]]; then
    printf '  ok    %-22s %4ss\n' "$name" "$secs"
  else
    printf '  FAIL  %-22s %4ss\n' "$name" "$secs"; fail=1
  fi
  # Everything but ptxas' resource report is shown; the report is summarized per kernel (sm_90).
  grep -v -e '^ptxas info' -e '^    [0-9]* bytes stack frame' "$OUT/$name.log" | sed 's/^/        /' | head -60 || true
  if [[ "$name" == *.cu ]]; then
    awk '/Compiling entry function/ { fn = "?"; if (match($0, /(attn_fwd|attn_bwd|restore|compress_write|combine|latent_query|latent_attn|latent_compress|latent_bwd)_kernel[A-Za-z0-9_]*/)) { fn = substr($0, RSTART, RLENGTH); sub(/E*v?NS0_.*/, "", fn) }; arch = $NF }
         /bytes stack frame/ { stack = $1; spill = $5 + $9 }
         /Used [0-9]+ registers/ { if (arch == "'"'"'sm_90'"'"'") printf "        sm_90 %-42.42s regs %3d  stack %3dB  spill %3dB\n", fn, $5, stack, spill }' "$OUT/$name.log"
  fi
done
echo "check_cuda_compile: total $(( $(date +%s) - T0 ))s"
exit $fail
