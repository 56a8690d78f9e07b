"""The study (vdproj-study) on the smoke preset: every planned run in study.json, intervals and
paired differences that follow from the listed per-seed values, the plots, resuming an
interrupted study, the budget check, the cpu-study design, and the Student-t quantiles."""
import json
import math
import os
import shutil
import subprocess
import sys

import pytest

from vdproj_ext.cli import study as study_cli
from vdproj_ext.experiment.study import (StudyError, data_path, design_for, estimate_wall_s,
                                         load_plan, pending_runs, plan_study, run_dir)
from vdproj_ext.experiment.study_report import check_intervals, check_study
from vdproj_ext.experiment.study_stats import (betainc, mean_interval, paired, pareto_front,
                                               t_cdf, t_quantile)
from vdproj_ext.models import VDProjConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMOKE = ["--preset", "smoke", "--jobs", "1", "--no-progress"]

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("study")
    study_cli.main([*SMOKE, "--out", str(out)])
    with open(out / "study.json") as f:
        return out, json.load(f)


def run_of(study, sweep, method, seed, **match):
    """The run of `sweep` with this method and seed (and fields)."""
    found = [r for rid, r in study["runs"].items() if rid in study["members"][sweep]
             and r["method"] == method and r["seed"] == seed
             and all(r[k] == v for k, v in match.items())]
    assert len(found) == 1, (sweep, method, seed, match, found)
    return found[0]


# ---------------------------------------------------------------------------------------------
# Student t, intervals


@pytest.mark.parametrize("p, df, expected", [
    (0.975, 1, 12.706204736), (0.975, 2, 4.302652730), (0.975, 4, 2.776445105),
    (0.975, 7, 2.364624252), (0.975, 29, 2.045229642), (0.95, 4, 2.131846786),
    (0.995, 10, 3.169272673), (0.025, 4, -2.776445105)])
def test_t_quantile_matches_tables(p, df, expected):
    assert t_quantile(p, df) == pytest.approx(expected, abs=1e-8)
    assert t_cdf(t_quantile(p, df), df) == pytest.approx(p, abs=1e-12)


def test_t_helpers_and_their_errors():
    assert t_cdf(0.0, 3) == 0.5
    assert betainc(2, 3, 0.4) == pytest.approx(0.5248, abs=1e-12)  # 1 - 0.6^4 - 4*0.4*0.6^3
    assert t_quantile(0.975, 1e5) == pytest.approx(1.959963985, abs=1e-4)
    for bad in (lambda: t_quantile(1.0, 4), lambda: t_quantile(0.9, 0),
                lambda: betainc(0, 1, 0.5), lambda: betainc(1, 1, 1.5), lambda: mean_interval([])):
        with pytest.raises(ValueError):
            bad()


def test_mean_interval_and_paired_by_hand():
    iv = mean_interval([1.0, 2.0, 3.0, 4.0, 5.0])
    half = 2.776445105 * math.sqrt(2.5) / math.sqrt(5)
    assert (iv["mean"], iv["lo"], iv["hi"]) == pytest.approx((3.0, 3.0 - half, 3.0 + half))
    one = mean_interval([7.0])
    assert one["mean"] == 7.0 and one["lo"] is None and one["half_width"] is None
    p = paired({0: 1.0, 1: 2.0, 2: 3.0, 5: 9.0}, {0: 2.0, 1: 2.5, 2: 3.7})
    assert p["seeds"] == [0, 1, 2] and p["values"] == pytest.approx([-1.0, -0.5, -0.7])
    assert p["a_lower"] == 3 and p["verdict"] == "a < b" and p["hi"] < 0
    assert paired({0: 1.0, 1: 3.0}, {0: 2.0, 1: 2.0})["verdict"] == "not distinguishable"
    assert paired({0: 5.0}, {0: 1.0})["verdict"] == "not distinguishable"  # one seed
    pts = [{"x": 1, "y": 5}, {"x": 2, "y": 6}, {"x": 3, "y": 2}, {"x": 4, "y": 3}]
    assert [q["x"] for q in pareto_front(pts, "x", "y")] == [1, 3]


# ---------------------------------------------------------------------------------------------
# The smoke study's outputs


def test_every_planned_run_is_in_study_json(smoke):
    out, study = smoke
    plan = load_plan(str(out))
    assert set(study["runs"]) == set(plan.runs) and not study["missing_runs"]
    assert set(study["members"]) == {"seeds", "ranks", "data"}
    assert len(study["members"]["seeds"]) == 2 * 4
    for r in study["runs"].values():
        assert math.isfinite(r["best_val_ppl"]) and r["best_val_ppl"] > 1
        assert os.path.exists(os.path.join(out, r["dir"], "results.json"))
    assert study["elapsed_s"] > 0 and study["sessions"][-1]["trained"]
    assert check_study(str(out)) == []


def test_intervals_follow_from_the_listed_per_seed_values(smoke):
    _, study = smoke
    for method, iv in study["seeds"]["methods"].items():
        assert iv["values"] == [run_of(study, "seeds", method, s)["best_val_ppl"]
                                for s in iv["seeds"]]
        n, vals = len(iv["values"]), iv["values"]
        mean = sum(vals) / n
        sd = math.sqrt(sum((v - mean) ** 2 for v in vals) / (n - 1))
        half = t_quantile(0.975, n - 1) * sd / math.sqrt(n)
        assert (iv["mean"], iv["lo"], iv["hi"]) == pytest.approx((mean, mean - half,
                                                                  mean + half), rel=1e-12)
    for point in study["ranks"]["points"]:
        assert point["values"] == [run_of(study, "ranks", point["method"], s,
                                          v_rank=point["v_rank"], k_rank=point["k_rank"],
                                          joint_kv=point["joint_kv"])["best_val_ppl"]
                                   for s in point["seeds"]]


def test_paired_differences_match_the_per_seed_values(smoke):
    _, study = smoke
    pairs = {(p["a"], p["b"]): p for p in study["seeds"]["paired"]}
    assert {("two_phase", "e2e"), ("e2e", "baseline"), ("two_phase_pca", "two_phase")} <= set(pairs)
    for (a, b), p in pairs.items():
        diffs = [run_of(study, "seeds", a, s)["best_val_ppl"]
                 - run_of(study, "seeds", b, s)["best_val_ppl"] for s in p["seeds"]]
        assert p["values"] == pytest.approx(diffs, rel=1e-12)
        assert p["mean"] == pytest.approx(sum(diffs) / len(diffs), rel=1e-12)
    for size in study["data"]["sizes"]:
        p = size["paired"]
        assert p["values"] == pytest.approx(
            [run_of(study, "data", "two_phase", s, n_train=size["n_train"])["best_val_ppl"]
             - run_of(study, "data", "e2e", s, n_train=size["n_train"])["best_val_ppl"]
             for s in p["seeds"]], rel=1e-12)
    bp = study["seeds"]["positions"]["paired"][0]
    wins = sum(all(run_of(study, "seeds", bp["a"], s)["position_ppl"][k]
                   < run_of(study, "seeds", bp["b"], s)["position_ppl"][k] for k in bp["buckets"])
               for s in bp["seeds"])
    assert bp["wins_every_bucket"] == wins


def test_conclusions_plots_and_markdown(smoke):
    out, study = smoke
    claims = {c["claim"]: c["verdict"] for c in study["conclusions"]}
    assert len(claims) == 6
    assert set(claims.values()) <= {"confirmed", "refuted", "not distinguishable", "mixed",
                                    "at some sizes only"}
    for name in ("pareto.png", "seeds.png", "positions.png", "data_size.png"):
        with open(out / name, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n", name
    md = (out / "study.md").read_text()
    for text in ("## Conclusions", "## Seed sweep", "## Rank sweep", "## Data-size sweep",
                 "95% CI", "pareto.png", "Command: `python -m vdproj_ext.study"):
        assert text in md
    kinds = {(p["k_rank"] is not None, p["joint_kv"]) for p in study["ranks"]["points"]}
    assert {(False, False), (True, False), (False, True)} <= kinds  # V-only, Rk, joint


def test_the_check_catches_numbers_that_do_not_follow(smoke, tmp_path):
    _, study = smoke
    bad = json.loads(json.dumps(study))
    bad["seeds"]["methods"]["e2e"]["values"][0] += 1.0
    bad["seeds"]["paired"][0]["a_values"][0] += 1.0
    problems = check_intervals(bad)
    assert any("seeds.methods.e2e" in p for p in problems)
    assert any("not a - b" in p for p in problems)


# ---------------------------------------------------------------------------------------------
# Resuming


def test_an_interrupted_study_trains_only_what_is_missing(smoke, tmp_path):
    src, before = smoke
    out = tmp_path / "resumed"
    shutil.copytree(src, out)
    plan = load_plan(str(out))
    gone, half = "e2e-v20-n32-s1", "two_phase-v8-n32-s0"
    shutil.rmtree(run_dir(str(out), gone))          # never ran
    shutil.rmtree(run_dir(str(out), half))          # killed within its second epoch
    run = plan.runs[half]
    killed = subprocess.run(
        [sys.executable, "-m", "vdproj_ext.train", "--preset", "smoke", "--mode", "two_phase",
         "--seed", str(run.seed), "--v-rank", str(run.v_rank), "--out", run_dir(str(out), half),
         "--data-pt", data_path(str(out), run.n_train), "--jobs", "1", "--threads", "1",
         "--no-progress", "--no-plots", "--debug-kill-at-step", "6"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
        env=dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")))
    assert killed.returncode != 0 and os.path.exists(
        os.path.join(run_dir(str(out), half), "checkpoints", "two_phase.pt"))
    assert sorted(pending_runs(plan, str(out))) == sorted([gone, half])
    untouched = {rid: os.path.getmtime(os.path.join(run_dir(str(out), rid), "results.json"))
                 for rid in plan.runs if rid not in (gone, half)}
    study_cli.main([*SMOKE, "--out", str(out)])
    with open(out / "study.json") as f:
        after = json.load(f)
    assert sorted(after["sessions"][-1]["trained"]) == sorted([gone, half])
    assert len(after["sessions"]) == len(before["sessions"]) + 1
    assert all(os.path.getmtime(os.path.join(run_dir(str(out), rid), "results.json")) == t
               for rid, t in untouched.items())
    with open(os.path.join(run_dir(str(out), half), "train.log")) as f:
        assert "resuming from" in f.read()
    for rid in (gone, half):  # deterministic: the same numbers as the uninterrupted study
        assert after["runs"][rid]["best_val_ppl"] == pytest.approx(
            before["runs"][rid]["best_val_ppl"], rel=1e-6)
    assert check_study(str(out)) == []


def test_a_run_folder_of_another_configuration_is_refused(smoke, tmp_path):
    src, _ = smoke
    out = tmp_path / "other"
    shutil.copytree(src, out)
    plan = load_plan(str(out))
    path = os.path.join(run_dir(str(out), next(iter(plan.runs))), "study_run.json")
    with open(path) as f:
        ident = json.load(f)
    ident["settings"]["lr"] = 0.5
    with open(path, "w") as f:
        json.dump(ident, f)
    with pytest.raises(StudyError, match="another run configuration"):
        pending_runs(plan, str(out))


# ---------------------------------------------------------------------------------------------
# The plan, the budget, the cpu-study design


def test_budget_refusal_trains_nothing(tmp_path, capsys):
    with pytest.raises(SystemExit, match="exceeds --budget-minutes"):
        study_cli.main([*SMOKE, "--out", str(tmp_path), "--budget-minutes", "0.001"])
    assert not (tmp_path / "runs").exists()
    with pytest.raises(SystemExit):
        study_cli.main([*SMOKE, "--out", str(tmp_path), "--sweeps", "seeds,bogus"])
    with pytest.raises(ValueError, match="no study design"):
        design_for("pythia-70m-kv")


def test_cpu_study_design_meets_the_issue():
    cfg = VDProjConfig.preset("cpu-study")
    plan = plan_study("cpu-study")
    runs = plan.runs.values()
    hd = cfg.hidden_size
    assert len({r.seed for r in runs if r.run_id in plan.members["seeds"]}) >= 5
    for m in ("e2e", "two_phase"):
        fracs = {r.v_rank / hd for r in runs if r.method == m and r.run_id in
                 plan.members["ranks"] and not r.k_rank and not r.joint_kv}
        assert len(fracs) >= 4 and min(fracs) == 0.25 and max(fracs) == 0.875
    assert any(r.k_rank for r in runs) and any(r.joint_kv for r in runs)
    sizes = {r.n_train for r in runs if r.run_id in plan.members["data"]}
    assert len(sizes) >= 3 and max(sizes) <= 12963  # the training split's 128-token samples
    per_token = cfg.uncompressed().param_counts()["total"] / (min(sizes) * 128)
    assert 50 < per_token < 62  # the reference: 72.4M over 1.28M tokens = 56.6
    assert estimate_wall_s(plan, list(plan.runs), jobs=2) / 60 <= 70


@pytest.mark.parametrize("flags, message", [
    (["--sweeps", "bogus"], "--sweeps: expected a comma-separated list"),
    (["--seeds", "0"], "--seeds: expected a positive integer"),
    (["--v-rank-fractions", "2"], "--v-rank-fractions: expected a fraction in (0, 1]"),
    (["--data-sizes", "0"], "--data-sizes: expected a positive integer"),
    (["--device", "bogus"], "--device: invalid choice"),
    (["--data-pt", "/nonexistent.pt"], "--data-pt: no such file or folder"),
    (["--jobs", "0"], "--jobs: expected a positive integer"),
    (["--sweeps", "data", "--data-sizes", "16,100000"], "fewer than the 100000 requested"),
])
def test_bad_values_are_usage_errors_before_anything_is_written(flags, message, tmp_path,
                                                                capsys):
    """Once exit 1 with a message or a traceback, some after study_plan.json and
    data/source.json were written (which then refused the corrected command)."""
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exit_info:
        study_cli.main([*SMOKE, "--out", str(out), *flags])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
    assert not out.exists() or not any(p.is_file() for p in out.rglob("*"))


def test_no_plots_is_not_reported_as_plots_written(tmp_path, capsys):
    study_cli.main([*SMOKE, "--out", str(tmp_path), "--sweeps", "seeds", "--seeds", "1",
                    "--no-plots"])
    out = capsys.readouterr().out
    assert "outputs complete" in out and "plots written" not in out
    assert not list(tmp_path.rglob("*.png"))
