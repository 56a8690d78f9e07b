"""vdproj_ext: V-DProj compressed KV-cache attention for PyTorch.

    from vdproj_ext import compressed_v_attention, compressed_attn_with_kvcache
    from vdproj_ext import compressed_kv_attention, compressed_kv_attn_with_kvcache
    from vdproj_ext import CompressedVAttention, VDProjConfig, VDProjForCausalLM

The facade of the layered package (README, "Layout"): the ops layer's public API, imported
eagerly, and the models layer's, imported on first use. Nothing here imports the experiment or
command-line layers.
"""
from importlib import import_module

from .ops import (CompressedKVAttentionFunction, CompressedVAttentionFunction, backend_info,
                  compressed_attn_with_kvcache, compressed_kv_attention,
                  compressed_kv_attn_with_kvcache, compressed_v_attention, decode_linear,
                  reference)

__version__ = "0.1.0"

# The model layer is imported on first use so that `import vdproj_ext` stays light.
_LAZY = {
    "CompressedVAttention": "models",
    "VDProjConfig": "models",
    "VDProjForCausalLM": "models",
    "CompressedKVCache": "models",
    "KVCache": "models",
    "LatentKVCache": "models",
}

__all__ = ["compressed_v_attention", "compressed_attn_with_kvcache", "compressed_kv_attention",
           "compressed_kv_attn_with_kvcache", "backend_info", "CompressedVAttentionFunction",
           "CompressedKVAttentionFunction", "decode_linear", "reference", *_LAZY]


def __getattr__(name):
    if name in _LAZY:
        return getattr(import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'vdproj_ext' has no attribute {name!r}")
