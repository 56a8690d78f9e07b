"""Ops layer: the public functional API (SPEC section 3) on top of the compiled kernels.

    attention.py   compressed_v_attention and its autograd.Function
    kvcache.py     compressed_attn_with_kvcache, and attend_values_cache: the caches' route to it
    latent_attention.py  compressed_kv_attention (latent keys, SPEC 3b) and its autograd.Function
    latent_kvcache.py    compressed_kv_attn_with_kvcache (latent keys, SPEC 3b), and
                         attend_latent_cache: the caches' route to it
    linear.py      decode_linear (the row policy of decode-sized CPU linears; optionally GELU)
    rotary.py      rotary_pair: the model's rotary embedding on q and k in one CPU kernel call
    quant.py       quantized caches (SPEC 3c): storage dtypes, absmax quantize-on-write, scales
    checks.py      the input checks and their messages (the C++ checks use the same texts)
    backend.py     loading the kernels, backend resolution, backend_info()
    routing.py     fused kernels, the ATen paths or the reference (CUDA; latent keys everywhere)
    aten_paths.py  ATen implementations for inputs the fused kernels do not take
    library.py     torch.library fake kernels and the registered autograd formula
    reference.py   the pure-PyTorch definition of the math

Imports only torch, vdproj_ext.bindings and its own modules.
"""
from . import reference
from .attention import CompressedVAttentionFunction, compressed_v_attention
from . import backend
from .backend import BACKENDS, backend_info
from .kvcache import compressed_attn_with_kvcache
from .latent_attention import CompressedKVAttentionFunction, compressed_kv_attention
from .latent_kvcache import compressed_kv_attn_with_kvcache
from .linear import decode_linear

# Define and register torch.ops.vdproj_ext.* at import when the kernels were compiled ahead of
# time; a JIT build (minutes) waits for the first call that needs it.
backend.load_kernels(jit=False)

__all__ = ["compressed_v_attention", "compressed_attn_with_kvcache", "compressed_kv_attention",
           "compressed_kv_attn_with_kvcache", "decode_linear", "backend_info",
           "CompressedVAttentionFunction", "CompressedKVAttentionFunction", "BACKENDS",
           "reference"]
