"""Validation perplexity with a quantized KV cache (issue 11, SPEC 3c): the main job's trained
models decoding through float32, int8 and float8_e4m3fn caches, with and without the Hadamard
rotation of the latents (models/rotation.py), against the same model with a float cache.

    python -m vdproj_ext.train --preset cpu-small --out runs/default      # the main job
    python bench/quant_ppl.py --train-out runs/default --threads 2       # a few minutes

Method: cached decoding, token by token (--chunk 1, the default). Each validation window of T
tokens is fed through the model's cache one token at a time, as generate() does: every step
writes the new token's keys and latents into the cache (quantized, for a quantized cache) and
attends over all the cache holds, so every next-token logit after the first reads the
quantized past. The model is folded first (prepare_for_inference, the decoding form), so
the rows are written by the caches' attend_compressed. Perplexity is exp of the mean
next-token cross-entropy over every predicted token of every window, as in training. --chunk C
feeds C tokens per step instead: since every cached row is quantized on its own, this stores
the same rows and computes the same logits up to float rounding, only faster.

The validation windows are the training run's own (OUT/parts/data.pt when the run exported
them, else rebuilt from the preset like bench/convert_ppl.py does). Rotation: "none" or
"hadamard" (block Hadamard, rotate_latents); an uncompressed run (baseline, e2e is
compressed) has no latent, so it is measured without rotation only.

Writes quant_ppl_<preset>.md and .json into --out (default bench/results/): per model, cache
dtype and rotation, the cache bytes per token and layer (scales included), the perplexity and
its change against the float cache without rotation, and whether the change is within the
issue's budget (int8 <= +0.5%, float8_e4m3fn <= +2%).
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

try:
    import vdproj_ext  # noqa: F401
except ImportError:  # run as a script from a source checkout without an install
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from vdproj_ext.experiment.checkpoint import (CheckpointError, find_checkpoint,
                                              load_trained_model)
from vdproj_ext.experiment.data import Dataset
from vdproj_ext.models import kv_cache_nbytes, rotate_latents

from convert_ppl import load_splits, perplexity, write_report

HERE = os.path.dirname(os.path.abspath(__file__))
CACHE_DTYPES = {"float32": None, "int8": torch.int8, "float8_e4m3fn": torch.float8_e4m3fn}
BUDGET = {"int8": 0.005, "float8_e4m3fn": 0.02}  # the bound on the ppl increase
ROTATIONS = ("none", "hadamard")


def validation_windows(train_out: Path, vocab_size: int) -> torch.Tensor:
    """The training run's validation windows (N, T)."""
    exported = train_out / "parts" / "data.pt"
    if exported.is_file():
        return Dataset.load(str(exported), vocab_size).val
    results = json.loads((train_out / "results.json").read_text())
    return load_splits(str(train_out), results["preset"], vocab_size)[1]


@torch.no_grad()
def cached_perplexity(model, windows: torch.Tensor, cache_dtype, *, batch: int,
                      chunk: int) -> float:
    """exp of the mean next-token cross-entropy, every logit computed through the model's
    cache in cache_dtype, `chunk` tokens per step (module docstring)."""
    total, count = 0.0, 0
    for ids in windows.split(batch):
        b, t = ids.shape
        cache = model.new_cache(b, t, cache_dtype=cache_dtype)
        logits = torch.cat([model(ids[:, s:s + chunk], cache=cache).logits
                            for s in range(0, t - 1, chunk)], 1)[:, :t - 1]
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(),
                               ids[:, 1:].reshape(-1), reduction="sum")
        total += float(loss.double())
        count += b * (t - 1)
    return math.exp(total / count)


def decoding_form(model, rotation: str):
    """A folded copy of the model, its latents rotated first when asked."""
    model = copy.deepcopy(model)
    if rotation != "none":
        rotate_latents(model, rotation)
    return model.prepare_for_inference()


def bytes_per_token_layer(cfg, cache_dtype) -> float:
    return kv_cache_nbytes(None, 1, 1, cfg.num_heads, cfg.head_dim, cfg.v_rank, 4, config=cfg,
                           cache_dtype=cache_dtype) / cfg.num_layers


def measure_run(run: str, args, windows) -> dict:
    model, _ = load_trained_model(find_checkpoint(Path(args.train_out), [run]))
    cfg = model.config
    if args.max_batches:
        windows = windows[:args.max_batches * args.batch]
    uncached = perplexity(model, windows)
    rotations = ROTATIONS if cfg.v_rank is not None else ("none",)
    rows, reference = [], None
    for rotation in rotations:
        decoder = decoding_form(model, rotation)
        for name, cache_dtype in CACHE_DTYPES.items():
            t0 = time.time()
            ppl = cached_perplexity(decoder, windows, cache_dtype, batch=args.batch,
                                    chunk=args.chunk)
            if reference is None:  # float32 cache, no rotation: the first one measured
                reference = ppl
            delta = ppl / reference - 1
            row = {"run": run, "cache_dtype": name, "rotation": rotation, "ppl": ppl,
                   "delta": delta, "bytes_per_token_layer": bytes_per_token_layer(cfg,
                                                                                  cache_dtype),
                   "within_budget": delta <= BUDGET[name] if name in BUDGET else None,
                   "wall_s": round(time.time() - t0, 1)}
            rows.append(row)
            print(f"{run:14s} {name:14s} {rotation:9s} ppl {ppl:9.4f} ({100 * delta:+.3f}%) "
                  f"{row['wall_s']} s", flush=True)
    return {"run": run, "config": {"v_rank": cfg.v_rank, "k_rank": cfg.k_rank,
                                   "joint_kv": cfg.joint_kv, "heads": cfg.num_heads,
                                   "head_dim": cfg.head_dim, "rope_dims": cfg.rope_dims,
                                   "layers": cfg.num_layers},
            "uncached_ppl": uncached, "float_cache_ppl": reference, "rows": rows}


def markdown_table(result: dict) -> str:
    lines = ["| model | cache dtype | rotation | bytes / token / layer | val ppl | vs float "
             "cache | budget |", "|---|---|---|---|---|---|---|"]
    for model in result["models"]:
        for r in model["rows"]:
            budget = {None: "-", True: "ok", False: "**over**"}[r["within_budget"]]
            lines.append(f"| {r['run']} | {r['cache_dtype']} | {r['rotation']} | "
                         f"{r['bytes_per_token_layer']:g} | {r['ppl']:.4f} | "
                         f"{100 * r['delta']:+.3f}% | {budget} |")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--train-out", default="runs/default",
                   help="output folder of `python -m vdproj_ext.train` (the main job)")
    p.add_argument("--runs", nargs="+", default=["two_phase", "two_phase_kv"],
                   help="runs of that folder to measure (baseline works too, without rotation)")
    p.add_argument("--batch", type=int, default=16, help="validation windows per batch")
    p.add_argument("--chunk", type=int, default=1,
                   help="tokens per cached step (1: token by token, as in decoding)")
    p.add_argument("--max-batches", type=int, default=0, help="0: the whole validation split")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", default=os.path.join(HERE, "results"))
    args = p.parse_args(argv)
    if args.batch < 1 or args.chunk < 1 or args.max_batches < 0:
        p.error("--batch and --chunk must be >= 1, --max-batches >= 0")
    if args.threads:
        torch.set_num_threads(args.threads)
    train_out = Path(args.train_out)
    try:  # a usage error, not a traceback, for a folder that lacks what is measured
        results = json.loads((train_out / "results.json").read_text())
        for run in args.runs:
            find_checkpoint(train_out, [run])
        first, _ = load_trained_model(find_checkpoint(train_out, [args.runs[0]]))
    except (FileNotFoundError, CheckpointError) as e:
        p.error(f"--train-out {args.train_out}: {e}")
    t0 = time.time()
    windows = validation_windows(train_out, first.config.vocab_size)
    models = [measure_run(run, args, windows) for run in args.runs]
    used = min(len(windows), args.max_batches * args.batch) if args.max_batches else len(windows)
    result = {"preset": results["preset"], "train_out": os.path.abspath(args.train_out),
              "val_windows": used, "seq_len": int(windows.shape[1]), "chunk": args.chunk,
              "batch": args.batch, "threads": torch.get_num_threads(),
              "budget": BUDGET, "models": models, "wall_s": round(time.time() - t0, 1),
              "command": "python bench/quant_ppl.py " + " ".join(
                  argv if argv is not None else sys.argv[1:])}
    table = markdown_table(result)
    os.makedirs(args.out, exist_ok=True)
    notes = "\n".join(f"- {m['run']}: uncached forward ppl {m['uncached_ppl']:.4f}, float32 "
                      f"cache {m['float_cache_ppl']:.4f}" for m in models)
    write_report(os.path.join(args.out, f"quant_ppl_{result['preset']}"), result, table,
                 f"{result['preset']}: {used} validation windows of {result['seq_len']} tokens, "
                 f"cached decoding {args.chunk} token(s) per step, folded models; deltas "
                 f"against the same model's float32 cache without rotation; budget int8 <= "
                 f"+0.5%, float8_e4m3fn <= +2%.", notes)
    return result


if __name__ == "__main__":
    main()
