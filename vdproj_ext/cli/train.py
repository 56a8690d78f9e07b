"""vdproj-train: the V-DProj training experiment (SPEC section 5).

    python -m vdproj_ext.train                      # all runs, cpu-small preset, Shakespeare
    python -m vdproj_ext.train --preset smoke --out runs/smoke
    torchrun --nproc_per_node=2 -m vdproj_ext.train --preset smoke --mode e2e

The protocol and the runs are in vdproj_ext/experiment/protocol.py; this module only turns
the command line into ExperimentOptions and picks between training the runs in this process
and training them at once in child processes (each of which is this command again).
"""
from __future__ import annotations

import argparse
import sys
from typing import List, Optional

from ..experiment.checkpoint import CheckpointError
from ..experiment.loop import TrainingDiverged
from ..experiment.protocol import DEFAULT_RUNS, MODES, RUN_NAMES, Settings, runs_for
from ..experiment.runner import (ExperimentOptions, default_jobs, run_configs, run_jobs,
                                 train_runs)
from ..experiment.report import write_outputs
from ..models import VDProjConfig
from .argtypes import (DEVICES, existing_path, int_at_least, non_negative_float,
                       non_negative_int, open_fraction, positive_float, positive_int,
                       tokenizer_spec)
from .interrupt import run_interruptible


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="vdproj-train", description="V-DProj experiment: baseline, end-to-end and "
        "two-phase training of a GPT-NeoX model with a compressed value cache (and, in the "
        "*_kv runs, latent keys as well).")
    p.add_argument("--out", default="runs/default", help="output folder (default runs/default)")
    p.add_argument("--preset", default="cpu-small", choices=VDProjConfig.PRESETS)
    p.add_argument("--mode", default="all", choices=(*MODES, "all"),
                   help=f"the runs (default all: {', '.join(DEFAULT_RUNS)})")
    p.add_argument("--phase1", default="sgd", choices=("sgd", "pca", "both"),
                   help="phase 1 by SGD (the reference), by closed-form PCA, or both (adds "
                        "the runs two_phase_pca and two_phase_kv_pca next to their SGD runs)")
    p.add_argument("--resume", action="store_true",
                   help="continue the runs whose checkpoints are in --out")
    p.add_argument("--seed", type=int, default=0)
    g = p.add_argument_group("data")
    g.add_argument("--data-text", type=existing_path,
                   help="your own UTF-8 text file instead of Shakespeare")
    g.add_argument("--data-npy", type=existing_path,
                   help="a pre-tokenized .npy token stream (1-D) or (N, seq_len)")
    g.add_argument("--data-pt", type=existing_path,
                   help="exact splits exported by `python -m vdproj_ext.cli.data "
                   "--export` (for machines without tokenizers)")
    g.add_argument("--tokenizer", type=tokenizer_spec,
                   help="neox | bpe:N | bytes | path/to/tokenizer.json "
                   "(default: the preset's)")
    g.add_argument("--n-train", type=positive_int, help="training samples (default: the preset's)")
    g.add_argument("--n-val", type=positive_int, help="validation samples (default: the preset's)")
    g.add_argument("--val-frac", type=open_fraction, help="held-out tail fraction of the text")
    g.add_argument("--seq-len", type=int_at_least(2), help="tokens per sample (default 128)")
    g = p.add_argument_group("protocol overrides (defaults are the reference's)")
    g.add_argument("--epochs", type=positive_int,
                   help="max epochs of phase 2 / e2e / baseline (30)")
    g.add_argument("--phase1-epochs", type=positive_int, help="max epochs of phase 1 (10)")
    g.add_argument("--lr", type=positive_float,
                   help="phase 2 / e2e / baseline learning rate (1e-4)")
    g.add_argument("--phase1-lr", type=positive_float, help="phase 1 learning rate (1e-3)")
    g.add_argument("--patience", type=positive_int, help="early-stopping patience (1)")
    g.add_argument("--batch-size", type=positive_int, help="global batch size (8)")
    g.add_argument("--v-rank", type=positive_int, help="override the preset's v_rank")
    g.add_argument("--k-rank", type=positive_int, help="the latent-key runs' k_rank "
                   "(default: the preset's, else 0.375 * hidden size)")
    g.add_argument("--init-from", type=existing_path,
                   help="start every run from a local Hugging Face GPT-NeoX "
                   "checkpoint folder (e.g. Pythia-70m) instead of random weights; its shape "
                   "replaces the preset's, and its vocabulary must match the tokenizer")
    _execution_args(p.add_argument_group("execution"))
    return p


def _execution_args(g):
    g.add_argument("--device", default="auto", choices=DEVICES)
    g.add_argument("--amp", default="auto", choices=("auto", "none", "bf16", "fp16"),
                   help="autocast dtype (auto: bf16 on CUDA, none on CPU)")
    g.add_argument("--backend", default="auto", choices=("auto", "ext", "reference"),
                   help="backend of vdproj_ext's attention ops")
    g.add_argument("--eval-batch", type=positive_int, help="evaluation batch size")
    g.add_argument("--jobs", type=positive_int,
                   help="runs trained at once in separate processes (default: all of them; 1 "
                   "trains them one after another in this process)")
    g.add_argument("--threads", type=positive_int,
                   help="torch CPU threads per process (default: cores / jobs)")
    g.add_argument("--save-every-steps", type=non_negative_int, default=0,
                   help="also checkpoint every N steps within an epoch (0: at epoch ends)")
    g.add_argument("--save-every-s", type=non_negative_float, default=0.0,
                   help="write epoch-end checkpoints only when this many seconds passed since "
                        "the last one (0: every epoch; large models on fast GPUs: e.g. 120)")
    g.add_argument("--no-pca-reference", action="store_true",
                   help="skip the PCA-optimum reconstruction reported next to SGD phase 1")
    g.add_argument("--no-plots", action="store_true")
    g.add_argument("--no-progress", action="store_true", help="no tqdm bars")
    g.add_argument("--debug-kill-at-step", type=int, default=0, help=argparse.SUPPRESS)
    g.add_argument("--child-run", choices=RUN_NAMES, help=argparse.SUPPRESS)


def options(args) -> ExperimentOptions:
    settings = Settings.for_preset(args.preset, **{k: getattr(args, k, None)
                                                   for k in Settings.field_names()})
    return ExperimentOptions(
        out=args.out, preset=args.preset, settings=settings, seed=args.seed,
        phase1=args.phase1, resume=args.resume, data_text=args.data_text,
        data_npy=args.data_npy, data_pt=args.data_pt, v_rank=args.v_rank, k_rank=args.k_rank,
        init_from=args.init_from, amp=args.amp, backend=args.backend,
        save_every_steps=args.save_every_steps, save_every_s=args.save_every_s,
        pca_reference=not args.no_pca_reference, show_progress=not args.no_progress,
        kill_at_step=args.debug_kill_at_step)


def _child_command(argv: List[str]):
    """The command line of a child process of run_jobs: this command, for one run."""
    def command(run: str, threads: int, data_file: Optional[str]) -> List[str]:
        data_args = ["--data-pt", data_file] if data_file else []
        return [sys.executable, "-m", "vdproj_ext.train", *argv, *data_args, "--child-run", run,
                "--jobs", "1", "--threads", str(threads), "--no-progress", "--no-plots"]
    return command


def _check_data_flags(parser, args) -> None:
    """One data source, and --tokenizer only for text (pre-tokenized data carries its ids)."""
    given = [f"--{f.replace('_', '-')}" for f in ("data_text", "data_npy", "data_pt")
             if getattr(args, f)]
    if len(given) > 1:
        parser.error(f"{' and '.join(given)} are alternatives: give one data source")
    if args.tokenizer and (args.data_npy or args.data_pt):
        parser.error(f"--tokenizer does not apply to pre-tokenized data ({given[0]})")


def main(argv=None) -> Optional[dict]:
    return run_interruptible(_main, argv, "the checkpoints in --out keep the finished work; "
                             "rerun the same command with --resume to continue")


def _main(argv) -> Optional[dict]:
    from_cli = argv is None
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.child_run:  # a child gets its parent's flags plus --data-pt (the splits)
        _check_data_flags(parser, args)
    try:  # bad flag combinations: a usage error before anything is written
        opts = options(args)
        run_configs(opts)
    except ValueError as e:
        parser.error(str(e))
    runs = [args.child_run] if args.child_run else runs_for(args.mode, args.phase1)
    jobs = default_jobs(args.jobs, runs, as_child=bool(args.child_run))
    if jobs > 1 and len(runs) > 1:
        results = run_jobs(opts, runs, min(jobs, len(runs)), threads=args.threads,
                           child_command=_child_command(argv))
        write_outputs(results, opts.out, plots=not args.no_plots)
        return results
    try:
        return train_runs(opts, runs, device=args.device, threads=args.threads,
                          as_child=bool(args.child_run), plots=not args.no_plots)
    except CheckpointError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        if not from_cli:
            raise
        sys.exit(2)
    except TrainingDiverged as e:  # not a usage error: the settings trained to NaN
        print(f"error: {e}", file=sys.stderr, flush=True)
        if not from_cli:
            raise
        sys.exit(1)


if __name__ == "__main__":
    main()
