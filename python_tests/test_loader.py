"""How the compiled kernels are found: the wheel layouts of setup.py, in a scratch copy.

Each case copies the Python package next to the shipped sources (`_csrc`, as a wheel built
with build isolation holds them), writes the `_build_info.json` that setup.py would, and
imports it in a subprocess, so the package under test here is never disturbed.
"""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


def make_wheel_copy(tmp_path: Path, build_info: dict) -> Path:
    root = tmp_path / "site"
    pkg = root / "vdproj_ext"
    shutil.copytree(REPO / "vdproj_ext", pkg,
                    ignore=shutil.ignore_patterns("*.so", "__pycache__", "_csrc"))
    shutil.copytree(REPO / "csrc", pkg / "_csrc")
    (pkg / "_build_info.json").write_text(json.dumps(build_info))
    return root


def run_python(root: Path, code: str, **env) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "PYTHONPATH": str(root), **env}
    return subprocess.run([sys.executable, "-c", code], cwd=root, env=full_env,
                          capture_output=True, text=True, timeout=600)


PROBE = """
import json, torch, vdproj_ext
info = vdproj_ext.backend_info()
q = torch.randn(1, 3, 2, 8); k = torch.randn(1, 4, 2, 8)
v_c = torch.randn(1, 4, 5); w_r = torch.randn(16, 5)
out = vdproj_ext.compressed_v_attention(q, k, v_c, w_r, causal=True)
ref = vdproj_ext.compressed_v_attention(q, k, v_c, w_r, causal=True, backend="reference")
info["max_err"] = (out - ref).abs().max().item()
try:
    vdproj_ext.compressed_v_attention(q, k, v_c, w_r, backend="ext")
    info["ext_error"] = None
except RuntimeError as exc:
    info["ext_error"] = str(exc)
print("RESULT" + json.dumps(info))
"""


def probe(root, **env):
    proc = run_python(root, PROBE, **env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT")][-1]
    return json.loads(line[len("RESULT"):]), proc.stderr


def test_torch_mismatch_is_a_clear_message_not_a_symbol_error(tmp_path):
    root = make_wheel_copy(tmp_path, {"aot": True, "torch_version": "1.0.0", "with_cuda": False})
    info, stderr = probe(root, VDPROJ_EXT_NO_JIT="1")
    assert info["extension_loaded"] is False
    assert info["auto_backend"]["cpu"] == "reference"
    assert "built against torch 1.0.0" in info["extension_error"]
    assert torch.__version__ in info["extension_error"]
    assert "built against torch 1.0.0" in info["ext_error"]  # backend="ext" says why
    assert info["max_err"] == 0.0
    assert "undefined symbol" not in stderr


@pytest.mark.slow
def test_sources_only_wheel_compiles_on_first_use(tmp_path):
    """What plain `pip install .` produces: sources only, compiled by the JIT loader."""
    root = make_wheel_copy(tmp_path, {"aot": False})
    info, _ = probe(root, VDPROJ_EXT_CACHE=str(tmp_path / "jit-cache"))
    assert info["extension_origin"] == "jit", info["extension_error"]
    assert info["cpu_kernels"] and info["auto_backend"]["cpu"] == "ext"
    assert info["ext_error"] is None
    assert info["max_err"] < 1e-5


REGISTERED_AT_IMPORT = """
import json, torch, vdproj_ext
ops = torch.ops.vdproj_ext
names = ["cva_forward", "cva_backward", "kvcache_attention", "ckv_forward",
         "ckv_kvcache_attention"]
defined = {n: hasattr(ops, n) for n in names}
q = torch.empty(1, 3, 2, 8, device="meta"); k = torch.empty(1, 4, 2, 8, device="meta")
v_c = torch.empty(1, 4, 5, device="meta"); w_r = torch.empty(16, 5, device="meta")
fake = [list(t.shape) for t in ops.cva_forward(q, k, v_c, w_r, None, True, 0.3)]
print("RESULT" + json.dumps({"defined": defined, "fake": fake,
                             "origin": vdproj_ext.backend_info()["extension_origin"]}))
"""


def test_ops_are_defined_and_registered_at_import():
    """An ahead-of-time build defines torch.ops.vdproj_ext.* and their fake kernels as soon as
    the package is imported, before any op is called (as torch.library users expect)."""
    if vdproj_ext_origin() != "aot":
        pytest.skip("needs the ahead-of-time build (a JIT build waits for the first call)")
    proc = run_python(REPO, REGISTERED_AT_IMPORT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT")][-1]
    result = json.loads(line[len("RESULT"):])
    assert all(result["defined"].values()), result["defined"]
    assert result["fake"] == [[1, 3, 2, 8], [1, 2, 3], [1, 3, 2, 5]]
    assert result["origin"] == "aot"


def vdproj_ext_origin():
    import vdproj_ext
    return vdproj_ext.backend_info()["extension_origin"]


SECOND_COPY = """
import importlib.util, json, sys, torch
spec = importlib.util.spec_from_file_location("_C", sys.argv[1])
other = importlib.util.module_from_spec(spec)
spec.loader.exec_module(other)  # another copy defines torch.ops.vdproj_ext first
import vdproj_ext
q = torch.randn(1, 3, 2, 8); k = torch.randn(1, 4, 2, 8)
v_c = torch.randn(1, 4, 5); w_r = torch.randn(16, 5)
out = vdproj_ext.compressed_v_attention(q, k, v_c, w_r, causal=True)
ref = vdproj_ext.compressed_v_attention(q, k, v_c, w_r, causal=True, backend="reference")
info = vdproj_ext.backend_info()
print("RESULT" + json.dumps({"error": info["extension_error"], "loaded": info["extension_loaded"],
                             "max_err": (out - ref).abs().max().item()}))
"""


def test_a_second_copy_of_the_kernels_is_not_loaded(tmp_path):
    """With torch.ops.vdproj_ext already defined by another build (a CMake build loaded by
    hand), importing and calling vdproj_ext must not load its own copy: a second
    TORCH_LIBRARY(vdproj_ext) terminates the process. The package falls back and says why."""
    built = sorted((REPO / "vdproj_ext").glob("_C*.so"))
    if not built:
        pytest.skip("needs the ahead-of-time build in the source tree")
    copy = tmp_path / "other" / built[0].name  # another file: dlopen loads it anew
    copy.parent.mkdir()
    shutil.copy(built[0], copy)
    proc = subprocess.run([sys.executable, "-c", SECOND_COPY, str(copy)], cwd=REPO,
                          env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT")][-1]
    result = json.loads(line[len("RESULT"):])
    assert result["loaded"] is False
    assert "already defined by another copy" in result["error"]
    assert result["max_err"] == 0.0
