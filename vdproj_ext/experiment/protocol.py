"""The experiment's fixed facts: the reference protocol, the presets' settings, the position
buckets, what each training stage trains, and THE table of runs.

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
learning rate, gradient-norm clipping at 1.0, Hugging Face GPT-NeoX init.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

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

# Validation perplexity is also reported per bucket [lo, hi) of the predicted token's index.
POSITION_EDGES = (0, 16, 32, 64, 96, 128)


@dataclass(frozen=True)
class Settings:
    """The numbers a run trains with: PROTOCOL, then the preset's PRESET_SETTINGS, then the
    command line's overrides (each later source wins)."""
    seq_len: int           # tokens per sample
    batch_size: int        # global batch (split across DDP processes)
    phase1_lr: float
    phase1_epochs: int     # at most
    lr: float              # phase 2, e2e and baseline
    epochs: int            # at most, phase 2, e2e and baseline
    patience: int          # epochs without improvement before stopping
    max_grad_norm: float   # 0: no clipping
    weight_decay: float
    tokenizer: str         # neox | bpe:N | bytes | path/to/tokenizer.json
    n_train: int           # training samples
    n_val: int             # validation samples
    val_frac: float        # held-out tail fraction of the text
    eval_batch: int        # evaluation batch per process

    @classmethod
    def for_preset(cls, preset: str, **overrides) -> "Settings":
        """The preset's settings; overrides that are None keep the preset's value."""
        values = dict(PROTOCOL, **PRESET_SETTINGS[preset])
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)

    @classmethod
    def field_names(cls) -> List[str]:
        return [f.name for f in dataclasses.fields(cls)]

    def protocol(self) -> dict:
        """The PROTOCOL entries, in PROTOCOL's order (results.json "protocol")."""
        return {k: getattr(self, k) for k in PROTOCOL}


# ---------------------------------------------------------------------------------------------
# Training stages: what trains, on which objective, with which learning rate and epochs.


@dataclass(frozen=True)
class StageSpec:
    name: str
    objective: str      # "recon": mean (V - V_restored)^2; "ce": next-token cross-entropy
    trains: str         # "v_projection" | "all_but_v_projection" | "all"
    lr_setting: str     # the Settings field of its learning rate
    epochs_setting: str  # the Settings field of its epoch limit


STAGES: Dict[str, StageSpec] = {s.name: s for s in (
    StageSpec("phase1", "recon", "v_projection", "phase1_lr", "phase1_epochs"),
    StageSpec("phase2", "ce", "all_but_v_projection", "lr", "epochs"),
    StageSpec("train", "ce", "all", "lr", "epochs"),
)}


# ---------------------------------------------------------------------------------------------
# THE run table: every place that names runs (the CLIs' choices, the job order, the report's
# rows and labels, vdproj-generate's default pick) derives from it.


@dataclass(frozen=True)
class RunSpec:
    name: str
    label: str                    # row label in report.md and the plots' legends
    compressed: bool              # V-DProj model (v_compress/v_restore); False: baseline model
    stages: Tuple[str, ...]       # STAGES keys, trained in this order
    phase1: Optional[str] = None  # a fixed phase-1 method; None: --phase1 chooses
    variant_of: Optional[str] = None  # added next to that run by --phase1 both; not a --mode
    reference_rank: Optional[int] = None  # the reference's claimed order (1: best perplexity)

    @property
    def two_phase(self) -> bool:
        return self.stages == ("phase1", "phase2")

    def phase1_method(self, requested: str) -> str:
        """The phase-1 method this run uses under `--phase1 requested`."""
        return self.phase1 or requested


RUNS: Dict[str, RunSpec] = {r.name: r for r in (
    RunSpec("baseline", "Baseline (no compression)", False, ("train",), reference_rank=3),
    RunSpec("e2e", "V-DProj end-to-end", True, ("train",), reference_rank=2),
    RunSpec("two_phase", "V-DProj two-phase", True, ("phase1", "phase2"), reference_rank=1),
    RunSpec("two_phase_pca", "V-DProj two-phase (PCA phase 1)", True, ("phase1", "phase2"),
            phase1="pca", variant_of="two_phase"),
)}

RUN_NAMES = tuple(RUNS)  # the table's order is the report's row order
BASELINE_RUN = "baseline"  # the run the others are compared against
MODES = tuple(name for name, r in RUNS.items() if r.variant_of is None)  # --mode, besides "all"
# Best expected perplexity first: the reference's finding, and vdproj-generate's default pick.
REFERENCE_RANKING = tuple(sorted((n for n, r in RUNS.items() if r.reference_rank),
                                 key=lambda n: RUNS[n].reference_rank))


def runs_for(mode: str, phase1: str) -> List[str]:
    """The runs of `--mode mode --phase1 phase1`."""
    runs = list(MODES) if mode == "all" else [mode]
    if phase1 == "both":
        runs += [n for n, r in RUNS.items() if r.variant_of in runs]
    return runs
