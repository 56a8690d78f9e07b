"""End-to-end decoding: the V-DProj models with their compressed KV caches against the same
model uncompressed (same weights otherwise), in one run, interleaved, medians.

    python bench/bench_decode.py                      # pythia-70m shape, CPU, float32
    python bench/bench_decode.py --preset pythia-70m-kv   # latent keys too (issue 10)
    python bench/bench_decode.py --quick              # a smaller grid
    python bench/bench_decode.py --device cuda --dtype bfloat16 --batches 1 8 32 128

Measured per (batch, context): KV-cache bytes, the largest batch whose weights + cache fit a
memory budget, and decode throughput (new tokens per second over the whole batch) of a decode
step at that context: embedding, all layers with cached attention, final norm, LM head and
argmax, i.e. what generate() runs per token. The caches are filled to the context length
directly with random keys and values (a 2048-token prefill per point would take minutes on
2 cores and does not change what a decode step reads).

The models (--models picks some): "uncompressed"; "v-only", compressed values (the preset's
v_rank); "kv", latent keys as well (only for a preset with k_rank or joint_kv, such as
pythia-70m-kv); and each compressed one "+fold", after model.prepare_for_inference() (the
compress projections folded into the fused query/key/value projection: what generate() users
and vdproj-generate decode with), to measure what the folds gain. Every model's tokens/s is
also given as a ratio to the uncompressed model's: the median of the ratios measured within
each interleaved repetition, with every point timed for at least --min-seconds (run_grid).

Writes a markdown table and a PNG plot (--out, default bench/results/), and prints which
backend ran. The pytest functions at the bottom are small smoke benchmarks collected by
`pytest --benchmark-only` (and run once in the ordinary test suite).
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import random
import statistics
import sys
import time

import torch

try:
    import vdproj_ext
except ImportError:  # run as a script from a source checkout without an install
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import vdproj_ext
from vdproj_ext import VDProjConfig, VDProjForCausalLM
from vdproj_ext.ops.quant import write_rows

CACHE_DTYPES = {"int8": torch.int8, "fp8": torch.float8_e4m3fn}

HERE = os.path.dirname(os.path.abspath(__file__))


# ---------------------------------------------------------------------------------------------
# Measurement


def model_configs(config):
    """name -> config of the compressed models a preset implies (module docstring)."""
    configs = {"uncompressed": config.uncompressed(),
               "v-only": config.replace(k_rank=None, joint_kv=False)}
    if config.latent_keys:
        configs["kv"] = config
    return configs


def build_models(config, dtype, device, names=None):
    """The models of model_configs(config) (and their "+fold" variants) sharing every
    GPT-NeoX weight (same init seed); names: which of them (default: all)."""
    models = {}
    for name, cfg in model_configs(config).items():
        model = VDProjForCausalLM(cfg, init_seed=0).to(device, dtype).eval()
        models[name] = model
        if name != "uncompressed":
            models[name + "+fold"] = copy.deepcopy(model).prepare_for_inference()
    shared = models["uncompressed"].state_dict()
    for name in ("v-only", "kv"):
        for key, t in models[name].state_dict().items() if name in models else ():
            if key in shared:
                assert torch.equal(t, shared[key]), f"{key} differs between the models"
    if names:
        unknown = sorted(set(names) - set(models))
        if unknown:
            raise SystemExit(f"--models: unknown {unknown}; this preset has {list(models)}")
        models = {n: m for n, m in models.items() if n in names or n == "uncompressed"}
    return models


def cache_dtype_of(name):
    """A model entry "<model>@int8" or "@fp8" decodes with that quantized cache (SPEC 3c)."""
    return CACHE_DTYPES[name.split("@")[1]] if "@" in name else None


def with_quantized_caches(models, cache_dtypes):
    """Each compressed model's folded form also with each quantized cache (same weights)."""
    extra = {f"{name}@{kind}": model for kind in cache_dtypes for name, model in models.items()
             if name.endswith("+fold")}
    return {**models, **extra}


def weight_bytes(model):
    return sum(p.numel() * p.element_size() for p in model.parameters())


def fill_cache(cache, context, gen):
    """Random finite keys/values in the first `context` slots (quantized with their scales in
    a quantized cache), seqlens = context."""
    for buf, scale in cache.stored_tensors():
        values = torch.randn(buf[:, :context].shape, generator=gen) * 0.5
        write_rows(buf, scale, (slice(None), slice(0, context)), values.to(buf.device))
    cache.seqlens.fill_(context)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


@torch.no_grad()
def decode_steps(model, cache, context, tokens, steps, device):
    """Time `steps` decode steps starting at `context` cached tokens; per-step seconds."""
    cache.seqlens.fill_(context)
    times = []
    tok = tokens
    for _ in range(steps):
        sync(device)
        t0 = time.perf_counter()
        logits = model(tok, cache=cache).logits
        tok = logits[:, -1].argmax(-1, keepdim=True)
        sync(device)
        times.append(time.perf_counter() - t0)
    return times


def run_grid(models, batches, contexts, *, steps, reps, warmup, device, dtype, budget_bytes,
             min_seconds=0.0, log=print):
    """One row per (batch, context). Each point runs at least `reps` interleaved repetitions,
    and more where steps are cheap, so that every point is timed for about `min_seconds` (all
    models together, estimated from the warm-up): a 12 ms step at batch 1 is otherwise timed
    36 times, too few against this machine's noise for a 2% question. A model's "speedup" is
    the median over repetitions of its step time's ratio to the uncompressed model's in the
    same repetition (paired, so a burst of load that hits one repetition cancels);
    "speedup_of_medians" is the plain ratio of median tokens/s, kept for comparison."""
    rows = []
    vocab = models["uncompressed"].config.vocab_size
    gen = torch.Generator().manual_seed(0)
    for context in contexts:
        for batch in batches:
            caches = {}
            for name, model in models.items():
                cache = model.new_cache(batch, context + steps + warmup, dtype=dtype,
                                        cache_dtype=cache_dtype_of(name))
                fill_cache(cache, context, gen)
                caches[name] = cache
            tokens = torch.randint(0, vocab, (batch, 1), generator=gen).to(device)
            per_step = {name: [] for name in models}
            per_rep = {name: [] for name in models}  # median step of each repetition
            round_s = 0.0  # one repetition of every model, estimated from the warm-up
            for name, model in models.items():  # warm-up (allocator, OpenMP pool)
                warm = decode_steps(model, caches[name], context, tokens, warmup, device)
                round_s += steps * statistics.median(warm) if warm else 0.0
            # without a warm-up (--warmup 0) there is no estimate: exactly `reps`
            reps_here = max(reps, math.ceil(min_seconds / round_s)) if round_s > 0 else reps
            names = list(models)
            order = random.Random(context * 1000 + batch)
            for rep in range(reps_here):  # interleaved, so drifts in machine load hit all
                # alike, in an order shuffled each repetition: a fixed rotation still let one
                # model follow the same neighbour (and its cache footprint) every time
                order.shuffle(names)
                for name in names:
                    times = decode_steps(models[name], caches[name], context, tokens, steps,
                                         device)
                    per_step[name] += times
                    per_rep[name].append(statistics.median(times))
            row = {"batch": batch, "context": context, "reps": reps_here}
            for name in models:
                step_s = statistics.median(per_step[name])
                cache_bytes = caches[name].nbytes
                seq_bytes = cache_bytes // batch  # per sequence at this cache length
                row[name] = {"step_ms": 1e3 * step_s, "tokens_per_s": batch / step_s,
                             "cache_bytes": cache_bytes,
                             "iqr_ms": 1e3 * _iqr(per_step[name]),
                             "max_batch_in_budget": max(0, (budget_bytes - weight_bytes(
                                 models[name])) // seq_bytes)}
            base = row["uncompressed"]
            for name in models:  # ratios to the uncompressed model
                paired = [b / m for b, m in zip(per_rep["uncompressed"], per_rep[name])]
                row[name]["speedup"] = statistics.median(paired)
                row[name]["speedup_iqr"] = _iqr(paired)
                row[name]["speedup_of_medians"] = (row[name]["tokens_per_s"]
                                                   / base["tokens_per_s"])
                row[name]["cache_reduction"] = 1 - row[name]["cache_bytes"] / base["cache_bytes"]
            log(_row_line(row, list(models)))
            rows.append(row)
            del caches
    return rows


def _iqr(xs):
    q = statistics.quantiles(xs, n=4) if len(xs) >= 2 else [xs[0]] * 3
    return q[2] - q[0]


def _row_line(row, names):
    s = f"batch {row['batch']:4d} ctx {row['context']:5d} reps {row.get('reps', '-'):>3} | tok/s"
    for name in names:
        r = row[name]
        s += f" {name} {r['tokens_per_s']:.1f}"
        if name != "uncompressed":
            s += f" (x{r['speedup']:.3f}, cache -{100 * r['cache_reduction']:.2f}%)"
    return s


def markdown_table(rows, meta):
    """One row per (batch, context): each model's cache (MiB), tokens/s and ratio to the
    uncompressed model, and the largest batch of each model in the memory budget."""
    names = [n for n in rows[0] if isinstance(rows[0][n], dict)]
    head = "| batch | context | reps |"
    head += "".join(f" {n} cache (MiB) |" for n in names if not n.endswith("+fold"))
    head += "".join(f" {n} tok/s |" + ("" if n == "uncompressed" else f" {n} vs uncompr. |")
                    for n in names)
    head += f" max batch in {meta['budget_gib']:g} GiB ({' / '.join(names)}) |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        line = f"| {r['batch']} | {r['context']} | {r.get('reps', '-')} |"
        line += "".join(f" {r[n]['cache_bytes'] / 2**20:.1f} |" for n in names
                        if not n.endswith("+fold"))
        line += "".join(f" {r[n]['tokens_per_s']:.1f} |" +
                        ("" if n == "uncompressed" else f" {r[n]['speedup']:.3f}x |")
                        for n in names)
        line += f" {' / '.join(str(r[n]['max_batch_in_budget']) for n in names)} |"
        lines.append(line)
    return "\n".join(lines)


def plot(rows, path, title):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    contexts = sorted({r["context"] for r in rows})
    batches = sorted({r["batch"] for r in rows})
    names = [n for n in rows[0] if isinstance(rows[0][n], dict)]
    styles = ["--o", "-s", ":^", "-D", ":v"]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for ctx in contexts:
        sel = [r for r in rows if r["context"] == ctx]
        bs = [r["batch"] for r in sel]
        color = None
        for name, style in zip(names, styles):
            line = axes[0].plot(bs, [r[name]["tokens_per_s"] for r in sel], style, color=color,
                                label=f"{name}, ctx {ctx}")[0]
            color = line.get_color()
            if name != "uncompressed":
                axes[1].plot(bs, [r[name]["speedup"] for r in sel], style, color=color,
                             label=f"{name}, ctx {ctx}")
    for ax in axes:
        ax.set_xscale("log", base=2)
        ax.set_xticks(batches, [str(b) for b in batches])
        ax.set_xlabel("batch size")
        ax.legend(fontsize=6)
    axes[0].set_ylabel("decode tokens / s")
    axes[0].set_title("decode throughput")
    axes[1].axhline(1.0, color="grey", lw=0.8)
    axes[1].axhline(0.98, color="grey", lw=0.8, ls=":")
    axes[1].set_ylabel("tokens/s relative to uncompressed")
    axes[1].set_title("decode speed relative to the uncompressed model")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="pythia-70m")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--batches", type=int, nargs="+", default=[1, 4, 8, 16])
    p.add_argument("--contexts", type=int, nargs="+", default=[256, 1024, 2048])
    p.add_argument("--steps", type=int, default=6, help="decode steps per repetition")
    p.add_argument("--reps", type=int, default=5, help="interleaved repetitions")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--min-seconds", type=float, default=10.0,
                   help="time each (batch, context) point for at least this long, all models "
                        "together, by raising --reps where steps are cheap (0: exactly --reps)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads on CPU (default: all cores torch sees)")
    p.add_argument("--budget-gib", type=float, default=2.0,
                   help="memory budget (weights + KV cache) for the largest-batch column")
    p.add_argument("--models", nargs="+", default=None,
                   help="which models to time (default: all the preset implies; the "
                        "uncompressed one always runs): uncompressed v-only v-only+fold kv "
                        "kv+fold")
    p.add_argument("--cache-dtypes", nargs="*", default=[], choices=sorted(CACHE_DTYPES),
                   help="also decode each folded compressed model with these quantized caches "
                        "(rows '<model>+fold@int8', '@fp8': int8 or float8_e4m3fn, SPEC 3c)")
    p.add_argument("--quick", action="store_true", help="batches 1 8, contexts 256 2048")
    p.add_argument("--out", default=os.path.join(HERE, "results"))
    args = p.parse_args(argv)
    if args.quick:
        args.batches, args.contexts = [1, 8], [256, 2048]
    if args.threads:
        torch.set_num_threads(args.threads)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    info = vdproj_ext.backend_info()
    backend = info["auto_backend"].get(device.type, "reference")
    print(f"vdproj_ext backend on {device.type}: {backend}  (torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, openmp {info['openmp']})")
    if backend != "ext":
        print("WARNING: compiled kernels unavailable; the compressed model runs the slow "
              f"pure-PyTorch reference ({info['extension_error']})")
    cfg = VDProjConfig.preset(args.preset)
    models = with_quantized_caches(build_models(cfg, dtype, device, args.models),
                                   args.cache_dtypes)
    budget = int(args.budget_gib * 2**30)
    t0 = time.time()
    rows = run_grid(models, args.batches, args.contexts, steps=args.steps, reps=args.reps,
                    warmup=args.warmup, device=device, dtype=dtype, budget_bytes=budget,
                    min_seconds=args.min_seconds)
    meta = {"preset": args.preset, "device": str(device), "dtype": args.dtype,
            "backend": backend, "threads": torch.get_num_threads(), "torch": torch.__version__,
            "budget_gib": args.budget_gib, "steps": args.steps, "reps": args.reps,
            "min_seconds": args.min_seconds,
            "weight_bytes": {k: weight_bytes(m) for k, m in models.items()},
            "command": "python bench/bench_decode.py " + " ".join(argv if argv is not None
                                                                   else sys.argv[1:]),
            "wall_s": round(time.time() - t0, 1)}
    os.makedirs(args.out, exist_ok=True)
    stem = f"decode_{args.preset}_{device.type}_{args.dtype}_{meta['threads']}t"
    if args.cache_dtypes:
        stem += "_cache-" + "-".join(args.cache_dtypes)
    table = markdown_table(rows, meta)
    with open(os.path.join(args.out, stem + ".md"), "w") as f:
        f.write(f"{meta['command']}\n\n{args.preset}, {device.type}, {args.dtype}, backend "
                f"{backend}, {meta['threads']} threads, medians of at least "
                f"{args.reps}x{args.steps} decode steps (more repetitions where steps are "
                f"cheap: at least {args.min_seconds:g} s a point, column reps); 'vs uncompr.' "
                f"is the median of per-repetition paired ratios\n\n{table}\n")
    with open(os.path.join(args.out, stem + ".json"), "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1)
    plot(rows, os.path.join(args.out, stem + ".png"),
         f"{args.preset}, {device.type} {args.dtype}, backend {backend}, "
         f"{meta['threads']} threads")
    print()
    print(table)
    print(f"\nwrote {os.path.join(args.out, stem)}.{{md,json,png}} in {meta['wall_s']} s")
    return rows


# ---------------------------------------------------------------------------------------------
# pytest-benchmark: one small decode step each (seconds, not minutes)


def _small_setup(preset, batch=4, context=192):
    """A prepared (folded) cpu-small model of `preset` ("uncompressed" for the baseline) with
    a cache filled to `context`."""
    cfg = (VDProjConfig.preset("cpu-small").uncompressed() if preset == "uncompressed"
           else VDProjConfig.preset(preset))
    model = VDProjForCausalLM(cfg, init_seed=0).prepare_for_inference()
    cache = model.new_cache(batch, context + 1)
    fill_cache(cache, context, torch.Generator().manual_seed(0))
    tokens = torch.zeros(batch, 1, dtype=torch.long)
    return model, cache, context, tokens


def _bench_step(benchmark, preset):
    model, cache, context, tokens = _small_setup(preset)

    def step():
        cache.seqlens.fill_(context)
        with torch.no_grad():
            return model(tokens, cache=cache).logits

    logits = benchmark(step)
    assert logits.shape == (4, 1, model.config.vocab_size) and torch.isfinite(logits).all()


def test_decode_step_compressed(benchmark):
    _bench_step(benchmark, "cpu-small")


def test_decode_step_latent_kv(benchmark):
    _bench_step(benchmark, "cpu-small-kv")


def test_decode_step_uncompressed(benchmark):
    _bench_step(benchmark, "uncompressed")


def test_fold_matches_unfolded():
    """The prepared (folded) variants decode the same logits as the models they come from
    (also tested in python_tests/test_generate.py and test_latent_model.py)."""
    for preset in ("smoke", "smoke-kv"):
        cfg = VDProjConfig.preset(preset)
        model = VDProjForCausalLM(cfg, init_seed=0).double().eval()
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith("bias"):
                    p.normal_()
        folded = copy.deepcopy(model).prepare_for_inference()
        ids = torch.randint(0, cfg.vocab_size, (2, 9))
        c1, c2 = model.new_cache(2, 12), folded.new_cache(2, 12)
        with torch.no_grad():
            a = torch.cat([model(ids[:, :5], cache=c1).logits] +
                          [model(ids[:, i:i + 1], cache=c1).logits for i in range(5, 9)], 1)
            b = torch.cat([folded(ids[:, :5], cache=c2).logits] +
                          [folded(ids[:, i:i + 1], cache=c2).logits for i in range(5, 9)], 1)
        assert (a - b).abs().max() < 1e-10, preset


def test_grid_and_table_on_a_tiny_setting():
    import pytest
    models = build_models(VDProjConfig.preset("smoke-kv"), torch.float32, torch.device("cpu"))
    assert list(models) == ["uncompressed", "v-only", "v-only+fold", "kv", "kv+fold"]
    rows = run_grid(models, [2], [8], steps=1, reps=1, warmup=1, device=torch.device("cpu"),
                    dtype=torch.float32, budget_bytes=2**20, log=lambda line: None)
    assert rows[0]["kv"]["cache_reduction"] == pytest.approx(0.25)  # smoke: rotary on half
    table = markdown_table(rows, {"budget_gib": 0.001})
    assert table.count("\n") == 2 and "kv+fold vs uncompr." in table


if __name__ == "__main__":
    main()
