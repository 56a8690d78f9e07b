"""The study's PNG plots (matplotlib, Agg): per-seed results, position buckets, the Pareto
plot of perplexity against KV-cache bytes, and the data-size sweep. Error bars are the 95%
t-intervals of study.json."""
from __future__ import annotations

import os
from typing import Dict

from .protocol import RUNS

PLOTS = {"seeds": "seeds.png", "ranks": "pareto.png", "data": "data_size.png"}
POSITIONS_PLOT = "positions.png"
MARKERS = {"baseline": "s", "e2e": "o", "two_phase": "D", "two_phase_pca": "^",
           "e2e_kv": "v", "two_phase_kv": "P"}


def _err(iv: dict):
    """(lower, upper) error-bar lengths of an interval (0 without one)."""
    if iv.get("lo") is None:
        return [[0.0], [0.0]]
    return [[iv["mean"] - iv["lo"]], [iv["hi"] - iv["mean"]]]


def _errorbar(ax, xs, intervals, **kw):
    """Means with their 95% t-intervals as error bars."""
    errs = [_err(iv) for iv in intervals]
    ax.errorbar(xs, [iv["mean"] for iv in intervals],
                yerr=[[e[0][0] for e in errs], [e[1][0] for e in errs]], capsize=3, **kw)


def _save(plt, fig, path: str, axes=()):
    """Legends on `axes`, then write the figure and free it."""
    for ax in axes:
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _plot_seeds(plt, study: dict, path: str):
    methods = study["seeds"]["methods"]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    names = list(methods)
    by_seed: Dict[int, list] = {}
    for x, m in enumerate(names):
        for seed, v in zip(methods[m]["seeds"], methods[m]["values"]):
            by_seed.setdefault(seed, []).append((x, v))
        _errorbar(ax, [x + 0.15], [methods[m]], fmt="k_", markersize=14)
    for seed, pts in by_seed.items():  # one line per seed: the pairing
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "-o", alpha=0.45, markersize=4,
                label=f"seed {seed}")
    ax.set_xticks(range(len(names)), [RUNS[m].label.replace(" (", "\n(") for m in names],
                  fontsize=7)
    ax.set_ylabel("best validation perplexity")
    ax.set_title("Seed sweep: per-seed values (lines), mean and 95% CI (black)")
    _save(plt, fig, path, [ax])


def _plot_positions(plt, study: dict, path: str):
    pos = study["seeds"]["positions"]
    buckets = pos["buckets"]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    for i, (m, per) in enumerate(pos["methods"].items()):
        _errorbar(ax1, [j + 0.06 * (i - 1.5) for j in range(len(buckets))],
                  [per[b] for b in buckets], marker=MARKERS.get(m, "o"), label=RUNS[m].label)
    for i, bp in enumerate(pos["paired"]):
        _errorbar(ax2, [j + 0.08 * (i - 1) for j in range(len(buckets))],
                  [bp["buckets"][b] for b in buckets], marker="o",
                  label=f"{bp['a']} - {bp['b']}")
    ax2.axhline(0.0, color="k", lw=0.8)
    for ax, title in ((ax1, "mean val ppl by position (95% CI)"),
                      (ax2, "paired difference by position (95% CI)")):
        ax.set_xticks(range(len(buckets)), buckets)
        ax.set_xlabel("predicted token position")
        ax.set_title(title)
    _save(plt, fig, path, [ax1, ax2])


def _point_tag(p: dict) -> str:
    if p["v_rank"] is None:
        return ""
    return f"Rv {p['v_rank']}" + (f"/Rk {p['k_rank']}" if p["k_rank"] else
                                  " joint" if p["joint_kv"] else "")


def _plot_pareto(plt, study: dict, path: str):
    rk = study["ranks"]
    fig, ax = plt.subplots(figsize=(8, 5))
    for m in dict.fromkeys(p["method"] for p in rk["points"]):
        pts = [p for p in rk["points"] if p["method"] == m]
        # e2e and two-phase points of one cache size side by side, each tag written once
        shift = 1.0 + 0.006 * (m.startswith("two_phase") - m.startswith("e2e"))
        _errorbar(ax, [p["kv_bytes_per_token"] * shift for p in pts], pts, fmt="none",
                  color=f"C{list(MARKERS).index(m)}")
        ax.plot([p["kv_bytes_per_token"] * shift for p in pts], [p["mean"] for p in pts],
                MARKERS.get(m, "o"), color=f"C{list(MARKERS).index(m)}", label=RUNS[m].label)
        for p in pts if not m.startswith("e2e") else ():
            ax.annotate(_point_tag(p), (p["kv_bytes_per_token"] * shift, p["mean"]),
                        fontsize=6, xytext=(3, 3), textcoords="offset points")
    front = [p for lbl in rk["pareto"] for p in rk["points"] if p["label"] == lbl]
    ax.step([p["kv_bytes_per_token"] for p in front], [p["mean"] for p in front], "k--",
            where="post", lw=0.8, label="Pareto front (means)")
    ax.set_xlabel(f"KV-cache bytes per token (all layers, {study['kv_bytes_per_value']} "
                  f"bytes a value)")
    ax.set_ylabel("best validation perplexity (mean, 95% CI)")
    ax.set_title("Rank sweep: perplexity against KV-cache size")
    _save(plt, fig, path, [ax])


def _plot_data(plt, study: dict, path: str):
    sizes = study["data"]["sizes"]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    for m in ("e2e", "two_phase"):
        pts = [(s["n_train"], s["methods"][m]) for s in sizes if m in s["methods"]]
        _errorbar(ax1, [n for n, _ in pts], [iv for _, iv in pts], marker=MARKERS[m],
                  label=RUNS[m].label)
    pts = [(s["n_train"], s["paired"]) for s in sizes if "paired" in s]
    _errorbar(ax2, [n for n, _ in pts], [p for _, p in pts], marker="o",
              label="two_phase - e2e")
    ax2.axhline(0.0, color="k", lw=0.8)
    for ax, title in ((ax1, "best val ppl (mean, 95% CI)"),
                      (ax2, "two-phase advantage: paired difference (95% CI)")):
        ax.set_xscale("log")
        ax.set_xticks([s["n_train"] for s in sizes], [str(s["n_train"]) for s in sizes])
        ax.minorticks_off()
        ax.set_xlabel("training samples")
        ax.set_title(title)
    _save(plt, fig, path, [ax1, ax2])


def write_plots(study: dict, out: str) -> Dict[str, str]:
    """The plots of the sweeps in study, written into out: {sweep: file name} (also
    "positions"). Empty without matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plots", flush=True)
        return {}
    written = {}
    for sweep, draw in (("seeds", _plot_seeds), ("ranks", _plot_pareto), ("data", _plot_data)):
        if sweep in study and study["runs"]:
            draw(plt, study, os.path.join(out, PLOTS[sweep]))
            written[sweep] = PLOTS[sweep]
    if "seeds" in study and study["runs"]:
        _plot_positions(plt, study, os.path.join(out, POSITIONS_PLOT))
        written["positions"] = POSITIONS_PLOT
    return written
