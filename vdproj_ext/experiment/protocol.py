"""The experiment's fixed facts: the reference protocol, the presets' settings, the position
buckets, what each training stage trains, and THE table of runs.

Protocol (fixed by the reference experiment; every preset keeps it):
  * phase 1: only the compress/restore pairs train (v_compress/v_restore; with latent keys
    k_compress/k_restore too), on the model's reconstruction loss: mean((V - V_restored)^2)
    averaged over layers, and with latent keys the same for k_nope, logged separately;
    AdamW lr 1e-3, batch 8, <= 10 epochs, early stopping with patience 1 on validation
    reconstruction; the best epoch is kept. `--phase1 pca` replaces it by its closed-form
    optimum, the mean-centred rank-R PCA of each layer's V (and of its k_nope).
  * phase 2: every pair frozen, everything else trains on next-token cross-entropy;
    AdamW lr 1e-4, batch 8, <= 30 epochs, patience 1 on validation perplexity; best kept;
    reconstruction loss logged every epoch.
  * e2e: the compressed model, everything trained together under the phase 2 settings.
  * baseline: the same model without compression under the same settings.
Latent keys (SPEC sections 3b and 5): the runs marked latent_keys compress k_nope as well, to
Rk = LATENT_KEY_RANK_FRACTION * H*D, next to the preset's Rv = 0.625 * H*D; with rotary on a
quarter of each head that cuts the cache by 37.5% instead of 18.75%.
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
    # The study's overfitting regime (vdproj-study; VDProjConfig.preset("cpu-study")): the
    # cpu-small model over 128 training samples, the reference's ~56 parameters per training
    # token. One protocol change: every learning rate x10 (ratio phase 1 : phase 2 kept). At
    # lr 1e-4 a 128-wide model moves too little per step to overfit 16 steps per epoch within
    # 30 epochs (measured: baseline val ppl still falling at epoch 30, 169 against train 75);
    # at 1e-3 it overfits like the reference (best epoch 7-10, train ppl ~35 against val
    # ~115 there, the reference's 79 against 415). 256 validation samples: less noise.
    "cpu-study": dict(tokenizer="bpe:2048", n_train=128, n_val=256, val_frac=0.1,
                      eval_batch=32, lr=1e-3, phase1_lr=1e-2),
    # CI: a few seconds per run; fewer epochs than the protocol.
    "smoke": dict(tokenizer="bytes", n_train=32, n_val=16, val_frac=0.1, eval_batch=16,
                  phase1_epochs=2, epochs=2),
}


def settings_key(preset: str) -> str:
    """The PRESET_SETTINGS entry of a model preset: a latent-key preset ("cpu-small-kv") trains
    on its base preset's data and settings."""
    base = preset[:-3] if preset.endswith("-kv") else preset
    if base not in PRESET_SETTINGS:
        raise ValueError(f"preset: no data and run settings for {preset!r}; known: "
                         f"{sorted(PRESET_SETTINGS)} (and their '-kv' latent-key variants)")
    return base


# The latent-key runs' Rk as a fraction of H*D (SPEC section 5); --k-rank overrides it.
LATENT_KEY_RANK_FRACTION = 0.375

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
        values = dict(PROTOCOL, **PRESET_SETTINGS[settings_key(preset)])
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
    objective: str      # "recon": the pairs' reconstruction loss; "ce": next-token cross-entropy
    trains: str         # "projections" (every compress/restore pair) | "all_but_projections"
                        # | "all"
    lr_setting: str     # the Settings field of its learning rate
    epochs_setting: str  # the Settings field of its epoch limit


STAGES: Dict[str, StageSpec] = {s.name: s for s in (
    StageSpec("phase1", "recon", "projections", "phase1_lr", "phase1_epochs"),
    StageSpec("phase2", "ce", "all_but_projections", "lr", "epochs"),
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
    latent_keys: bool = False     # keys compressed too (k_compress/k_restore, SPEC 3b)
    default: bool = True          # part of the default job (--mode all)

    @property
    def two_phase(self) -> bool:
        return self.stages == ("phase1", "phase2")

    def phase1_method(self, requested: str) -> Optional[str]:
        """The phase-1 method this run uses under `--phase1 requested` (None: no phase 1).
        Under "both" the run without a fixed method is the SGD one, its variant the PCA one;
        so a run's method, label and checkpoint fingerprint never read "both"."""
        if not self.two_phase:
            return None
        return self.phase1 or ("sgd" if requested == "both" else requested)


RUNS: Dict[str, RunSpec] = {r.name: r for r in (
    RunSpec("baseline", "Baseline (no compression)", False, ("train",), reference_rank=3),
    RunSpec("e2e", "V-DProj end-to-end", True, ("train",), reference_rank=2),
    RunSpec("two_phase", "V-DProj two-phase", True, ("phase1", "phase2"), reference_rank=1),
    RunSpec("two_phase_pca", "V-DProj two-phase (PCA phase 1)", True, ("phase1", "phase2"),
            phase1="pca", variant_of="two_phase"),
    # Latent keys. The default job is the three runs above plus two_phase_kv (SPEC section
    # 5); e2e_kv only on request (--mode e2e_kv): the default job must stay within 15 minutes
    # on a 2-core machine, and the four runs already take about 13 CPU-minutes.
    RunSpec("e2e_kv", "V-DProj + latent keys end-to-end", True, ("train",), latent_keys=True,
            default=False),
    RunSpec("two_phase_kv", "V-DProj + latent keys two-phase", True, ("phase1", "phase2"),
            latent_keys=True),
    RunSpec("two_phase_kv_pca", "V-DProj + latent keys two-phase (PCA phase 1)", True,
            ("phase1", "phase2"), phase1="pca", variant_of="two_phase_kv", latent_keys=True),
)}

RUN_NAMES = tuple(RUNS)  # the table's order is the report's row order
BASELINE_RUN = "baseline"  # the run the others are compared against
MODES = tuple(name for name, r in RUNS.items() if r.variant_of is None)  # --mode, besides "all"
DEFAULT_RUNS = tuple(name for name in MODES if RUNS[name].default)  # --mode all
# Best expected perplexity first: the reference's finding, and vdproj-generate's default pick.
REFERENCE_RANKING = tuple(sorted((n for n, r in RUNS.items() if r.reference_rank),
                                 key=lambda n: RUNS[n].reference_rank))


def runs_for(mode: str, phase1: str) -> List[str]:
    """The runs of `--mode mode --phase1 phase1`."""
    runs = list(DEFAULT_RUNS) if mode == "all" else [mode]
    if phase1 == "both":
        runs += [n for n, r in RUNS.items() if r.variant_of in runs]
    return runs
