"""Running the experiment: one run from start (or checkpoint) to result, the runs of one
process in turn, and the job runner that trains several runs at once in child processes.

A run (protocol.RUNS) is a model (compressed or not) and its stages: each stage is fitted by
loop.StageTrainer, or, for phase 1 by PCA, set in closed form. The run's results.json entry
is assembled at the end from its RunState and a final evaluation.

Outputs in ExperimentOptions.out: results.json (SPEC section 5), report.md and plots
(report.py), checkpoints/<run>.pt (checkpoint.py; resumable with --resume, also mid-epoch),
tokenizer.json for trained tokenizers, and parts/ when runs train in child processes.
"""
from __future__ import annotations

import copy
import json
import os
import subprocess
import time
import warnings
from dataclasses import dataclass
from typing import Callable, List, Optional

import torch

from ..models import (VDProjConfig, VDProjForCausalLM, config_from_gpt_neox, fit_v_pca_,
                      from_gpt_neox, read_gpt_neox_config)
from ..ops import backend_info
from .checkpoint import (Checkpoint, CheckpointWriter, EpochLog, RunState, atomic_save_json,
                         checkpoint_path, read_checkpoint)
from .data import load_dataset
from .distributed import Dist
from .loop import Session, StageTrainer, evaluate
from .protocol import LATENT_KEY_RANK_FRACTION, PROTOCOL, RUN_NAMES, RUNS, RunSpec, Settings
from .report import write_outputs


@dataclass
class ExperimentOptions:
    """The command line's choices that shape the runs; cli/train.py fills every field from
    its flags, where the defaults and their help live."""
    out: str                       # output folder
    preset: str                    # VDProjConfig preset and PRESET_SETTINGS key
    settings: Settings
    seed: int
    phase1: str                    # sgd | pca | both
    resume: bool
    data_text: Optional[str]
    data_npy: Optional[str]
    data_pt: Optional[str]
    v_rank: Optional[int]          # overrides the preset's
    k_rank: Optional[int]          # the latent-key runs' (None: the preset's, else
                                   # LATENT_KEY_RANK_FRACTION * H*D)
    init_from: Optional[str]       # a Hugging Face GPT-NeoX folder
    amp: str                       # auto | none | bf16 | fp16
    backend: str                   # of the attention ops
    save_every_steps: int
    save_every_s: float
    pca_reference: bool            # report the PCA optimum next to SGD phase 1
    show_progress: bool
    kill_at_step: int              # test hook
    joint_kv: bool = False         # the latent-key runs share the values' latent (SPEC 3b)


def resolve_config(opts: ExperimentOptions) -> VDProjConfig:
    """The compressed model's config: the preset's, or the --init-from checkpoint's shape.
    Its k_rank (a latent-key preset's) is left for latent_key_config to use."""
    cfg = VDProjConfig.preset(opts.preset)
    if opts.v_rank is not None:
        cfg = cfg.replace(v_rank=opts.v_rank)
    if opts.init_from:  # a pretrained GPT-NeoX (e.g. Pythia-70m): its shape wins
        cfg = config_from_gpt_neox(read_gpt_neox_config(opts.init_from), v_rank=cfg.v_rank,
                                   k_rank=cfg.k_rank, joint_kv=cfg.joint_kv)
    if cfg.v_rank is None:
        raise ValueError("the experiment needs a compressed model (v_rank set)")
    if opts.settings.seq_len > cfg.max_positions:
        raise ValueError(f"--seq-len {opts.settings.seq_len} exceeds the preset's "
                         f"max_positions {cfg.max_positions}")
    return cfg


def latent_key_config(cfg: VDProjConfig, k_rank: Optional[int] = None,
                      joint_kv: bool = False) -> VDProjConfig:
    """The latent-key runs' config: cfg with k_rank from --k-rank, else the preset's, else
    LATENT_KEY_RANK_FRACTION * H*D (SPEC section 5). joint_kv, or a joint-latent preset, makes
    the keys share the value latent instead. An explicit k_rank is taken or refused
    (VDProjConfig's checks), never replaced: 0 is an error, not "the default"."""
    if joint_kv:
        if k_rank is not None:
            raise ValueError(f"k_rank={k_rank} and joint_kv exclude each other: the joint "
                             f"latent is the values' v_rank={cfg.v_rank} latent")
        return cfg.replace(k_rank=None, joint_kv=True)
    if k_rank is not None:
        return cfg.replace(k_rank=k_rank, joint_kv=False)
    if cfg.joint_kv:
        return cfg
    return cfg.replace(k_rank=cfg.k_rank or round(LATENT_KEY_RANK_FRACTION * cfg.hidden_size))


def run_configs(opts: ExperimentOptions):
    """The V-only runs' config and the latent-key runs' one; a ValueError naming the bad
    choice (the CLI calls this first, to refuse bad flags before anything is written)."""
    with warnings.catch_warnings():  # an oversized rank: refused here, not just warned of
        warnings.simplefilter("ignore")
        preset_cfg = resolve_config(opts)
        configs = (preset_cfg.replace(k_rank=None, joint_kv=False),
                   latent_key_config(preset_cfg, opts.k_rank, opts.joint_kv))
    for cfg in configs:
        if cfg.oversized_rank():
            raise ValueError(cfg.oversized_rank())
    return configs


class Experiment:
    """This process's share of the experiment: trains runs one after another."""

    def __init__(self, opts: ExperimentOptions, dist: Dist):
        self.opts, self.dist = opts, dist
        self.cfg, self.kv_cfg = run_configs(opts)  # the V-only runs', the latent-key runs'
        if dist.main:
            os.makedirs(os.path.join(opts.out, "checkpoints"), exist_ok=True)
        self.amp = opts.amp if opts.amp != "auto" else (
            "bf16" if dist.device.type == "cuda" else "none")
        self.session: Optional[Session] = None  # once the data is loaded

    @property
    def data(self):
        return self.session.data

    def load_data(self):
        o, t0 = self.opts, time.time()
        data = load_dataset(o.settings, self.cfg.vocab_size, data_pt=o.data_pt,
                            data_text=o.data_text, data_npy=o.data_npy)
        self.dist.log(f"data: {data.source}, tokenizer {data.tokenizer}, "
                 f"{tuple(data.train.shape)} train / {tuple(data.val.shape)} val "
                 f"samples ({time.time() - t0:.1f} s)")
        self.session = Session(o.settings, self.dist, data, self.amp, o.seed,
                               show_progress=o.show_progress,
                               save_every_steps=o.save_every_steps,
                               save_every_s=o.save_every_s, kill_at_step=o.kill_at_step)

    def save_tokenizer(self):
        if hasattr(self.data.tok, "save"):  # a trained BPE: keep it
            self.data.tok.save(os.path.join(self.opts.out, "tokenizer.json"))

    def fingerprint(self, spec: RunSpec) -> dict:
        """What must match for --resume to continue a checkpoint of this run."""
        s = self.opts.settings
        protocol = json.dumps({k: getattr(s, k) for k in sorted(PROTOCOL)}, sort_keys=True)
        config = self.kv_cfg if spec.latent_keys else self.cfg
        fingerprint = {"run": spec.name, "config": json.dumps(config.to_dict(), sort_keys=True),
                       "data": self.data.fingerprint(), "seed": self.opts.seed,
                       "protocol": protocol + f" epochs={s.epochs} "
                                              f"phase1_epochs={s.phase1_epochs}",
                       "amp": self.amp, "init_from": self.opts.init_from}
        if spec.two_phase:  # --phase1 does not concern the other runs
            fingerprint["phase1"] = spec.phase1_method(self.opts.phase1)
        return fingerprint

    def config_for(self, spec: RunSpec) -> VDProjConfig:
        if not spec.compressed:
            return self.cfg.uncompressed()
        return self.kv_cfg if spec.latent_keys else self.cfg

    def build_model(self, spec: RunSpec) -> VDProjForCausalLM:
        cfg = self.config_for(spec)
        if self.opts.init_from:
            # Pretrained GPT-NeoX weights; the compress/restore pairs start from the model's
            # random orthogonal pairs (phase 1, or e2e training, fits them).
            model = from_gpt_neox(self.opts.init_from, v_rank=cfg.v_rank, k_rank=cfg.k_rank,
                                  joint_kv=cfg.joint_kv, init="random")
            if cfg.v_rank is not None:
                model.init_weights_vproj_(self.opts.seed)
        else:
            model = VDProjForCausalLM(cfg, init_seed=self.opts.seed)
        model.set_backend(self.opts.backend)
        return model.to(self.dist.device)

    # ---- one run
    def run(self, name: str) -> dict:
        """Train run `name` (resuming its checkpoint with --resume); its results.json entry."""
        spec, path = RUNS[name], checkpoint_path(self.opts.out, name)
        ckpt = self.resume_point(spec, path)
        if ckpt is not None and ckpt.state.done:
            self.dist.log(f"[{name}] already finished in {path}; reusing its results")
            return ckpt.state.result
        model = self.build_model(spec)
        writer = CheckpointWriter(path, fingerprint=self.fingerprint(spec),
                                  config=self.config_for(spec), tokenizer=self.data.tokenizer,
                                  enabled=self.dist.main)
        state, optimizer_state = RunState.new(name, spec.stages), None
        if ckpt is not None:
            model.load_state_dict(ckpt.model)
            state, optimizer_state = ckpt.state, ckpt.optimizer
        t_start = time.time() - state.wall_s
        for stage in state.remaining_stages():
            state.stage = stage
            self.train_stage(spec, state, model, writer, optimizer_state)
            optimizer_state = None  # it belonged to the stage the checkpoint was in
            state.wall_s = time.time() - t_start
            if state.next_stage(stage) is not None:
                state.stage = state.next_stage(stage)
                writer.save(state, model)
        result = self.run_result(spec, state, model)
        state.wall_s = time.time() - t_start
        result["wall_s"] = round(state.wall_s, 2)
        state.done, state.result = True, result
        for st in state.stages.values():
            st.best_state = None  # the final model is the best one; keep the file small
        writer.save(state, model)
        self.dist.log(f"[{name}] best val ppl {result['best_val_ppl']:.3f} at epoch "
                 f"{result['best_epoch']} ({result['wall_s']:.1f} s)")
        return result

    def resume_point(self, spec: RunSpec, path: str) -> Optional[Checkpoint]:
        """The run's checkpoint under --resume (None: start afresh)."""
        if not (self.opts.resume and os.path.exists(path)):
            if os.path.exists(path):
                self.dist.log(f"[{spec.name}] starting afresh; overwriting {path} (use --resume "
                         f"to continue it)")
            return None
        ckpt = read_checkpoint(path, self.fingerprint(spec))
        if not ckpt.state.done:
            st = ckpt.state.stages[ckpt.state.stage]
            self.dist.log(f"[{spec.name}] resuming from {path} (stage {ckpt.state.stage}, "
                     f"epoch {st.epoch}, step {st.step})")
        return ckpt

    def train_stage(self, spec: RunSpec, state: RunState, model, writer: CheckpointWriter,
                    optimizer_state: Optional[dict]):
        stage = state.stage
        if stage == "phase1" and spec.phase1_method(self.opts.phase1) == "pca":
            self.phase1_pca(state, model)
            return
        st = state.stages[stage]
        if stage == "phase1" and self.opts.pca_reference and st.pca_reference_val_recon is None:
            st.pca_reference_val_recon = self.pca_reference(model)
        StageTrainer(self.session, model, state, stage, writer, optimizer_state).fit()

    def fit_pca_(self, model, show_progress: bool = False):
        """Every pair of the model set to its closed-form optimum, layer by layer: the PCA
        of each layer's V and, with latent keys, of its k_nope (or of the joint [k_nope | v]).
        Returns the fraction of variance kept per layer, of V and of k_nope (None without
        latent keys)."""
        kept = fit_v_pca_(model, lambda: self.session.eval_batches(self.data.train),
                          show_progress=show_progress, reduce_fn=self.dist.sum_, by_pair=True)
        kept_k = [k["k"] for k in kept] if kept and "k" in kept[0] else None
        return [k["v"] for k in kept], kept_k

    def phase1_pca(self, state: RunState, model):
        """Phase 1 in closed form: each layer's PCA of every pair (one "epoch")."""
        st, t0 = state.stages["phase1"], time.time()
        kept, kept_k = self.fit_pca_(model, self.dist.main and self.opts.show_progress)
        train = evaluate(self.session, model, self.data.train, ce=False, recon=True)
        val = evaluate(self.session, model, self.data.val, ce=False, recon=True)
        st.log = [EpochLog(1, method="pca", train_recon=train.recon, val_recon=val.recon,
                           train_recon_k=train.recon_k, train_recon_v=train.recon_v,
                           val_recon_k=val.recon_k, val_recon_v=val.recon_v,
                           variance_kept=kept, variance_kept_k=kept_k,
                           time_s=round(time.time() - t0, 3))]
        st.best, st.best_epoch, st.stopped = val.recon, 1, False
        self.dist.log(f"[{state.run}/phase1] pca: train_recon {train.recon:.6f}, val_recon "
                      f"{val.recon:.6f}, variance kept per layer "
                      + ", ".join(f"{k:.3f}" for k in kept)
                      + ("" if kept_k is None else ", of the keys "
                         + ", ".join(f"{k:.3f}" for k in kept_k)))

    def pca_reference(self, model) -> float:
        """Validation reconstruction of the PCA optimum, on a copy of the phase-1 model."""
        ref = copy.deepcopy(model)
        self.fit_pca_(ref)
        return evaluate(self.session, ref, self.data.val, ce=False, recon=True).recon

    def run_result(self, spec: RunSpec, state: RunState, model) -> dict:
        """The run's results.json entry (SPEC section 5), wall_s aside."""
        final = state.stages[spec.stages[-1]]
        val = evaluate(self.session, model, self.data.val, ce=True,
                       recon=model.config.v_rank is not None)
        result = {"best_val_ppl": final.best, "best_epoch": final.best_epoch,
                  "position_ppl": val.position_ppl, "stopped_early": final.stopped,
                  "epochs_run": len(final.log), "trainable_params": final.trainable,
                  "initial_val": final.initial}
        result.update(self.run_shape(spec, model))
        for key, value in (("final_val_recon", val.recon), ("final_val_recon_k", val.recon_k),
                           ("final_val_recon_v", val.recon_v)):
            if value is not None:
                result[key] = value
        if not spec.two_phase:
            result["epochs"] = [e.to_dict() for e in final.log]
            return result
        p1, initial = state.stages["phase1"], state.stages["phase1"].initial or {}
        result.update(phase1_method=spec.phase1_method(self.opts.phase1),
                      phase1=[e.to_dict() for e in p1.log],
                      phase2=[e.to_dict() for e in final.log],
                      phase1_best_epoch=p1.best_epoch, phase1_best_val_recon=p1.best,
                      phase1_initial_val_recon=initial.get("recon"))
        best = next((e for e in p1.log if e.epoch == p1.best_epoch), None)
        if best is not None and best.val_recon_k is not None:  # latent keys: each pair
            per_pair = dict(phase1_initial_val_recon_k=initial.get("recon_k"),
                            phase1_initial_val_recon_v=initial.get("recon_v"),
                            phase1_best_val_recon_k=best.val_recon_k,
                            phase1_best_val_recon_v=best.val_recon_v)
            # (a PCA phase 1 has no initial evaluation)
            result.update({k: v for k, v in per_pair.items() if v is not None})
        if p1.pca_reference_val_recon is not None:
            result["phase1_pca_reference_val_recon"] = p1.pca_reference_val_recon
        return result

    def run_shape(self, spec: RunSpec, model) -> dict:
        """The run's model size and cache size (results.json: each run's own
        kv_cache_reduction; the top-level one is the V-only runs')."""
        cfg = model.config
        shape = {"kv_cache_reduction": cfg.kv_cache_reduction,
                 "kv_cache_values_per_token_layer": cfg.cache_values_per_token(),
                 "total_params": sum(p.numel() for p in model.parameters())}
        if spec.latent_keys:
            shape.update(k_rank=None if cfg.joint_kv else cfg.k_rank, v_rank=cfg.v_rank,
                         joint_kv=cfg.joint_kv, rotary_dims=cfg.rotary_ndims)
        return shape

    def results_skeleton(self) -> dict:
        """results.json without its runs."""
        cfg, o = self.cfg, self.opts
        counts = cfg.param_counts()
        auto = backend_info()["auto_backend"]
        return {
            "preset": o.preset,
            "config": cfg.to_dict(),
            "params": {"total": counts["total"], "v_projection": counts["v_projection"],
                       "phase2_trainable": counts["total"] - counts["v_projection"],
                       "phase2_frozen": counts["v_projection"],
                       "baseline_total": cfg.uncompressed().param_counts()["total"]},
            "kv_cache_reduction": cfg.kv_cache_reduction,
            "kv_cache_values_per_token_layer": {
                "baseline": 2 * cfg.hidden_size, "compressed": cfg.hidden_size + cfg.v_rank,
                "latent_keys": self.kv_cfg.cache_values_per_token()},
            "protocol": o.settings.protocol(),
            "data": self.data.summary(),
            "seed": o.seed, "phase1_method": o.phase1, "init_from": o.init_from,
            "world_size": self.dist.world, "device": str(self.dist.device), "amp": self.amp,
            "torch_version": torch.__version__,
            "torch_threads": torch.get_num_threads(),
            "backend": {"requested": o.backend, "auto_cpu": auto["cpu"],
                        "auto_cuda": auto["cuda"]},
            "runs": {},
        }


# ---------------------------------------------------------------------------------------------
# Several runs: in this process, or in child processes at once


def part_path(out: str, run: str) -> str:
    """Where a child process (train_runs(as_child=True)) writes its results."""
    return os.path.join(out, "parts", f"{run}.json")


def train_runs(opts: ExperimentOptions, runs: List[str], *, device: str = "auto",
               threads: Optional[int] = None, as_child: bool = False,
               plots: bool = True) -> dict:
    """Train `runs` one after another in this process (one rank of it under torchrun).
    results.json is rewritten after each run; report.md and plots at the end. A child of
    run_jobs trains one run and writes only its part."""
    torch.set_num_threads(threads or max(1, (os.cpu_count() or 1)))
    dist = Dist(device)
    try:
        torch.manual_seed(opts.seed)
        exp = Experiment(opts, dist)
        exp.load_data()
        t0 = time.time()
        results = exp.results_skeleton()
        results_path = (part_path(opts.out, runs[0]) if as_child
                        else os.path.join(opts.out, "results.json"))
        os.makedirs(os.path.dirname(results_path), exist_ok=True)
        for name in runs:
            results["runs"][name] = exp.run(name)
            results["wall_s"] = round(time.time() - t0, 2)
            if dist.main:
                atomic_save_json(results, results_path)
        if dist.main:
            exp.save_tokenizer()
        if dist.main and not as_child:
            write_outputs(results, opts.out, plots=plots)
        return results
    finally:
        dist.close()


def default_jobs(jobs: Optional[int], runs: List[str], as_child: bool) -> int:
    if jobs is not None:
        return max(1, jobs)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 or as_child:
        return 1
    # One process per run, all at once: single-threaded processes time-share a small CPU with
    # no OpenMP synchronisation, and on a GPU several batch-8 runs keep it busier than one.
    return len(runs)


def run_jobs(opts: ExperimentOptions, runs: List[str], jobs: int, *,
             child_command: Callable[[str, int, Optional[str]], List[str]],
             threads: Optional[int] = None) -> dict:
    """Train `runs` in `jobs` child processes at once (longest first) and join their results.

    child_command(run, threads, data_file) is the command line of a child that trains `run`
    alone through train_runs(as_child=True), with `threads` torch threads and, unless None,
    the exported splits `data_file`. Independent single-threaded processes use a small CPU far
    better than one process with several intra-op threads, and several processes keep a GPU
    busier at batch 8."""
    t0 = time.time()
    os.makedirs(os.path.join(opts.out, "parts"), exist_ok=True)
    data_file, data_summary = None, None
    if not opts.data_pt:  # tokenize once here; the children read the exact same splits
        exp = Experiment(opts, Dist("cpu"))
        exp.load_data()
        data_file = os.path.join(opts.out, "parts", "data.pt")
        exp.data.save(data_file)
        exp.save_tokenizer()
        data_summary = exp.data.summary()  # the original source, not the hand-over file
    threads = threads or max(1, (os.cpu_count() or 1) // jobs)
    print(f"training {', '.join(runs)} in {jobs} parallel processes "
          f"({threads} thread(s) each); progress below is per epoch", flush=True)
    longest_first = sorted(runs, key=lambda r: (len(RUNS[r].stages), RUN_NAMES.index(r)),
                           reverse=True)
    failed = _run_processes([(r, child_command(r, threads, data_file)) for r in longest_first],
                            jobs)
    if failed:
        raise RuntimeError(f"run(s) failed: {', '.join(failed)}; their checkpoints are in "
                           f"{os.path.join(opts.out, 'checkpoints')} (continue with --resume)")
    results = None
    for run in runs:
        with open(part_path(opts.out, run)) as f:
            part = json.load(f)
        results = results or part
        results["runs"][run] = part["runs"][run]
    results["wall_s"] = round(time.time() - t0, 2)
    results["jobs"] = jobs
    if data_summary is not None:
        results["data"] = data_summary
    return results


def _run_processes(commands, jobs: int,
                   on_done: Optional[Callable[[str, int], None]] = None) -> List[str]:
    """Run (name, argv) commands, `jobs` at a time, in order; the names of those that failed.
    on_done(name, exit status) is called as each one ends. Interrupted, it stops the running
    ones too (their checkpoints stay for --resume)."""
    pending, running, failed = list(commands), {}, []
    try:
        while pending or running:
            while pending and len(running) < jobs:
                name, cmd = pending.pop(0)
                running[name] = subprocess.Popen(cmd)
            time.sleep(0.5)
            for name, proc in list(running.items()):
                if proc.poll() is not None:
                    del running[name]
                    if proc.returncode != 0:
                        failed.append(f"{name} (exit status {proc.returncode})")
                    if on_done is not None:
                        on_done(name, proc.returncode)
    finally:
        for proc in running.values():
            proc.terminate()
        for proc in running.values():
            proc.wait()
    return failed
