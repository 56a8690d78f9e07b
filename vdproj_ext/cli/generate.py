"""vdproj-generate: generate text with a V-DProj model and report its KV cache and speed.

    vdproj-generate --checkpoint out/checkpoints/two_phase.pt --prompt "ROMEO:" --max-new-tokens 50
    vdproj-generate --checkpoint out --run e2e --prompt "To be"            # a training output dir
    vdproj-generate --checkpoint path/to/pythia-70m --v-rank 320 --prompt "Hello"   # HF folder
    vdproj-generate --checkpoint path/to/pythia-70m --v-rank 320 --k-rank 192 --prompt "Hi"

--checkpoint is one of
  * a training checkpoint written by `python -m vdproj_ext.train` (a .pt file holding the
    model config and state dict), or its output folder (then --run picks the run, default
    two_phase, else e2e, else baseline);
  * a Hugging Face GPT-NeoX folder (config.json + weights). With --v-rank it is compressed on
    load (with --k-rank its keys too: latent keys, SPEC 3b), the compress/restore pairs fitted
    by --init on --calibration-text (default: the embedded Shakespeare text when available).
A compressed model decodes after model.prepare_for_inference(), which folds the compress
projections into the query/key/value projection (--no-fold skips it). --cache-dtype int8 or
fp8 (float8_e4m3fn) stores the KV cache quantized, with float32 per-row scales (SPEC 3c).
The tokenizer is --tokenizer (a tokenizer.json, "neox" or "bytes"), else the one the checkpoint
names or ships (tokenizer.json beside it), else the GPT-NeoX-20B tokenizer.
Loading is vdproj_ext.experiment.inference.load_model; this module parses and prints.
"""
from __future__ import annotations

import argparse
import sys
import time

import torch

from ..experiment.inference import load_model
from ..experiment.protocol import REFERENCE_RANKING, RUN_NAMES
from ..models import kv_cache_nbytes
from ..models.calibration import INITS
from ..ops import backend_info
from .argtypes import non_negative_float, positive_int

CACHE_DTYPES = {"model": None, "int8": torch.int8, "fp8": torch.float8_e4m3fn}


def _fmt_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n} B"
        n /= 1024
    return f"{n} B"


def _backend(t) -> str:
    return backend_info()["auto_backend"].get(t.device.type, "reference")


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="vdproj-generate",
                                description="Generate text with a V-DProj model; report the "
                                            "KV cache size and tokens per second.")
    p.add_argument("--checkpoint", required=True,
                   help="training checkpoint (.pt) or output folder, or a HF GPT-NeoX folder")
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-new-tokens", type=positive_int, default=50)
    p.add_argument("--temperature", type=non_negative_float, default=0.0, help="0: greedy")
    p.add_argument("--top-k", type=positive_int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eos-token-id", type=int, default=None)
    p.add_argument("--tokenizer", default=None, help="tokenizer.json path, 'neox' or 'bytes'")
    p.add_argument("--run", choices=RUN_NAMES, default=None,
                   help="which run of a training output folder (default: the first present "
                        f"of {', '.join(REFERENCE_RANKING)})")
    p.add_argument("--v-rank", type=positive_int, default=None,
                   help="compress a HF GPT-NeoX checkpoint to this rank on load")
    p.add_argument("--k-rank", type=positive_int, default=None,
                   help="with --v-rank: also compress the keys' non-rotary dims to this rank")
    p.add_argument("--init", default=None, choices=INITS,
                   help="how --v-rank converts a HF folder (default pca)")
    p.add_argument("--calibration-text", default=None, help="text file for --init pca/svd")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--device", default="cpu")
    p.add_argument("--cache-dtype", default="model", choices=sorted(CACHE_DTYPES),
                   help="KV cache storage: the model's dtype, or int8 / fp8 (float8_e4m3fn) "
                        "with float32 per-row scales")
    p.add_argument("--threads", type=positive_int, default=None)
    p.add_argument("--no-fold", action="store_true",
                   help="keep the compress projections separate (by default a compressed "
                        "model decodes after model.prepare_for_inference(), which folds them "
                        "into the query/key/value projection: faster)")
    return p.parse_args(argv)


def _error(msg: str) -> int:
    print(f"vdproj-generate: error: {msg}", file=sys.stderr)
    return 2


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        model, tok, desc = load_model(args.checkpoint, run=args.run, v_rank=args.v_rank,
                                      k_rank=args.k_rank, init=args.init,
                                      calibration_text=args.calibration_text,
                                      tokenizer=args.tokenizer, dtype=getattr(torch, args.dtype),
                                      device=args.device)
    except (FileNotFoundError, ValueError, RuntimeError, TypeError) as exc:
        return _error(str(exc))
    cfg = model.config
    if cfg.v_rank is not None and not args.no_fold:
        model = model.prepare_for_inference()
        desc += ", compress projections folded (prepare_for_inference)"
    # The tokenizer must decode every id generated: a smaller vocabulary than the model's
    # (Pythia's embedding is padded past its tokenizer; bytes on a larger model) restricts
    # generation to its ids; a larger one does not belong to this model.
    tok_vocab = getattr(tok, "vocab_size", None)
    if tok_vocab is not None and tok_vocab > cfg.vocab_size:
        return _error(f"the tokenizer has {tok_vocab} token ids, more than the model's "
                      f"vocab_size {cfg.vocab_size}; pass the matching --tokenizer")
    prompt_ids = tok.encode(args.prompt)
    if not prompt_ids:
        return _error("the prompt encodes to no tokens")
    if max(prompt_ids) >= cfg.vocab_size:
        return _error(f"the tokenizer produced ids up to {max(prompt_ids)}, beyond the model's "
                      f"vocab_size {cfg.vocab_size}; pass the matching --tokenizer")
    ids = torch.tensor([prompt_ids], device=args.device)
    gen = torch.Generator(device=args.device).manual_seed(args.seed)
    t0 = time.perf_counter()
    out = model.generate(ids, args.max_new_tokens, temperature=args.temperature,
                         top_k=args.top_k, eos_token_id=args.eos_token_id, generator=gen,
                         cache_dtype=CACHE_DTYPES[args.cache_dtype], vocab_limit=tok_vocab)
    if ids.device.type == "cuda":
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - t0
    new = out[0, len(prompt_ids):].tolist()
    if args.eos_token_id is not None and args.eos_token_id in new:
        new = new[:new.index(args.eos_token_id) + 1]
    print(args.prompt + tok.decode(new))
    print("-" * 60)
    print(f"model: {desc}")
    print(_cache_line(cfg, len(prompt_ids) + args.max_new_tokens, getattr(torch, args.dtype),
                      CACHE_DTYPES[args.cache_dtype]))
    print(f"speed: {len(new)} new tokens in {elapsed:.3f} s = {len(new) / elapsed:.1f} tokens/s "
          f"(prefill of {len(prompt_ids)} prompt tokens included; kernels: {_backend(ids)}, "
          f"{torch.get_num_threads()} threads)")
    return 0


def _cache_line(cfg, max_len: int, dtype: torch.dtype, cache_dtype=None) -> str:
    """The KV cache of one sequence of max_len tokens (scales included when quantized),
    against the uncompressed one in the model's dtype."""
    elem = torch.empty((), dtype=dtype).element_size()
    shape = (cfg.num_layers, 1, max_len, cfg.num_heads, cfg.head_dim)
    # the config knows latent keys
    used = kv_cache_nbytes(*shape, cfg.v_rank, elem, config=cfg, cache_dtype=cache_dtype)
    full = kv_cache_nbytes(*shape, None, elem)
    stored = "" if cache_dtype is None else f" ({cache_dtype} with float32 scales)"
    if cfg.v_rank is not None or cache_dtype is not None:
        return (f"KV cache: {used} bytes ({_fmt_bytes(used)}) for {max_len} tokens{stored}; "
                f"uncompressed {full} bytes ({_fmt_bytes(full)}): "
                f"{100 * (1 - used / full):.2f}% smaller")
    return (f"KV cache: {used} bytes ({_fmt_bytes(used)}) for {max_len} tokens (uncompressed "
            f"model; V-DProj at the reference ratio R=0.625*H*D would take "
            f"{kv_cache_nbytes(*shape, int(0.625 * cfg.hidden_size), elem)} bytes)")

if __name__ == "__main__":
    sys.exit(main())
