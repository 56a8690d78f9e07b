"""The study's outputs: study.json (every run, the sweeps' statistics, the verdicts, the time
taken), study.md (the same as tables), PNG plots, and the check that they are complete and
that every interval follows from the per-seed values listed next to it.
"""
from __future__ import annotations

import json
import math
import os
from typing import Dict, List

from ..models import VDProjConfig
from .checkpoint import atomic_save_json
from .protocol import RUNS, Settings
from .study import KV_BYTES_PER_VALUE, Session, StudyPlan, finished_result, load_plan
from .study_analysis import (conclusions, data_analysis, ranks_analysis, run_summary,
                             seeds_analysis)
from .study_markdown import render_markdown
from .study_plots import write_plots
from .study_stats import mean_interval

STUDY_FORMAT = "vdproj-study-1"


def collect_runs(plan: StudyPlan, out: str) -> Dict[str, dict]:
    """The summaries of the plan's finished runs, by run id."""
    runs = {}
    for rid, run in plan.runs.items():
        results = finished_result(plan, run, out)
        if results is not None:
            runs[rid] = run_summary(plan, run, results)
    return runs


def build_study(plan: StudyPlan, out: str, command: str) -> dict:
    """study.json's content, timings aside."""
    runs = collect_runs(plan, out)
    cfg = VDProjConfig.preset(plan.preset)
    s = Settings.for_preset(plan.preset)
    tokens = s.n_train * s.seq_len
    study = {
        "format": STUDY_FORMAT, "preset": plan.preset, "command": command,
        "sweeps": list(plan.sweeps), "design": plan.to_dict()["design"],
        "protocol": s.protocol(), "settings": {k: getattr(s, k) for k in s.field_names()},
        "model": {"hidden_size": cfg.hidden_size, "num_layers": cfg.num_layers,
                  "num_heads": cfg.num_heads, "vocab_size": cfg.vocab_size,
                  "v_rank": cfg.v_rank, "params": cfg.param_counts()["total"],
                  "baseline_params": cfg.uncompressed().param_counts()["total"],
                  "params_per_train_token": cfg.param_counts()["total"] / tokens},
        "kv_bytes_per_value": KV_BYTES_PER_VALUE,
        "planned_runs": len(plan.runs), "missing_runs": sorted(set(plan.runs) - set(runs)),
        "members": plan.members, "runs": runs,
    }
    if "seeds" in plan.sweeps:
        study["seeds"] = seeds_analysis(plan, runs)
    if "ranks" in plan.sweeps:
        study["ranks"] = ranks_analysis(plan, runs, cfg.hidden_size, cfg.v_rank)
    if "data" in plan.sweeps:
        study["data"] = data_analysis(plan, runs)
    study["conclusions"] = conclusions(study)
    return study


def _previous_sessions(path: str) -> List[dict]:
    """The sessions recorded by an earlier invocation's study.json (a resumed study)."""
    if not os.path.exists(path):
        return []
    try:
        with open(path) as f:
            old = json.load(f)
    except (OSError, ValueError):
        return []
    return old.get("sessions", []) if old.get("format") == STUDY_FORMAT else []


def write_study(plan: StudyPlan, out: str, session: Session, command: str,
                plots: bool = True) -> dict:
    """study.json, study.md and (plots=True) the PNG plots, into OUT."""
    path = os.path.join(out, "study.json")
    sessions = _previous_sessions(path) + [session.to_dict()]
    study = build_study(plan, out, command)
    study["sessions"] = sessions
    study["elapsed_s"] = session.elapsed_s
    study["elapsed_s_total"] = round(math.fsum(s["elapsed_s"] for s in sessions), 1)
    study["run_seconds_total"] = round(math.fsum(r["wall_s"] or 0.0
                                                 for r in study["runs"].values()), 1)
    study["plots"] = write_plots(study, out) if plots else {}
    atomic_save_json(study, path)
    with open(os.path.join(out, "study.md"), "w") as f:
        f.write(render_markdown(study))
    return study


# ---------------------------------------------------------------------------------------------
# The completeness check (what an outside check of study.json verifies)


def _close(x, y) -> bool:
    if x is None or y is None:
        return x is y
    return math.isclose(x, y, rel_tol=1e-9, abs_tol=1e-9)


def _intervals(node, where="study"):
    """Every (path, dict) in study.json that holds an interval with its values."""
    if isinstance(node, dict):
        if "values" in node and "mean" in node and "lo" in node:
            yield where, node
        for k, v in node.items():
            yield from _intervals(v, f"{where}.{k}")
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _intervals(v, f"{where}[{i}]")


def check_intervals(study: dict) -> List[str]:
    """Problems with the intervals: each recomputed from its listed values, and each paired
    difference equal to a's value minus b's."""
    problems = []
    for where, node in _intervals(study):
        again = mean_interval(node["values"], node["level"])
        if not all(_close(node[k], again[k]) for k in ("mean", "sd", "lo", "hi")):
            problems.append(f"{where}: interval does not follow from its values")
        if "a_values" in node and any(
                not _close(d, a - b) for d, a, b in zip(node["values"], node["a_values"],
                                                        node["b_values"])):
            problems.append(f"{where}: differences are not a - b")
    return problems


def check_paired_values(study: dict) -> List[str]:
    """The seed sweep's paired values are the listed runs' best val perplexities."""
    problems, runs = [], study["runs"]
    ids = study.get("members", {}).get("seeds", [])
    for p in study.get("seeds", {}).get("paired", []):
        for side in ("a", "b"):
            for seed, value in zip(p["seeds"], p[f"{side}_values"]):
                match = [runs[i]["best_val_ppl"] for i in ids if i in runs
                         and runs[i]["method"] == p[side] and runs[i]["seed"] == seed]
                if len(match) != 1 or not _close(match[0], value):
                    problems.append(f"seeds.paired {p['a']}-{p['b']}: {p[side]} seed {seed} "
                                    f"is not that run's best_val_ppl")
    return problems


def check_study(out: str) -> List[str]:
    """Everything wrong with the study in OUT (empty: complete and consistent)."""
    with open(os.path.join(out, "study.json")) as f:
        study = json.load(f)
    plan = load_plan(out)
    problems = [f"planned run {rid} missing from study.json" for rid in plan.runs
                if rid not in study["runs"]]
    problems += check_intervals(study) + check_paired_values(study)
    for sweep in plan.sweeps:
        name = study.get("plots", {}).get(sweep)
        if not name or not os.path.exists(os.path.join(out, name)):
            problems.append(f"plot of the {sweep} sweep missing")
    if not os.path.exists(os.path.join(out, "study.md")):
        problems.append("study.md missing")
    if any(RUNS.get(r["method"]) is None for r in study["runs"].values()):
        problems.append("a run of an unknown method")
    return problems
