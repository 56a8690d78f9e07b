"""study.md: the study's tables, rendered from study.json's content."""
from __future__ import annotations

from typing import List, Optional

from .protocol import RUNS

HOW_TO_READ = """\
How to read this:
- Every run trains one method with one seed under the protocol above; its score is the best
  validation perplexity over its epochs (early stopping with patience 1 keeps the best epoch).
  Lower is better. The same seed gives every method the same initialisation of the shared
  weights and the same data order, so methods are compared seed by seed.
- "95% CI" is the t-interval of a mean over seeds: mean +- t(0.975, n-1) * sd / sqrt(n). With
  few seeds it is wide: that is the honest uncertainty, not a defect.
- "a - b" rows are paired: the interval of the mean of the per-seed differences. Below 0: a
  is better. Verdicts: "a < b" (interval entirely below 0), "a > b" (entirely above), "not
  distinguishable" (the interval holds 0: this many seeds cannot tell them apart).
- A claim is "confirmed" when its interval lies on the claim's side of 0, "refuted" when on
  the other side, "not distinguishable" otherwise. study.json lists every per-seed value that
  each interval was computed from.
"""


def _f(x, nd=2) -> str:
    return "-" if x is None else f"{x:.{nd}f}"


def _ci(iv: dict, nd=2, signed=False) -> str:
    if iv.get("lo") is None:
        return "-"
    fmt = f"{{:+.{nd}f}}" if signed else f"{{:.{nd}f}}"
    return f"[{fmt.format(iv['lo'])}, {fmt.format(iv['hi'])}]"


def _vals(values, nd=2) -> str:
    return ", ".join(f"{v:.{nd}f}" for v in values)


def _table(header, rows) -> List[str]:
    return (["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
            + ["| " + " | ".join(str(c) for c in r) + " |" for r in rows] + [""])


def _header(study: dict) -> List[str]:
    m, s, p = study["model"], study["settings"], study["protocol"]
    minutes = study["elapsed_s"] / 60
    total = study["elapsed_s_total"] / 60
    return [f"# V-DProj study: preset `{study['preset']}`", "",
            f"Command: `{study['command']}`", "",
            f"Time: {minutes:.1f} min for this invocation, {total:.1f} min over "
            f"{len(study['sessions'])} invocation(s); the runs' own wall time summed: "
            f"{study['run_seconds_total'] / 60:.1f} min ({study['planned_runs']} runs).", "",
            f"Model: GPT-NeoX, {m['num_layers']} layers, hidden {m['hidden_size']}, "
            f"{m['num_heads']} heads, vocabulary {m['vocab_size']}, V-DProj rank {m['v_rank']}; "
            f"{m['params']:,} parameters ({m['baseline_params']:,} uncompressed), "
            f"{m['params_per_train_token']:.1f} per training token at {s['n_train']} samples "
            f"of {s['seq_len']} tokens (the reference: 56.6). Validation: {s['n_val']} samples "
            f"(held-out tail). Tokenizer {s['tokenizer']}.", "",
            "Protocol: " + ", ".join(f"{k} {v}" for k, v in p.items()) + ".", "",
            f"KV-cache bytes per token count all layers at {study['kv_bytes_per_value']} bytes "
            f"a value (a 16-bit cache).", "", HOW_TO_READ]


def _conclusions(study: dict) -> List[str]:
    rows = [(c["claim"], f"**{c['verdict']}**", c["evidence"]) for c in study["conclusions"]]
    return ["## Conclusions", ""] + _table(("Claim", "Verdict", "Evidence"), rows)


def _pair_rows(pairs) -> list:
    return [(f"{p['a']} - {p['b']}", f"{p['mean']:+.2f}", _ci(p, signed=True),
             f"{p['relative_percent']['mean']:+.2f}%", f"{p['a_lower']} of {p['n']}",
             p["verdict"], _vals(p["values"])) for p in pairs]


PAIR_HEADER = ("a - b", "mean diff", "95% CI", "relative", "a lower in", "verdict",
               "per-seed differences")


def _seeds(study: dict) -> List[str]:
    sd = study["seeds"]
    rows = [(v["label"], v["n"], _f(v["mean"]), _ci(v), _f(v["sd"]), _f(v["best_epoch"], 1),
             _f(v["train_ppl_at_best"]), _f(v["overfit_ratio"]), v["stopped_early"],
             _vals(v["values"])) for v in sd["methods"].values()]
    lines = ["## Seed sweep", "", "Best validation perplexity per method:", ""]
    lines += _table(("Method", "seeds", "mean", "95% CI", "sd", "best epoch (mean)",
                     "train ppl at best (mean)", "val / train", "stopped early",
                     "per-seed values"), rows)
    lines += ["Paired differences (same seeds):", ""] + _table(PAIR_HEADER, _pair_rows(
        sd["paired"]))
    pos = sd["positions"]
    rows = [(RUNS[m].label, *(f"{iv['mean']:.2f} {_ci(iv)}" for iv in per.values()))
            for m, per in pos["methods"].items()]
    lines += ["Validation perplexity by position bucket (mean and 95% CI over seeds):", ""]
    lines += _table(("Method", *pos["buckets"]), rows)
    rows = [(f"{bp['a']} - {bp['b']}",
             *(f"{p['mean']:+.2f} {_ci(p, signed=True)}" for p in bp["buckets"].values()),
             f"{bp['wins_every_bucket']} of {len(bp['seeds'])}") for bp in pos["paired"]]
    lines += ["Paired differences by bucket, and the seeds in which a wins at every bucket:", ""]
    lines += _table(("a - b", *pos["buckets"], "wins at every bucket"), rows)
    return lines + ["![seeds](seeds.png)", "", "![positions](positions.png)", ""]


def _ranks(study: dict) -> List[str]:
    rk = study["ranks"]
    rows = [(p["label"], p["kv_bytes_per_token"], f"{100 * p['kv_cache_reduction']:.2f}%",
             p["n"], _f(p["mean"]), _ci(p), _vals(p["values"])) for p in rk["points"]]
    lines = ["## Rank sweep", "", "Best validation perplexity against KV-cache size:", ""]
    lines += _table(("Point", "KV bytes / token", "cache saved", "seeds", "mean", "95% CI",
                     "per-seed values"), rows)
    lines += ["Pareto front (mean perplexity against bytes, smallest cache first): "
              + "; ".join(rk["pareto"]) + ".", ""]
    rows = [(p["label"], p["kv_bytes_per_token"], *_pair_rows([p])[0]) for p in rk["paired"]]
    lines += ["Two-phase against end-to-end at each cache size:", ""]
    lines += _table(("Point", "KV bytes / token", *PAIR_HEADER), rows)
    return lines + ["![pareto](pareto.png)", ""]


def _data(study: dict) -> List[str]:
    rows = []
    for s in study["data"]["sizes"]:
        e2e, tp = s["methods"].get("e2e"), s["methods"].get("two_phase")
        p: Optional[dict] = s.get("paired")
        rows.append((s["n_train"], _f(s["params_per_token"], 1),
                     "-" if e2e is None else f"{e2e['mean']:.2f} {_ci(e2e)}",
                     "-" if tp is None else f"{tp['mean']:.2f} {_ci(tp)}",
                     "-" if p is None else f"{p['mean']:+.2f} {_ci(p, signed=True)}",
                     "-" if p is None else p["verdict"],
                     " / ".join(_f(v.get("best_epoch"), 1) for v in s["methods"].values())))
    lines = ["## Data-size sweep", ""]
    lines += _table(("train samples", "params / token", "e2e", "two_phase",
                     "two_phase - e2e", "verdict", "best epoch (e2e / two_phase)"), rows)
    change = study["data"].get("advantage_change")
    if change is not None:
        lines += [f"Change of the advantage (two_phase - e2e) from the smallest to the largest "
                  f"size, seed by seed: {change['mean']:+.2f} ppl {_ci(change, signed=True)}.",
                  ""]
    return lines + ["![data size](data_size.png)", ""]


def _runs(study: dict) -> List[str]:
    rows = [(rid, r["method"], r["seed"], r["n_train"], r["v_rank"] or "-",
             r["k_rank"] or ("joint" if r["joint_kv"] else "-"), _f(r["best_val_ppl"]),
             r["best_epoch"], r["epochs_run"], _f(r["train_ppl_at_best"]),
             r["kv_bytes_per_token"], _f(r["wall_s"], 1))
            for rid, r in sorted(study["runs"].items())]
    lines = ["## Every run", ""]
    if study["missing_runs"]:
        lines += [f"**Missing (not finished): {', '.join(study['missing_runs'])}**", ""]
    return lines + _table(("run", "method", "seed", "train samples", "Rv", "Rk",
                           "best val ppl", "best epoch", "epochs", "train ppl at best",
                           "KV bytes / token", "wall s"), rows)


def render_markdown(study: dict) -> str:
    lines = _header(study) + _conclusions(study)
    for key, render in (("seeds", _seeds), ("ranks", _ranks), ("data", _data)):
        if key in study:
            lines += render(study)
    return "\n".join(lines + _runs(study))
