"""The training experiment on the smoke preset: outputs, determinism, resume, DDP."""
import json
import math
import os
import subprocess
import sys

import pytest
import torch

from vdproj_ext.cli import train
from vdproj_ext.experiment.checkpoint import CheckpointError, EpochLog, RunState
from vdproj_ext.experiment.data import (build_dataset, epoch_order, split_text, strip_notices,
                                        train_batches)
from vdproj_ext.experiment.protocol import REFERENCE_RANKING, runs_for

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
    assert set(r["runs"]) == {"baseline", "e2e", "two_phase"}
    buckets = ["0-16", "16-32", "32-64", "64-96", "96-128"]
    for name, run in r["runs"].items():
        assert list(run["position_ppl"]) == buckets
        assert all(math.isfinite(v) and v > 1 for v in run["position_ppl"].values())
        assert run["best_epoch"] >= 1 and math.isfinite(run["best_val_ppl"])
        log = run["phase2"] if name == "two_phase" else run["epochs"]
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
    for run in ("baseline", "e2e", "two_phase"):
        assert (out / "checkpoints" / f"{run}.pt").exists()


def test_parallel_jobs_and_reruns_give_identical_numbers(smoke_all, tmp_path):
    """Same seed -> same numbers, whether the runs go one after another in this process or
    at once in separate processes."""
    _, res = smoke_all
    proc = run_cli([*SMOKE, "--out", str(tmp_path), "--jobs", "3", "--no-plots"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(tmp_path / "results.json") as f:
        par = json.load(f)
    for name in ("baseline", "e2e", "two_phase"):
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


def test_two_process_ddp_matches_single_process(tmp_path):
    common = [*SMOKE, "--mode", "e2e", "--epochs", "1", "--no-plots"]
    single = train.main([*common, "--out", str(tmp_path / "one")])["runs"]["e2e"]
    env = repo_env(OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         "-m", "vdproj_ext.train", *common, "--out", str(tmp_path / "two")],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(tmp_path / "two" / "results.json") as f:
        r = json.load(f)
    assert r["world_size"] == 2
    two = r["runs"]["e2e"]
    a, b = single["epochs"][0], two["epochs"][0]
    for key in ("train_loss", "val_loss", "recon"):
        assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-7), key
    assert two["position_ppl"] == pytest.approx(single["position_ppl"], rel=1e-5)


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
    assert set(merged["runs"]) == {"baseline", "e2e", "two_phase"}
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


def test_run_table_gives_the_modes_and_the_reference_ranking():
    assert runs_for("all", "sgd") == ["baseline", "e2e", "two_phase"]
    assert runs_for("all", "both") == ["baseline", "e2e", "two_phase", "two_phase_pca"]
    assert runs_for("two_phase", "both") == ["two_phase", "two_phase_pca"]
    assert runs_for("e2e", "both") == ["e2e"]
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
