"""The study's numbers: each run's summary, the three sweeps' statistics, and a verdict on each
of the reference's claims. Every interval in the output carries the per-seed values it was
computed from ("values"), so study.json can be checked by recomputing it.

Verdicts come from 95% t-intervals of paired differences (same seed: same initialisation and
data order): "confirmed" when the interval lies entirely on the claim's side of 0, "refuted"
when entirely on the other side, "not distinguishable" when it holds 0.
"""
from __future__ import annotations

import math
from typing import Dict, List, Optional, Tuple

from .protocol import RUNS
from .study import (LATENT_METHODS, SEED_METHODS, SWEEP_METHODS, StudyPlan, StudyRun,
                    kv_bytes_per_token, run_config)
from .study_stats import mean_interval, paired, pareto_front

# The seed sweep's paired comparisons, a - b (the reference's claims first).
SEED_PAIRS = (("two_phase", "e2e"), ("e2e", "baseline"), ("two_phase", "baseline"),
              ("two_phase_pca", "two_phase"), ("two_phase_pca", "e2e"))
# The rank sweep compares each two-phase point with the end-to-end run of the same cache.
TWO_PHASE_VS = {"two_phase": "e2e", LATENT_METHODS["two_phase"]: LATENT_METHODS["e2e"]}
CLAIM_VERDICT = {"a < b": "confirmed", "a > b": "refuted",
                 "not distinguishable": "not distinguishable"}


def run_summary(plan: StudyPlan, run: StudyRun, results: dict) -> dict:
    """A finished run's study.json entry."""
    r = results["runs"][run.method]
    log = r["phase2"] if RUNS[run.method].two_phase else r["epochs"]
    best = next((e for e in log if e["epoch"] == r["best_epoch"]), {})
    tokens = results["data"]["train_samples"] * results["data"]["seq_len"]
    cfg = run_config(plan, run)
    out = dict(run.to_dict(), best_val_ppl=r["best_val_ppl"], best_epoch=r["best_epoch"],
               epochs_run=r["epochs_run"], stopped_early=r["stopped_early"],
               train_ppl_at_best=best.get("train_ppl"), position_ppl=r["position_ppl"],
               kv_cache_reduction=r["kv_cache_reduction"],
               kv_bytes_per_token=kv_bytes_per_token(cfg), total_params=r["total_params"],
               params_per_token=r["total_params"] / tokens, wall_s=r.get("wall_s"),
               dir=f"runs/{run.run_id}")
    if "phase1_best_val_recon" in r:
        out["phase1_best_val_recon"] = r["phase1_best_val_recon"]
    return out


def _by_seed(runs: Dict[str, dict], ids: List[str], method: str, key="best_val_ppl",
             **match) -> Dict[int, float]:
    """{seed: value} of the runs among ids with this method (and these fields)."""
    out = {}
    for rid in ids:
        r = runs.get(rid)
        if r and r["method"] == method and all(r[k] == v for k, v in match.items()):
            out[r["seed"]] = r[key] if not callable(key) else key(r)
    return out


def _interval(by_seed: Dict[int, float]) -> dict:
    seeds = sorted(by_seed)
    return dict(seeds=seeds, **mean_interval([by_seed[s] for s in seeds]))


def _mean(values) -> Optional[float]:
    values = [v for v in values if v is not None]
    return math.fsum(values) / len(values) if values else None


# ---------------------------------------------------------------------------------------------
# The seed sweep


def seeds_analysis(plan: StudyPlan, runs: Dict[str, dict]) -> dict:
    ids = plan.members["seeds"]
    methods, pos = {}, {}
    for m in SEED_METHODS:
        by_seed = _by_seed(runs, ids, m)
        if not by_seed:
            continue
        mine = [runs[i] for i in ids if i in runs and runs[i]["method"] == m]
        methods[m] = dict(_interval(by_seed), label=RUNS[m].label,
                          best_epoch=_mean(r["best_epoch"] for r in mine),
                          train_ppl_at_best=_mean(r["train_ppl_at_best"] for r in mine),
                          overfit_ratio=_mean(r["best_val_ppl"] / r["train_ppl_at_best"]
                                              for r in mine if r["train_ppl_at_best"]),
                          stopped_early=sum(bool(r["stopped_early"]) for r in mine),
                          params_per_token=_mean(r["params_per_token"] for r in mine))
        pos[m] = {b: _interval(_by_seed(runs, ids, m, key=lambda r, b=b: r["position_ppl"][b]))
                  for b in _buckets(runs, ids)}
    pairs = [dict(a=a, b=b, **paired(_by_seed(runs, ids, a), _by_seed(runs, ids, b)))
             for a, b in SEED_PAIRS if a in methods and b in methods]
    bucket_pairs = [_bucket_pair(runs, ids, a, b) for a, b in SEED_PAIRS[:3]
                    if a in methods and b in methods]
    return {"methods": methods, "paired": pairs,
            "positions": {"buckets": _buckets(runs, ids), "methods": pos,
                          "paired": bucket_pairs}}


def _buckets(runs, ids) -> List[str]:
    first = next((runs[i] for i in ids if i in runs), None)
    return list(first["position_ppl"]) if first else []


def _bucket_pair(runs, ids, a: str, b: str) -> dict:
    """a - b in every position bucket, and the seeds where a is lower in all of them."""
    buckets = _buckets(runs, ids)
    per = {bk: dict(a=a, b=b, **paired(
        _by_seed(runs, ids, a, key=lambda r, bk=bk: r["position_ppl"][bk]),
        _by_seed(runs, ids, b, key=lambda r, bk=bk: r["position_ppl"][bk]))) for bk in buckets}
    seeds = per[buckets[0]]["seeds"] if buckets else []
    every = [s for s in seeds
             if all(per[bk]["values"][per[bk]["seeds"].index(s)] < 0 for bk in buckets)]
    verdicts = {p["verdict"] for p in per.values()}
    overall = ("a < b" if verdicts == {"a < b"} else
               "a > b" if "a > b" in verdicts else "not distinguishable")
    return {"a": a, "b": b, "buckets": per, "seeds": seeds, "wins_every_bucket": len(every),
            "seeds_winning_every_bucket": every, "verdict": overall}


# ---------------------------------------------------------------------------------------------
# The rank sweep


def _point_key(r: dict) -> Tuple:
    return (r["method"], r["v_rank"], r["k_rank"], r["joint_kv"])


def _point_label(r: dict, hd: int) -> str:
    if r["v_rank"] is None:
        return "baseline (full cache)"
    label = f"{r['method']} Rv={r['v_rank']} ({r['v_rank'] / hd:.3g} H*D)"
    if r["k_rank"]:
        label += f", Rk={r['k_rank']}"
    return label + (", joint latent" if r["joint_kv"] else "")


def ranks_analysis(plan: StudyPlan, runs: Dict[str, dict], hd: int, default_rank: int) -> dict:
    ids = [i for i in plan.members["ranks"] if i in runs]
    groups: Dict[Tuple, List[dict]] = {}
    for i in ids:
        groups.setdefault(_point_key(runs[i]), []).append(runs[i])
    points = []
    for key, rs in groups.items():
        first = rs[0]
        points.append(dict(method=first["method"], v_rank=first["v_rank"],
                           k_rank=first["k_rank"], joint_kv=first["joint_kv"],
                           label=_point_label(first, hd),
                           v_rank_fraction=None if first["v_rank"] is None
                           else first["v_rank"] / hd,
                           kv_bytes_per_token=first["kv_bytes_per_token"],
                           kv_cache_reduction=first["kv_cache_reduction"],
                           **_interval({r["seed"]: r["best_val_ppl"] for r in rs})))
    points.sort(key=lambda p: (p["method"], -p["kv_bytes_per_token"]))
    front = pareto_front(points, "kv_bytes_per_token", "mean")
    pairs = []
    for p in points:
        other = TWO_PHASE_VS.get(p["method"])
        match = dict(v_rank=p["v_rank"], k_rank=p["k_rank"], joint_kv=p["joint_kv"])
        b = _by_seed(runs, ids, other, **match) if other else {}
        if b:
            pairs.append(dict(a=p["method"], b=other, **match, label=p["label"],
                              kv_bytes_per_token=p["kv_bytes_per_token"],
                              **paired(_by_seed(runs, ids, p["method"], **match), b)))
    return {"points": points, "pareto": [p["label"] for p in front], "paired": pairs,
            "reference_rank": _reference_rank(runs, ids, default_rank)}


def _reference_rank(runs, ids, rank: int) -> dict:
    """Two-phase at the reference's rank against the next lower and higher V-only ranks."""
    ranks = sorted({runs[i]["v_rank"] for i in ids if runs[i]["method"] == "two_phase"
                    and not runs[i]["k_rank"] and not runs[i]["joint_kv"]})
    out = {"v_rank": rank, "ranks": ranks}
    if rank not in ranks:
        return out
    at = _by_seed(runs, ids, "two_phase", v_rank=rank, k_rank=None, joint_kv=False)
    for side, j in (("lower", ranks.index(rank) - 1), ("higher", ranks.index(rank) + 1)):
        if 0 <= j < len(ranks):
            other = _by_seed(runs, ids, "two_phase", v_rank=ranks[j], k_rank=None,
                             joint_kv=False)
            out[side] = dict(a=f"two_phase Rv={ranks[j]}", b=f"two_phase Rv={rank}",
                             v_rank=ranks[j], **paired(other, at))
    return out


# ---------------------------------------------------------------------------------------------
# The data sweep


def data_analysis(plan: StudyPlan, runs: Dict[str, dict]) -> dict:
    ids = [i for i in plan.members["data"] if i in runs]
    sizes = []
    for n in sorted({runs[i]["n_train"] for i in ids}):
        methods = {}
        for m in SWEEP_METHODS:
            by_seed = _by_seed(runs, ids, m, n_train=n)
            if by_seed:
                mine = [runs[i] for i in ids if runs[i]["method"] == m
                        and runs[i]["n_train"] == n]
                methods[m] = dict(_interval(by_seed),
                                  best_epoch=_mean(r["best_epoch"] for r in mine),
                                  train_ppl_at_best=_mean(r["train_ppl_at_best"] for r in mine))
        entry = {"n_train": n, "methods": methods,
                 "params_per_token": _mean(runs[i]["params_per_token"] for i in ids
                                           if runs[i]["n_train"] == n)}
        if len(methods) == 2:
            entry["paired"] = dict(a="two_phase", b="e2e", **paired(
                _by_seed(runs, ids, "two_phase", n_train=n), _by_seed(runs, ids, "e2e",
                                                                       n_train=n)))
        sizes.append(entry)
    if len(sizes) >= 2 and all("paired" in s for s in (sizes[0], sizes[-1])):
        # the change of the advantage from the smallest to the largest size, seed by seed
        def advantage(entry):
            return dict(zip(entry["paired"]["seeds"], entry["paired"]["values"]))
        change = dict(a=f"advantage at n={sizes[-1]['n_train']}",
                      b=f"advantage at n={sizes[0]['n_train']}",
                      **paired(advantage(sizes[-1]), advantage(sizes[0])))
        return {"sizes": sizes, "advantage_change": change}
    return {"sizes": sizes}


# ---------------------------------------------------------------------------------------------
# The verdicts


def pair_text(p: dict) -> str:
    """'a - b = ... (95% CI ...)' for a paired comparison of best val perplexities."""
    if p.get("lo") is None:
        return f"{p['a']} - {p['b']} = {p['mean']:+.2f} ppl (one seed: no interval)"
    rel = p["relative_percent"]
    return (f"{p['a']} - {p['b']} = {p['mean']:+.2f} ppl (95% CI {p['lo']:+.2f} to "
            f"{p['hi']:+.2f}; {rel['mean']:+.2f}%, CI {rel['lo']:+.2f}% to {rel['hi']:+.2f}%), "
            f"{p['a']} lower in {p['a_lower']} of {p['n']} seeds")


def _find(pairs, a, b) -> Optional[dict]:
    return next((p for p in pairs if p["a"] == a and p["b"] == b), None)


def conclusions(study: dict) -> List[dict]:
    """One entry per claim of the reference and per question of the study: claim, verdict,
    evidence (the numbers it rests on)."""
    out = []
    seeds = study.get("seeds")
    if seeds:
        for a, b, claim in (("two_phase", "e2e", "two-phase training beats end-to-end"),
                            ("e2e", "baseline", "end-to-end beats the baseline")):
            p = _find(seeds["paired"], a, b)
            if p:
                out.append({"claim": claim, "verdict": CLAIM_VERDICT[p["verdict"]],
                            "evidence": pair_text(p)})
        for bp in seeds["positions"]["paired"]:
            if bp["a"] == "two_phase" and bp["b"] in ("e2e", "baseline"):
                out.append(_bucket_claim(bp))
    if study.get("ranks"):
        out.append(_rank_claim(study["ranks"]))
    if study.get("data"):
        out.append(_data_finding(study["data"]))
    return out


def _bucket_claim(bp: dict) -> dict:
    worst = max(bp["buckets"].items(), key=lambda kv: kv[1]["mean"])
    return {"claim": f"two-phase wins at every position bucket (against {bp['b']})",
            "verdict": CLAIM_VERDICT[bp["verdict"]],
            "evidence": f"two_phase lower than {bp['b']} at every bucket in "
                        f"{bp['wins_every_bucket']} of {len(bp['seeds'])} seeds; buckets whose "
                        f"interval lies below 0: "
                        f"{sum(p['verdict'] == 'a < b' for p in bp['buckets'].values())} of "
                        f"{len(bp['buckets'])}; weakest bucket {worst[0]}: "
                        + pair_text(worst[1])}


def _rank_claim(ranks: dict) -> dict:
    ref = ranks["reference_rank"]
    claim = f"rank {ref['v_rank']} (0.625 H*D, the reference's 320 of 512) is the point to use"
    lower, higher = ref.get("lower"), ref.get("higher")
    if lower is None:
        return {"claim": claim, "verdict": "not distinguishable",
                "evidence": "no lower rank in the sweep"}
    costs = lower["verdict"] == "a > b"      # a smaller cache costs perplexity
    if lower["verdict"] == "a < b":
        verdict = "refuted"                   # a smaller cache is better: the rank is dominated
    elif costs and (higher is None or higher["verdict"] != "a < b"):
        verdict = "confirmed"
    else:
        verdict = "not distinguishable"
    text = [pair_text(lower)] + ([] if higher is None else [pair_text(higher)])
    on_front = any(f"Rv={ref['v_rank']} " in lbl and lbl.startswith("two_phase ")
                   for lbl in ranks["pareto"])
    text.append(f"two_phase at rank {ref['v_rank']} is {'' if on_front else 'not '}on the "
                f"Pareto front of mean perplexity against cache bytes")
    return {"claim": claim, "verdict": verdict, "evidence": "; ".join(text)}


def _data_finding(data: dict) -> dict:
    parts = [f"n={s['n_train']} ({s['params_per_token']:.1f} params/token): "
             + pair_text(s["paired"]) + f" [{s['paired']['verdict']}]"
             for s in data["sizes"] if "paired" in s]
    change = data.get("advantage_change")
    if change is not None:
        parts.append(f"change of two_phase - e2e from the smallest to the largest size: "
                     f"{change['mean']:+.2f} ppl"
                     + ("" if change["lo"] is None else
                        f" (95% CI {change['lo']:+.2f} to {change['hi']:+.2f})"))
    verdicts = {s["paired"]["verdict"] for s in data["sizes"] if "paired" in s}
    verdict = ("confirmed" if verdicts == {"a < b"} else "refuted" if verdicts == {"a > b"}
               else "mixed" if len(verdicts - {"not distinguishable"}) > 1
               else "not distinguishable" if verdicts == {"not distinguishable"}
               else "at some sizes only")
    return {"claim": "two-phase beats end-to-end at every training-set size",
            "verdict": verdict, "evidence": "; ".join(parts)}
