"""vdproj-study: does two-phase training really win? The protocol over seeds, ranks and
training-set sizes, with 95% intervals and paired comparisons (vdproj_ext/experiment/study.py).

    python -m vdproj_ext.study --preset smoke --out runs/study_smoke      # CI, < 2 minutes
    python -m vdproj_ext.study --preset cpu-study --out runs/study --jobs 2 --budget-minutes 90

Parallelism: the runs are independent, so the study trains them as separate single-threaded
processes, --jobs at a time (each child is this command with --child-run). On a cluster node
that is the way to fill it (CPU cores, or several runs sharing a GPU at batch 8). A large run
can in addition use DDP: --launcher "torchrun --standalone --nproc_per_node=N" starts each run
under torchrun, whose N ranks split every batch (experiment/distributed.py). Runs never span
nodes; on a scheduler, start one study per node with its own --out.
"""
from __future__ import annotations

import argparse
import os
import shlex
import sys
import time
from typing import List, Optional

from ..experiment.checkpoint import CheckpointError
from ..experiment.study import (DESIGNS, SWEEPS, Session, StudyError, default_jobs, design_for,
                                estimate_run_s, estimate_wall_s, execute_run, execute_study,
                                load_plan, pending_runs, plan_study, prepare_data, save_plan)
from ..experiment.study_report import check_study, write_study
from .argtypes import (DEVICES, existing_path, non_negative_float, unit_fraction,
                       positive_float, positive_int)
from .interrupt import run_interruptible


def _ints(text: str) -> tuple:
    return tuple(positive_int(x) for x in text.split(",") if x)


def _floats(text: str) -> tuple:
    return tuple(unit_fraction(x) for x in text.split(",") if x)


def _sweeps(text: str) -> str:
    unknown = [s for s in text.split(",") if s and s not in SWEEPS]
    if unknown or not any(text.split(",")):
        raise argparse.ArgumentTypeError(f"expected a comma-separated list of "
                                         f"{', '.join(SWEEPS)}, got {text!r}")
    return text


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="vdproj-study", description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 2)[2], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="cpu-study", choices=sorted(DESIGNS),
                   help="model, data and sweep design (default cpu-study: the reference's "
                        "overfitting regime on a CPU; smoke: CI)")
    p.add_argument("--out", default="runs/study", help="output folder (default runs/study); "
                   "rerun the same command to continue an interrupted study")
    p.add_argument("--sweeps", default=",".join(SWEEPS), type=_sweeps,
                   help=f"comma-separated, of {', '.join(SWEEPS)} (default all)")
    p.add_argument("--seeds", type=positive_int,
                   help="seeds of the seed sweep (default: the design's)")
    p.add_argument("--sweep-seeds", type=positive_int, help="seeds of the rank and data sweeps")
    p.add_argument("--v-rank-fractions", type=_floats,
                   help="the rank sweep's v_rank as fractions of H*D, e.g. 0.25,0.5,0.75")
    p.add_argument("--data-sizes", type=_ints, help="the data sweep's training-set sizes, "
                   "e.g. 128,512,2048")
    p.add_argument("--data-pt", type=existing_path,
                   help="exact splits (python -m vdproj_ext.cli.data --export) to "
                   "draw every training-set size from, instead of building them here")
    p.add_argument("--jobs", type=positive_int,
                   help="runs trained at once, each a separate process (default: one per "
                   "core; runs of a few seconds, as in smoke, train in this process one after "
                   "another)")
    p.add_argument("--threads", type=positive_int, default=1,
                   help="torch threads per run (default 1)")
    p.add_argument("--budget-minutes", type=positive_float,
                   help="refuse to start when the estimated time exceeds this")
    p.add_argument("--launcher", help="command that starts each run instead of this Python, "
                   "e.g. \"torchrun --standalone --nproc_per_node=4\" (DDP per run)")
    p.add_argument("--device", default="auto", choices=DEVICES)
    p.add_argument("--save-every-s", type=non_negative_float, default=0.0,
                   help="write epoch-end checkpoints only this often (0: every epoch; "
                        "pythia-70m on a GPU: e.g. 120)")
    p.add_argument("--dry-run", action="store_true", help="print the plan and the estimate")
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--no-progress", action="store_true", help="no tqdm bar")
    p.add_argument("--child-run", help=argparse.SUPPRESS)
    return p


def parse_args(argv=None):
    return build_parser().parse_args(argv)


def _child_command(args):
    """The command line of one run as a child process; None: train in this process (one job,
    no launcher)."""
    if args.jobs == 1 and not args.launcher:
        return None

    def command(run_id: str) -> List[str]:
        head = shlex.split(args.launcher) if args.launcher else [sys.executable]
        return [*head, "-m", "vdproj_ext.study", "--out", args.out, "--child-run", run_id,
                "--threads", str(args.threads), "--device", args.device,
                "--save-every-s", str(args.save_every_s)]
    return command


def _announce(plan, todo, args) -> Optional[float]:
    """Print the plan and the estimate; the estimate in seconds (None: no cost model)."""
    est = estimate_wall_s(plan, todo, args.jobs)
    print(f"study {plan.preset}: sweeps {', '.join(plan.sweeps)}; {len(plan.runs)} runs, "
          f"{len(plan.runs) - len(todo)} already finished in {args.out}, {len(todo)} to train "
          f"({args.jobs} at a time, {args.threads} thread(s) each)", flush=True)
    if est is None:
        print(f"estimate: unknown (no cost model measured for preset {plan.preset})", flush=True)
    else:
        print(f"estimate: {est / 60:.1f} min on a 2-core machine like the one the preset was "
              f"measured on (quiet)", flush=True)
    if args.dry_run:
        for rid in todo:
            cost = estimate_run_s(plan, plan.runs[rid])
            print(f"  {rid}: " + ("?" if cost is None else f"~{cost:.0f} s"))
    return est


def _check_budget(est: Optional[float], args) -> None:
    if args.budget_minutes is None:
        return
    if est is None:
        print(f"warning: no estimate, so --budget-minutes {args.budget_minutes:g} cannot be "
              f"checked", flush=True)
    elif est / 60 > args.budget_minutes:
        sys.exit(f"error: the estimate ({est / 60:.1f} min) exceeds --budget-minutes "
                 f"{args.budget_minutes:g}. Shrink the study (--seeds, --sweep-seeds, "
                 f"--data-sizes, --v-rank-fractions, --sweeps), give it more cores (--jobs), "
                 f"or raise the budget; finished runs in --out are kept either way.")


def main(argv=None) -> Optional[dict]:
    return run_interruptible(_main, argv, "finished runs and checkpoints stay in --out; rerun "
                             "the same command to continue")


def _main(argv) -> Optional[dict]:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.child_run:
        execute_run(load_plan(args.out), args.child_run, args.out, threads=args.threads,
                    device=args.device, save_every_s=args.save_every_s)
        return None
    try:
        design = design_for(args.preset, seeds=args.seeds, sweep_seeds=args.sweep_seeds,
                            v_rank_fractions=args.v_rank_fractions, data_sizes=args.data_sizes)
        plan = plan_study(args.preset, [s for s in args.sweeps.split(",") if s], design)
        todo = pending_runs(plan, args.out)
    except (ValueError, StudyError) as e:  # a usage error, before anything is written
        parser.error(str(e))
    args.jobs = args.jobs or default_jobs(plan, todo)
    est = _announce(plan, todo, args)
    _check_budget(est, args)
    if args.dry_run:
        return None
    try:  # the data is checked before its first file is written
        prepare_data(plan, args.out, args.data_pt)
    except (ValueError, StudyError) as e:
        parser.error(str(e))
    return _run(plan, args, est, "python -m vdproj_ext.study " + shlex.join(argv))


def _run(plan, args, est, command: str) -> dict:
    save_plan(plan, args.out)
    t0 = time.time()
    session = Session(time.strftime("%Y-%m-%d %H:%M:%S"), args.jobs, args.threads,
                      None if est is None else round(est, 1), args.device, args.save_every_s)
    failure = None
    try:
        execute_study(plan, args.out, session, child_command=_child_command(args),
                      progress=not args.no_progress)
    except (StudyError, CheckpointError) as e:
        failure = e
    session.elapsed_s = round(time.time() - t0, 1)
    study = write_study(plan, args.out, session, command, plots=not args.no_plots)
    print(f"study time: {session.elapsed_s / 60:.1f} min this invocation "
          f"({study['elapsed_s_total'] / 60:.1f} min in all); "
          f"{os.path.join(args.out, 'study.md')}", flush=True)
    for c in study["conclusions"]:
        print(f"  {c['claim']}: {c['verdict']}", flush=True)
    if failure is not None:
        sys.exit(f"error: {failure}")
    problems = [] if args.no_plots else check_study(args.out)
    if problems:
        sys.exit("error: the study's outputs are incomplete:\n  " + "\n  ".join(problems))
    print(f"outputs complete: {len(study['runs'])} runs in study.json, intervals and paired "
          f"differences consistent with the per-seed values"
          + ("" if args.no_plots else ", plots written"), flush=True)
    return study


if __name__ == "__main__":
    main()
