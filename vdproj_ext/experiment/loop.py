"""The training loop: evaluate a model, and fit one stage of a run (phase 1, phase 2, or the
whole model for e2e and the baseline) with early stopping, checkpointing as it goes.

    stage = StageTrainer(session, model, state, "phase2", writer); stage.fit()

One epoch is a pass over the training samples in an order fixed by (seed, epoch), in global
batches of Settings.batch_size; under DDP each process takes its slice of every batch. After
each epoch: validate, log, keep the best weights, stop after `patience` epochs without
improvement. A checkpoint holds the StageState, so a killed run resumes at the very step it
reached and ends exactly where an uninterrupted one would.
"""
from __future__ import annotations

import contextlib
import math
import os
import signal
import time
from dataclasses import dataclass
from typing import Dict, List, Optional

import torch

from .checkpoint import CheckpointWriter, EpochLog, RunState
from .data import Dataset, eval_batches, num_batches, train_batches
from .distributed import Dist
from .protocol import POSITION_EDGES, STAGES, Settings


def ppl(loss: float) -> float:
    """exp(loss), inf past float range, NaN for a NaN loss (a diverged run)."""
    if math.isnan(loss):
        return float("nan")
    return math.exp(loss) if loss < 700 else float("inf")


class TrainingDiverged(RuntimeError):
    """No epoch of a stage gave a finite validation metric, so there are no weights to keep."""


@dataclass
class Session:
    """What all stages of all runs in this process share."""
    settings: Settings
    dist: Dist
    data: Dataset
    amp: str                    # autocast dtype: "none" | "bf16" | "fp16"
    seed: int                   # with the epoch, fixes the order of the training samples
    show_progress: bool = False  # tqdm bars on the main process
    save_every_steps: int = 0   # also checkpoint every N steps within an epoch (0: never)
    save_every_s: float = 0.0   # epoch-end checkpoints at most this often (0: every epoch)
    kill_at_step: int = 0       # test hook: SIGKILL this process after N optimizer steps
    steps_done: int = 0         # optimizer steps taken by this process (for kill_at_step)

    def autocast(self):
        if self.amp == "none":
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if self.amp == "bf16" else torch.float16
        return torch.autocast(self.dist.device.type, dtype=dtype)

    def eval_batches(self, split: torch.Tensor):
        """This process's share of `split`, on its device."""
        for ids in eval_batches(split, batch=self.settings.eval_batch, rank=self.dist.rank,
                                world=self.dist.world):
            yield ids.to(self.dist.device, non_blocking=True)


# ---------------------------------------------------------------------------------------------
# Evaluation


@dataclass
class Evaluation:
    """Metrics over a split, summed across processes; None where not asked for."""
    loss: Optional[float] = None    # token-weighted cross-entropy
    ppl: Optional[float] = None
    position_ppl: Optional[Dict[str, float]] = None  # "lo-hi" -> perplexity (POSITION_EDGES)
    recon: Optional[float] = None   # mean over samples of the model's reconstruction loss
    recon_k: Optional[float] = None  # latent keys: its key part (k_nope) ...
    recon_v: Optional[float] = None  # ... and its value part

    def summary(self) -> Dict[str, float]:
        """loss, ppl and the recon losses where measured (results.json "initial_val")."""
        return {k: v for k, v in (("loss", self.loss), ("ppl", self.ppl), ("recon", self.recon),
                                  ("recon_k", self.recon_k), ("recon_v", self.recon_v))
                if v is not None}


def position_ppl(per_pos: torch.Tensor) -> Dict[str, float]:
    """Perplexity per bucket of POSITION_EDGES; per_pos[j] is the mean loss predicting
    token j + 1 (token 0 is never predicted)."""
    buckets = {}
    for lo, hi in zip(POSITION_EDGES[:-1], POSITION_EDGES[1:]):
        sel = [j for j in range(len(per_pos)) if lo <= j + 1 < hi]
        if sel:
            buckets[f"{lo}-{hi}"] = ppl(per_pos[sel].mean().item())
    return buckets


def recon_parts(out) -> Optional[torch.Tensor]:
    """A latent-key model's reconstruction losses by pair, detached: (keys' k_nope, values);
    None for a model whose keys are not compressed. (out.recon_loss, the objective, is the
    mean of the pairs' losses.)"""
    parts = out.recon_losses or {}
    if "k" not in parts:
        return None
    return torch.stack((parts["k"].detach(), parts["v"].detach()))


@torch.no_grad()
def evaluate(s: Session, model, split: torch.Tensor, *, ce=True, recon=False) -> Evaluation:
    """Cross-entropy (with position buckets) and/or reconstruction loss over `split`."""
    was_training = model.training
    model.eval()
    t = split.shape[1]
    pos_sum = torch.zeros(t - 1, dtype=torch.float64, device=s.dist.device)
    # per sample: recon, recon_k, recon_v (summed over samples); then the sample count
    stats = torch.zeros(4, dtype=torch.float64, device=s.dist.device)
    split_recon = False
    for ids in s.eval_batches(split):
        with s.autocast():
            out = model(ids, labels=ids if ce else None, return_recon=recon,
                        skip_logits=not ce, loss_reduction="none")
        if ce:
            pos_sum += out.loss.double().sum(0)
        if recon and out.recon_loss is not None:
            stats[0] += out.recon_loss.double() * ids.shape[0]
            parts = recon_parts(out)
            if parts is not None:
                stats[1:3] += parts.double() * ids.shape[0]
                split_recon = True
        stats[3] += ids.shape[0]
    s.dist.sum_(pos_sum)
    s.dist.sum_(stats)
    model.train(was_training)
    return _evaluation(pos_sum, stats.tolist(), t, ce=ce, recon=recon, split_recon=split_recon)


def _evaluation(pos_sum: torch.Tensor, stats: List[float], t: int, *, ce: bool, recon: bool,
                split_recon: bool) -> Evaluation:
    """evaluate()'s sums over the split, turned into means."""
    n = stats[3]
    res = Evaluation()
    if ce:
        res.loss = pos_sum.sum().item() / (n * (t - 1))
        res.ppl = ppl(res.loss)
        res.position_ppl = position_ppl((pos_sum / n).cpu())
    if recon:
        res.recon = stats[0] / n if n else float("nan")
    if recon and split_recon:
        res.recon_k, res.recon_v = (stats[1] / n, stats[2] / n) if n else (math.nan, math.nan)
    return res


# ---------------------------------------------------------------------------------------------
# Training one stage


def set_trainable_(model, trains: str) -> List[torch.nn.Parameter]:
    """requires_grad per StageSpec.trains; returns the trainable parameters."""
    pairs = {id(p) for p in model.v_projection_parameters()}  # every pair, keys' too
    for p in model.parameters():
        in_pair = id(p) in pairs
        p.requires_grad_({"projections": in_pair, "all_but_projections": not in_pair,
                          "all": True}[trains])
    return [p for p in model.parameters() if p.requires_grad]


class StageTrainer:
    """Fits one stage of a run, resuming from where state.stages[stage] stands."""

    def __init__(self, s: Session, model, state: RunState, stage: str,
                 writer: CheckpointWriter, optimizer_state: Optional[dict] = None):
        self.s, self.model, self.state, self.writer = s, model, state, writer
        self.spec, self.st = STAGES[stage], state.stages[stage]
        self.recon_objective = self.spec.objective == "recon"
        self.compressed = model.config.v_rank is not None
        self.max_epochs = getattr(s.settings, self.spec.epochs_setting)
        self.params = set_trainable_(model, self.spec.trains)
        self.st.trainable = sum(p.numel() for p in self.params)
        self.opt = torch.optim.AdamW(self.params, lr=getattr(s.settings, self.spec.lr_setting),
                                     betas=(0.9, 0.999), eps=1e-8,
                                     weight_decay=s.settings.weight_decay)
        if optimizer_state is not None:
            self.opt.load_state_dict(optimizer_state)

    def fit(self):
        """Train to the epoch limit or an early stop; leaves the best epoch's weights in the
        model, every parameter trainable again."""
        st, model = self.st, self.model
        # k_restore's bias cancels in the softmax (SPEC 3b): cross-entropy never reaches it,
        # so a latent-key model trained whole (e2e_kv) has a parameter without gradient
        unreached = (model.config.latent_keys and not self.recon_objective
                     and self.spec.trains == "all")
        net = self.s.dist.wrap(model, find_unused_parameters=unreached)
        model.train()
        if st.initial is None:
            st.initial = self.evaluate().summary()
        while not st.stopped and st.epoch <= self.max_epochs:
            t0 = time.time()
            pending = self.train_epoch(net)
            self.end_epoch(pending, t0)
        del net
        if st.best_state is None:  # every epoch's metric was NaN (NaN < best is never true)
            what = "reconstruction loss" if self.recon_objective else "loss"
            raise TrainingDiverged(
                f"[{self.state.run}/{self.spec.name}] training diverged: no epoch gave a finite "
                f"validation {what} (see the log above), so there are no weights to keep; "
                f"lower the learning rate and train into another --out")
        model.load_state_dict(st.best_state)
        for p in model.parameters():
            p.requires_grad_(True)

    def evaluate(self) -> Evaluation:
        return evaluate(self.s, self.model, self.s.data.val, ce=not self.recon_objective,
                        recon=self.compressed)

    def train_epoch(self, net) -> torch.Tensor:
        """The epoch's remaining steps. Returns this process's sums of the logged losses (see
        train_step) not yet folded into st (kept on the device, so that no step waits for
        the GPU)."""
        s, st = self.s, self.st
        pending = torch.zeros(3, dtype=torch.float64, device=s.dist.device)
        n_batches = num_batches(len(s.data.train), s.settings.batch_size)
        bar = self.progress_bar(n_batches)
        for ids in train_batches(s.data.train, seed=s.seed, epoch=st.epoch,
                                 global_batch=s.settings.batch_size, rank=s.dist.rank,
                                 world=s.dist.world, start_step=st.step):
            logged = self.train_step(net, ids.to(s.dist.device, non_blocking=True))
            pending[:len(logged)] += logged
            st.step += 1
            s.steps_done += 1
            if bar is not None:
                bar.update(1)
                if st.step % 10 == 0:
                    bar.set_postfix(loss=f"{logged[0].item():.4f}")
            if s.kill_at_step and s.steps_done >= s.kill_at_step:
                os.kill(os.getpid(), signal.SIGKILL)  # test hook: die like a killed job
            if s.save_every_steps and st.step % s.save_every_steps == 0 and st.step < n_batches:
                pending = self.sync_loss(pending)
                self.writer.save(self.state, self.model, self.opt)
        if bar is not None:
            bar.close()
        return pending

    def train_step(self, net, ids: torch.Tensor) -> torch.Tensor:
        """One optimizer step. Returns the step's loss, detached, in float64, as a vector:
        [loss], or [loss, key part, value part] for a latent-key model's phase 1."""
        with self.s.autocast():
            if self.recon_objective:
                out = net(ids, return_recon=True, skip_logits=True)
                loss = out.recon_loss
            else:
                out = net(ids, labels=ids)
                loss = out.loss
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        if self.s.settings.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(self.params, self.s.settings.max_grad_norm)
        self.opt.step()
        parts = recon_parts(out) if self.recon_objective else None
        logged = loss.detach().reshape(1)
        return (logged if parts is None else torch.cat((logged, parts))).double()

    def sync_loss(self, pending: torch.Tensor) -> torch.Tensor:
        """Fold every process's pending loss sums into st.loss_sum (the sum over steps of the
        global batch's loss) and st.recon_k_sum / recon_v_sum, so that a checkpoint written by
        rank 0 holds them."""
        st = self.st
        total = (self.s.dist.sum_(pending.clone()) / self.s.dist.world).tolist()
        st.loss_sum += total[0]
        st.recon_k_sum += total[1]
        st.recon_v_sum += total[2]
        return torch.zeros_like(pending)

    def end_epoch(self, pending: torch.Tensor, t0: float):
        """Validate, log, keep the best weights, decide on early stopping, checkpoint."""
        st = self.st
        self.sync_loss(pending)
        st.train_time += time.time() - t0
        entry = self.epoch_log(st.loss_sum / st.step, self.evaluate())
        st.log.append(entry)
        metric = entry.val_recon if self.recon_objective else entry.val_ppl
        improved = metric < st.best
        if improved:
            st.best, st.best_epoch, st.bad = metric, st.epoch, 0
            st.best_state = {k: v.detach().to("cpu", copy=True)
                             for k, v in self.model.state_dict().items()}
        else:
            st.bad += 1
            if st.bad >= self.s.settings.patience:
                st.stopped = True
        self.s.dist.log(f"[{self.state.run}/{self.spec.name}] epoch {st.epoch}: " + ", ".join(
            f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}"
            for k, v in entry.to_dict().items() if k != "epoch")
            + ("" if improved else "  (no improvement)"))
        st.epoch, st.step, st.loss_sum, st.train_time = st.epoch + 1, 0, 0.0, 0.0
        st.recon_k_sum = st.recon_v_sum = 0.0
        last = st.stopped or st.epoch > self.max_epochs
        if last or self.writer.seconds_since_save() >= self.s.save_every_s:
            self.writer.save(self.state, self.model, self.opt)

    def epoch_log(self, train_loss: float, val: Evaluation) -> EpochLog:
        st = self.st
        time_s = round(st.train_time, 3)
        if self.recon_objective:
            split = val.recon_k is not None  # a latent-key model: log each pair's part
            return EpochLog(st.epoch, train_recon=train_loss, val_recon=val.recon,
                            train_recon_k=st.recon_k_sum / st.step if split else None,
                            train_recon_v=st.recon_v_sum / st.step if split else None,
                            val_recon_k=val.recon_k, val_recon_v=val.recon_v, time_s=time_s)
        return EpochLog(st.epoch, train_loss=train_loss, train_ppl=ppl(train_loss),
                        val_loss=val.loss, val_ppl=val.ppl, recon=val.recon,
                        recon_k=val.recon_k, recon_v=val.recon_v, time_s=time_s)

    def progress_bar(self, n_batches: int):
        if not (self.s.dist.main and self.s.show_progress):
            return None
        try:  # optional: a bare GPU node may lack it
            from tqdm.auto import tqdm
        except ImportError:
            return None
        return tqdm(total=n_batches, initial=self.st.step, leave=False, dynamic_ncols=True,
                    desc=f"{self.state.run}/{self.spec.name} epoch {self.st.epoch}/"
                         f"{self.max_epochs}")
