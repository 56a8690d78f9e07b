"""argparse types shared by the command lines. A bad value is a usage error (exit 2) that
names the flag, raised while parsing: before anything is written."""
from __future__ import annotations

import argparse
import math
import os

DEVICES = ("auto", "cpu", "cuda")


def _number(text: str, kind):
    try:
        return kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None


def int_at_least(low: int):
    """argparse type: an int >= low."""
    def parse(text: str) -> int:
        value = _number(text, int)
        if value < low:
            what = {0: "a non-negative integer", 1: "a positive integer"}.get(
                low, f"an integer >= {low}")
            raise argparse.ArgumentTypeError(f"expected {what}, got {text}")
        return value
    parse.__name__ = f"int >= {low}"
    return parse


positive_int = int_at_least(1)
non_negative_int = int_at_least(0)


def positive_float(text: str) -> float:
    value = _number(text, float)
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"expected a finite number > 0, got {text}")
    return value


def non_negative_float(text: str) -> float:
    value = _number(text, float)
    if not (math.isfinite(value) and value >= 0):
        raise argparse.ArgumentTypeError(f"expected a finite number >= 0, got {text}")
    return value


def open_fraction(text: str) -> float:
    value = _number(text, float)
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"expected a fraction strictly between 0 and 1, "
                                         f"got {text}")
    return value


def existing_path(text: str) -> str:
    if not os.path.exists(text):
        raise argparse.ArgumentTypeError(f"no such file or folder: {text}")
    return text


def tokenizer_spec(text: str) -> str:
    """neox | bytes | bpe:N | path/to/tokenizer.json (experiment/data.py make_tokenizer)."""
    if text in ("neox", "bytes") or os.path.isfile(text):
        return text
    if text.startswith("bpe:"):
        positive_int(text[4:])
        return text
    raise argparse.ArgumentTypeError(f"expected neox, bytes, bpe:N or a tokenizer.json path, "
                                     f"got {text!r}")


def unit_fraction(text: str) -> float:
    """A fraction in (0, 1]."""
    value = _number(text, float)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"expected a fraction in (0, 1], got {text}")
    return value
