"""Checkpoints: atomic writes, the typed training state, the file format and its one reader.

A run's checkpoint is OUT/checkpoints/<run>.pt, a torch.save'd dict (loadable with
weights_only=True):

    {"format":      CKPT_FORMAT,
     "fingerprint": {name: value} of everything that must match to resume (Experiment.fingerprint),
     "state":       RunState.to_dict(),
     "model":       the model's state_dict (at the moment of writing),
     "config":      VDProjConfig.to_dict() of that model,
     "tokenizer":   the tokenizer's name ("bytes", "bpe-2048", "neox-20b", ...),
     "optimizer":   AdamW state_dict of the stage in progress (absent between stages)}

The layout is that of the first format, so CKPT_FORMAT stays "vdproj-train-checkpoint-1":
files written before the typed state existed still resume (their optional fields read as
None). Training resumes with read_checkpoint(path, fingerprint); vdproj-generate reads the
same files through load_trained_model.
"""
from __future__ import annotations

import dataclasses
import glob
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from ..models import VDProjConfig, VDProjForCausalLM

CKPT_FORMAT = "vdproj-train-checkpoint-1"


class CheckpointError(RuntimeError):
    """A checkpoint that is unreadable, foreign, incomplete or from another configuration."""


# ---------------------------------------------------------------------------------------------
# Atomic writes: a reader (or a resumed run) sees the old file or the new one, whole.


def atomic_write_bytes(path: str, write_fn):
    """write_fn(tmp_path), fsync, then os.replace onto `path`. A killed writer leaves its
    temporary behind (a checkpoint's can be a gigabyte): the next write removes it."""
    remove_stale_temporaries(path)
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        write_fn(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def remove_stale_temporaries(path: str):
    """Remove `path`'s temporaries (path.tmp-<pid>) whose writer is no longer running."""
    for tmp in glob.glob(glob.escape(path) + ".tmp-*"):
        pid = tmp.rsplit("-", 1)[1]
        if pid.isdigit() and not _process_alive(int(pid)):
            try:
                os.remove(tmp)
            except FileNotFoundError:  # another process got there first
                pass


def _process_alive(pid: int) -> bool:
    if pid == os.getpid():
        return False  # this process writes one file at a time: a leftover of its own
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def atomic_save_json(obj, path):
    def write(tmp):
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=1)
            f.write("\n")
    atomic_write_bytes(path, write)


def atomic_torch_save(obj, path):
    atomic_write_bytes(path, lambda tmp: torch.save(obj, tmp))


# ---------------------------------------------------------------------------------------------
# The training state


@dataclass
class EpochLog:
    """One epoch of a stage, as results.json lists it; fields that are None are left out.

    Phase 1 by SGD logs epoch, train_recon, val_recon, time_s; phase 1 by PCA one entry with
    method "pca" and variance_kept; cross-entropy stages log the losses and perplexities, and
    `recon` (validation reconstruction) when the model is compressed. With latent keys, every
    reconstruction figure also comes split by pair: *_k for the keys' k_nope, *_v for V."""
    epoch: int
    method: Optional[str] = None              # "pca": the closed-form phase 1
    train_recon: Optional[float] = None       # mean reconstruction loss over the epoch's steps
    val_recon: Optional[float] = None
    train_recon_k: Optional[float] = None     # latent keys: train_recon's key part ...
    train_recon_v: Optional[float] = None     # ... and its value part
    val_recon_k: Optional[float] = None
    val_recon_v: Optional[float] = None
    variance_kept: Optional[List[float]] = None  # PCA: fraction of V's variance, per layer
    variance_kept_k: Optional[List[float]] = None  # PCA, latent keys: of k_nope's, per layer
    train_loss: Optional[float] = None        # mean cross-entropy over the epoch's steps
    train_ppl: Optional[float] = None
    val_loss: Optional[float] = None          # token-weighted validation cross-entropy
    val_ppl: Optional[float] = None
    recon: Optional[float] = None             # validation reconstruction during CE training
    recon_k: Optional[float] = None           # latent keys: recon's key part ...
    recon_v: Optional[float] = None           # ... and its value part
    time_s: Optional[float] = None            # training time of the epoch (evaluation excluded)

    def to_dict(self) -> dict:
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}


@dataclass
class StageState:
    """Where one stage of a run stands. Written mid-epoch, it resumes at `step` of `epoch`
    (the epoch's sample order depends only on the seed and the epoch)."""
    epoch: int = 1                 # the epoch in progress, from 1; past the limit: finished
    step: int = 0                  # optimizer steps done in that epoch
    loss_sum: float = 0.0          # sum over those steps of the global batch's mean loss
    recon_k_sum: float = 0.0       # latent keys, phase 1: the same for the loss's key part ...
    recon_v_sum: float = 0.0       # ... and for its value part
    train_time: float = 0.0        # seconds of training in that epoch
    log: List[EpochLog] = field(default_factory=list)  # the finished epochs
    best: float = math.inf         # best validation metric: recon (phase 1), else perplexity
    best_epoch: Optional[int] = None
    bad: int = 0                   # epochs since the best one (early stopping)
    stopped: bool = False          # stopped early
    trainable: Optional[int] = None  # parameters the stage trains
    initial: Optional[Dict[str, float]] = None  # validation metrics before the first step
    best_state: Optional[Dict[str, torch.Tensor]] = None  # the best epoch's weights, on CPU;
    # dropped once the run is done (the model then holds them), to keep the file small
    pca_reference_val_recon: Optional[float] = None  # SGD phase 1: the PCA optimum's recon

    def to_dict(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        d["log"] = [e.to_dict() for e in self.log]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "StageState":
        return cls(**dict(d, log=[EpochLog(**e) for e in d.get("log", [])]))


@dataclass
class RunState:
    """Where a whole run stands: its stages in training order, the one in progress."""
    run: str                       # protocol.RUNS key
    stages: Dict[str, StageState]  # protocol.STAGES keys, in training order
    stage: str                     # the stage in progress
    done: bool = False
    wall_s: float = 0.0            # seconds since the run started, summed over resumptions
    result: Optional[dict] = None  # the run's results.json entry, once done

    @classmethod
    def new(cls, run: str, stages: Sequence[str]) -> "RunState":
        return cls(run, {name: StageState() for name in stages}, stages[0])

    def remaining_stages(self) -> List[str]:
        """The stage in progress and the ones after it."""
        names = list(self.stages)
        return names[names.index(self.stage):]

    def next_stage(self, stage: str) -> Optional[str]:
        names = list(self.stages)
        i = names.index(stage) + 1
        return names[i] if i < len(names) else None

    def to_dict(self) -> dict:
        return {"run": self.run, "stages": {k: s.to_dict() for k, s in self.stages.items()},
                "stage": self.stage, "done": self.done, "wall_s": self.wall_s,
                "result": self.result}

    @classmethod
    def from_dict(cls, d: dict) -> "RunState":
        return cls(d["run"], {k: StageState.from_dict(s) for k, s in d["stages"].items()},
                   d["stage"], d["done"], d["wall_s"], d.get("result"))


# ---------------------------------------------------------------------------------------------
# Writing and reading checkpoint files


def checkpoint_path(out_dir: str, run: str) -> str:
    return os.path.join(out_dir, "checkpoints", f"{run}.pt")


class CheckpointWriter:
    """Writes one run's checkpoint file; a no-op on processes other than the main one."""

    def __init__(self, path: str, *, fingerprint: dict, config: VDProjConfig, tokenizer: str,
                 enabled: bool):
        self.path, self.enabled = path, enabled
        self.header = {"format": CKPT_FORMAT, "fingerprint": fingerprint}
        self.config, self.tokenizer = config.to_dict(), tokenizer
        self.last_save = time.time()

    def save(self, state: RunState, model: torch.nn.Module, optimizer=None):
        if not self.enabled:
            return
        ckpt = dict(self.header, state=state.to_dict(), model=model.state_dict(),
                    config=self.config, tokenizer=self.tokenizer)
        if optimizer is not None:
            ckpt["optimizer"] = optimizer.state_dict()
        atomic_torch_save(ckpt, self.path)
        self.last_save = time.time()

    def seconds_since_save(self) -> float:
        return time.time() - self.last_save


@dataclass
class Checkpoint:
    """A checkpoint file as read back."""
    path: str
    model: Dict[str, torch.Tensor]  # state_dict
    config: dict                    # VDProjConfig.to_dict()
    tokenizer: Optional[str]
    state: Optional[RunState]       # read when resuming (read_checkpoint with a fingerprint)
    optimizer: Optional[dict]


def read_checkpoint(path, fingerprint: Optional[dict] = None) -> Checkpoint:
    """Read and validate a training checkpoint, with a clear CheckpointError for corrupt,
    foreign or incomplete files. To resume a run, pass its `fingerprint`: the file must come
    from the same configuration, and its training state is read too."""
    resume_hint = (" Delete it to restart that run from scratch, or run without --resume."
                   if fingerprint is not None else "")
    try:
        raw = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated zip, garbage, unpickling refusal
        raise CheckpointError(
            f"checkpoint {path} is unreadable (corrupt or truncated: {type(e).__name__}: {e})."
            + resume_hint) from None
    if not isinstance(raw, dict) or raw.get("format") != CKPT_FORMAT:
        raise CheckpointError(f"{path} is not a vdproj_ext training checkpoint "
                              f"(expected format {CKPT_FORMAT!r})")
    if fingerprint is not None:
        _check_fingerprint(path, raw.get("fingerprint", {}), fingerprint)
    needed = ("state", "model") if fingerprint is not None else ("model", "config")
    for key in needed:
        if key not in raw:
            raise CheckpointError(f"checkpoint {path} lacks {key!r}; it is incomplete")
    state = None
    if fingerprint is not None:
        try:
            state = RunState.from_dict(raw["state"])
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"checkpoint {path} has a malformed training state "
                                  f"({type(e).__name__}: {e})") from None
    return Checkpoint(str(path), raw["model"], raw.get("config"), raw.get("tokenizer"), state,
                      raw.get("optimizer"))


def _check_fingerprint(path, saved: dict, expected: dict):
    diffs = [f"  {k}: checkpoint has {saved.get(k)!r}, this run has {v!r}"
             for k, v in expected.items() if saved.get(k) != v]
    if diffs:
        raise CheckpointError(
            f"checkpoint {path} was written by a different configuration:\n" + "\n".join(diffs)
            + "\nResume with the same arguments, use another --out, or run without --resume.")


def find_checkpoint(path: Path, runs: Sequence[str]) -> Path:
    """`path` itself if it is a file; else the first of `runs` with a checkpoint in the
    training output folder `path` (or its checkpoints/ folder)."""
    if path.is_file():
        return path
    ckpt_dir = path / "checkpoints" if (path / "checkpoints").is_dir() else path
    for name in runs:
        if (ckpt_dir / f"{name}.pt").is_file():
            return ckpt_dir / f"{name}.pt"
    raise FileNotFoundError(f"no checkpoint for run(s) {list(runs)} under {ckpt_dir} (expected "
                            f"<run>.pt files written by python -m vdproj_ext.train)")


def load_trained_model(path) -> Tuple[VDProjForCausalLM, Checkpoint]:
    """The model a training checkpoint holds, in eval mode, on CPU."""
    ckpt = read_checkpoint(path)
    config = VDProjConfig.from_dict(ckpt.config)
    model = VDProjForCausalLM(config, init_seed=None)
    missing, unexpected = model.load_state_dict(ckpt.model, strict=False)
    if missing or unexpected:
        raise CheckpointError(f"{path}: state dict does not match its config (missing "
                              f"{missing[:5]}, unexpected {unexpected[:5]})")
    return model.eval(), ckpt
