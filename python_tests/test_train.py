"""The training experiment on the smoke preset: outputs, determinism, resume, DDP."""
import json
import math
import os
import subprocess
import sys
import warnings

import pytest
import torch

from vdproj_ext.cli import train
from vdproj_ext.experiment.checkpoint import CheckpointError, EpochLog, RunState
from vdproj_ext.experiment.loop import TrainingDiverged, ppl
from vdproj_ext.experiment.data import (build_dataset, epoch_order, split_text, strip_notices,
                                        train_batches)
from vdproj_ext.experiment.protocol import REFERENCE_RANKING, RUNS, Settings, runs_for
from vdproj_ext.experiment.runner import latent_key_config
from vdproj_ext.models import VDProjConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMOKE = ["--preset", "smoke", "--threads", "1", "--no-progress"]


pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


def repo_env(**extra):
    """This environment with the repository first on PYTHONPATH, for child processes."""
    return dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
                **extra)


def run_cli(args, **kw):
    return subprocess.run([sys.executable, "-m", "vdproj_ext.train", *args], cwd=ROOT,
                          env=repo_env(), capture_output=True, text=True, timeout=300, **kw)


def numbers(run):
    """Every logged number of a run's result (timings excluded)."""
    out = {}
    for key, val in run.items():
        if key in ("wall_s",):
            continue
        if isinstance(val, list):
            for i, e in enumerate(val):
                for k, v in e.items():
                    if k != "time_s":
                        out[f"{key}[{i}].{k}"] = v
        else:
            out[key] = val
    return out


@pytest.fixture(scope="module")
def smoke_all(tmp_path_factory):
    out = tmp_path_factory.mktemp("smoke_all")
    res = train.main([*SMOKE, "--out", str(out), "--jobs", "1"])
    return out, res


def test_smoke_writes_spec_outputs(smoke_all):
    out, res = smoke_all
    with open(out / "results.json") as f:
        r = json.load(f)
    p = r["params"]
    assert {"total", "v_projection", "phase2_trainable", "phase2_frozen"} <= set(p)
    assert p["phase2_trainable"] + p["phase2_frozen"] == p["total"]
    assert p["phase2_frozen"] == p["v_projection"] == 2 * (32 * 20 + 20 + 20 * 32 + 32)
    assert r["kv_cache_reduction"] == pytest.approx(0.1875)
    assert set(r["runs"]) == {"baseline", "e2e", "two_phase", "two_phase_kv"}
    buckets = ["0-16", "16-32", "32-64", "64-96", "96-128"]
    for name, run in r["runs"].items():
        assert list(run["position_ppl"]) == buckets
        assert all(math.isfinite(v) and v > 1 for v in run["position_ppl"].values())
        assert run["best_epoch"] >= 1 and math.isfinite(run["best_val_ppl"])
        log = run["phase2"] if RUNS[name].two_phase else run["epochs"]
        assert [e["epoch"] for e in log] == list(range(1, len(log) + 1))
        assert min(e["val_ppl"] for e in log) == pytest.approx(run["best_val_ppl"])
        assert all({"train_loss", "train_ppl", "val_loss", "val_ppl"} <= set(e) for e in log)
        if name != "baseline":
            assert all("recon" in e for e in log)
    tp = r["runs"]["two_phase"]
    assert tp["phase1"] and all({"train_recon", "val_recon"} <= set(e) for e in tp["phase1"])
    assert tp["trainable_params"] == p["phase2_trainable"]
    assert r["runs"]["e2e"]["trainable_params"] == p["total"]
    # phase 2 froze the projections: its recon moves only through V itself; phase 1 improved it
    assert tp["phase1_best_val_recon"] < tp["phase1_initial_val_recon"]
    report = (out / "report.md").read_text()
    for heading in ("## Parameters", "## Results", "## Position-wise", "## Phase 1"):
        assert heading in report
    for png in ("curves.png", "position_ppl.png", "reconstruction.png"):
        assert (out / png).stat().st_size > 1000
    for run in ("baseline", "e2e", "two_phase", "two_phase_kv"):
        assert (out / "checkpoints" / f"{run}.pt").exists()


def test_parallel_jobs_and_reruns_give_identical_numbers(smoke_all, tmp_path):
    """Same seed -> same numbers, whether the runs go one after another in this process or
    at once in separate processes."""
    _, res = smoke_all
    proc = run_cli([*SMOKE, "--out", str(tmp_path), "--jobs", "3", "--no-plots"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(tmp_path / "results.json") as f:
        par = json.load(f)
    for name in ("baseline", "e2e", "two_phase", "two_phase_kv"):
        assert numbers(par["runs"][name]) == numbers(res["runs"][name]), name


def test_kill_mid_epoch_then_resume_matches(smoke_all, tmp_path):
    _, res = smoke_all
    # smoke: 32 samples / batch 8 = 4 steps per epoch, 2 phase-1 epochs; step 11 is in the
    # middle of phase 2's first epoch. Checkpoint every step so that the kill lands between.
    args = [*SMOKE, "--out", str(tmp_path), "--mode", "two_phase", "--save-every-steps", "1"]
    proc = run_cli([*args, "--debug-kill-at-step", "11"])
    assert proc.returncode == -9, (proc.returncode, proc.stderr[-2000:])
    ckpt = torch.load(tmp_path / "checkpoints" / "two_phase.pt", weights_only=True)
    state = ckpt["state"]
    assert state["stage"] == "phase2" and not state["done"]
    assert state["stages"]["phase2"]["step"] == 2 and state["stages"]["phase2"]["epoch"] == 1
    resumed = train.main([*args, "--resume"])
    assert numbers(resumed["runs"]["two_phase"]) == numbers(res["runs"]["two_phase"])
    # a finished run is not redone
    again = train.main([*args, "--resume", "--no-plots"])
    assert numbers(again["runs"]["two_phase"]) == numbers(res["runs"]["two_phase"])


def test_corrupt_and_mismatched_checkpoints_are_refused(tmp_path):
    args = [*SMOKE, "--out", str(tmp_path), "--mode", "e2e", "--epochs", "1", "--no-plots"]
    train.main(args)
    path = tmp_path / "checkpoints" / "e2e.pt"
    with pytest.raises(CheckpointError, match="different configuration") as err:
        train.main([*args, "--resume", "--seed", "5"])
    assert "seed: checkpoint has 0, this run has 5" in str(err.value)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        train.main([*args, "--resume"])
    path.write_bytes(b"not a checkpoint at all")
    proc = run_cli([*args, "--resume"])
    assert proc.returncode == 2 and "corrupt or truncated" in proc.stderr
    assert "Traceback" not in proc.stderr


def single_and_two_process_runs(tmp_path, mode):
    """Run `mode` for one epoch in this process and under torchrun with two processes; the
    two results.json files."""
    common = [*SMOKE, "--mode", mode, "--epochs", "1", "--no-plots"]
    single = train.main([*common, "--out", str(tmp_path / "one")])
    env = repo_env(OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         "-m", "vdproj_ext.train", *common, "--out", str(tmp_path / "two")],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(tmp_path / "two" / "results.json") as f:
        return single, json.load(f)


def test_two_process_ddp_matches_single_process(tmp_path):
    one, r = single_and_two_process_runs(tmp_path, "e2e")
    single = one["runs"]["e2e"]
    assert r["world_size"] == 2
    two = r["runs"]["e2e"]
    a, b = single["epochs"][0], two["epochs"][0]
    for key in ("train_loss", "val_loss", "recon"):
        assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-7), key
    assert two["position_ppl"] == pytest.approx(single["position_ppl"], rel=1e-5)


def test_two_process_ddp_trains_latent_keys_whole(tmp_path):
    """e2e_kv under DDP: k_restore's bias never gets a gradient from the cross-entropy (it
    cancels in the softmax), which DDP must be told about."""
    one, r = single_and_two_process_runs(tmp_path, "e2e_kv")
    a, b = one["runs"]["e2e_kv"]["epochs"][0], r["runs"]["e2e_kv"]["epochs"][0]
    for key in ("train_loss", "val_loss", "recon", "recon_k", "recon_v"):
        assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-7), key


def test_data_splits_and_batches():
    text = "a\n" * 50 + "<<notice\nblock>>" + "b\n" * 50
    assert "notice" not in strip_notices(text)
    tr, va = split_text("line1\nline2\nline3\nline4\n", 0.3)
    assert tr + va == "line1\nline2\nline3\nline4\n" and tr.endswith("\n") and va
    data = torch.arange(40 * 4).view(40, 4)
    assert torch.equal(epoch_order(40, 1, 2), epoch_order(40, 1, 2))
    assert not torch.equal(epoch_order(40, 1, 2), epoch_order(40, 1, 3))
    whole = list(train_batches(data, seed=0, epoch=1, global_batch=8, rank=0, world=1))
    halves = [list(train_batches(data, seed=0, epoch=1, global_batch=8, rank=r, world=2))
              for r in range(2)]
    assert len(whole) == 5
    for i, batch in enumerate(whole):
        assert torch.equal(torch.cat((halves[0][i], halves[1][i])), batch)
    tail = list(train_batches(data, seed=0, epoch=1, global_batch=8, rank=0, world=1,
                              start_step=3))
    assert all(torch.equal(x, y) for x, y in zip(tail, whole[3:]))


def test_embedded_data_has_no_overlap():
    d = build_dataset(seq_len=128, n_train=64, n_val=8, val_frac=0.1, tokenizer="bytes",
                      vocab_size=256)
    assert d.train.shape == (64, 128) and d.val.shape == (8, 128)
    train_rows = {tuple(r.tolist()) for r in d.train}
    assert not any(tuple(r.tolist()) in train_rows for r in d.val)
    assert d.info["train_tokens_tokenized"] >= 64 * 128


def test_phase1_pca_reaches_the_reported_optimum(smoke_all, tmp_path):
    _, res = smoke_all
    out = train.main([*SMOKE, "--out", str(tmp_path), "--mode", "two_phase", "--phase1", "pca",
                      "--epochs", "1", "--no-plots"])
    run = out["runs"]["two_phase"]
    assert run["phase1_method"] == "pca" and run["phase1"][0]["method"] == "pca"
    assert all(0 < k <= 1 for k in run["phase1"][0]["variance_kept"])
    sgd = res["runs"]["two_phase"]
    # the same model at the start of phase 1, so the same closed-form optimum
    assert run["phase1_best_val_recon"] == pytest.approx(sgd["phase1_pca_reference_val_recon"],
                                                         rel=1e-4)
    assert run["phase1_best_val_recon"] <= sgd["phase1_best_val_recon"] * 1.001


def test_report_merge_and_rerender(smoke_all, tmp_path):
    from vdproj_ext.experiment import report
    out, _ = smoke_all
    merged = report.merge([str(out), str(out)], str(tmp_path))
    assert set(merged["runs"]) == {"baseline", "e2e", "two_phase", "two_phase_kv"}
    text = (tmp_path / "report.md").read_text()
    assert "Reference finding" in text and "| Baseline (no compression) |" in text


def test_init_from_gpt_neox_checkpoint(tmp_path):
    """--init-from starts from pretrained GPT-NeoX weights: the baseline's initial validation
    loss is the checkpoint's own loss on the validation split."""
    transformers = pytest.importorskip("transformers")
    cfg = transformers.GPTNeoXConfig(vocab_size=256, hidden_size=32, num_hidden_layers=2,
                                     num_attention_heads=2, intermediate_size=64,
                                     rotary_pct=0.5, max_position_embeddings=256,
                                     tie_word_embeddings=False, hidden_act="gelu")
    torch.manual_seed(0)
    hf = transformers.GPTNeoXForCausalLM(cfg).eval()
    hf.save_pretrained(tmp_path / "neox")
    out = train.main([*SMOKE, "--out", str(tmp_path / "run"), "--mode", "baseline",
                      "--epochs", "1", "--no-plots", "--init-from", str(tmp_path / "neox")])
    val = build_dataset(seq_len=128, n_train=32, n_val=16, val_frac=0.1, tokenizer="bytes",
                        vocab_size=256).val
    with torch.no_grad():
        ref = hf(val, labels=val).loss.item()
    assert out["runs"]["baseline"]["initial_val"]["loss"] == pytest.approx(ref, rel=1e-4)
    assert out["config"]["hidden_size"] == 32 and out["init_from"]


# ---------------------------------------------------------------------------------------------
# Latent keys (SPEC section 5: the two_phase_kv and e2e_kv runs)

# smoke: H = 2 heads of D = 16, rotary on 8 of them, Rk = 0.375 * 32 = 12, Rv = 20: a token
# caches 2*8 + 12 + 20 = 48 values per layer instead of 64. (At the main job's and the
# reference's rotary 25%, it is 37.5%: test_latent_key_runs_cut_the_cache_by_37_5_percent.)
SMOKE_KV_REDUCTION = 1 - (2 * 8 + 12 + 20) / 64
PAIRS = (".k_compress.", ".k_restore.", ".v_compress.", ".v_restore.")


def pair_weights(state_dict):
    return {k: v for k, v in state_dict.items() if any(p in k for p in PAIRS)}


@pytest.mark.parametrize("preset", ["cpu-small", "pythia-70m"])
def test_latent_key_runs_cut_the_cache_by_37_5_percent(preset):
    base = VDProjConfig.preset(preset)
    cfg = latent_key_config(base)
    hd = base.hidden_size
    assert (cfg.k_rank, cfg.v_rank) == (0.375 * hd, 0.625 * hd)
    assert cfg.kv_cache_reduction == 0.375 and base.kv_cache_reduction == 0.1875
    assert latent_key_config(base, k_rank=16).k_rank == 16
    assert latent_key_config(VDProjConfig.preset(f"{preset}-kv")) == cfg


def test_two_phase_kv_logs_key_and_value_reconstruction(smoke_all):
    _, res = smoke_all
    runs = res["runs"]
    run = runs["two_phase_kv"]
    assert run["kv_cache_reduction"] == pytest.approx(SMOKE_KV_REDUCTION)
    assert (run["k_rank"], run["v_rank"], run["rotary_dims"]) == (12, 20, 8)
    for name in ("e2e", "two_phase"):  # each run its own; the top level is the V-only one
        assert runs[name]["kv_cache_reduction"] == pytest.approx(0.1875)
    assert runs["baseline"]["kv_cache_reduction"] == 0.0
    assert res["kv_cache_reduction"] == pytest.approx(0.1875)
    for e in run["phase1"]:
        assert {"train_recon", "val_recon", "train_recon_k", "train_recon_v", "val_recon_k",
                "val_recon_v"} <= set(e)
        # the objective is the mean of the two pairs' losses
        assert e["val_recon"] == pytest.approx((e["val_recon_k"] + e["val_recon_v"]) / 2,
                                               rel=1e-5)
    assert all({"recon", "recon_k", "recon_v"} <= set(e) for e in run["phase2"])
    assert run["phase1_best_val_recon_k"] < run["phase1_initial_val_recon_k"]
    assert run["phase1_best_val_recon_v"] < run["phase1_initial_val_recon_v"]
    assert {"final_val_recon_k", "final_val_recon_v"} <= set(run)
    assert "final_val_recon_k" not in runs["two_phase"]  # V-only runs log as before
    assert all("val_recon_k" not in e for e in runs["two_phase"]["phase1"])


def test_two_phase_kv_freezes_every_pair_and_resumes(smoke_all, tmp_path):
    """Killed inside phase 1 and again at phase 2's first step, resumed each time: the
    numbers of the uninterrupted run, and phase 2 leaves every pair as phase 1 left it."""
    _, res = smoke_all
    args = [*SMOKE, "--out", str(tmp_path), "--mode", "two_phase_kv", "--save-every-steps", "1",
            "--no-plots"]
    path = tmp_path / "checkpoints" / "two_phase_kv.pt"
    # smoke: 4 steps per epoch, 2 phase-1 epochs; step 3 is inside phase 1's first epoch
    proc = run_cli([*args, "--debug-kill-at-step", "3"])
    assert proc.returncode == -9, (proc.returncode, proc.stderr[-2000:])
    p1 = torch.load(path, weights_only=True)["state"]["stages"]["phase1"]
    assert (p1["epoch"], p1["step"]) == (1, 2) and p1["recon_k_sum"] > 0 < p1["recon_v_sum"]
    # resumed at step 3, it finishes phase 1 in 6 steps and dies at phase 2's first: the
    # checkpoint then holds the model phase 1 ended with
    proc = run_cli([*args, "--resume", "--debug-kill-at-step", "7"])
    assert proc.returncode == -9, (proc.returncode, proc.stderr[-2000:])
    ckpt = torch.load(path, weights_only=True)
    assert ckpt["state"]["stage"] == "phase2" and ckpt["state"]["stages"]["phase2"]["step"] == 0
    after_phase1 = pair_weights(ckpt["model"])
    assert len(after_phase1) == 2 * 4 * 2  # layers x pairs' modules x (weight, bias)
    resumed = train.main([*args, "--resume"])
    run = resumed["runs"]["two_phase_kv"]
    assert numbers(run) == numbers(res["runs"]["two_phase_kv"])
    final = torch.load(path, weights_only=True)["model"]
    for name, w in after_phase1.items():
        assert torch.equal(final[name], w), name
    assert not all(torch.equal(final[k], ckpt["model"][k]) for k in final if k not in after_phase1)
    frozen = sum(w.numel() for w in after_phase1.values())
    assert run["trainable_params"] == run["total_params"] - frozen


def test_mode_e2e_kv_trains_everything_with_latent_keys(tmp_path):
    out = train.main([*SMOKE, "--out", str(tmp_path), "--mode", "e2e_kv", "--epochs", "1",
                      "--no-plots"])
    assert set(out["runs"]) == {"e2e_kv"}
    run = out["runs"]["e2e_kv"]
    assert run["kv_cache_reduction"] == pytest.approx(SMOKE_KV_REDUCTION)
    assert out["kv_cache_reduction"] == pytest.approx(0.1875)
    assert run["trainable_params"] == run["total_params"] > out["params"]["total"]
    assert [e["epoch"] for e in run["epochs"]] == [1]
    assert all({"val_ppl", "recon", "recon_k", "recon_v"} <= set(e) for e in run["epochs"])
    assert math.isfinite(run["best_val_ppl"])
    report = (tmp_path / "report.md").read_text()
    assert "| V-DProj + latent keys end-to-end |" in report
    assert f"-{100 * SMOKE_KV_REDUCTION:.2f}%" in report


def test_every_cli_preset_trains_including_the_latent_key_ones(tmp_path):
    # The "-kv" model presets train on their base preset's data and settings; --preset
    # smoke-kv once failed with a KeyError before any run started.
    for preset in VDProjConfig.PRESETS:
        base = preset[:-3] if preset.endswith("-kv") else preset
        assert Settings.for_preset(preset) == Settings.for_preset(base)
    with pytest.raises(ValueError, match="preset"):
        Settings.for_preset("no-such-preset")
    for mode, reduction in (("two_phase", 0.1875), ("two_phase_kv", SMOKE_KV_REDUCTION)):
        out = train.main(["--preset", "smoke-kv", "--threads", "1", "--no-progress", "--out",
                          str(tmp_path / mode), "--mode", mode, "--epochs", "1",
                          "--phase1-epochs", "1", "--no-plots"])
        # The V-only run drops the preset's latent keys; the latent-key run keeps its k_rank.
        assert set(out["runs"]) == {mode}
        assert out["runs"][mode]["kv_cache_reduction"] == pytest.approx(reduction)
        assert math.isfinite(out["runs"][mode]["best_val_ppl"])


def test_phase1_pca_fits_the_keys_too(smoke_all, tmp_path):
    _, res = smoke_all
    out = train.main([*SMOKE, "--out", str(tmp_path), "--mode", "two_phase_kv", "--phase1",
                      "pca", "--epochs", "1", "--no-plots"])
    run, sgd = out["runs"]["two_phase_kv"], res["runs"]["two_phase_kv"]
    p1 = run["phase1"][0]
    assert run["phase1_method"] == "pca" and p1["method"] == "pca"
    assert len(p1["variance_kept_k"]) == len(p1["variance_kept"]) == 2
    assert all(0 < k <= 1 for k in p1["variance_kept"] + p1["variance_kept_k"])
    # the same model at the start of phase 1, so the same closed-form optimum
    assert run["phase1_best_val_recon"] == pytest.approx(sgd["phase1_pca_reference_val_recon"],
                                                         rel=1e-4)
    assert p1["val_recon_k"] <= sgd["phase1_best_val_recon_k"] * 1.001
    assert p1["val_recon_v"] <= sgd["phase1_best_val_recon_v"] * 1.001


def test_report_shows_the_latent_key_rows(smoke_all):
    out, _ = smoke_all
    report = (out / "report.md").read_text()
    assert "| V-DProj + latent keys two-phase |" in report
    assert "| V-DProj + latent keys | 48 (rotary K 16 + K_c 12 + V_c 20) | 25.00% |" in report
    assert "Val recon K / V" in report and "every compress/restore pair frozen" in report


def test_generate_from_the_latent_key_run(smoke_all, capsys):
    from vdproj_ext.cli.generate import main
    out, _ = smoke_all
    assert main(["--checkpoint", str(out), "--run", "two_phase_kv", "--prompt", "ROMEO:",
                 "--max-new-tokens", "5"]) == 0
    text = capsys.readouterr().out
    assert "(v_rank=20, k_rank=12)" in text
    assert f"{100 * SMOKE_KV_REDUCTION:.2f}% smaller" in text


def test_run_table_gives_the_modes_and_the_reference_ranking():
    assert runs_for("all", "sgd") == ["baseline", "e2e", "two_phase", "two_phase_kv"]
    assert runs_for("all", "both") == ["baseline", "e2e", "two_phase", "two_phase_kv",
                                       "two_phase_pca", "two_phase_kv_pca"]
    assert runs_for("two_phase", "both") == ["two_phase", "two_phase_pca"]
    assert runs_for("e2e", "both") == ["e2e"]
    assert runs_for("two_phase_kv", "both") == ["two_phase_kv", "two_phase_kv_pca"]
    assert runs_for("e2e_kv", "sgd") == ["e2e_kv"]
    assert REFERENCE_RANKING == ("two_phase", "e2e", "baseline")


def test_run_state_round_trips_and_reads_first_layout_files():
    state = RunState.new("two_phase", ("phase1", "phase2"))
    st = state.stages["phase1"]
    st.log.append(EpochLog(1, train_recon=0.5, val_recon=0.25, time_s=0.1))
    st.epoch, st.step, st.best, st.best_epoch = 2, 3, 0.25, 1
    saved = state.to_dict()
    assert saved["stages"]["phase1"]["log"] == [
        {"epoch": 1, "train_recon": 0.5, "val_recon": 0.25, "time_s": 0.1}]
    assert RunState.from_dict(saved) == state
    # files written before the typed state lack the optional fields
    del saved["result"]
    for stage in saved["stages"].values():
        for key in ("trainable", "initial", "best_state", "pca_reference_val_recon"):
            del stage[key]
    assert RunState.from_dict(saved) == state


# ---- command-line and bookkeeping defects found by the second audit (each failed before
# its fix)


def test_rank_overrides_are_taken_or_refused_never_dropped():
    """--k-rank 0 once fell back to the preset's k_rank, and joint_kv dropped a k_rank."""
    base = VDProjConfig.preset("smoke-kv")
    with pytest.raises(ValueError, match="k_rank must be a positive int"):
        latent_key_config(base, k_rank=0)
    with pytest.raises(ValueError, match="k_rank"):
        latent_key_config(base, k_rank=8, joint_kv=True)
    assert latent_key_config(base, joint_kv=True).joint_kv


@pytest.mark.parametrize("flags, message", [
    (["--k-rank", "0"], "--k-rank: expected a positive integer, got 0"),
    (["--k-rank", "-3"], "--k-rank: expected a positive integer, got -3"),
    (["--v-rank", "0"], "--v-rank: expected a positive integer, got 0"),
    # smoke: hidden 32 (2 heads of 16, rotary 8): keys have 2 * 8 = 16 non-rotary dims
    (["--v-rank", "100"], "v_rank=100 exceeds the 32 dims"),
    (["--k-rank", "40"], "k_rank=40 exceeds the 16 non-rotary key dims"),
    (["--seq-len", "512"], "--seq-len 512 exceeds"),
])
def test_bad_rank_flags_are_usage_errors(flags, message, tmp_path, capsys):
    """Exit 2 with argparse's usage line and the message, before any run starts; no
    traceback, and nothing written."""
    with pytest.raises(SystemExit) as exit_info:
        train.main([*SMOKE, "--out", str(tmp_path / "out"), "--mode", "two_phase_kv", *flags])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "usage: vdproj-train" in err and message in err, err
    assert not (tmp_path / "out").exists()


def test_ranks_above_the_dimension_they_compress_are_flagged():
    """A rank above the width it compresses caches more than the dims it replaces (v_rank:
    a kv_cache_reduction below 0): the config warns, the experiment refuses it
    (test_bad_rank_flags_are_usage_errors). Full rank is exact conversion, not flagged."""
    base = VDProjConfig.preset("smoke")  # hidden 32, Dn = 8 per head, 2 heads
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert base.replace(v_rank=32).kv_cache_reduction == 0.0
        assert base.replace(k_rank=16).kv_cache_reduction == pytest.approx(
            1 - (16 + 16 + 20) / 64)
        assert base.replace(v_rank=48, joint_kv=True).oversized_rank() is None
    for changes, message in ((dict(v_rank=33), "v_rank=33 exceeds the 32 dims"),
                             (dict(k_rank=17), "k_rank=17 exceeds the 16 non-rotary key dims"),
                             # the joint latent compresses [k_nope | v]: 16 + 32 dims
                             (dict(v_rank=49, joint_kv=True), "v_rank=49 exceeds the 48 dims")):
        with pytest.warns(UserWarning, match=message):
            cfg = base.replace(**changes)
        assert message in cfg.oversized_rank()
    with pytest.warns(UserWarning, match="v_rank=33"):
        assert base.replace(v_rank=33).kv_cache_reduction < 0


def test_phase1_both_labels_each_run_by_its_method_and_resumes_with_either(tmp_path):
    """--phase1 both: two_phase is the SGD run (labelled sgd, not both), so --phase1 sgd can
    resume its folder and --phase1 both can resume an --phase1 sgd folder."""
    args = [*SMOKE, "--out", str(tmp_path), "--mode", "two_phase", "--epochs", "1",
            "--phase1-epochs", "1", "--no-plots", "--no-pca-reference"]
    both = train.main([*args, "--phase1", "both"])
    assert both["runs"]["two_phase"]["phase1_method"] == "sgd"
    assert both["runs"]["two_phase_pca"]["phase1_method"] == "pca"
    assert both["phase1_method"] == "both"  # the job's choice, at the top level
    again = train.main([*args, "--phase1", "sgd", "--resume"])  # finished: reused
    assert numbers(again["runs"]["two_phase"]) == numbers(both["runs"]["two_phase"])
    again = train.main([*args, "--phase1", "both", "--resume"])
    assert numbers(again["runs"]["two_phase"]) == numbers(both["runs"]["two_phase"])
    # runs without a phase 1 do not care about the flag
    e2e = [*args[:-6], "--mode", "e2e", "--epochs", "1", "--no-plots"]
    first = train.main([*e2e, "--phase1", "pca"])
    assert numbers(train.main([*e2e, "--phase1", "sgd", "--resume"])["runs"]["e2e"]) == \
        numbers(first["runs"]["e2e"])


def test_a_killed_write_leaves_no_temporary_file_behind(tmp_path):
    """A kill during a checkpoint write leaves <run>.pt.tmp-<pid> (the checkpoint itself
    stays whole); the next write to that path removes it, unless its writer still lives."""
    from vdproj_ext.experiment.checkpoint import atomic_save_json
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    path = tmp_path / "e2e.pt"
    stale = tmp_path / f"e2e.pt.tmp-{dead.pid}"
    live = tmp_path / f"e2e.pt.tmp-{os.getppid()}"  # a running process's write in progress
    other = tmp_path / f"two_phase.pt.tmp-{dead.pid}"  # another file's: not this writer's
    for f in (stale, live, other):
        f.write_bytes(b"partial")
    atomic_save_json({"a": 1}, str(path))
    assert json.loads(path.read_text()) == {"a": 1}
    assert not stale.exists() and live.exists() and other.exists()


@pytest.mark.parametrize("flags, message", [
    (["--epochs", "0"], "--epochs: expected a positive integer, got 0"),
    (["--phase1-epochs", "0"], "--phase1-epochs: expected a positive integer"),
    (["--batch-size", "-4"], "--batch-size: expected a positive integer, got -4"),
    (["--seq-len", "1"], "--seq-len: expected an integer >= 2, got 1"),
    (["--n-train", "0"], "--n-train: expected a positive integer"),
    (["--n-val", "0"], "--n-val: expected a positive integer"),
    (["--eval-batch", "0"], "--eval-batch: expected a positive integer"),
    (["--patience", "0"], "--patience: expected a positive integer"),
    (["--threads", "-1"], "--threads: expected a positive integer"),
    (["--save-every-steps", "-1"], "--save-every-steps: expected a non-negative integer"),
    (["--save-every-s", "-5"], "--save-every-s: expected a finite number >= 0"),
    (["--lr", "-1"], "--lr: expected a finite number > 0, got -1"),
    (["--lr", "nan"], "--lr: expected a finite number > 0, got nan"),
    (["--val-frac", "2"], "--val-frac: expected a fraction strictly between 0 and 1"),
    (["--tokenizer", "bogus"], "--tokenizer: expected neox, bytes, bpe:N"),
    (["--tokenizer", "bpe:0"], "--tokenizer: expected a positive integer, got 0"),
    (["--device", "bogus"], "--device: invalid choice: 'bogus'"),
    (["--data-text", "/nonexistent.txt"], "--data-text: no such file or folder"),
    (["--data-npy", "/nonexistent.npy"], "--data-npy: no such file or folder"),
    (["--init-from", "/nonexistent"], "--init-from: no such file or folder"),
    (["--data-text", __file__, "--data-npy", __file__],
     "--data-text and --data-npy are alternatives"),
    (["--tokenizer", "neox", "--data-npy", __file__],
     "--tokenizer does not apply to pre-tokenized data (--data-npy)"),
])
def test_bad_values_are_usage_errors_before_anything_is_written(flags, message, tmp_path,
                                                                capsys):
    """Each of these once crashed with a traceback (ZeroDivisionError, TypeError, ...) after
    creating the output folder, or (--device, two data sources) was silently ignored."""
    with pytest.raises(SystemExit) as exit_info:
        train.main([*SMOKE, "--out", str(tmp_path / "out"), "--mode", "baseline", *flags])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "usage: vdproj-train" in err and message in err, err
    assert not (tmp_path / "out").exists()


def test_a_run_that_diverges_is_a_clear_error_also_on_resume(tmp_path, capsys):
    """NaN in every epoch's validation loss leaves no weights to keep: a clear error (exit
    1), logged as NaN perplexity, and the same error on --resume (once a TypeError)."""
    args = [*SMOKE, "--out", str(tmp_path), "--mode", "baseline", "--epochs", "2",
            "--lr", "1e30"]
    for extra in ([], ["--resume"]):
        with pytest.raises(TrainingDiverged, match="training diverged: no epoch gave a finite "
                                                   "validation loss"):
            train.main(args + extra)
    captured = capsys.readouterr()
    assert "val_ppl nan" in captured.out + captured.err


def test_ppl_of_a_nan_loss_is_nan():
    assert math.isnan(ppl(float("nan")))
    assert ppl(800.0) == float("inf") and ppl(0.0) == 1.0


def test_ctrl_c_is_a_message_not_a_traceback(tmp_path):
    """SIGINT (Ctrl-C) mid-training: exit 130 with a note on --resume, no KeyboardInterrupt
    traceback (the checkpoints keep the finished steps; resuming is tested above)."""
    import signal
    import time
    out = tmp_path / "out"
    proc = subprocess.Popen(
        [sys.executable, "-m", "vdproj_ext.train", *SMOKE, "--out", str(out), "--mode",
         "baseline", "--epochs", "100000", "--patience", "100000", "--no-plots",
         "--save-every-steps", "1"],
        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while not (out / "checkpoints" / "baseline.pt").exists():
            assert proc.poll() is None and time.time() < deadline, proc.stderr.read()
            time.sleep(0.1)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "rerun the same command with --resume" in err, err
