"""The kernels' build flags and source files, read from csrc/build_flags.json.

That file is the one place for them: setup.py (ahead-of-time build) and loader.py (JIT build)
read it through this module, CMakeLists.txt and .ci/check_cuda_compile.sh read it directly.
This module imports neither torch nor the rest of vdproj_ext, so setup.py can load it by path
in an isolated build environment.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

FLAGS_FILE = "build_flags.json"


def read_flags(src_dir: Path) -> dict:
    """The parsed build_flags.json of a source tree (csrc/ or a wheel's _csrc/)."""
    with open(Path(src_dir) / FLAGS_FILE) as f:
        return json.load(f)


def sources(src_dir: Path, with_cuda: bool) -> list[str]:
    """Every source file of the build, in a stable order, as paths under src_dir."""
    groups = read_flags(src_dir)["sources"]
    patterns = groups["cpu"] + (groups["cuda"] if with_cuda else [])
    return [str(path) for pattern in patterns for path in sorted(Path(src_dir).glob(pattern))]


def compile_flags(src_dir: Path, with_cuda: bool) -> dict:
    """{"cxx": [...], "nvcc": [...], "ldflags": [...]} for a CPU-only or a CUDA build."""
    flags = read_flags(src_dir)
    extra = flags["cuda_build"] if with_cuda else []
    return {"cxx": flags["cxx"] + extra, "nvcc": flags["nvcc"] + extra,
            "ldflags": flags["ldflags"]}


if __name__ == "__main__":  # python build_config.py SRC_DIR {sources|cxx|nvcc|ldflags} [cuda]
    src, what = Path(sys.argv[1]), sys.argv[2]
    cuda = sys.argv[3:] == ["cuda"]
    print("\n".join(sources(src, cuda) if what == "sources" else compile_flags(src, cuda)[what]))
