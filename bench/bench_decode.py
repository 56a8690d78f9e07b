"""End-to-end decoding: the V-DProj model with its compressed KV cache against the same model
uncompressed (same weights otherwise), in one run, interleaved, medians.

    python bench/bench_decode.py                      # pythia-70m shape, CPU, float32
    python bench/bench_decode.py --quick              # a smaller grid
    python bench/bench_decode.py --device cuda --dtype bfloat16 --batches 1 8 32 128

Measured per (batch, context): KV-cache bytes, the largest batch whose weights + cache fit a
memory budget, and decode throughput (new tokens per second over the whole batch) of a decode
step at that context: embedding, all layers with cached attention, final norm, LM head and
argmax, i.e. what generate() runs per token. The caches are filled to the context length
directly with random keys and values (a 2048-token prefill per point would take minutes on
2 cores and does not change what a decode step reads). "compressed+fold" is the compressed model
after vdproj_ext.models.fold_v_compress (v_compress folded into the value projection: one
linear map x -> V_c), to measure whether that pays.

Writes a markdown table and a PNG plot (--out, default bench/results/), and prints which
backend ran. The pytest functions at the bottom are small smoke benchmarks collected by
`pytest --benchmark-only` (and run once in the ordinary test suite).
"""
from __future__ import annotations

import argparse
import json
import os
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
from vdproj_ext.models import fold_v_compress

HERE = os.path.dirname(os.path.abspath(__file__))


# ---------------------------------------------------------------------------------------------
# Measurement


def build_models(config, dtype, device, fold=True):
    """Compressed and uncompressed models sharing every GPT-NeoX weight (same init seed)."""
    comp = VDProjForCausalLM(config, init_seed=0).to(device, dtype).eval()
    base = VDProjForCausalLM(config.replace(v_rank=None), init_seed=0).to(device, dtype).eval()
    shared = base.state_dict()
    for name, t in comp.state_dict().items():
        if name in shared:
            assert torch.equal(t, shared[name]), f"{name} differs between the two models"
    models = {"uncompressed": base, "compressed": comp}
    if fold:
        models["compressed+fold"] = fold_v_compress(comp)
    return models


def weight_bytes(model):
    return sum(p.numel() * p.element_size() for p in model.parameters())


def fill_cache(cache, context, gen):
    """Random finite keys/values in the first `context` slots, seqlens = context."""
    bufs = cache.k_cache + (cache.vc_cache if hasattr(cache, "vc_cache") else cache.v_cache)
    for buf in bufs:
        buf[:, :context].copy_(torch.randn(buf[:, :context].shape, generator=gen) * 0.5)
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
             log=print):
    rows = []
    cfg = models["compressed"].config
    gen = torch.Generator().manual_seed(0)
    for context in contexts:
        for batch in batches:
            caches = {}
            for name, model in models.items():
                cache = model.new_cache(batch, context + steps + warmup, dtype=dtype)
                fill_cache(cache, context, gen)
                caches[name] = cache
            tokens = torch.randint(0, cfg.vocab_size, (batch, 1), generator=gen).to(device)
            per_step = {name: [] for name in models}
            for name, model in models.items():  # warm-up (allocator, OpenMP pool)
                decode_steps(model, caches[name], context, tokens, warmup, device)
            for _ in range(reps):  # interleaved, so drifts in machine load hit all alike
                for name, model in models.items():
                    per_step[name] += decode_steps(model, caches[name], context, tokens, steps,
                                                   device)
            row = {"batch": batch, "context": context}
            for name in models:
                step_s = statistics.median(per_step[name])
                cache_bytes = caches[name].nbytes
                seq_bytes = cache_bytes // batch  # per sequence at this cache length
                row[name] = {"step_ms": 1e3 * step_s, "tokens_per_s": batch / step_s,
                             "cache_bytes": cache_bytes,
                             "iqr_ms": 1e3 * _iqr(per_step[name]),
                             "max_batch_in_budget": max(0, (budget_bytes - weight_bytes(
                                 models[name])) // seq_bytes)}
            row["speedup"] = row["compressed"]["tokens_per_s"] / row["uncompressed"]["tokens_per_s"]
            if "compressed+fold" in models:
                row["fold_speedup"] = (row["compressed+fold"]["tokens_per_s"]
                                       / row["compressed"]["tokens_per_s"])
            row["cache_reduction"] = 1 - (row["compressed"]["cache_bytes"]
                                          / row["uncompressed"]["cache_bytes"])
            log(_row_line(row))
            rows.append(row)
            del caches
    return rows


def _iqr(xs):
    q = statistics.quantiles(xs, n=4) if len(xs) >= 2 else [xs[0]] * 3
    return q[2] - q[0]


def _row_line(row):
    u, c = row["uncompressed"], row["compressed"]
    s = (f"batch {row['batch']:4d} ctx {row['context']:5d} | tok/s uncompressed "
         f"{u['tokens_per_s']:9.1f} compressed {c['tokens_per_s']:9.1f} "
         f"x{row['speedup']:.3f}")
    if "fold_speedup" in row:
        s += f" | fold {row['compressed+fold']['tokens_per_s']:9.1f} x{row['fold_speedup']:.3f}"
    return s + f" | cache -{100 * row['cache_reduction']:.2f}%"


def markdown_table(rows, meta):
    fold = "fold_speedup" in rows[0]
    head = ("| batch | context | KV cache uncompressed (MiB) | compressed (MiB) | reduction "
            "| tok/s uncompressed | tok/s compressed | speedup |"
            + (" tok/s compressed+fold | fold vs compressed |" if fold else "")
            + f" max batch in {meta['budget_gib']:g} GiB (uncompr. / compr.) |")
    sep = "|" + "---|" * (head.count("|") - 1)
    lines = [head, sep]
    for r in rows:
        u, c = r["uncompressed"], r["compressed"]
        line = (f"| {r['batch']} | {r['context']} | {u['cache_bytes'] / 2**20:.1f} | "
                f"{c['cache_bytes'] / 2**20:.1f} | {100 * r['cache_reduction']:.2f}% | "
                f"{u['tokens_per_s']:.1f} | {c['tokens_per_s']:.1f} | {r['speedup']:.3f}x |")
        if fold:
            line += (f" {r['compressed+fold']['tokens_per_s']:.1f} | "
                     f"{r['fold_speedup']:.3f}x |")
        line += f" {u['max_batch_in_budget']} / {c['max_batch_in_budget']} |"
        lines.append(line)
    return "\n".join(lines)


def plot(rows, path, title):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    contexts = sorted({r["context"] for r in rows})
    batches = sorted({r["batch"] for r in rows})
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for ctx in contexts:
        sel = [r for r in rows if r["context"] == ctx]
        bs = [r["batch"] for r in sel]
        line = axes[0].plot(bs, [r["uncompressed"]["tokens_per_s"] for r in sel], "--o",
                            label=f"uncompressed, ctx {ctx}")[0]
        axes[0].plot(bs, [r["compressed"]["tokens_per_s"] for r in sel], "-s",
                     color=line.get_color(), label=f"V-DProj, ctx {ctx}")
        axes[1].plot(bs, [r["speedup"] for r in sel], "-s", color=line.get_color(),
                     label=f"V-DProj, ctx {ctx}")
        if "compressed+fold" in sel[0]:
            axes[1].plot(bs, [r["compressed+fold"]["tokens_per_s"] / r["uncompressed"][
                "tokens_per_s"] for r in sel], ":^", color=line.get_color(),
                label=f"V-DProj + fold, ctx {ctx}")
    axes[0].set_xscale("log", base=2)
    axes[0].set_xlabel("batch size")
    axes[0].set_ylabel("decode tokens / s")
    axes[0].set_xticks(batches, [str(b) for b in batches])
    axes[0].legend(fontsize=7)
    axes[0].set_title("decode throughput")
    axes[1].axhline(1.0, color="grey", lw=0.8)
    axes[1].axhline(1.1, color="grey", lw=0.8, ls=":")
    axes[1].set_xscale("log", base=2)
    axes[1].set_xticks(batches, [str(b) for b in batches])
    axes[1].set_xlabel("batch size")
    axes[1].set_ylabel("V-DProj / uncompressed")
    axes[1].set_title("decode speedup (KV cache 18.75% smaller)")
    axes[1].legend(fontsize=7)
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
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads on CPU (default: all cores torch sees)")
    p.add_argument("--budget-gib", type=float, default=2.0,
                   help="memory budget (weights + KV cache) for the largest-batch column")
    p.add_argument("--no-fold", action="store_true", help="skip the folded-v_compress variant")
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
    models = build_models(cfg, dtype, device, fold=not args.no_fold)
    budget = int(args.budget_gib * 2**30)
    t0 = time.time()
    rows = run_grid(models, args.batches, args.contexts, steps=args.steps, reps=args.reps,
                    warmup=args.warmup, device=device, dtype=dtype, budget_bytes=budget)
    meta = {"preset": args.preset, "device": str(device), "dtype": args.dtype,
            "backend": backend, "threads": torch.get_num_threads(), "torch": torch.__version__,
            "budget_gib": args.budget_gib, "steps": args.steps, "reps": args.reps,
            "weight_bytes": {k: weight_bytes(m) for k, m in models.items()},
            "command": "python bench/bench_decode.py " + " ".join(argv if argv is not None
                                                                   else sys.argv[1:]),
            "wall_s": round(time.time() - t0, 1)}
    os.makedirs(args.out, exist_ok=True)
    stem = f"decode_{args.preset}_{device.type}_{args.dtype}_{meta['threads']}t"
    table = markdown_table(rows, meta)
    with open(os.path.join(args.out, stem + ".md"), "w") as f:
        f.write(f"{meta['command']}\n\n{args.preset}, {device.type}, {args.dtype}, backend "
                f"{backend}, {meta['threads']} threads, medians of {args.reps}x{args.steps} "
                f"decode steps\n\n{table}\n")
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


def _small_setup(v_rank, batch=4, context=192):
    cfg = VDProjConfig.preset("cpu-small")
    model = VDProjForCausalLM(cfg if v_rank else cfg.replace(v_rank=None), init_seed=0).eval()
    cache = model.new_cache(batch, context + 1)
    fill_cache(cache, context, torch.Generator().manual_seed(0))
    tokens = torch.zeros(batch, 1, dtype=torch.long)
    return model, cache, context, tokens


def _bench_step(benchmark, v_rank):
    model, cache, context, tokens = _small_setup(v_rank)

    def step():
        cache.seqlens.fill_(context)
        with torch.no_grad():
            return model(tokens, cache=cache).logits

    logits = benchmark(step)
    assert logits.shape == (4, 1, model.config.vocab_size) and torch.isfinite(logits).all()


def test_decode_step_compressed(benchmark):
    _bench_step(benchmark, True)


def test_decode_step_uncompressed(benchmark):
    _bench_step(benchmark, False)


def test_fold_matches_unfolded():
    """The folded variant decodes the same logits as the compressed model (also tested in
    python_tests/test_generate.py)."""
    cfg = VDProjConfig.preset("smoke")
    model = VDProjForCausalLM(cfg, init_seed=0).double().eval()
    with torch.no_grad():
        for attn in model.attention_modules():
            attn.v_compress.bias.normal_()
            attn.query_key_value.bias.normal_()
    folded = fold_v_compress(model)
    ids = torch.randint(0, cfg.vocab_size, (2, 9))
    c1, c2 = model.new_cache(2, 12), folded.new_cache(2, 12)
    with torch.no_grad():
        a = torch.cat([model(ids[:, :5], cache=c1).logits] +
                      [model(ids[:, i:i + 1], cache=c1).logits for i in range(5, 9)], 1)
        b = torch.cat([folded(ids[:, :5], cache=c2).logits] +
                      [folded(ids[:, i:i + 1], cache=c2).logits for i in range(5, 9)], 1)
    assert (a - b).abs().max() < 1e-10


if __name__ == "__main__":
    main()
