"""The models layer: the GPT-NeoX language model with V-DProj attention (compressed values and,
optionally, latent keys), its KV caches, generation, the inference folds, calibration of the
compress/restore pairs and Hugging Face conversion.

It imports only vdproj_ext.ops (and torch). Inside the package, imports point one way:

    config, generation, cache (ops)      depend on nothing else here
    rotation                             nothing (works on any model's layers)
    layers (ops)                         config
    folding (ops), calibration           layers
    gpt_neox                             config, layers, cache, generation, folding
    convert                              config, layers, calibration, gpt_neox

The one exception is VDProjForCausalLM.from_gpt_neox, a delegate that imports convert on call.
"""
from .cache import (CacheOverflowError, CompressedKVCache, KVCache, LatentKVCache,
                    kv_cache_nbytes)
from .calibration import fit_v_pca_, init_v_projection_
from .config import VDProjConfig
from .convert import config_from_gpt_neox, from_gpt_neox, read_gpt_neox_config, save_gpt_neox
from .folding import FoldedVAttention, fold_v_compress
from .gpt_neox import CausalLMOutput, VDProjForCausalLM
from .layers import CompressedVAttention, apply_rotary, rotary_cos_sin
from .rotation import rotate_latents, rotation_matrix

__all__ = ["VDProjConfig", "VDProjForCausalLM", "CompressedVAttention", "CausalLMOutput",
           "KVCache", "CompressedKVCache", "LatentKVCache", "CacheOverflowError",
           "kv_cache_nbytes", "FoldedVAttention", "fold_v_compress", "from_gpt_neox",
           "read_gpt_neox_config", "config_from_gpt_neox", "save_gpt_neox",
           "init_v_projection_", "fit_v_pca_", "rotary_cos_sin", "apply_rotary",
           "rotate_latents", "rotation_matrix"]
