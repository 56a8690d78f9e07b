"""The study (vdproj-study): does two-phase training really win? The protocol's runs over
seeds, ranks and training-set sizes, each run trained by the experiment's own runner.

    plan = plan_study("cpu-study", ("seeds", "ranks", "data"))
    execute_study(plan, "runs/study", jobs=2, child_command=...)   # resumable
    write_study(plan, "runs/study", session)                       # study.json, study.md, plots

Sweeps (each run is one protocol.RUNS run of one seed; the same seed means the same
initialisation and data order in every method, so methods are compared seed by seed):
    seeds  baseline, e2e, two_phase and two_phase_pca over design.seeds seeds;
    ranks  e2e and two_phase at each v_rank fraction of H*D, the baseline, and the latent-key
           points (keys' own latent next to the values', and the joint latent), over
           design.sweep_seeds seeds: val perplexity against KV-cache bytes per token;
    data   e2e and two_phase at each training-set size, over design.sweep_seeds seeds.
A run that two sweeps share (same method, seed, ranks and size) trains once.

Folders: OUT/study_plan.json, OUT/data/n<N>.pt (the exact splits of each training-set size,
shared by all its runs), OUT/runs/<run id>/ (a vdproj-train output folder: results.json,
report.md, checkpoints/, plus study_run.json and train.log). A run whose results.json holds its
result is done and skipped; any other run is (re)started with resume, so a half-finished one
continues from its last checkpoint.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from ..models import VDProjConfig
from .checkpoint import atomic_save_json, atomic_write_bytes
from .data import load_dataset
from .protocol import LATENT_KEY_RANK_FRACTION, RUNS, Settings
from .runner import ExperimentOptions, _run_processes, train_runs

SWEEPS = ("seeds", "ranks", "data")
SEED_METHODS = ("baseline", "e2e", "two_phase", "two_phase_pca")
SWEEP_METHODS = ("e2e", "two_phase")
LATENT_METHODS = {"e2e": "e2e_kv", "two_phase": "two_phase_kv"}  # the latent-key counterparts
KV_BYTES_PER_VALUE = 2  # the KV-cache bytes are counted for a 16-bit cache (bf16 / fp16)


class StudyError(RuntimeError):
    """A study folder that does not fit the plan, or runs that failed."""


@dataclass(frozen=True)
class CostModel:
    """Seconds on one core of the 2-core machine the study preset was measured on (quiet,
    torch with 1 thread), for the up-front estimate."""
    step_s: float            # one cross-entropy training step (batch 8 of seq_len tokens)
    phase1_step_s: float     # one phase-1 step (reconstruction loss, no logits)
    eval_sample_s: float     # one validation sample, forward
    run_overhead_s: float    # start, model build, final evaluation, checkpoint writes
    epochs: Dict[str, float]  # expected epochs per stage ("train", "phase1", "phase2")


@dataclass(frozen=True)
class StudyDesign:
    """What each sweep varies for a preset (overridable on the command line)."""
    seeds: int                          # the seed sweep's seeds: 0 .. seeds-1
    sweep_seeds: int                    # the rank and data sweeps' seeds
    v_rank_fractions: Tuple[float, ...]  # the rank sweep's v_rank, as fractions of H*D
    latent_points: Tuple[str, ...]      # "k": k_rank 0.375 H*D next to the preset's v_rank;
                                        # "joint": one latent shared by keys and values
    data_sizes: Tuple[int, ...]         # the data sweep's training-set sizes (samples)
    cost: Optional[CostModel] = None    # None: no estimate (not measured for this preset)


# The study presets. cpu-study: the reference's overfitting regime at CPU scale (see
# protocol.PRESET_SETTINGS); its data sweep goes from that regime (128 samples, 56 parameters
# per token) to 16x the data (3.5 per token; 2048 of the ~12,900 samples the text holds: the
# next step, 4096, would add ~35 minutes). Its cost model was measured on the shared 2-core
# machine (nice -n 19, 1 thread, load ~1): an e2e run 34 s (10 epochs of 16 steps at 0.103 s,
# 12 evaluations of 256 samples at 1.5 s), two-phase 50 s (phase-1 steps 0.04 s), e2e on 2048
# samples 254 s (8 epochs). 80 runs: ~50 minutes estimated with --jobs 2.
DESIGNS: Dict[str, StudyDesign] = {
    "smoke": StudyDesign(2, 2, (0.25, 0.875), ("k", "joint"), (16, 32),
                         CostModel(0.01, 0.008, 0.0005, 1.0,
                                   {"train": 2, "phase1": 2, "phase2": 2})),
    "cpu-study": StudyDesign(8, 3, (0.25, 0.5, 0.625, 0.75, 0.875), ("k", "joint"),
                             (128, 512, 2048),
                             CostModel(0.103, 0.04, 0.006, 6.0,
                                       {"train": 10, "phase1": 10, "phase2": 10})),
    "cpu-small": StudyDesign(5, 3, (0.25, 0.5, 0.625, 0.75, 0.875), ("k", "joint"),
                             (120, 480, 1920)),
    "pythia-70m": StudyDesign(5, 3, (0.25, 0.5, 0.625, 0.75, 0.875), ("k", "joint"),
                              (2500, 5000, 10000)),
}


@dataclass(frozen=True)
class StudyRun:
    """One training run of the study: a protocol.RUNS run, a seed, its ranks and data size."""
    method: str                    # protocol.RUNS key
    seed: int
    n_train: int
    v_rank: Optional[int] = None   # None: the baseline (no latent)
    k_rank: Optional[int] = None   # the keys' own latent (latent-key runs)
    joint_kv: bool = False         # keys share the value latent (latent-key runs)

    @property
    def run_id(self) -> str:
        ranks = "" if self.v_rank is None else f"-v{self.v_rank}"
        ranks += f"-k{self.k_rank}" if self.k_rank else ("-joint" if self.joint_kv else "")
        return f"{self.method}{ranks}-n{self.n_train}-s{self.seed}"

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class StudyPlan:
    preset: str
    design: StudyDesign
    sweeps: Tuple[str, ...]
    runs: Dict[str, StudyRun] = field(default_factory=dict)      # by run id
    members: Dict[str, List[str]] = field(default_factory=dict)  # sweep -> its run ids

    def add(self, sweep: str, run: StudyRun):
        self.runs.setdefault(run.run_id, run)
        ids = self.members.setdefault(sweep, [])
        if run.run_id not in ids:
            ids.append(run.run_id)

    def settings(self, n_train: int) -> Settings:
        return Settings.for_preset(self.preset, n_train=n_train)

    def to_dict(self) -> dict:
        return {"preset": self.preset, "design": dataclasses.asdict(self.design),
                "sweeps": list(self.sweeps), "runs": {k: r.to_dict() for k, r in self.runs.items()},
                "members": self.members}

    @classmethod
    def from_dict(cls, d: dict) -> "StudyPlan":
        des = dict(d["design"])
        cost = des.pop("cost")
        design = StudyDesign(**{k: tuple(v) if isinstance(v, list) else v for k, v in des.items()},
                             cost=None if cost is None else CostModel(**cost))
        plan = cls(d["preset"], design, tuple(d["sweeps"]))
        plan.runs = {k: StudyRun(**r) for k, r in d["runs"].items()}
        plan.members = {k: list(v) for k, v in d["members"].items()}
        return plan


# ---------------------------------------------------------------------------------------------
# Planning


def design_for(preset: str, **overrides) -> StudyDesign:
    """The preset's study design, with the overrides that are not None."""
    if preset not in DESIGNS:
        raise ValueError(f"--preset {preset!r} has no study design; choose one of "
                         f"{sorted(DESIGNS)}")
    changes = {k: v for k, v in overrides.items() if v is not None}
    if "v_rank_fractions" in changes and any(not 0 < f <= 1 for f in
                                             changes["v_rank_fractions"]):
        raise ValueError("--v-rank-fractions must lie in (0, 1]")
    for key in ("seeds", "sweep_seeds"):
        if changes.get(key, 1) < 1:
            raise ValueError(f"--{key.replace('_', '-')} must be at least 1")
    return dataclasses.replace(DESIGNS[preset], **changes)


def plan_study(preset: str, sweeps: Sequence[str] = SWEEPS,
               design: Optional[StudyDesign] = None) -> StudyPlan:
    """Every run of the chosen sweeps (a run two sweeps share appears once)."""
    bad = [s for s in sweeps if s not in SWEEPS]
    if bad or not sweeps:
        raise ValueError(f"--sweeps must name some of {', '.join(SWEEPS)}; got {list(sweeps)}")
    design = design or design_for(preset)
    cfg, settings = VDProjConfig.preset(preset), Settings.for_preset(preset)
    n0 = settings.n_train
    if "data" in sweeps and min(design.data_sizes) < settings.batch_size:
        raise ValueError(f"--data-sizes must be at least one batch ({settings.batch_size})")
    plan = StudyPlan(preset, design, tuple(s for s in SWEEPS if s in sweeps))
    if "seeds" in sweeps:
        for seed in range(design.seeds):
            for m in SEED_METHODS:
                plan.add("seeds", StudyRun(m, seed, n0, None if m == "baseline" else cfg.v_rank))
    if "ranks" in sweeps:
        _plan_ranks(plan, cfg, n0)
    if "data" in sweeps:
        for n in design.data_sizes:
            for seed in range(design.sweep_seeds):
                for m in SWEEP_METHODS:
                    plan.add("data", StudyRun(m, seed, n, cfg.v_rank))
    return plan


def _plan_ranks(plan: StudyPlan, cfg: VDProjConfig, n0: int):
    hd, d = cfg.hidden_size, plan.design
    # the preset's own rank (the reference's 0.625 H*D) is always a point: the claim about it
    # is judged against its neighbours, and its runs are the seed sweep's
    ranks = sorted({max(1, round(f * hd)) for f in d.v_rank_fractions} | {cfg.v_rank})
    for seed in range(d.sweep_seeds):
        plan.add("ranks", StudyRun("baseline", seed, n0))
        for m in SWEEP_METHODS:
            for r in ranks:
                plan.add("ranks", StudyRun(m, seed, n0, r))
            for point in d.latent_points:
                k_rank = round(LATENT_KEY_RANK_FRACTION * hd) if point == "k" else None
                plan.add("ranks", StudyRun(LATENT_METHODS[m], seed, n0, cfg.v_rank,
                                           k_rank=k_rank, joint_kv=point == "joint"))


def run_config(plan: StudyPlan, run: StudyRun) -> VDProjConfig:
    """The model a run trains (for its cache size before it has run)."""
    cfg = VDProjConfig.preset(plan.preset).replace(k_rank=None, joint_kv=False)
    if run.v_rank is None:
        return cfg.uncompressed()
    return cfg.replace(v_rank=run.v_rank, k_rank=run.k_rank, joint_kv=run.joint_kv)


def kv_bytes_per_token(cfg: VDProjConfig) -> int:
    """KV-cache bytes one token takes, all layers, at KV_BYTES_PER_VALUE bytes a value."""
    return cfg.cache_values_per_token() * cfg.num_layers * KV_BYTES_PER_VALUE


# ---------------------------------------------------------------------------------------------
# The estimate


def estimate_run_s(plan: StudyPlan, run: StudyRun) -> Optional[float]:
    """Expected seconds of one run at one thread (None without a cost model)."""
    c = plan.design.cost
    if c is None:
        return None
    s = plan.settings(run.n_train)
    steps = run.n_train // s.batch_size
    evals = s.n_val * c.eval_sample_s
    stages = RUNS[run.method].stages
    total = c.run_overhead_s + evals
    for stage in stages:
        if stage == "phase1" and RUNS[run.method].phase1 == "pca":
            total += 2 * run.n_train * c.eval_sample_s  # the PCA pass and its evaluation
        elif stage == "phase1":
            total += c.epochs["phase1"] * (steps * c.phase1_step_s + evals)
        else:
            total += c.epochs[stage] * (steps * c.step_s + evals)
    return total


def estimate_wall_s(plan: StudyPlan, run_ids: Sequence[str], jobs: int) -> Optional[float]:
    """Expected wall seconds of run_ids over `jobs` single-threaded processes (longest
    first; never less than the longest run)."""
    costs = [estimate_run_s(plan, plan.runs[r]) for r in run_ids]
    if any(c is None for c in costs):
        return None
    if not costs:
        return 0.0
    parallel = max(1, min(jobs, os.cpu_count() or 1))
    return max(max(costs), sum(costs) / parallel) * max(1.0, jobs / parallel)


PROCESS_START_S = 5.0  # a child process: Python, torch, the extension, the data file


def default_jobs(plan: StudyPlan, run_ids: Sequence[str]) -> int:
    """One process per core; but runs of a few seconds (smoke) train in this process, one
    after another: starting a process per run would cost more than the runs."""
    costs = [estimate_run_s(plan, plan.runs[r]) for r in run_ids]
    if costs and all(c is not None and c < 3 * PROCESS_START_S for c in costs):
        return 1
    return os.cpu_count() or 1


# ---------------------------------------------------------------------------------------------
# Data and run folders


def data_path(out: str, n_train: int) -> str:
    return os.path.join(out, "data", f"n{n_train}.pt")


def run_dir(out: str, run_id: str) -> str:
    return os.path.join(out, "runs", run_id)


def prepare_data(plan: StudyPlan, out: str, data_pt: Optional[str] = None) -> List[str]:
    """The exact splits of every training-set size of the plan, in OUT/data/ (kept if there).
    The largest is built once (or read from data_pt); a smaller size takes its last n
    training windows, which is what building it directly gives (the training samples are the
    last windows before the validation tail, and the tokenizers encode line by line).
    OUT/data/source.json records where they came from; another source is refused."""
    sizes = sorted({r.n_train for r in plan.runs.values()})
    source, source_path = _check_data_source(plan, out, data_pt)
    missing = [n for n in sizes if not os.path.exists(data_path(out, n))]
    full = None
    if missing:  # load and check everything before the first file is written
        vocab = VDProjConfig.preset(plan.preset).vocab_size
        full = load_dataset(plan.settings(max(sizes)), vocab, data_pt=data_pt)
        if max(missing) > len(full.train):
            raise ValueError(f"the data holds {len(full.train)} training samples, fewer than "
                             f"the study's size {max(missing)}")
    if not os.path.exists(source_path):
        os.makedirs(os.path.dirname(source_path), exist_ok=True)
        atomic_save_json(source, source_path)
    for n in missing:
        part = dataclasses.replace(full, train=full.train[len(full.train) - n:])
        atomic_write_bytes(data_path(out, n), part.save)
    return missing


def _check_data_source(plan: StudyPlan, out: str, data_pt: Optional[str]):
    """(source, path of OUT/data/source.json); an existing record of another source is an
    error."""
    s = Settings.for_preset(plan.preset)
    source = {"preset": plan.preset, "tokenizer": s.tokenizer, "n_val": s.n_val,
              "val_frac": s.val_frac, "seq_len": s.seq_len,
              "data_pt": os.path.abspath(data_pt) if data_pt else None}
    path = os.path.join(out, "data", "source.json")
    if os.path.exists(path):
        with open(path) as f:
            if json.load(f) != source:
                raise StudyError(f"{path} records data from another source than this study's "
                                 f"{source}; use another --out")
    return source, path


def run_options(plan: StudyPlan, run: StudyRun, out: str,
                save_every_s: float = 0.0) -> ExperimentOptions:
    """vdproj-train's options for the run (resume on: a checkpoint there continues)."""
    return ExperimentOptions(
        out=run_dir(out, run.run_id), preset=plan.preset, settings=plan.settings(run.n_train),
        seed=run.seed, phase1="sgd", resume=True, data_text=None, data_npy=None,
        data_pt=data_path(out, run.n_train), v_rank=run.v_rank, k_rank=run.k_rank,
        init_from=None, amp="auto", backend="auto", save_every_steps=0,
        save_every_s=save_every_s,
        pca_reference=False, show_progress=False, kill_at_step=0, joint_kv=run.joint_kv)


def run_identity(plan: StudyPlan, run: StudyRun) -> dict:
    """What a run folder's study_run.json must hold for its contents to count as this run."""
    return {"preset": plan.preset, "run": run.to_dict(),
            "settings": dataclasses.asdict(plan.settings(run.n_train))}


def _check_identity(plan: StudyPlan, run: StudyRun, out: str) -> None:
    path = os.path.join(run_dir(out, run.run_id), "study_run.json")
    if os.path.exists(path):
        with open(path) as f:
            saved = json.load(f)
        if saved != run_identity(plan, run):
            raise StudyError(f"{path} records another run configuration than this study's "
                             f"{run.run_id} (a different preset or protocol); use another "
                             f"--out, or delete that folder to retrain it")


def finished_result(plan: StudyPlan, run: StudyRun, out: str) -> Optional[dict]:
    """The run's results.json entry if it has finished in OUT, else None."""
    _check_identity(plan, run, out)
    path = os.path.join(run_dir(out, run.run_id), "results.json")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        results = json.load(f)
    return results if run.method in results.get("runs", {}) else None


def execute_run(plan: StudyPlan, run_id: str, out: str, *, threads: int = 1,
                device: str = "auto", save_every_s: float = 0.0) -> None:
    """Train one run (resuming its checkpoint if any) with the experiment's runner; its log
    goes to the run folder's train.log. save_every_s: epoch-end checkpoints at most this
    often (vdproj-train --save-every-s; large models)."""
    run = plan.runs[run_id]
    _check_identity(plan, run, out)
    folder = run_dir(out, run_id)
    os.makedirs(folder, exist_ok=True)
    atomic_save_json(run_identity(plan, run), os.path.join(folder, "study_run.json"))
    with open(os.path.join(folder, "train.log"), "a") as log, \
            contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
        print(f"== {time.strftime('%Y-%m-%d %H:%M:%S')} study run {run_id}", flush=True)
        train_runs(run_options(plan, run, out, save_every_s), [run.method], device=device,
                   threads=threads, plots=False)


# ---------------------------------------------------------------------------------------------
# Running the study


@dataclass
class Session:
    """One invocation of the study: what it trained and how long it took."""
    started: str
    jobs: int
    threads: int
    estimate_s: Optional[float]      # expected wall seconds of the runs it had to train
    device: str = "auto"
    save_every_s: float = 0.0        # epoch-end checkpoints at most this often (0: each epoch)
    trained: List[str] = field(default_factory=list)  # run ids trained (or resumed) here
    elapsed_s: float = 0.0

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def pending_runs(plan: StudyPlan, out: str) -> List[str]:
    """The runs not finished in OUT, longest expected first."""
    todo = [rid for rid, run in plan.runs.items() if finished_result(plan, run, out) is None]
    return sorted(todo, key=lambda r: -(estimate_run_s(plan, plan.runs[r]) or 0.0))


def save_plan(plan: StudyPlan, out: str) -> str:
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, "study_plan.json")
    atomic_save_json(plan.to_dict(), path)
    return path


def load_plan(out: str) -> StudyPlan:
    with open(os.path.join(out, "study_plan.json")) as f:
        return StudyPlan.from_dict(json.load(f))


def execute_study(plan: StudyPlan, out: str, session: Session, *,
                  child_command: Optional[Callable[[str], List[str]]] = None,
                  progress: bool = True) -> None:
    """Train every pending run: in this process one after another (child_command None), or
    as child processes, session.jobs at once, child_command(run_id) being the command line of
    one (which calls execute_run). A tqdm bar counts the runs. Failed runs are named at the
    end; the others' results stay, and a rerun continues."""
    todo = pending_runs(plan, out)
    bar = _runs_bar(len(plan.runs), len(plan.runs) - len(todo), progress)
    failed: List[str] = []
    try:
        if child_command is None:
            for rid in todo:
                session.trained.append(rid)
                execute_run(plan, rid, out, threads=session.threads, device=session.device,
                            save_every_s=session.save_every_s)
                _advance(bar, rid)
        else:
            def done(rid, status):
                if status == 0:
                    _advance(bar, rid)
            session.trained.extend(todo)
            failed = _run_processes([(rid, child_command(rid)) for rid in todo],
                                    session.jobs, on_done=done)
    finally:
        if bar is not None:
            bar.close()
    if failed:
        logs = ", ".join(os.path.join(run_dir(out, f.split()[0]), "train.log") for f in failed)
        raise StudyError(f"run(s) failed: {', '.join(failed)}; see {logs}. Rerun the same "
                         f"command to continue (finished runs are kept).")


def _runs_bar(total: int, done: int, progress: bool):
    if not progress:
        return None
    try:  # optional, as in the training loop
        from tqdm.auto import tqdm
    except ImportError:
        return None
    return tqdm(total=total, initial=done, unit="run", desc="study", dynamic_ncols=True)


def _advance(bar, run_id: str):
    if bar is not None:
        bar.set_postfix_str(run_id, refresh=False)
        bar.update(1)
