// vdproj_ext operator schemas, CPU kernels and the Python module.
//
// Ops (namespace vdproj_ext; CUDA implementations live in csrc/cuda/):
//   cva_forward(q, k, v_c, w_r, b_r?, causal, softmax_scale) -> (out, softmax_lse, ctx)
//   cva_backward(grad_out, q, k, v_c, w_r, softmax_lse, ctx, causal, softmax_scale)
//       -> (grad_q, grad_k, grad_v_c, grad_w_r, grad_b_r)
//   kvcache_attention(q, k_cache!, vc_cache!, w_r, b_r?, k?, v?, w_c?, b_c?, cache_seqlens,
//                     causal, softmax_scale) -> out
#include <torch/extension.h>
#include <torch/version.h>

namespace vdproj {

std::tuple<at::Tensor, at::Tensor, at::Tensor> cva_forward_cpu(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v_c, const at::Tensor& w_r,
    const std::optional<at::Tensor>& b_r, bool causal, double softmax_scale) {
  TORCH_CHECK(false, "vdproj_ext: cva_forward CPU kernel not written yet");
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> cva_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v_c,
    const at::Tensor& w_r, const at::Tensor& softmax_lse, const at::Tensor& ctx, bool causal,
    double softmax_scale) {
  TORCH_CHECK(false, "vdproj_ext: cva_backward CPU kernel not written yet");
}

at::Tensor kvcache_attention_cpu(
    const at::Tensor& q, at::Tensor& k_cache, at::Tensor& vc_cache, const at::Tensor& w_r,
    const std::optional<at::Tensor>& b_r, const std::optional<at::Tensor>& k,
    const std::optional<at::Tensor>& v, const std::optional<at::Tensor>& w_c,
    const std::optional<at::Tensor>& b_c, const at::Tensor& cache_seqlens, bool causal,
    double softmax_scale) {
  TORCH_CHECK(false, "vdproj_ext: kvcache_attention CPU kernel not written yet");
}

}  // namespace vdproj

TORCH_LIBRARY(vdproj_ext, m) {
  m.def("cva_forward(Tensor q, Tensor k, Tensor v_c, Tensor w_r, Tensor? b_r, bool causal, "
        "float softmax_scale) -> (Tensor, Tensor, Tensor)");
  m.def("cva_backward(Tensor grad_out, Tensor q, Tensor k, Tensor v_c, Tensor w_r, "
        "Tensor softmax_lse, Tensor ctx, bool causal, float softmax_scale) "
        "-> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def("kvcache_attention(Tensor q, Tensor(a!) k_cache, Tensor(b!) vc_cache, Tensor w_r, "
        "Tensor? b_r, Tensor? k, Tensor? v, Tensor? w_c, Tensor? b_c, Tensor cache_seqlens, "
        "bool causal, float softmax_scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(vdproj_ext, CPU, m) {
  m.impl("cva_forward", &vdproj::cva_forward_cpu);
  m.impl("cva_backward", &vdproj::cva_backward_cpu);
  m.impl("kvcache_attention", &vdproj::kvcache_attention_cpu);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "vdproj_ext compiled kernels (ops are registered under torch.ops.vdproj_ext)";
  m.def("build_info", []() {
    pybind11::dict info;
    info["torch_version"] = TORCH_VERSION;  // the headers this was compiled against
#ifdef VDPROJ_WITH_CUDA
    info["with_cuda"] = true;
#else
    info["with_cuda"] = false;
#endif
#ifdef _OPENMP
    info["openmp"] = true;
#else
    info["openmp"] = false;
#endif
    return info;
  });
}
