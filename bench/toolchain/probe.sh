#!/usr/bin/env bash
# Usage: bench/toolchain/probe.sh PY CXX... : for each C++ compiler, build bench/toolchain/probe.cpp
# against torch's headers and libc10 and call it from torch's process (in a subprocess, so a
# crash is contained). Prints one line per compiler: "ok CXX" or "FAIL CXX (why)", plus each
# compiler's version and default string ABI; exits 0 if any passed, and the first that passed
# is written to $PROBE_CHOICE (when set).
set -uo pipefail
PY="$1"; shift
HERE="$(cd "$(dirname "$0")" && pwd)"
WORK="$(mktemp -d)"
read -r TORCH_INC TORCH_LIB PYINC SUFFIX ABI < <("$PY" -c "
import os, sysconfig, torch
from torch.utils.cpp_extension import include_paths, library_paths
print(include_paths()[0], library_paths()[0], sysconfig.get_paths()['include'],
      sysconfig.get_config_var('EXT_SUFFIX'), int(torch._C._GLIBCXX_USE_CXX11_ABI))")
echo "torch string ABI: _GLIBCXX_USE_CXX11_ABI=$ABI"
i=0; chosen=""
for cxx in "$@"; do
  i=$((i + 1))
  if ! command -v "$cxx" >/dev/null 2>&1; then echo "FAIL $cxx (not found)"; continue; fi
  default_abi=$(echo '#include <string>' | "$cxx" -x c++ -std=c++17 -E -dM - 2>/dev/null |
                awk '/define _GLIBCXX_USE_CXX11_ABI/ {print $3}')
  echo "   $cxx: $("$cxx" --version | head -1); default _GLIBCXX_USE_CXX11_ABI=${default_abi:-?}"
  name="probe$i"
  if ! "$cxx" -O3 -fopenmp -shared -fPIC -std=c++17 -DPROBE_NAME="$name" "$HERE/probe.cpp" \
      -I"$TORCH_INC" -I"$PYINC" -L"$TORCH_LIB" -lc10 -Wl,-rpath,"$TORCH_LIB" \
      -o "$WORK/$name$SUFFIX" >"$WORK/$name.log" 2>&1; then
    echo "FAIL $cxx (build: $(tail -1 "$WORK/$name.log"))"; continue
  fi
  out=$(cd "$WORK" && "$PY" -c "
import torch, $name
assert $name.reason(40) == 'head_dim 40 (kernels: 64)', $name.reason(40)
try:
    $name.check(40)
except ValueError as e:
    assert 'head_dim must be 64, got 40' in str(e), str(e)
else:
    raise SystemExit('no exception')
print('fine')" 2>&1); rc=$?
  if [[ $rc == 0 && "$out" == *fine* ]]; then
    echo "ok   $cxx"; [[ -z "$chosen" ]] && chosen="$cxx"
  else
    echo "FAIL $cxx (exit $rc: $(echo "$out" | tail -1))"
  fi
done
rm -rf "$WORK"
[[ -n "${PROBE_CHOICE:-}" && -n "$chosen" ]] && echo "$chosen" >"$PROBE_CHOICE"
[[ -n "$chosen" ]]
