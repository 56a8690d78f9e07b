"""report.md and plots from results.json; merging results of runs trained in separate folders.

Rows follow the run table (protocol.RUNS): its order, its labels. Re-render or merge with
`python -m vdproj_ext.cli.report`.
"""
from __future__ import annotations

import json
import os
from typing import List, Tuple

from .checkpoint import atomic_save_json
from .protocol import BASELINE_RUN, REFERENCE_RANKING, RUN_NAMES, RUNS


def _fmt(x, nd=2):
    if x is None:
        return "-"
    if isinstance(x, float):
        if x != x:
            return "nan"
        return f"{x:.{nd}f}" if abs(x) >= 1e-3 or x == 0 else f"{x:.3e}"
    return str(x)


def _sig(x):
    """Reconstruction losses are small: four significant digits."""
    return "-" if x is None else f"{x:.4g}"


def _table(header, rows):
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(_fmt(c) if not isinstance(c, str) else c for c in r) + " |"
            for r in rows]
    return "\n".join(out)


def _runs(results) -> List[Tuple[str, dict]]:
    """(name, result) of the known runs in results, in the run table's order."""
    return [(name, results["runs"][name]) for name in RUN_NAMES if name in results["runs"]]


def _ce_log(name, r) -> list:
    """The run's cross-entropy epochs (phase 2 of a two-phase run)."""
    return r["phase2"] if RUNS[name].two_phase else r["epochs"]


def _latent_key_run(results):
    """(name, result) of the first latent-key run in results, or None."""
    return next(((n, r) for n, r in _runs(results) if RUNS[n].latent_keys), None)


def _kv_reduction(results, name, r) -> float:
    """The run's own KV-cache reduction (results written before runs recorded it: the
    top-level V-only figure for compressed runs)."""
    if "kv_cache_reduction" in r:
        return r["kv_cache_reduction"]
    return results["kv_cache_reduction"] if RUNS[name].compressed else 0.0


def _k_v(k, v) -> str:
    """A key / value pair of reconstruction losses ("-" when the keys are not compressed)."""
    return "-" if k is None else f"{_sig(k)} / {_sig(v)}"


# ---------------------------------------------------------------------------------------------
# Tables


def summary_table(results) -> str:
    base = results["runs"].get(BASELINE_RUN, {}).get("best_val_ppl")
    rows = []
    for name, r in _runs(results):
        delta = "-" if base is None or name == BASELINE_RUN else \
            f"{100.0 * (r['best_val_ppl'] / base - 1.0):+.2f}%"
        red = _kv_reduction(results, name, r)
        rows.append((RUNS[name].label, r["best_val_ppl"], r["best_epoch"],
                     _sig(r.get("final_val_recon")),
                     _k_v(r.get("final_val_recon_k"), r.get("final_val_recon_v")), delta,
                     f"-{100 * red:.2f}%" if red else "-"))
    return _table(("Method", "Best val PPL", "Best epoch", "Val recon loss",
                   "Val recon K / V", "PPL vs baseline", "KV cache"), rows)


def position_table(results) -> str:
    runs = _runs(results)
    keys = list(next(iter(runs))[1]["position_ppl"]) if runs else []
    rows = [(RUNS[n].label, *(r["position_ppl"].get(k) for k in keys)) for n, r in runs]
    return _table(("Method", *(f"tokens {k}" for k in keys)), rows)


def epoch_table(log, recon_only=False) -> str:
    """A stage's per-epoch log; a latent-key model's adds the key / value parts of the
    reconstruction losses."""
    split = any("val_recon_k" in e or "recon_k" in e for e in log)
    if recon_only:
        rows = [(e["epoch"], _sig(e.get("train_recon")), _sig(e.get("val_recon")))
                + ((_k_v(e.get("train_recon_k"), e.get("train_recon_v")),
                    _k_v(e.get("val_recon_k"), e.get("val_recon_v"))) if split else ())
                + (e.get("time_s"),) for e in log]
        return _table(("Epoch", "Train recon", "Val recon")
                      + (("Train recon K / V", "Val recon K / V") if split else ())
                      + ("Time (s)",), rows)
    rows = [(e["epoch"], e.get("train_loss"), e.get("train_ppl"), e.get("val_loss"),
             e.get("val_ppl"), _sig(e.get("recon")))
            + ((_k_v(e.get("recon_k"), e.get("recon_v")),) if split else ())
            + (e.get("time_s"),) for e in log]
    return _table(("Epoch", "Train loss", "Train PPL", "Val loss", "Val PPL", "Val recon")
                  + (("Val recon K / V",) if split else ()) + ("Time (s)",), rows)


def phase1_table(results) -> str:
    rows = [(RUNS[name].label, r.get("phase1_method"), _sig(r.get("phase1_initial_val_recon")),
             _sig(r.get("phase1_best_val_recon")),
             _k_v(r.get("phase1_best_val_recon_k"), r.get("phase1_best_val_recon_v")),
             r.get("phase1_best_epoch"), _sig(r.get("phase1_pca_reference_val_recon")),
             _sig(r.get("final_val_recon")), r["best_val_ppl"])
            for name, r in _runs(results) if RUNS[name].two_phase]
    return _table(("Method", "Phase 1", "Val recon before", "Val recon after phase 1",
                   "K / V after phase 1", "Phase 1 best epoch", "PCA optimum (same model)",
                   "Val recon after phase 2", "Final best val PPL"), rows)


def findings(results) -> str:
    """The reference's claim (two-phase < e2e < baseline in perplexity) against this run."""
    r = results["runs"]
    names = [n for n in REFERENCE_RANKING if n in r]
    if len(names) < 2:
        return ""
    order = sorted(names, key=lambda n: r[n]["best_val_ppl"])
    ranked = " < ".join(f"{n} {r[n]['best_val_ppl']:.2f}" for n in order)
    held = order == names
    return (f"Reference finding: two-phase beats end-to-end, which beats the baseline (best val "
            f"PPL, lower is better). This run: {ranked}, so the ordering is "
            f"{'confirmed' if held else 'not confirmed'} (one seed per run; rerun with --seed N "
            f"to see how far the seed alone moves these numbers).")


# ---------------------------------------------------------------------------------------------
# report.md


def _setup_section(results) -> List[str]:
    cfg, data, proto = results["config"], results["data"], results["protocol"]
    hd = cfg["hidden_size"]
    return [
        f"# V-DProj experiment: preset `{results['preset']}`",
        "",
        f"Model: GPT-NeoX, {cfg['num_layers']} layers, hidden {hd}, {cfg['num_heads']} heads "
        f"of {hd // cfg['num_heads']}, rotary {cfg['rotary_pct']}, "
        f"{'parallel' if cfg['use_parallel_residual'] else 'sequential'} residual, "
        f"vocab {cfg['vocab_size']}; V-DProj rank R = {cfg['v_rank']} "
        f"({cfg['v_rank'] / hd:.3f} x H*D)." + _latent_key_sentence(results),
        f"Data: {data['source']}, tokenizer {data['tokenizer']}, {data['train_samples']} "
        f"training and {data['val_samples']} validation samples of {data['seq_len']} tokens "
        f"(validation = contiguous held-out tail).",
        f"Protocol: batch {proto['batch_size']}; phase 1 lr {proto['phase1_lr']}, <= "
        f"{proto['phase1_epochs']} epochs; phase 2 / e2e / baseline lr {proto['lr']}, <= "
        f"{proto['epochs']} epochs; early stopping patience {proto['patience']}; best epoch "
        f"kept. Phase 1 method: {results.get('phase1_method', 'sgd')}. Seed {results['seed']}, "
        f"{results.get('world_size', 1)} process(es) on {results.get('device')}, "
        f"amp {results.get('amp')}, total wall time {_fmt(results.get('wall_s'), 1)} s.",
        "",
    ]


def _latent_key_sentence(results) -> str:
    kv = _latent_key_run(results)
    if kv is None:
        return ""
    r, hd = kv[1], results["config"]["hidden_size"]
    if r.get("joint_kv"):
        return (f" Latent-key runs: keys and values share one latent of R = {r['v_rank']}, "
                f"{r['rotary_dims']} rotary dims per head stay uncompressed.")
    return (f" Latent-key runs: Rk = {r['k_rank']} ({r['k_rank'] / hd:.3f} x H*D) for the "
            f"keys' non-rotary dims, Rv = {r['v_rank']}; {r['rotary_dims']} rotary dims per "
            f"head stay uncompressed.")


def _param_rows(results) -> list:
    p = results["params"]
    rows = [("Total (V-DProj model)", f"{p['total']:,}"),
            ("V projection (v_compress + v_restore)", f"{p['v_projection']:,}"),
            ("Phase 2 trainable", f"{p['phase2_trainable']:,}"),
            ("Phase 2 frozen", f"{p['phase2_frozen']:,}"),
            ("Baseline total (no compression)", f"{p.get('baseline_total', 0):,}")]
    kv = _latent_key_run(results)
    if kv is not None and "total_params" in kv[1]:
        name, r = kv
        rows.append(("Total (latent-key model)", f"{r['total_params']:,}"))
        if RUNS[name].two_phase:  # its final stage, phase 2, trains all but the pairs
            rows += [("Phase 2 trainable (latent-key model)", f"{r['trainable_params']:,}"),
                     ("Phase 2 frozen (latent-key model: every pair)",
                      f"{r['total_params'] - r['trainable_params']:,}")]
    return rows


def _cache_rows(results) -> list:
    cfg = results["config"]
    hd, r = cfg["hidden_size"], cfg["v_rank"]
    rows = [("Baseline", f"{2 * hd} (K {hd} + V {hd})", "-"),
            ("V-DProj", f"{hd + r} (K {hd} + V_c {r})",
             f"{100 * results['kv_cache_reduction']:.2f}%")]
    kv = _latent_key_run(results)
    if kv is not None and "kv_cache_values_per_token_layer" in kv[1]:
        k = kv[1]
        rope = cfg["num_heads"] * k["rotary_dims"]
        latents = (f"latent {k['v_rank']}" if k.get("joint_kv")
                   else f"K_c {k['k_rank']} + V_c {k['v_rank']}")
        rows.append(("V-DProj + latent keys",
                     f"{k['kv_cache_values_per_token_layer']} (rotary K {rope} + {latents})",
                     f"{100 * k['kv_cache_reduction']:.2f}%"))
    return rows


def _size_sections(results) -> List[str]:
    return [
        "## Parameters",
        "",
        _table(("Quantity", "Count"), _param_rows(results)),
        "",
        "## KV cache",
        "",
        _table(("Model", "Values per token and layer", "Reduction"), _cache_rows(results)),
        "",
    ]


def _results_sections(results) -> List[str]:
    return [
        "## Results",
        "",
        summary_table(results),
        "",
        findings(results),
        "",
        "Val recon loss: mean over layers of mean((V - V_restored)^2) on the validation set, "
        "for the kept (best) model; with latent keys, the model's combined loss, and Val recon "
        "K / V its parts: mean((k_nope - k_nope_restored)^2) and mean((V - V_restored)^2).",
        "",
        "## Position-wise validation perplexity",
        "",
        "Tokens are bucketed by their index in the 128-token sample (the token being predicted; "
        "index 0 is never predicted).",
        "",
        position_table(results),
        "",
    ]


def _log_sections(results) -> List[str]:
    lines = []
    if any(RUNS[name].two_phase for name, _ in _runs(results)):
        lines += ["## Phase 1", "", phase1_table(results), ""]
    lines += ["## Per-epoch logs", ""]
    for name, r in _runs(results):
        lines += [f"### {RUNS[name].label}", ""]
        if RUNS[name].two_phase:
            frozen = ("every compress/restore pair" if RUNS[name].latent_keys
                      else "v_compress/v_restore")
            lines += ["Phase 1 (reconstruction):", "", epoch_table(r["phase1"], recon_only=True),
                      "", f"Phase 2 ({frozen} frozen):", "", epoch_table(r["phase2"]), ""]
        else:
            lines += [epoch_table(r["epochs"]), ""]
        lines += [f"Stopped early: {r.get('stopped_early')}; wall time {_fmt(r.get('wall_s'), 1)}"
                  f" s.", ""]
    plots = results.get("plots", [])
    if plots:
        lines += ["## Plots", ""] + [f"![{os.path.splitext(f)[0]}]({f})" for f in plots] + [""]
    return lines


def render(results) -> str:
    return "\n".join(_setup_section(results) + _size_sections(results)
                     + _results_sections(results) + _log_sections(results))


# ---------------------------------------------------------------------------------------------
# Plots (matplotlib is optional: imported only here)


def _plot_curves(results, axes):
    runs = _runs(results)
    base_log = {e["epoch"]: e["val_ppl"] for e in _ce_log(BASELINE_RUN,
                                                          results["runs"][BASELINE_RUN])} \
        if BASELINE_RUN in results["runs"] else {}
    for name, r in runs:
        log, label = _ce_log(name, r), RUNS[name].label
        rel = [(e["epoch"], 100.0 * (e["val_ppl"] / base_log[e["epoch"]] - 1.0))
               for e in log if e["epoch"] in base_log]
        ep = [e["epoch"] for e in log]
        line, = axes[0].plot(ep, [e["val_ppl"] for e in log], marker="o", label=label)
        axes[0].plot(ep, [e["train_ppl"] for e in log], ls="--", color=line.get_color())
        axes[1].plot(ep, [e["val_loss"] for e in log], marker="o", color=line.get_color(),
                     label=label)
        axes[1].plot(ep, [e["train_loss"] for e in log], ls="--", color=line.get_color())
        if name != BASELINE_RUN and rel:
            axes[2].plot(*zip(*rel), marker="o", color=line.get_color(), label=label)
    axes[2].axhline(0.0, color="gray", lw=1)
    axes[2].set(xlabel="epoch", ylabel="val PPL vs baseline, same epoch (%)",
                title="Relative to the baseline")
    axes[0].set(xlabel="epoch", ylabel="perplexity (solid val, dashed train)", yscale="log",
                title="Perplexity")
    axes[1].set(xlabel="epoch", ylabel="cross-entropy (solid val, dashed train)", title="Loss")


def _plot_reconstruction(runs, axes):
    for name, r in runs:
        label = RUNS[name].label
        if RUNS[name].two_phase:
            p1 = r["phase1"]
            start = [(0, r["phase1_initial_val_recon"])] \
                if r.get("phase1_initial_val_recon") is not None else []
            pts = start + [(e["epoch"], e["val_recon"]) for e in p1]
            line, = axes[0].plot(*zip(*pts), marker="o", label=f"{label} val")
            axes[0].plot([e["epoch"] for e in p1], [e["train_recon"] for e in p1], ls="--",
                         label=f"{label} train")
            for part, style in (("k", ":"), ("v", "-.")):  # latent keys: each pair's part
                if any(f"val_recon_{part}" in e for e in p1):
                    axes[0].plot([e["epoch"] for e in p1], [e[f"val_recon_{part}"] for e in p1],
                                 ls=style, color=line.get_color(),
                                 label=f"{label} val, {part.upper()} part")
        log = _ce_log(name, r)
        axes[1].plot([e["epoch"] for e in log], [e.get("recon") for e in log], marker="o",
                     label=label)
    # with latent keys the loss is the mean of the keys' (k_nope) and the values' losses
    axes[0].set(xlabel="epoch", ylabel="mean (V - V_r)^2 (latent keys: with K's)",
                title="Phase 1 reconstruction", yscale="log")
    axes[1].set(xlabel="epoch", ylabel="val mean (V - V_r)^2 (latent keys: with K's)",
                title="Reconstruction during CE training", yscale="log")


def _plot_positions(runs, ax):
    keys = list(runs[0][1]["position_ppl"]) if runs else []
    width = 0.8 / max(1, len(runs))
    for i, (name, r) in enumerate(runs):
        ax.bar([j + i * width for j in range(len(keys))], [r["position_ppl"][k] for k in keys],
               width=width, label=RUNS[name].label)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(keys))])
    ax.set_xticklabels(keys)
    ax.set(xlabel="token position", ylabel="validation perplexity",
           title="Position-wise validation perplexity (best epoch)")


def make_plots(results, out_dir) -> list:
    """curves.png, reconstruction.png (when a run is compressed) and position_ppl.png in
    out_dir; returns the file names."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    files = []
    runs = _runs(results)

    def save(fig, axes, name, grid_axis="both"):
        """Grid and legend on every panel, then write out_dir/name and list it."""
        for ax in axes:
            ax.grid(alpha=0.3, axis=grid_axis)
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(os.path.join(out_dir, name), dpi=110)
        plt.close(fig)
        files.append(name)

    fig, axes = plt.subplots(1, 3, figsize=(16, 4))
    _plot_curves(results, axes)
    save(fig, axes, "curves.png")
    compressed = [(n, r) for n, r in runs if RUNS[n].compressed]
    if compressed:
        fig, axes = plt.subplots(1, 2, figsize=(11, 4))
        _plot_reconstruction(compressed, axes)
        save(fig, axes, "reconstruction.png")
    fig, ax = plt.subplots(figsize=(7, 4))
    _plot_positions(runs, ax)
    save(fig, [ax], "position_ppl.png", grid_axis="y")
    return files


# ---------------------------------------------------------------------------------------------
# Writing, merging


def write_report(results, out_dir, plots=True):
    """report.md (and the plots, listed in results.json) in out_dir."""
    if plots:
        try:
            import matplotlib  # noqa: F401  (optional on a bare GPU node)
        except ImportError:
            print("matplotlib is not installed: no plots (re-render later with "
                  "`python -m vdproj_ext.cli.report DIR`)")
            plots = False
    if plots:
        results["plots"] = make_plots(results, out_dir)
        atomic_save_json(results, os.path.join(out_dir, "results.json"))
    with open(os.path.join(out_dir, "report.md"), "w") as f:
        f.write(render(results))


def write_outputs(results, out_dir, plots=True):
    """The experiment's end: results.json, report.md, plots, and the summary on stdout."""
    results_path = os.path.join(out_dir, "results.json")
    atomic_save_json(results, results_path)
    write_report(results, out_dir, plots=plots)
    print(f"wrote {results_path}, {os.path.join(out_dir, 'report.md')} "
          f"({results['wall_s']:.1f} s)", flush=True)
    print(summary_table(results), flush=True)


def merge(dirs, out_dir):
    """Join results.json files of separate runs (same preset, data and seed) into one."""
    merged = None
    for d in dirs:
        with open(os.path.join(d, "results.json")) as f:
            r = json.load(f)
        if merged is None:
            merged = r
            merged["wall_s"] = r.get("wall_s", 0.0)
            continue
        for key in ("config", "params", "data", "seed", "protocol"):
            if r[key] != merged[key]:
                raise ValueError(f"{d}/results.json differs from {dirs[0]} in {key!r}")
        merged["runs"].update(r["runs"])
        merged["wall_s"] = max(merged.get("wall_s", 0.0), r.get("wall_s", 0.0))
    merged["merged_from"] = [os.path.abspath(d) for d in dirs]
    os.makedirs(out_dir, exist_ok=True)
    write_report(merged, out_dir)
    return merged
