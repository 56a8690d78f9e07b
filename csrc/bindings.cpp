// The op schemas (torch.ops.vdproj_ext.*) and the Python module vdproj_ext._C.
//
//   cva_forward(q, k, v_c, w_r, b_r?, causal, softmax_scale) -> (out, softmax_lse, ctx)
//   cva_backward(grad_out, q, k, v_c, w_r, softmax_lse, ctx, causal, softmax_scale)
//       -> (grad_q, grad_k, grad_v_c, grad_w_r, grad_b_r)
//   kvcache_attention(q, k_cache!, vc_cache!, w_r, b_r?, k?, v?, w_c?, b_c?, cache_seqlens,
//                     causal, softmax_scale, k_scale!?, vc_scale!?) -> out
//   decode_linear(x, weight, bias?, gelu=False) -> y   (y through exact GELU when gelu)
//   rotary_pair(q, k, cos, sin) -> (q_rotated, k_rotated)   (CPU; GPT-NeoX's rotary embedding,
//       the same bits as vdproj_ext/models/layers.py's apply_rotary, for a decode step)
//   quantize_into(cache!, scale!, values, cache_seqlens) -> ()   (CPU; SPEC 3c rows written
//       at cache_seqlens[b] onwards, for rows computed outside the kvcache ops)
// Latent keys (SPEC 3b):
//   ckv_forward(q, k_rope, k_c?, v_c, w_kr, w_r, b_r?, causal, softmax_scale)
//       -> (out, softmax_lse, ctx)
//   ckv_backward(grad_out, q, k_rope, k_c?, v_c, w_kr, w_r, softmax_lse, ctx, causal,
//                softmax_scale) -> (grad_q, grad_k_rope, grad_k_c, grad_v_c, grad_w_kr,
//                                   grad_w_r, grad_b_r)   (grad_k_c empty when k_c is None)
//   ckv_kvcache_attention(q, krope_cache!, kc_cache!?, vc_cache!, w_kr, w_r, b_r?, k?, v?,
//                         w_kc?, b_kc?, w_c?, b_c?, cache_seqlens, causal, softmax_scale,
//                         krope_scale!?, kc_scale!?, vc_scale!?) -> out
// Quantized caches (SPEC 3c): a cache tensor of dtype int8 or float8_e4m3fn comes with its
// float32 per-row scale (the *_scale arguments, written with the rows; None for a float cache).
//
// Implementations: csrc/cpu/cpu_ops.cpp, latent_ops.cpp and rotary_ops.cpp (CPU),
// csrc/cuda/cuda_api.cpp (CUDA: the six attention ops; decode_linear, quantize_into and
// rotary_pair are CPU-only, and their callers use ATen ops on other devices).
#include <torch/extension.h>
#include <torch/version.h>

#include "cpu/dispatch.h"
#ifdef VDPROJ_WITH_CUDA
#include "cuda/cuda_api.h"
#endif

TORCH_LIBRARY(vdproj_ext, m) {
  m.def("cva_forward(Tensor q, Tensor k, Tensor v_c, Tensor w_r, Tensor? b_r, bool causal, "
        "float softmax_scale) -> (Tensor, Tensor, Tensor)");
  m.def("cva_backward(Tensor grad_out, Tensor q, Tensor k, Tensor v_c, Tensor w_r, "
        "Tensor softmax_lse, Tensor ctx, bool causal, float softmax_scale) "
        "-> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def("kvcache_attention(Tensor q, Tensor(a!) k_cache, Tensor(b!) vc_cache, Tensor w_r, "
        "Tensor? b_r, Tensor? k, Tensor? v, Tensor? w_c, Tensor? b_c, Tensor cache_seqlens, "
        "bool causal, float softmax_scale, Tensor(c!)? k_scale=None, "
        "Tensor(d!)? vc_scale=None) -> Tensor");
  m.def("decode_linear(Tensor x, Tensor weight, Tensor? bias, bool gelu=False) -> Tensor");
  m.def("rotary_pair(Tensor q, Tensor k, Tensor cos, Tensor sin) -> (Tensor, Tensor)");
  m.def("quantize_into(Tensor(a!) cache, Tensor(b!) scale, Tensor values, "
        "Tensor cache_seqlens) -> ()");
  m.def("ckv_forward(Tensor q, Tensor k_rope, Tensor? k_c, Tensor v_c, Tensor w_kr, Tensor w_r, "
        "Tensor? b_r, bool causal, float softmax_scale) -> (Tensor, Tensor, Tensor)");
  m.def("ckv_backward(Tensor grad_out, Tensor q, Tensor k_rope, Tensor? k_c, Tensor v_c, "
        "Tensor w_kr, Tensor w_r, Tensor softmax_lse, Tensor ctx, bool causal, "
        "float softmax_scale) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def("ckv_kvcache_attention(Tensor q, Tensor(a!) krope_cache, Tensor(b!)? kc_cache, "
        "Tensor(c!) vc_cache, Tensor w_kr, Tensor w_r, Tensor? b_r, Tensor? k, Tensor? v, "
        "Tensor? w_kc, Tensor? b_kc, Tensor? w_c, Tensor? b_c, Tensor cache_seqlens, "
        "bool causal, float softmax_scale, Tensor(d!)? krope_scale=None, "
        "Tensor(e!)? kc_scale=None, Tensor(f!)? vc_scale=None) -> Tensor");
}

namespace {

pybind11::dict build_info() {
  pybind11::dict info;
  info["torch_version"] = TORCH_VERSION;  // the headers this was compiled against
#ifdef VDPROJ_WITH_CUDA
  info["with_cuda"] = true;
  info["cuda_archs"] = vdproj::cuda::compiled_archs();
#else
  info["with_cuda"] = false;
#endif
  // int8 latent-key decode with AVX-512 VNNI (csrc/cpu/int8_vnni.h): supported by this CPU,
  // and in use
  info["cpu_int8_vnni_supported"] = vdproj::cpu_supports_int8_vnni();
  info["cpu_int8_vnni"] = vdproj::cpu_has_int8_vnni();
  info["decode_linear_max_rows"] = vdproj::decode_linear_max_rows();
#ifdef _OPENMP
  info["openmp"] = true;
#else
  info["openmp"] = false;
#endif
  return info;
}

constexpr const char* kSupportDoc = R"doc(
Whether the fused CUDA kernels take these inputs: "" when they do, else a short reason.

op: "cva" (cva_forward, and cva_backward too when backward=True), "kvcache"
(kvcache_attention), "ckv" (ckv_forward, and ckv_backward when backward=True) or
"ckv_kvcache" (ckv_kvcache_attention). q: the queries (B, Tq, H, D); rank: R (Rv for the
latent-key ops). vector_loaded: the inputs the kernels read with 16-byte vector loads, exactly
as they will be passed to the op (None entries are skipped): for "cva" [k, v_c], for "kvcache"
[k_cache, vc_cache, w_r, k, v, w_c], for "ckv" [k_rope, k_c, v_c], for "ckv_kvcache"
[krope_cache, kc_cache, vc_cache, w_r, k, v, w_kc, w_c]. t_new: new tokens written by the
kvcache ops (0 for none). rope_dim (Dr) and k_rank (Rk; 0 for the joint latent) describe the
latent keys of the "ckv" ops. The kvcache ops' caches (listed first) may be quantized (SPEC 3c)
when all of them are, with the same dtype (torch.int8 or torch.float8_e4m3fn). The answer covers
dtype, cache storage, head_dim, ranks, rotary dims, grid limits, 16-byte alignment and shared
memory against q's device; the ops raise a RuntimeError with the same reason when called with
inputs it rejects.)doc";

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "vdproj_ext compiled kernels (ops are registered under torch.ops.vdproj_ext)";
  m.def("build_info", &build_info);
  m.def(
      "_set_cpu_int8_vnni",
      [](bool on) {
        TORCH_CHECK_VALUE(!on || vdproj::cpu_supports_int8_vnni(),
                          "_set_cpu_int8_vnni: on=True needs a CPU with AVX-512 VNNI; this one "
                          "has none (build_info()['cpu_int8_vnni_supported'] is False)");
        return vdproj::int8_vnni_switch().exchange(on);
      },
      "Turns the AVX-512 VNNI path of int8 latent-key decode on or off (benchmarks, tests); "
      "returns the previous setting",
      pybind11::arg("on"));
#ifdef VDPROJ_WITH_CUDA
  m.def("cuda_kernel_support", &vdproj::cuda::kernel_support, kSupportDoc, pybind11::arg("op"),
        pybind11::arg("q"), pybind11::arg("rank"), pybind11::arg("vector_loaded"),
        pybind11::arg("t_new"), pybind11::arg("backward"), pybind11::arg("rope_dim") = 0,
        pybind11::arg("k_rank") = 0);
  m.def("cuda_kernel_smem_bytes", &vdproj::cuda::kernel_smem_bytes,
        "Shared memory (bytes) the CUDA kernels need for a shape: [attention (one stage), "
        "compress-on-write, backward]",
        pybind11::arg("dtype"), pybind11::arg("tq"), pybind11::arg("heads"),
        pybind11::arg("head_dim"), pybind11::arg("rank"), pybind11::arg("t_new"));
#else
  m.def(
      "cuda_kernel_support",
      [](const std::string&, const at::Tensor&, int64_t,
         const std::vector<std::optional<at::Tensor>>&, int64_t, bool, int64_t,
         int64_t) -> std::string { return "vdproj_ext was built without CUDA kernels"; },
      kSupportDoc, pybind11::arg("op"), pybind11::arg("q"), pybind11::arg("rank"),
      pybind11::arg("vector_loaded"), pybind11::arg("t_new"), pybind11::arg("backward"),
      pybind11::arg("rope_dim") = 0, pybind11::arg("k_rank") = 0);
#endif
}
