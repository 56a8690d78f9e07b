"""Conversion perplexity (issue 10): a trained uncompressed model converted to latent keys by
from_gpt_neox, "pca" against "score_aware", separate key and value latents against the joint
one, at several ranks; validation perplexity on the embedded Shakespeare split.

It trains nothing. It takes the output folder of a baseline training run,

    python -m vdproj_ext.train --preset cpu-small --mode baseline --out runs/baseline
    python bench/convert_ppl.py --train-out runs/baseline          # its preset, the defaults

writes that model as a Hugging Face GPT-NeoX folder (<out>/hf_baseline, models.save_gpt_neox),
and converts it with from_gpt_neox at each setting:
  * separate latents: k_rank = f * H*D for f in --k-fracs, v_rank = --v-frac * H*D;
  * the joint latent: R = f * H*D for f in --joint-fracs;
  * references: the original model and values only (v_rank = --v-frac * H*D, keys whole);
each with every init of --inits, fitted on the first --calib-samples training windows. The
validation split is rebuilt exactly as the training run built it (same preset settings, and
the run's own tokenizer.json when it trained one).

Writes convert_ppl_<preset>.md and .json into --out (default bench/results/) and prints the
table: per setting, cache values per token and layer, the cache reduction, and the perplexity
of each init with its change against the original.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
import warnings
from pathlib import Path

import torch

try:
    import vdproj_ext  # noqa: F401
except ImportError:  # run as a script from a source checkout without an install
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from vdproj_ext.experiment.checkpoint import (CheckpointError, find_checkpoint,
                                              load_trained_model)
from vdproj_ext.experiment.data import build_dataset
from vdproj_ext.experiment.protocol import Settings
from vdproj_ext.models import from_gpt_neox, save_gpt_neox

HERE = os.path.dirname(os.path.abspath(__file__))


def load_baseline(train_out: str):
    """The baseline run's model; a ValueError for anything else."""
    model, _ = load_trained_model(find_checkpoint(Path(train_out), ["baseline"]))
    if model.config.v_rank is not None:
        raise ValueError(f"{train_out}: the checkpoint is compressed (v_rank="
                         f"{model.config.v_rank}); convert_ppl needs the baseline run")
    return model


def training_preset(train_out: str) -> str:
    """The preset the training run recorded in its results.json."""
    path = Path(train_out) / "results.json"
    if not path.is_file():
        raise ValueError(f"{path} not found: give --preset, the training run's preset")
    return json.loads(path.read_text())["preset"]


def load_splits(train_out: str, preset: str, vocab_size: int):
    """(calibration candidates, validation windows) as the training run built them."""
    settings = Settings.for_preset(preset)
    own = Path(train_out) / "tokenizer.json"
    tokenizer = str(own) if own.is_file() else settings.tokenizer
    data = build_dataset(seq_len=settings.seq_len, n_train=settings.n_train,
                         n_val=settings.n_val, val_frac=settings.val_frac, tokenizer=tokenizer,
                         vocab_size=vocab_size)
    return data.train, data.val


@torch.no_grad()
def perplexity(model, windows: torch.Tensor, batch: int = 16) -> float:
    """exp of the mean next-token cross-entropy over every predicted validation token."""
    total, count = 0.0, 0
    for ids in windows.split(batch):
        loss = model(ids, labels=ids, loss_reduction="none").loss
        total += float(loss.double().sum())
        count += loss.numel()
    return math.exp(total / count)


def settings_grid(cfg, k_fracs, joint_fracs, v_frac):
    """(name, from_gpt_neox keywords) of every converted setting, references first."""
    hd = cfg.hidden_size
    v_rank = round(v_frac * hd)
    grid = [("values only", dict(v_rank=v_rank))]
    grid += [(f"separate k{round(f * hd)} v{v_rank}", dict(v_rank=v_rank, k_rank=round(f * hd)))
             for f in k_fracs]
    grid += [(f"joint R{round(f * hd)}", dict(v_rank=round(f * hd), joint_kv=True))
             for f in joint_fracs]
    return grid


def check_grid(cfg, grid):
    """Every setting's config, built before anything is converted or written: a ValueError
    names the first bad one (e.g. a rank above the dims it compresses)."""
    for name, ranks in grid:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                problem = cfg.replace(**ranks).oversized_rank()
        except ValueError as e:
            problem = str(e)
        if problem:
            raise ValueError(f"setting {name!r}: {problem}")


def run(args, model, grid) -> dict:
    cfg, hf_dir = model.config, Path(args.out) / "hf_baseline"
    save_gpt_neox(model, hf_dir)
    calib_all, val = load_splits(args.train_out, args.preset, cfg.vocab_size)
    calib = calib_all[:args.calib_samples]
    if args.val_samples:
        val = val[:args.val_samples]
    original = perplexity(from_gpt_neox(hf_dir), val)
    rows = [{"setting": "original", "cache_values": 2 * cfg.hidden_size, "reduction": 0.0,
             "ppl": {"-": original}}]
    print(f"original: val ppl {original:.3f} ({len(val)} windows of {val.shape[1]} tokens)")
    for name, ranks in grid:
        row = {"setting": name, "ranks": ranks, "ppl": {}}
        for init in args.inits:
            t0 = time.time()
            model = from_gpt_neox(hf_dir, init=init, calibration_ids=calib, **ranks)
            row["ppl"][init] = perplexity(model, val)
            row["cache_values"] = model.config.cache_values_per_token()
            row["reduction"] = model.config.kv_cache_reduction
            print(f"{name:24s} {init:12s} val ppl {row['ppl'][init]:9.3f} "
                  f"({100 * (row['ppl'][init] / original - 1):+.2f}%)  {time.time() - t0:.1f} s")
        rows.append(row)
    return {"preset": args.preset, "train_out": os.path.abspath(args.train_out),
            "calib_samples": int(calib.shape[0]), "val_windows": int(val.shape[0]),
            "seq_len": int(val.shape[1]), "hidden": cfg.hidden_size,
            "rope_dims_per_head": cfg.rope_dims, "heads": cfg.num_heads,
            "original_ppl": original, "inits": list(args.inits), "rows": rows}


def markdown_table(result: dict) -> str:
    inits, base = result["inits"], result["original_ppl"]
    head = ("| setting | cache values / token / layer | cache reduction | "
            + " | ".join(f"val ppl {i} | vs original" for i in inits) + " |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in result["rows"]:
        cells = []
        for init in inits:
            ppl = r["ppl"].get(init, r["ppl"].get("-"))
            cells.append(f"{ppl:.3f} | {100 * (ppl / base - 1):+.2f}%")
        lines.append(f"| {r['setting']} | {r['cache_values']} | {100 * r['reduction']:.2f}% | "
                     + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--train-out", required=True,
                   help="output folder of `python -m vdproj_ext.train --mode baseline`")
    p.add_argument("--preset", help="the training preset, whose data settings rebuild the "
                   "splits (default: the one --train-out's results.json records)")
    p.add_argument("--k-fracs", type=float, nargs="+", default=[0.125, 0.25, 0.375, 0.5],
                   help="k_rank as fractions of H*D (separate latents)")
    p.add_argument("--joint-fracs", type=float, nargs="+", default=[0.5, 0.625, 0.75, 1.0],
                   help="the joint latent's R as fractions of H*D")
    p.add_argument("--v-frac", type=float, default=0.625,
                   help="v_rank of the separate latents, as a fraction of H*D")
    p.add_argument("--inits", nargs="+", default=["pca", "score_aware"])
    p.add_argument("--calib-samples", type=int, default=64,
                   help="training windows the pairs are fitted on")
    p.add_argument("--val-samples", type=int, default=0, help="0: the whole validation split")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", default=os.path.join(HERE, "results"))
    args = p.parse_args(argv)
    if not all(f > 0 for f in (*args.k_fracs, *args.joint_fracs, args.v_frac)):
        p.error("--k-fracs, --joint-fracs and --v-frac must be positive fractions of H*D")
    if args.calib_samples < 1 or args.val_samples < 0:
        p.error("--calib-samples must be >= 1 and --val-samples >= 0")
    try:  # everything checkable before the work: a usage error, not a traceback
        args.preset = args.preset or training_preset(args.train_out)
        Settings.for_preset(args.preset)
        model = load_baseline(args.train_out)
        grid = settings_grid(model.config, args.k_fracs, args.joint_fracs, args.v_frac)
        check_grid(model.config, grid)
    except (ValueError, FileNotFoundError, CheckpointError) as e:
        p.error(str(e))
    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.time()
    result = run(args, model, grid)
    result["wall_s"] = round(time.time() - t0, 1)
    result["command"] = "python bench/convert_ppl.py " + " ".join(
        argv if argv is not None else sys.argv[1:])
    table = markdown_table(result)
    write_report(os.path.join(args.out, f"convert_ppl_{args.preset}"), result, table,
                 f"{result['preset']}: {result['calib_samples']} calibration windows, "
                 f"{result['val_windows']} validation windows of {result['seq_len']} tokens")
    return result


def write_report(stem, result, table, caption, notes=""):
    """stem.md (the command, a caption, the table, notes) and stem.json (result); prints the
    table."""
    with open(stem + ".md", "w") as f:
        f.write(f"{result['command']}\n\n{caption}\n\n{table}\n" + (f"\n{notes}\n" if notes else ""))
    with open(stem + ".json", "w") as f:
        json.dump(result, f, indent=1)
    print()
    print(table)
    print(f"\nwrote {stem}.{{md,json}} in {result['wall_s']} s")


if __name__ == "__main__":
    main()
