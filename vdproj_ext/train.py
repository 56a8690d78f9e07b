"""The V-DProj training experiment: baseline, end-to-end and two-phase runs (issue 4).

    python -m vdproj_ext.train                      # all three runs, cpu-small preset, Shakespeare
    python -m vdproj_ext.train --preset smoke --out runs/smoke
    torchrun --nproc_per_node=2 -m vdproj_ext.train --preset smoke --mode e2e

Protocol (fixed by the reference experiment; every preset keeps it):
  * phase 1: only v_compress/v_restore train, on mean((V - V_restored)^2) averaged over layers;
    AdamW lr 1e-3, batch 8, <= 10 epochs, early stopping with patience 1 on validation
    reconstruction; the best epoch is kept. `--phase1 pca` replaces it by its closed-form
    optimum, the mean-centred rank-R PCA of each layer's V.
  * phase 2: v_compress/v_restore frozen, everything else trains on next-token cross-entropy;
    AdamW lr 1e-4, batch 8, <= 30 epochs, patience 1 on validation perplexity; best kept;
    reconstruction loss logged every epoch.
  * e2e: the compressed model, everything trained together under the phase 2 settings.
  * baseline: the same model without compression under the same settings.
Choices the reference leaves open: AdamW with betas (0.9, 0.999), no weight decay, constant
learning rate, gradient-norm clipping at 1.0, Hugging Face GPT-NeoX init (model.init_weights).

Outputs (--out): results.json (SPEC section 5), report.md, plots, checkpoints/ (atomic; resumable
with --resume, also mid-epoch) and, for trained tokenizers, tokenizer.json.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import json
import math
import os
import signal
import sys
import time
from typing import Optional

import torch
import torch.distributed as dist

from . import data as data_mod
from .model import VDProjConfig, VDProjForCausalLM

CKPT_FORMAT = "vdproj-train-checkpoint-1"
RUN_NAMES = ("baseline", "e2e", "two_phase", "two_phase_pca")
POSITION_EDGES = (0, 16, 32, 64, 96, 128)

# The reference protocol (issue 4).
PROTOCOL = dict(seq_len=128, batch_size=8, phase1_lr=1e-3, phase1_epochs=10, lr=1e-4,
                epochs=30, patience=1, max_grad_norm=1.0, weight_decay=0.0)

# Per-preset data and run settings; anything here can be overridden on the command line.
PRESET_SETTINGS = {
    "pythia-70m": dict(tokenizer="neox", n_train=10000, n_val=1000, val_frac=0.1,
                       eval_batch=64),
    "cpu-small": dict(tokenizer="bpe:2048", n_train=480, n_val=96, val_frac=0.1,
                      eval_batch=32),
    # CI: a few seconds per run; fewer epochs than the protocol.
    "smoke": dict(tokenizer="bytes", n_train=32, n_val=16, val_frac=0.1, eval_batch=16,
                  phase1_epochs=2, epochs=2),
}


class CheckpointError(RuntimeError):
    pass


def _tqdm():
    try:  # optional: a bare GPU node may lack it
        from tqdm.auto import tqdm
        return tqdm
    except ImportError:
        return None


# ---------------------------------------------------------------------------------------------
# Small utilities


def atomic_write_bytes(path: str, write_fn):
    """write_fn(tmp_path) then os.replace: a reader sees the old file or the new one, whole."""
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        write_fn(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def atomic_save_json(obj, path):
    def write(tmp):
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=1)
            f.write("\n")
    atomic_write_bytes(path, write)


def atomic_torch_save(obj, path):
    atomic_write_bytes(path, lambda tmp: torch.save(obj, tmp))


def ppl(loss: float) -> float:
    return math.exp(loss) if loss < 700 else float("inf")


class Dist:
    """Process-group facts; a single process is world 1, rank 0."""

    def __init__(self, device_arg: str):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        local = int(os.environ.get("LOCAL_RANK", "0"))
        use_cuda = device_arg == "cuda" or (device_arg == "auto" and torch.cuda.is_available())
        if device_arg.startswith("cuda") and not torch.cuda.is_available():
            raise RuntimeError("--device cuda requested but torch sees no CUDA device")
        if use_cuda:
            torch.backends.cuda.matmul.allow_tf32 = True  # fp32 leftovers outside autocast
            torch.backends.cudnn.allow_tf32 = True
            self.device = torch.device("cuda", local if self.world > 1 else
                                       (torch.cuda.current_device()))
            torch.cuda.set_device(self.device)
        else:
            self.device = torch.device("cpu")
        if self.world > 1 and not dist.is_initialized():
            dist.init_process_group("nccl" if use_cuda else "gloo")

    @property
    def main(self) -> bool:
        return self.rank == 0

    def sum_(self, t: torch.Tensor) -> torch.Tensor:
        if self.world > 1:
            dist.all_reduce(t)
        return t

    def close(self):
        if self.world > 1 and dist.is_initialized():
            dist.destroy_process_group()


# ---------------------------------------------------------------------------------------------
# Checkpoints


def load_checkpoint(path: str, expected: dict) -> dict:
    """Load and validate a training checkpoint; clear errors for corrupt or foreign files."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated zip, garbage, unpickling refusal
        raise CheckpointError(
            f"checkpoint {path} is unreadable (corrupt or truncated: {type(e).__name__}: {e}). "
            f"Delete it to restart that run from scratch, or run without --resume.") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != CKPT_FORMAT:
        raise CheckpointError(f"{path} is not a vdproj_ext training checkpoint "
                              f"(expected format {CKPT_FORMAT!r})")
    saved = ckpt.get("fingerprint", {})
    diffs = [f"  {k}: checkpoint has {saved.get(k)!r}, this run has {v!r}"
             for k, v in expected.items() if saved.get(k) != v]
    if diffs:
        raise CheckpointError(
            f"checkpoint {path} was written by a different configuration:\n" + "\n".join(diffs)
            + "\nResume with the same arguments, use another --out, or run without --resume.")
    for key in ("state", "model"):
        if key not in ckpt:
            raise CheckpointError(f"checkpoint {path} lacks {key!r}; it is incomplete")
    return ckpt


# ---------------------------------------------------------------------------------------------
# The experiment


class Experiment:
    def __init__(self, args, ctx: Dist):
        self.args, self.ctx = args, ctx
        settings = dict(PROTOCOL)
        settings.update(PRESET_SETTINGS[args.preset])
        for key in ("tokenizer", "n_train", "n_val", "val_frac", "eval_batch", "phase1_epochs",
                    "epochs", "lr", "phase1_lr", "patience", "batch_size", "seq_len"):
            val = getattr(args, key, None)
            if val is not None:
                settings[key] = val
        self.s = settings
        self.cfg = VDProjConfig.preset(args.preset)
        if args.v_rank is not None:
            self.cfg = self.cfg.replace(v_rank=args.v_rank)
        if args.init_from:  # a pretrained GPT-NeoX (e.g. Pythia-70m): its shape wins
            from .convert import config_from_gpt_neox, read_gpt_neox_config
            self.cfg = config_from_gpt_neox(read_gpt_neox_config(args.init_from),
                                            v_rank=self.cfg.v_rank)
        if self.cfg.v_rank is None:
            raise ValueError("the experiment needs a compressed model (v_rank set)")
        if settings["seq_len"] > self.cfg.max_positions:
            raise ValueError(f"--seq-len {settings['seq_len']} exceeds the preset's "
                             f"max_positions {self.cfg.max_positions}")
        self.out = args.out
        self.ckpt_dir = os.path.join(self.out, "checkpoints")
        if ctx.main:
            os.makedirs(self.ckpt_dir, exist_ok=True)
        self.amp = args.amp if args.amp != "auto" else (
            "bf16" if ctx.device.type == "cuda" else "none")
        self.steps_done = 0  # optimizer steps taken by this process (for --debug-kill-at-step)
        self.last_save = time.time()

    # ---- data
    def load_data(self):
        s = self.s
        t0 = time.time()
        if self.args.data_pt:
            self.data = data_mod.Dataset.load(self.args.data_pt, self.cfg.vocab_size)
        else:
            self.data = data_mod.build_dataset(
            seq_len=s["seq_len"], n_train=s["n_train"], n_val=s["n_val"],
                val_frac=s["val_frac"], tokenizer=s["tokenizer"],
                vocab_size=self.cfg.vocab_size,
                data_text=self.args.data_text, data_npy=self.args.data_npy)
        if self.data.train.shape[1] != s["seq_len"]:
            raise ValueError(f"the data has samples of {self.data.train.shape[1]} tokens, "
                             f"not --seq-len {s['seq_len']}")
        self.log(f"data: {self.data.source}, tokenizer {self.data.tokenizer}, "
                 f"{tuple(self.data.train.shape)} train / {tuple(self.data.val.shape)} val "
                 f"samples ({time.time() - t0:.1f} s)")
        if self.data.train.shape[0] < s["batch_size"]:
            raise ValueError("fewer training samples than one batch")

    def fingerprint(self, run: str) -> dict:
        s = self.s
        return {"run": run, "config": json.dumps(self.cfg.to_dict(), sort_keys=True),
                "data": self.data.fingerprint(), "seed": self.args.seed,
                "phase1": "pca" if run == "two_phase_pca" else self.args.phase1,
                "protocol": json.dumps({k: s[k] for k in sorted(PROTOCOL)}, sort_keys=True)
                + f" epochs={s['epochs']} phase1_epochs={s['phase1_epochs']}",
                "amp": self.amp, "init_from": self.args.init_from}

    def log(self, msg):
        if self.ctx.main:
            print(msg, flush=True)

    # ---- model pieces
    def build_model(self, run: str) -> VDProjForCausalLM:
        cfg = self.cfg if run != "baseline" else self.cfg.replace(v_rank=None)
        if self.args.init_from:
            # Pretrained GPT-NeoX weights; v_compress/v_restore start from the model's random
            # orthogonal pair (phase 1, or e2e training, fits them).
            model = VDProjForCausalLM.from_gpt_neox(self.args.init_from, v_rank=cfg.v_rank,
                                                    init="random")
            if cfg.v_rank is not None:
                model.init_weights_vproj_(self.args.seed)
        else:
            model = VDProjForCausalLM(cfg, init_seed=self.args.seed)
        model.set_backend(self.args.backend)
        return model.to(self.ctx.device)

    def autocast(self):
        if self.amp == "none":
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if self.amp == "bf16" else torch.float16
        return torch.autocast(self.ctx.device.type, dtype=dtype)

    def batches(self, split: torch.Tensor):
        for ids in data_mod.eval_batches(split, batch=self.s["eval_batch"], rank=self.ctx.rank,
                                         world=self.ctx.world):
            yield ids.to(self.ctx.device, non_blocking=True)

    @torch.no_grad()
    def evaluate(self, model, split: torch.Tensor, *, ce=True, recon=False):
        """Token-weighted CE (and position buckets) and mean reconstruction loss over `split`,
        summed across processes."""
        was_training = model.training
        model.eval()
        t = split.shape[1]
        dev = self.ctx.device
        pos_sum = torch.zeros(t - 1, dtype=torch.float64, device=dev)
        stats = torch.zeros(2, dtype=torch.float64, device=dev)  # recon * samples, samples
        for ids in self.batches(split):
            with self.autocast():
                out = model(ids, labels=ids if ce else None, return_recon=recon,
                            skip_logits=not ce, loss_reduction="none")
            if ce:
                pos_sum += out.loss.double().sum(0)
            if recon and out.recon_loss is not None:
                stats[0] += out.recon_loss.double() * ids.shape[0]
            stats[1] += ids.shape[0]
        self.ctx.sum_(pos_sum)
        self.ctx.sum_(stats)
        model.train(was_training)
        n = stats[1].item()
        res = {}
        if ce:
            loss = pos_sum.sum().item() / (n * (t - 1))
            res.update(loss=loss, ppl=ppl(loss))
            per_pos = (pos_sum / n).cpu()  # per_pos[j]: loss predicting token j + 1
            buckets = {}
            for lo, hi in zip(POSITION_EDGES[:-1], POSITION_EDGES[1:]):
                sel = [j for j in range(t - 1) if lo <= j + 1 < hi]
                if sel:
                    buckets[f"{lo}-{hi}"] = ppl(per_pos[sel].mean().item())
            res["position_ppl"] = buckets
        if recon:
            res["recon"] = stats[0].item() / n if n else float("nan")
        return res

    # ---- checkpoints
    def ckpt_path(self, run):
        return os.path.join(self.ckpt_dir, f"{run}.pt")

    def save(self, run, state, model, optimizer=None):
        if not self.ctx.main:
            return
        ckpt = {"format": CKPT_FORMAT, "fingerprint": self.fingerprint(run), "state": state,
                "model": model.state_dict(), "config": self.cfg.to_dict() if run != "baseline"
                else self.cfg.replace(v_rank=None).to_dict(),
                "tokenizer": self.data.tokenizer}
        if optimizer is not None:
            ckpt["optimizer"] = optimizer.state_dict()
        atomic_torch_save(ckpt, self.ckpt_path(run))
        self.last_save = time.time()

    # ---- one training stage (phase 1 SGD, phase 2, e2e or baseline)
    def fit(self, run, state, model, stage, ckpt):
        """Train `stage` of `run` to completion (or early stop), resuming from state[stage]."""
        s, ctx = self.s, self.ctx
        recon_objective = stage == "phase1"
        st = state["stages"][stage]
        lr = s["phase1_lr"] if recon_objective else s["lr"]
        max_epochs = s["phase1_epochs"] if recon_objective else s["epochs"]
        for name, p in model.named_parameters():
            is_v = ".v_compress." in name or ".v_restore." in name
            p.requires_grad_(is_v if stage == "phase1" else
                             (not is_v) if stage == "phase2" else True)
        params = [p for p in model.parameters() if p.requires_grad]
        st["trainable"] = sum(p.numel() for p in params)
        opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.999), eps=1e-8,
                                weight_decay=s["weight_decay"])
        if ckpt is not None and "optimizer" in ckpt and ckpt["state"]["stage"] == stage:
            opt.load_state_dict(ckpt["optimizer"])
        net = model
        if ctx.world > 1:
            net = torch.nn.parallel.DistributedDataParallel(
                model, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None)
        model.train()
        compressed = model.config.v_rank is not None
        if "initial" not in st:
            st["initial"] = self.evaluate(model, self.data.val, ce=not recon_objective,
                                          recon=compressed)
            st["initial"].pop("position_ppl", None)
        n_batches = data_mod.num_batches(len(self.data.train), s["batch_size"])
        save_every = self.args.save_every_steps
        while not st["stopped"] and st["epoch"] <= max_epochs:
            epoch, t0 = st["epoch"], time.time()
            # This process's losses since the last sync into st["loss_sum"], kept on the device
            # so that no step waits for the GPU.
            local_sum = torch.zeros((), dtype=torch.float64, device=ctx.device)
            bar = None
            if ctx.main and not self.args.no_progress and _tqdm() is not None:
                bar = _tqdm()(total=n_batches, initial=st["step"], leave=False,
                              dynamic_ncols=True, desc=f"{run}/{stage} epoch {epoch}/{max_epochs}")
            for ids in data_mod.train_batches(self.data.train, seed=self.args.seed, epoch=epoch,
                                              global_batch=s["batch_size"], rank=ctx.rank,
                                              world=ctx.world, start_step=st["step"]):
                ids = ids.to(ctx.device, non_blocking=True)
                with self.autocast():
                    if recon_objective:
                        loss = net(ids, return_recon=True, skip_logits=True).recon_loss
                    else:
                        loss = net(ids, labels=ids).loss
                opt.zero_grad(set_to_none=True)
                loss.backward()
                if s["max_grad_norm"]:
                    torch.nn.utils.clip_grad_norm_(params, s["max_grad_norm"])
                opt.step()
                local_sum += loss.detach().double()
                st["step"] += 1
                self.steps_done += 1
                if bar is not None:
                    bar.update(1)
                    if st["step"] % 10 == 0:
                        bar.set_postfix(loss=f"{loss.item():.4f}")
                if self.args.debug_kill_at_step and self.steps_done >= self.args.debug_kill_at_step:
                    os.kill(os.getpid(), signal.SIGKILL)  # test hook: die like a killed job
                if save_every and st["step"] % save_every == 0 and st["step"] < n_batches:
                    local_sum = self.sync_loss(st, local_sum)
                    self.save(run, state, model, opt)
            if bar is not None:
                bar.close()
            # The epoch's mean training loss over all steps and processes.
            local_sum = self.sync_loss(st, local_sum)
            st["train_time"] += time.time() - t0
            train_loss = st["loss_sum"] / st["step"]
            val = self.evaluate(model, self.data.val, ce=not recon_objective, recon=compressed)
            entry = {"epoch": epoch}
            if recon_objective:
                entry.update(train_recon=train_loss, val_recon=val["recon"])
                metric = val["recon"]
            else:
                entry.update(train_loss=train_loss, train_ppl=ppl(train_loss),
                             val_loss=val["loss"], val_ppl=val["ppl"])
                if compressed:
                    entry["recon"] = val["recon"]
                metric = val["ppl"]
            entry["time_s"] = round(st["train_time"], 3)
            st["log"].append(entry)
            improved = metric < st["best"]
            if improved:
                st["best"], st["best_epoch"], st["bad"] = metric, epoch, 0
                st["best_state"] = {k: v.detach().to("cpu", copy=True)
                                    for k, v in model.state_dict().items()}
            else:
                st["bad"] += 1
                if st["bad"] >= s["patience"]:
                    st["stopped"] = True
            self.log(f"[{run}/{stage}] epoch {epoch}: " + ", ".join(
                f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in entry.items()
                if k != "epoch") + ("" if improved else "  (no improvement)"))
            st.update(epoch=epoch + 1, step=0, loss_sum=0.0, train_time=0.0)
            last = st["stopped"] or st["epoch"] > max_epochs
            if last or time.time() - self.last_save >= self.args.save_every_s:
                self.save(run, state, model, opt)
        del net
        model.load_state_dict(st["best_state"])
        for p in model.parameters():
            p.requires_grad_(True)

    def sync_loss(self, st, local_sum: torch.Tensor) -> torch.Tensor:
        """Fold every process's pending loss sum into st["loss_sum"] (the sum over steps of
        the global batch's loss), so that a checkpoint written by rank 0 holds it."""
        st["loss_sum"] += self.ctx.sum_(local_sum.clone()).item() / self.ctx.world
        return torch.zeros_like(local_sum)

    def phase1_pca(self, run, state, model):
        st = state["stages"]["phase1"]
        t0 = time.time()
        kept = model.fit_v_pca_(lambda: self.batches(self.data.train),
                                show_progress=self.ctx.main and not self.args.no_progress,
                                reduce_fn=self.ctx.sum_)
        train = self.evaluate(model, self.data.train, ce=False, recon=True)
        val = self.evaluate(model, self.data.val, ce=False, recon=True)
        st["log"] = [{"epoch": 1, "method": "pca", "train_recon": train["recon"],
                      "val_recon": val["recon"], "variance_kept": kept,
                      "time_s": round(time.time() - t0, 3)}]
        st.update(best=val["recon"], best_epoch=1, stopped=False)
        self.log(f"[{run}/phase1] pca: train_recon {train['recon']:.6f}, val_recon "
                 f"{val['recon']:.6f}, variance kept per layer "
                 + ", ".join(f"{k:.3f}" for k in kept))

    def pca_reference(self, model) -> float:
        """Validation reconstruction of the PCA optimum on a copy of the phase-1 model."""
        ref = copy.deepcopy(model)
        ref.fit_v_pca_(lambda: self.batches(self.data.train), reduce_fn=self.ctx.sum_)
        return self.evaluate(ref, self.data.val, ce=False, recon=True)["recon"]

    # ---- whole runs
    def new_state(self, run):
        def stage():
            return {"epoch": 1, "step": 0, "loss_sum": 0.0, "train_time": 0.0,
                    "log": [], "best": float("inf"), "best_epoch": None, "bad": 0,
                    "stopped": False}
        stages = ["phase1", "phase2"] if run.startswith("two_phase") else ["train"]
        return {"run": run, "stages": {name: stage() for name in stages}, "stage": stages[0],
                "done": False, "wall_s": 0.0}

    def run(self, run: str) -> dict:
        path, ckpt = self.ckpt_path(run), None
        if self.args.resume and os.path.exists(path):
            ckpt = load_checkpoint(path, self.fingerprint(run))
            if ckpt["state"]["done"]:
                self.log(f"[{run}] already finished in {path}; reusing its results")
                return ckpt["state"]["result"]
            self.log(f"[{run}] resuming from {path} (stage {ckpt['state']['stage']}, "
                     f"epoch {ckpt['state']['stages'][ckpt['state']['stage']]['epoch']}, "
                     f"step {ckpt['state']['stages'][ckpt['state']['stage']]['step']})")
        elif os.path.exists(path) and self.ctx.main:
            self.log(f"[{run}] starting afresh; overwriting {path} (use --resume to continue it)")
        model = self.build_model(run)
        if ckpt is not None:
            model.load_state_dict(ckpt["model"])
            state = ckpt["state"]
        else:
            state = self.new_state(run)
        t_start = time.time() - state["wall_s"]
        stages = list(state["stages"])
        for stage in stages[stages.index(state["stage"]):]:
            state["stage"] = stage
            if stage == "phase1":
                method = "pca" if run == "two_phase_pca" else self.args.phase1
                if method == "pca":
                    self.phase1_pca(run, state, model)
                else:
                    st = state["stages"]["phase1"]
                    if "pca_reference_val_recon" not in st and not self.args.no_pca_reference:
                        st["pca_reference_val_recon"] = self.pca_reference(model)
                    self.fit(run, state, model, stage, ckpt)
            else:
                self.fit(run, state, model, stage, ckpt)
            ckpt = None
            state["wall_s"] = time.time() - t_start
            nxt = stages.index(stage) + 1
            if nxt < len(stages):
                state["stage"] = stages[nxt]
                self.save(run, state, model)
        final_stage = state["stages"][stages[-1]]
        val = self.evaluate(model, self.data.val, ce=True,
                            recon=model.config.v_rank is not None)
        result = {"best_val_ppl": final_stage["best"], "best_epoch": final_stage["best_epoch"],
                  "position_ppl": val["position_ppl"],
                  "stopped_early": final_stage["stopped"],
                  "epochs_run": len(final_stage["log"]),
                  "trainable_params": final_stage["trainable"],
                  "initial_val": final_stage["initial"]}
        if "recon" in val:
            result["final_val_recon"] = val["recon"]
        if run.startswith("two_phase"):
            p1 = state["stages"]["phase1"]
            result.update(phase1_method="pca" if run == "two_phase_pca" else self.args.phase1,
                          phase1=p1["log"], phase2=final_stage["log"],
                          phase1_best_epoch=p1["best_epoch"], phase1_best_val_recon=p1["best"],
                          phase1_initial_val_recon=p1.get("initial", {}).get("recon"))
            if "pca_reference_val_recon" in p1:
                result["phase1_pca_reference_val_recon"] = p1["pca_reference_val_recon"]
        else:
            result["epochs"] = final_stage["log"]
        state["wall_s"] = time.time() - t_start
        result["wall_s"] = round(state["wall_s"], 2)
        state.update(done=True, result=result)
        for st in state["stages"].values():
            st.pop("best_state", None)  # the final model is the best one; keep the file small
        self.save(run, state, model)
        self.log(f"[{run}] best val ppl {result['best_val_ppl']:.3f} at epoch "
                 f"{result['best_epoch']} ({result['wall_s']:.1f} s)")
        return result

    def results_skeleton_data(self) -> dict:
        return {"source": self.data.source, "tokenizer": self.data.tokenizer,
                "train_samples": int(self.data.train.shape[0]),
                "val_samples": int(self.data.val.shape[0]),
                "seq_len": int(self.data.train.shape[1]),
                "fingerprint": self.data.fingerprint(), **self.data.info}

    def results_skeleton(self) -> dict:
        from .ops import backend_info
        counts = self.cfg.param_counts()
        base = self.cfg.replace(v_rank=None).param_counts()["total"]
        s = self.s
        return {
            "preset": self.args.preset,
            "config": self.cfg.to_dict(),
            "params": {"total": counts["total"], "v_projection": counts["v_projection"],
                       "phase2_trainable": counts["total"] - counts["v_projection"],
                       "phase2_frozen": counts["v_projection"], "baseline_total": base},
            "kv_cache_reduction": self.cfg.kv_cache_reduction,
            "kv_cache_values_per_token_layer": {"baseline": 2 * self.cfg.hidden_size,
                                                "compressed": self.cfg.hidden_size
                                                + self.cfg.v_rank},
            "protocol": {k: s[k] for k in ("seq_len", "batch_size", "phase1_lr", "phase1_epochs",
                                           "lr", "epochs", "patience", "max_grad_norm",
                                           "weight_decay")},
            "data": self.results_skeleton_data(),
            "seed": self.args.seed, "phase1_method": self.args.phase1,
            "init_from": self.args.init_from,
            "world_size": self.ctx.world, "device": str(self.ctx.device), "amp": self.amp,
            "torch_version": torch.__version__,
            "torch_threads": torch.get_num_threads(),
            "backend": {"requested": self.args.backend,
                        "auto_cpu": backend_info()["auto_backend"]["cpu"],
                        "auto_cuda": backend_info()["auto_backend"]["cuda"]},
            "runs": {},
        }


def runs_for(mode: str, phase1: str):
    if mode == "all":
        runs = ["baseline", "e2e", "two_phase"]
    else:
        runs = [mode]
    if phase1 == "both" and "two_phase" in runs:
        runs.append("two_phase_pca")
    return runs


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        prog="vdproj-train", description="V-DProj experiment: baseline, end-to-end and "
        "two-phase training of a GPT-NeoX model with a compressed value cache.")
    p.add_argument("--out", default="runs/default", help="output folder (default runs/default)")
    p.add_argument("--preset", default="cpu-small", choices=VDProjConfig.PRESETS)
    p.add_argument("--mode", default="all", choices=("baseline", "e2e", "two_phase", "all"))
    p.add_argument("--phase1", default="sgd", choices=("sgd", "pca", "both"),
                   help="phase 1 by SGD (the reference), by closed-form PCA, or both (adds "
                        "the run two_phase_pca)")
    p.add_argument("--resume", action="store_true",
                   help="continue the runs whose checkpoints are in --out")
    p.add_argument("--seed", type=int, default=0)
    g = p.add_argument_group("data")
    g.add_argument("--data-text", help="your own UTF-8 text file instead of Shakespeare")
    g.add_argument("--data-npy", help="a pre-tokenized .npy token stream (1-D) or (N, seq_len)")
    g.add_argument("--data-pt", help="exact splits exported by `python -m vdproj_ext.data "
                                     "--export` (for machines without tokenizers)")
    g.add_argument("--tokenizer", help="neox | bpe:N | bytes | path/to/tokenizer.json "
                                       "(default: the preset's)")
    g.add_argument("--n-train", type=int, help="training samples (default: the preset's)")
    g.add_argument("--n-val", type=int, help="validation samples (default: the preset's)")
    g.add_argument("--val-frac", type=float, help="held-out tail fraction of the text")
    g.add_argument("--seq-len", type=int, help="tokens per sample (default 128)")
    g = p.add_argument_group("protocol overrides (defaults are the reference's)")
    g.add_argument("--epochs", type=int, help="max epochs of phase 2 / e2e / baseline (30)")
    g.add_argument("--phase1-epochs", type=int, help="max epochs of phase 1 (10)")
    g.add_argument("--lr", type=float, help="phase 2 / e2e / baseline learning rate (1e-4)")
    g.add_argument("--phase1-lr", type=float, help="phase 1 learning rate (1e-3)")
    g.add_argument("--patience", type=int, help="early-stopping patience (1)")
    g.add_argument("--batch-size", type=int, help="global batch size (8)")
    g.add_argument("--v-rank", type=int, help="override the preset's v_rank")
    g.add_argument("--init-from", help="start every run from a local Hugging Face GPT-NeoX "
                   "checkpoint folder (e.g. Pythia-70m) instead of random weights; its shape "
                   "replaces the preset's, and its vocabulary must match the tokenizer")
    g = p.add_argument_group("execution")
    g.add_argument("--device", default="auto", help="auto | cpu | cuda")
    g.add_argument("--amp", default="auto", choices=("auto", "none", "bf16", "fp16"),
                   help="autocast dtype (auto: bf16 on CUDA, none on CPU)")
    g.add_argument("--backend", default="auto", choices=("auto", "ext", "reference"),
                   help="backend of vdproj_ext's attention ops")
    g.add_argument("--eval-batch", type=int, help="evaluation batch size")
    g.add_argument("--jobs", type=int, help="runs trained at once in separate processes "
                   "(default: all of them; 1 trains them one after another in this process)")
    g.add_argument("--threads", type=int, help="torch CPU threads per process (default: "
                   "cores / jobs)")
    g.add_argument("--save-every-steps", type=int, default=0,
                   help="also checkpoint every N steps within an epoch (0: at epoch ends)")
    g.add_argument("--save-every-s", type=float, default=0.0,
                   help="write epoch-end checkpoints only when this many seconds passed since "
                        "the last one (0: every epoch; large models on fast GPUs: e.g. 120)")
    g.add_argument("--no-pca-reference", action="store_true",
                   help="skip the PCA-optimum reconstruction reported next to SGD phase 1")
    g.add_argument("--no-plots", action="store_true")
    g.add_argument("--no-progress", action="store_true", help="no tqdm bars")
    g.add_argument("--debug-kill-at-step", type=int, default=0, help=argparse.SUPPRESS)
    g.add_argument("--child-run", choices=RUN_NAMES, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def _default_jobs(args, runs) -> int:
    if args.jobs is not None:
        return max(1, args.jobs)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 or args.child_run:
        return 1
    # One process per run, all at once: single-threaded processes time-share a small CPU with
    # no OpenMP synchronisation, and on a GPU several batch-8 runs keep it busier than one.
    return len(runs)


def run_jobs(args, argv, runs, jobs) -> dict:
    """Train the runs in `jobs` child processes at once (longest first) and join their results.

    Independent single-threaded processes use a small CPU far better than one process with
    several intra-op threads, and several processes keep a GPU busier at batch 8."""
    import subprocess
    t0 = time.time()
    parts = os.path.join(args.out, "parts")
    os.makedirs(parts, exist_ok=True)
    data_args = []
    if not args.data_pt:  # tokenize once here; the children read the exact same splits
        exp = Experiment(args, Dist("cpu"))
        exp.load_data()
        data_file = os.path.join(parts, "data.pt")
        exp.data.save(data_file)
        data_args = ["--data-pt", data_file]
        if hasattr(exp.data.tok, "save"):
            exp.data.tok.save(os.path.join(args.out, "tokenizer.json"))
    pending = sorted(runs, key=lambda r: ("two_phase_pca", "two_phase", "e2e",
                                          "baseline").index(r))
    threads = args.threads or max(1, (os.cpu_count() or 1) // jobs)
    running, failed = {}, []
    print(f"training {', '.join(runs)} in {jobs} parallel processes "
          f"({threads} thread(s) each); progress below is per epoch", flush=True)
    try:
        while pending or running:
            while pending and len(running) < jobs:
                run = pending.pop(0)
                cmd = [sys.executable, "-m", "vdproj_ext.train", *argv, *data_args,
                       "--child-run", run, "--jobs", "1", "--threads", str(threads),
                       "--no-progress", "--no-plots"]
                running[run] = subprocess.Popen(cmd)
            time.sleep(0.5)
            for run, proc in list(running.items()):
                if proc.poll() is not None:
                    del running[run]
                    if proc.returncode != 0:
                        failed.append(f"{run} (exit status {proc.returncode})")
    finally:  # interrupted: stop the children too (their checkpoints stay for --resume)
        for proc in running.values():
            proc.terminate()
        for proc in running.values():
            proc.wait()
    if failed:
        raise RuntimeError(f"run(s) failed: {', '.join(failed)}; their checkpoints are in "
                           f"{os.path.join(args.out, 'checkpoints')} (continue with --resume)")
    results = None
    for run in runs:
        with open(os.path.join(parts, f"{run}.json")) as f:
            part = json.load(f)
        if results is None:
            results = part
        results["runs"][run] = part["runs"][run]
    results["wall_s"] = round(time.time() - t0, 2)
    results["jobs"] = jobs
    if data_args:  # report the original source, not the hand-over file
        results["data"] = exp.results_skeleton_data()
    return results


def main(argv=None) -> Optional[dict]:
    from_cli = argv is None
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    runs = [args.child_run] if args.child_run else runs_for(args.mode, args.phase1)
    jobs = _default_jobs(args, runs)
    if jobs > 1 and len(runs) > 1:
        from . import report
        results = run_jobs(args, argv, runs, min(jobs, len(runs)))
        _finish(args, results, report)
        return results
    torch.set_num_threads(args.threads or max(1, (os.cpu_count() or 1)))
    ctx = Dist(args.device)
    try:
        torch.manual_seed(args.seed)
        exp = Experiment(args, ctx)
        exp.load_data()
        t0 = time.time()
        results = exp.results_skeleton()
        if args.child_run:
            results_path = os.path.join(args.out, "parts", f"{args.child_run}.json")
            os.makedirs(os.path.dirname(results_path), exist_ok=True)
        else:
            results_path = os.path.join(args.out, "results.json")
        for run in runs:
            results["runs"][run] = exp.run(run)
            results["wall_s"] = round(time.time() - t0, 2)
            if ctx.main:
                atomic_save_json(results, results_path)
        if ctx.main and hasattr(exp.data.tok, "save"):  # a trained BPE: keep it
            exp.data.tok.save(os.path.join(args.out, "tokenizer.json"))
        if ctx.main and not args.child_run:
            from . import report
            _finish(args, results, report)
        return results
    except CheckpointError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        if not from_cli:
            raise
        sys.exit(2)
    finally:
        ctx.close()


def _finish(args, results, report):
    results_path = os.path.join(args.out, "results.json")
    atomic_save_json(results, results_path)
    report.write_report(results, args.out, plots=not args.no_plots)
    print(f"wrote {results_path}, {os.path.join(args.out, 'report.md')} "
          f"({results['wall_s']:.1f} s)", flush=True)
    print(report.summary_table(results), flush=True)


if __name__ == "__main__":
    main()
