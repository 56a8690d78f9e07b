"""Load the CMake-built extension on its own and check one op against the reference.

Usage: python .ci/cmake_check.py build/cmake/_C*.so
"""
import importlib.util
import sys

import torch

# Load the CMake build before importing vdproj_ext, whose own build would otherwise define
# torch.ops.vdproj_ext first (the package then leaves its copy unloaded: the loader's guard).
path = sys.argv[1]
spec = importlib.util.spec_from_file_location("_C", path)
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)  # registers torch.ops.vdproj_ext.*
print("cmake-built extension:", path, module.build_info())

from vdproj_ext import reference  # noqa: E402

torch.manual_seed(0)
q, k = torch.randn(2, 5, 3, 16, dtype=torch.float64), torch.randn(2, 7, 3, 16, dtype=torch.float64)
v_c, w_r, b_r = (torch.randn(2, 7, 11, dtype=torch.float64), torch.randn(48, 11, dtype=torch.float64),
                 torch.randn(48, dtype=torch.float64))
out, _, _ = torch.ops.vdproj_ext.cva_forward(q, k, v_c, w_r, b_r, True, 0.25)
expected = reference.compressed_v_attention(q, k, v_c, w_r, b_r, causal=True, softmax_scale=0.25)
err = ((out - expected).norm() / expected.norm()).item()
print(f"cva_forward vs reference: relative error {err:.2e}")
sys.exit(0 if err < 1e-10 else 1)
