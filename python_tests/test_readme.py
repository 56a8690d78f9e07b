"""The README's Usage block runs as written, so the first code a user copies works.

The block ends by converting a local GPT-NeoX folder ("path/to/pythia-70m"); the test points
it at a one-layer checkpoint of Pythia-70m's widths and vocabulary written for the purpose.
"""
from __future__ import annotations

import pathlib

import torch

from helpers import write_gpt_neox_folder
from vdproj_ext import VDProjConfig, VDProjForCausalLM

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"
FOLDER_IN_README = '"path/to/pythia-70m"'


def usage_block() -> str:
    text = README.read_text()
    section = text[text.index("## Usage"):]
    return section.split("```python\n", 1)[1].split("```", 1)[0]


def test_usage_block_runs(tmp_path):
    code = usage_block()
    assert code.count(FOLDER_IN_README) == 1, "the block's checkpoint folder moved"
    cfg = VDProjConfig.preset("pythia-70m").uncompressed().replace(num_layers=1)
    folder = write_gpt_neox_folder(tmp_path / "pythia", VDProjForCausalLM(cfg, init_seed=0))
    scope: dict = {}
    torch.manual_seed(0)
    exec(compile(code.replace(FOLDER_IN_README, repr(str(folder))), str(README), "exec"), scope)
    # What the block's last lines leave behind: the generated ids and the converted model.
    assert scope["out"].shape == (1, 16 + 20)
    # the block's comment: an int8 V-only cache of pythia-70m is 868 bytes a token and layer
    # (512 key bytes + 8 key scales + 320 latent bytes + 1 scale, float32 scales)
    assert scope["cache"].nbytes == 8 * 2048 * 6 * (512 + 4 * 8 + 320 + 4) == 8 * 2048 * 6 * 868
    converted = scope["model"]
    assert converted.config.v_rank == 320 and converted.config.num_layers == 1
    assert torch.isfinite(converted(scope["ids"]).logits).all()
