"""Autoregressive generation for VDProjForCausalLM (model.generate delegates here).

Prompts of different lengths share a batch through an attention mask. Their real tokens are
prefilled right-padded; the cache's seqlens are then set to the true lengths, so padding is
never attended and is overwritten by the generated tokens.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch


def _check_arguments(input_ids, max_new_tokens, temperature, top_k, vocab_limit=None):
    if input_ids.dim() != 2 or input_ids.shape[0] == 0 or input_ids.shape[1] == 0:
        raise ValueError(f"input_ids must be (B, T) with B >= 1 and T >= 1, "
                         f"got {tuple(input_ids.shape)}")
    if not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be a non-negative int, got {max_new_tokens!r}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be >= 1 or None, got {top_k}")
    if vocab_limit is not None and (isinstance(vocab_limit, bool) or
                                    not isinstance(vocab_limit, int) or vocab_limit < 1):
        raise ValueError(f"vocab_limit must be a positive int or None, got {vocab_limit!r}")


def _real_token_mask(input_ids, attention_mask) -> torch.Tensor:
    if attention_mask is None:
        return torch.ones_like(input_ids, dtype=torch.bool)
    if attention_mask.shape != input_ids.shape:
        raise ValueError(f"attention_mask must have shape {tuple(input_ids.shape)}, "
                         f"got {tuple(attention_mask.shape)}")
    mask = attention_mask.to(input_ids.device).bool()
    if int(mask.sum(1).min()) < 1:
        raise ValueError("every sequence needs at least one real token in attention_mask")
    return mask


def _pack_right(input_ids, mask, pad: int):
    """The real tokens of each sequence moved to its front (in order), padding behind them;
    and the number of real tokens per sequence."""
    lengths = mask.sum(1)
    order = torch.sort((~mask).to(torch.int8), dim=1, stable=True).indices
    packed = torch.gather(input_ids, 1, order)
    behind = torch.arange(input_ids.shape[1], device=input_ids.device) >= lengths[:, None]
    return packed.masked_fill(behind, pad), lengths


def _append_after_prompts(packed, lengths, tokens, pad: int):
    """packed (B, T) right-padded prompts with tokens (B, N) written right after each
    prompt's real tokens: (B, T + N), the padding at the end."""
    b, t = packed.shape
    n = tokens.shape[1]
    out = torch.full((b, t + n), pad, dtype=packed.dtype, device=packed.device)
    out[:, :t] = packed
    out.scatter_(1, lengths[:, None] + torch.arange(n, device=packed.device), tokens)
    return out


def _sampler(temperature: float, top_k: Optional[int], generator,
             vocab_limit: Optional[int] = None) -> Callable:
    """logits (B, vocab) -> next tokens (B,): argmax at temperature 0, else a sample from the
    softmax at that temperature, over the top_k logits when top_k is set; only over the ids
    below vocab_limit when it is set."""
    def pick(logits):
        logits = logits[..., :vocab_limit].float()  # the slice is the ids themselves
        if temperature == 0:
            return logits.argmax(-1)
        logits = logits / temperature
        if top_k is not None:
            kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[..., -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        probs = torch.softmax(logits, -1)
        return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
    return pick


def _generate_tokens(model, packed, lengths, max_new_tokens, pick, pad, eos_token_id,
                     use_cache, cache_dtype=None):
    """(B, max_new_tokens) new tokens after right-packed prompts; pad after a sequence's eos."""
    b, t = packed.shape
    generated = torch.full((b, max_new_tokens), pad, dtype=packed.dtype, device=packed.device)
    if max_new_tokens == 0:
        return generated
    done = torch.zeros(b, dtype=torch.bool, device=packed.device)
    rows = torch.arange(b, device=packed.device)
    if use_cache:
        cache = model.new_cache(b, t + max_new_tokens, cache_dtype=cache_dtype)
        logits = model(packed, cache=cache).logits
        cache.seqlens.copy_(lengths.to(cache.seqlens))  # the padding is overwritten next
    else:
        logits = model(packed).logits
    last = logits[rows, lengths - 1]
    for step in range(max_new_tokens):
        token = pick(last)
        if eos_token_id is not None:
            token = torch.where(done, torch.full_like(token, pad), token)
            done |= token == eos_token_id
        generated[:, step] = token
        if step + 1 == max_new_tokens or (eos_token_id is not None and bool(done.all())):
            break
        if use_cache:
            last = model(token[:, None], cache=cache).logits[:, -1]
        else:  # recompute everything (the reference path for tests)
            seq = _append_after_prompts(packed, lengths, generated[:, :step + 1], pad)
            last = model(seq).logits[rows, lengths + step]
    return generated


@torch.no_grad()
def generate(model, input_ids: torch.Tensor, max_new_tokens: int, *,
             temperature: float = 0.0, top_k: Optional[int] = None,
             eos_token_id: Optional[int] = None, attention_mask: Optional[torch.Tensor] = None,
             pad_token_id: Optional[int] = None, use_cache: bool = True,
             generator: Optional[torch.Generator] = None, cache_dtype=None,
             vocab_limit: Optional[int] = None) -> torch.Tensor:
    """Prompt followed by max_new_tokens generated tokens (greedy when temperature == 0).

    attention_mask (B, T), 1 on real tokens, lets prompts of different lengths share a
    batch, left or right padded. Sequences that emitted eos_token_id keep emitting
    pad_token_id (default: eos_token_id, else 0). The result keeps the caller's layout:
    appended after a left-padded (or unpadded) prompt, or after each real prompt with the
    padding moved to the end for right padding.

    cache_dtype (None, torch.int8 or torch.float8_e4m3fn) is the cache's storage
    (model.new_cache); it needs use_cache.

    vocab_limit: only ids below it are generated (greedy takes the argmax over them, sampling
    draws among them), e.g. a tokenizer's vocabulary size where the model's embedding is
    larger (padded, as Pythia's). None: the model's whole vocabulary.
    """
    _check_arguments(input_ids, max_new_tokens, temperature, top_k, vocab_limit)
    if cache_dtype is not None and not use_cache:
        raise ValueError(f"cache_dtype={cache_dtype} needs use_cache=True (without a cache "
                         f"nothing is stored)")
    mask = _real_token_mask(input_ids, attention_mask)
    pad = pad_token_id if pad_token_id is not None else (
        eos_token_id if eos_token_id is not None else 0)
    packed, lengths = _pack_right(input_ids, mask, pad)
    generated = _generate_tokens(model, packed, lengths, max_new_tokens,
                                 _sampler(temperature, top_k, generator, vocab_limit), pad,
                                 eos_token_id, use_cache, cache_dtype)
    if bool(mask[:, -1].all()):  # left-padded or unpadded: append after the prompt as given
        return torch.cat((input_ids, generated), 1)
    return _append_after_prompts(packed, lengths, generated, pad)
