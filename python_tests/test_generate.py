"""Cached decoding and generate(): equivalence with full forward passes, ragged batches,
sampling, stop tokens and overflow."""
import pytest
import torch

from helpers import write_gpt_neox_folder
from vdproj_ext import VDProjConfig, VDProjForCausalLM
from vdproj_ext.models import CacheOverflowError, CompressedKVCache, KVCache

V_RANKS = [20, None]  # the smoke preset's compressed layer, and the plain baseline


def _model(v_rank, dtype=torch.float64, backend="auto", device="cpu", seed=3):
    cfg = VDProjConfig.preset("smoke", v_rank=v_rank)
    model = VDProjForCausalLM(cfg, init_seed=seed)
    with torch.no_grad():  # peaked next-token distributions, so greedy choices are clear
        model.embed_out.weight.mul_(30)
        for attn in model.attention_modules():
            attn.query_key_value.weight.mul_(8)
    return model.to(device, dtype).eval().set_backend(backend)


@torch.no_grad()
def _greedy_uncached(model, ids, steps):
    """The definition: re-run the whole sequence and take the argmax, every step."""
    seq = ids
    for _ in range(steps):
        nxt = model(seq).logits[:, -1].argmax(-1, keepdim=True)
        seq = torch.cat((seq, nxt), 1)
    return seq


@pytest.mark.parametrize("v_rank", V_RANKS)
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 2e-4)])
@pytest.mark.parametrize("backend", ["auto", "reference"])
def test_cached_logits_equal_full_forward(v_rank, dtype, tol, backend, device):
    model = _model(v_rank, dtype, backend, device)
    ids = torch.randint(0, model.config.vocab_size, (3, 23), device=device)
    with torch.no_grad():
        full = model(ids).logits
        cache = model.new_cache(3, 30)
        assert isinstance(cache, CompressedKVCache if v_rank else KVCache)
        # prefill 9, a chunk of 4 on top of the cache, then one token at a time
        pieces = [model(ids[:, :9], cache=cache).logits,
                  model(ids[:, 9:13], cache=cache).logits]
        for i in range(13, 23):
            pieces.append(model(ids[:, i:i + 1], cache=cache).logits)
    got = torch.cat(pieces, 1)
    assert cache.seqlens.tolist() == [23, 23, 23]
    scale = full.abs().max().item()
    assert (got - full).abs().max().item() <= tol * scale


@pytest.mark.parametrize("v_rank", V_RANKS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_cached_greedy_equals_uncached_greedy(v_rank, dtype, device):
    model = _model(v_rank, dtype, "auto", device)
    ids = torch.randint(0, model.config.vocab_size, (4, 7), device=device)
    expected = _greedy_uncached(model, ids, 16)
    cached = model.generate(ids, 16)
    assert torch.equal(cached, expected)


@pytest.mark.parametrize("v_rank", V_RANKS)
@pytest.mark.parametrize("side", ["left", "right"])
def test_ragged_batch_matches_each_sequence_alone(v_rank, side, device):
    model = _model(v_rank, torch.float64, "auto", device)
    vocab, pad, new = model.config.vocab_size, 0, 12
    prompts = [torch.randint(1, vocab, (n,), device=device) for n in (9, 3, 6, 1)]
    t = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), t), pad, device=device)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        sl = slice(t - len(p), t) if side == "left" else slice(0, len(p))
        ids[i, sl], mask[i, sl] = p, 1
    out = model.generate(ids, new, attention_mask=mask, pad_token_id=pad)
    assert out.shape == (len(prompts), t + new)
    for i, p in enumerate(prompts):
        alone = model.generate(p[None], new)[0]
        assert torch.equal(alone, _greedy_uncached(model, p[None], new)[0])
        if side == "left":  # the generated tokens follow the (left-padded) prompt
            assert torch.equal(out[i, t:], alone[len(p):])
            assert torch.equal(out[i, :t], ids[i])
        else:  # right padding: the padding moves behind the generated tokens
            assert torch.equal(out[i, :len(p) + new], alone)
            assert (out[i, len(p) + new:] == pad).all()


def test_sampling_is_seeded_and_valid():
    model = _model(20, torch.float64)
    ids = torch.randint(0, model.config.vocab_size, (3, 5))
    kw = dict(temperature=1.3, top_k=5)
    a = model.generate(ids, 15, generator=torch.Generator().manual_seed(7), **kw)
    b = model.generate(ids, 15, generator=torch.Generator().manual_seed(7), **kw)
    c = model.generate(ids, 15, generator=torch.Generator().manual_seed(8), **kw)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert torch.equal(a[:, :5], ids)
    # every sampled token lies among the top 5 of the model's distribution at that point
    with torch.no_grad():
        logits = model(a[:, :-1]).logits[:, 4:]
    top5 = logits.topk(5, -1).indices
    assert (top5 == a[:, 5:, None]).any(-1).all()
    # top_k=1 is greedy whatever the temperature
    g = model.generate(ids, 10, temperature=2.0, top_k=1)
    assert torch.equal(g, model.generate(ids, 10))
    # plain temperature sampling (no top-k) stays in range and follows the global seed
    torch.manual_seed(0)
    s1 = model.generate(ids, 10, temperature=0.8)
    torch.manual_seed(0)
    s2 = model.generate(ids, 10, temperature=0.8)
    assert torch.equal(s1, s2) and int(s1.max()) < model.config.vocab_size


@pytest.mark.parametrize("v_rank", V_RANKS)
def test_eos_stops_generation(v_rank):
    model = _model(v_rank, torch.float64)
    ids = torch.randint(0, model.config.vocab_size, (2, 6))
    free = model.generate(ids, 12)
    eos = int(free[0, 9])  # the 4th token sequence 0 generates
    pad = (eos + 1) % model.config.vocab_size
    out = model.generate(ids, 12, eos_token_id=eos, pad_token_id=pad)
    for i in range(2):
        gen = free[i, 6:]
        hits = (gen == eos).nonzero()
        stop = int(hits[0]) + 1 if len(hits) else 12
        assert torch.equal(out[i, 6:6 + stop], gen[:stop])
        assert (out[i, 6 + stop:] == pad).all()
    # all sequences done: generation stops early, the rest is padding
    single = model.generate(ids[:1], 12, eos_token_id=eos, pad_token_id=pad)
    stop0 = int((free[0, 6:] == eos).nonzero()[0]) + 1
    assert torch.equal(single[0, :6 + stop0], free[0, :6 + stop0])
    assert int(single[0, 5 + stop0]) == eos and (single[0, 6 + stop0:] == pad).all()


@pytest.mark.parametrize("v_rank", V_RANKS)
def test_cache_overflow_through_the_model(v_rank):
    model = _model(v_rank, torch.float32)
    cache = model.new_cache(2, 8)
    ids = torch.randint(0, model.config.vocab_size, (2, 6))
    model(ids, cache=cache)
    with pytest.raises(CacheOverflowError, match="max_len=8"):
        model(ids[:, :3], cache=cache)
    assert cache.seqlens.tolist() == [6, 6]
    model(ids[:, :2], cache=cache)  # exactly fills it
    assert cache.seqlens.tolist() == [8, 8]


def test_kernel_and_reference_generate_the_same_tokens():
    ref = _model(20, torch.float32, "reference")
    ext = _model(20, torch.float32, "auto")
    ids = torch.randint(0, ref.config.vocab_size, (3, 5))
    assert torch.equal(ref.generate(ids, 16), ext.generate(ids, 16))


@torch.no_grad()
def _greedy_below(model, ids, steps, limit):
    """Greedy decoding over the ids < limit only, by re-running the whole sequence."""
    seq = ids
    for _ in range(steps):
        nxt = model(seq).logits[:, -1, :limit].argmax(-1, keepdim=True)
        seq = torch.cat((seq, nxt), 1)
    return seq


@pytest.mark.parametrize("v_rank", V_RANKS)
def test_vocab_limit_keeps_generated_ids_below_it(v_rank):
    """vocab_limit (a tokenizer smaller than the model's vocabulary): ids >= vocab_limit are
    never generated, greedy or sampled, even where the model prefers them; greedy is the
    argmax over the ids below the limit."""
    model = _model(v_rank, torch.float64)
    with torch.no_grad():  # the upper half of the vocabulary dominates the logits
        model.embed_out.weight[128:].mul_(100)
    ids = torch.randint(0, 128, (2, 4))
    free = model.generate(ids, 6)
    assert int(free[:, 4:].min()) >= 128  # the model alone would leave the limit
    limited = model.generate(ids, 6, vocab_limit=128)
    assert torch.equal(limited, _greedy_below(model, ids, 6, 128))
    sampled = model.generate(ids, 6, vocab_limit=128, temperature=1.5, top_k=500,
                             generator=torch.Generator().manual_seed(1))
    assert int(sampled.max()) < 128
    assert torch.equal(model.generate(ids, 6, vocab_limit=model.config.vocab_size), free)
    for bad in (0, -1, 2.5):
        with pytest.raises(ValueError, match="vocab_limit"):
            model.generate(ids, 2, vocab_limit=bad)


# ---------------------------------------------------------------------------------------------
# The vdproj-generate command line


def _training_checkpoint(folder, v_rank=20, model=None):
    """What `python -m vdproj_ext.train` writes: out/checkpoints/<run>.pt with the model's
    config and state dict (and the tokenizer's name); of `model` when given."""
    if model is None:
        model = VDProjForCausalLM(VDProjConfig.preset("smoke", v_rank=v_rank), init_seed=4)
    cfg = model.config
    (folder / "checkpoints").mkdir(parents=True)
    torch.save({"format": "vdproj-train-checkpoint-1", "model": model.state_dict(),
                "config": cfg.to_dict(), "tokenizer": "bytes", "state": {}},
               folder / "checkpoints" / "two_phase.pt")
    return model


def test_cli_training_checkpoint(tmp_path, capsys):
    from vdproj_ext.models import kv_cache_nbytes
    from vdproj_ext.cli.generate import main
    from vdproj_ext.experiment.inference import load_model
    model = _training_checkpoint(tmp_path)
    rc = main(["--checkpoint", str(tmp_path), "--prompt", "ROMEO:", "--max-new-tokens", "7"])
    out = capsys.readouterr().out
    assert rc == 0, out
    cfg = model.config
    used = kv_cache_nbytes(cfg.num_layers, 1, 6 + 7, cfg.num_heads, cfg.head_dim, cfg.v_rank)
    full = kv_cache_nbytes(cfg.num_layers, 1, 6 + 7, cfg.num_heads, cfg.head_dim, None)
    assert out.startswith("ROMEO:")
    assert f"KV cache: {used} bytes" in out and f"uncompressed {full} bytes" in out
    assert "tokens/s" in out
    # the text is the model's greedy continuation
    loaded, tok, _ = load_model(tmp_path / "checkpoints" / "two_phase.pt")
    ids = torch.tensor([tok.encode("ROMEO:")])
    expected = model.eval().generate(ids, 7)[0, 6:].tolist()
    assert out.splitlines()[0] == "ROMEO:" + tok.decode(expected)


def test_cli_hf_folder_with_v_rank(tmp_path, capsys):
    from vdproj_ext.cli.generate import main
    cfg = VDProjConfig.preset("smoke", v_rank=None)
    model = VDProjForCausalLM(cfg, init_seed=2)
    folder = write_gpt_neox_folder(tmp_path / "hf", model)
    calib = tmp_path / "calib.txt"
    calib.write_text("To be, or not to be, that is the question. " * 40)
    rc = main(["--checkpoint", str(folder), "--v-rank", "16", "--tokenizer", "bytes",
               "--calibration-text", str(calib), "--prompt", "Hello", "--max-new-tokens", "4",
               "--temperature", "0.7", "--top-k", "5"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "converted to v_rank=16 by pca" in out and "% smaller" in out


def test_cli_errors(tmp_path, capsys):
    from vdproj_ext.cli.generate import main
    assert main(["--checkpoint", str(tmp_path / "missing"), "--prompt", "x"]) == 2
    assert "does not exist" in capsys.readouterr().err
    _training_checkpoint(tmp_path)
    assert main(["--checkpoint", str(tmp_path), "--run", "e2e", "--prompt", "x"]) == 2
    assert "no checkpoint" in capsys.readouterr().err
    assert main(["--checkpoint", str(tmp_path), "--v-rank", "8", "--prompt", "x"]) == 2
    assert "v-rank" in capsys.readouterr().err


@pytest.mark.parametrize("v_rank", V_RANKS)
def test_cli_bytes_tokenizer_on_a_larger_vocabulary(tmp_path, capsys, v_rank):
    """A model with 512 token ids and the 256-id bytes tokenizer: generation keeps to the ids
    the tokenizer can decode (greedy = the argmax over ids < 256), never crashes, even where
    the model prefers the ids above 255; sampling too."""
    from vdproj_ext.cli.generate import main
    model = VDProjForCausalLM(VDProjConfig.preset("smoke", v_rank=v_rank, vocab_size=512),
                              init_seed=4)
    with torch.no_grad():  # ids >= 256 dominate: unrestricted greedy picks them
        model.embed_out.weight[256:].mul_(100)
    _training_checkpoint(tmp_path, model=model)
    prompt = "ROMEO:"
    ids = torch.tensor([list(prompt.encode())])
    assert int(model.eval().generate(ids, 5)[0, 6:].min()) >= 256
    rc = main(["--checkpoint", str(tmp_path), "--tokenizer", "bytes", "--prompt", prompt,
               "--max-new-tokens", "5"])
    out = capsys.readouterr().out
    assert rc == 0, out
    expected = _greedy_below(model, ids, 5, 256)[0, 6:].tolist()
    assert max(expected) < 256
    assert out.splitlines()[0] == prompt + bytes(expected).decode("utf-8", errors="replace")
    rc = main(["--checkpoint", str(tmp_path), "--tokenizer", "bytes", "--prompt", prompt,
               "--max-new-tokens", "8", "--temperature", "2.0", "--seed", "3"])
    assert rc == 0, capsys.readouterr().out


def test_cli_tokenizer_larger_than_the_model_vocabulary(tmp_path, capsys):
    """The bytes tokenizer (256 ids) on a model of 128: a clear error (exit 2) naming both
    sizes, before anything is generated."""
    from vdproj_ext.cli.generate import main
    model = VDProjForCausalLM(VDProjConfig.preset("smoke", vocab_size=128), init_seed=4)
    _training_checkpoint(tmp_path, model=model)
    rc = main(["--checkpoint", str(tmp_path), "--tokenizer", "bytes", "--prompt", "ab",
               "--max-new-tokens", "3"])
    captured = capsys.readouterr()
    assert rc == 2 and captured.out == ""
    assert "256" in captured.err and "vocab_size 128" in captured.err
    assert "--tokenizer" in captured.err


# ---------------------------------------------------------------------------------------------
# Folding v_compress into the value projection (inference)


@pytest.mark.parametrize("biases", [True, False])
def test_folded_model_matches(biases, device):
    from vdproj_ext.models import FoldedVAttention, fold_v_compress
    model = _model(20, torch.float64, "auto", device)
    if not biases:  # a model without attention biases folds too
        cfg = model.config.replace(attention_bias=False)
        model = VDProjForCausalLM(cfg, init_seed=3).to(device, torch.float64).eval()
    with torch.no_grad():
        for attn in model.attention_modules():
            if attn.v_compress.bias is not None:
                attn.v_compress.bias.normal_()
    folded = fold_v_compress(model)
    assert all(isinstance(a, FoldedVAttention) for a in folded.attention_modules())
    assert not any(isinstance(a, FoldedVAttention) for a in model.attention_modules())
    ids = torch.randint(0, model.config.vocab_size, (3, 15), device=device)
    with torch.no_grad():
        full = model(ids).logits
        assert (folded(ids).logits - full).abs().max() < 1e-9  # uncached forward
        cache = folded.new_cache(3, 16)
        pieces = [folded(ids[:, :6], cache=cache).logits, folded(ids[:, 6:9], cache=cache).logits]
        pieces += [folded(ids[:, i:i + 1], cache=cache).logits for i in range(9, 15)]
    assert (torch.cat(pieces, 1) - full).abs().max() < 1e-9
    # ragged generation is unchanged
    mask = torch.ones_like(ids)
    mask[0, :7] = 0
    mask[2, :3] = 0
    assert torch.equal(folded.generate(ids, 8, attention_mask=mask),
                       model.generate(ids, 8, attention_mask=mask))
    with pytest.raises(CacheOverflowError):
        folded(ids[:, :2], cache=folded.new_cache(3, 1))
    with pytest.raises(ValueError, match="compressed"):
        fold_v_compress(_model(None))


@pytest.mark.parametrize("flags", [["--temperature", "-1"], ["--top-k", "0"], ["--top-k", "-2"],
                                   ["--threads", "-1"], ["--max-new-tokens", "0"],
                                   ["--v-rank", "0"]])
def test_cli_bad_values_are_usage_errors(flags, tmp_path, capsys):
    """Once a ValueError/RuntimeError traceback (exit 1) from models/generation.py."""
    from vdproj_ext.cli.generate import main
    with pytest.raises(SystemExit) as exit_info:
        main(["--checkpoint", str(tmp_path), "--prompt", "x", *flags])
    assert exit_info.value.code == 2
    assert f"argument {flags[0]}" in capsys.readouterr().err


def test_cli_refuses_conversion_flags_for_a_training_checkpoint(tmp_path, capsys):
    """--init and --calibration-text convert a HF folder; with a training checkpoint they
    were silently ignored."""
    from vdproj_ext.cli.generate import main
    _training_checkpoint(tmp_path)
    for flags in (["--init", "random"], ["--calibration-text", __file__]):
        assert main(["--checkpoint", str(tmp_path), "--prompt", "x", *flags]) == 2
        assert "--init and --calibration-text apply when --v-rank converts" in \
            capsys.readouterr().err
