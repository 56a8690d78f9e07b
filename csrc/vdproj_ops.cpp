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

#include "cpu_kernels_prelude.h"

// The kernels of cpu_kernels.h, compiled for several instruction sets without tying the
// binary to the build machine: AVX-512 and AVX2+FMA variants via `#pragma GCC target`, and a
// baseline (SSE2 on x86-64) built with the default flags. cpu_isa() picks one at run time.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define VDPROJ_MULTI_ISA 1
#pragma GCC push_options
#pragma GCC target("avx512f,avx512vl,avx512bw,avx512dq,avx2,fma,f16c")
#define VDPROJ_ISA_NS isa_avx512
#define VDPROJ_VBYTES 64
#define VDPROJ_ISA_NAME "avx512"
#include "cpu_kernels.h"
#undef VDPROJ_ISA_NS
#undef VDPROJ_VBYTES
#undef VDPROJ_ISA_NAME
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
#define VDPROJ_ISA_NS isa_avx2
#define VDPROJ_VBYTES 32
#define VDPROJ_ISA_NAME "avx2"
#include "cpu_kernels.h"
#undef VDPROJ_ISA_NS
#undef VDPROJ_VBYTES
#undef VDPROJ_ISA_NAME
#pragma GCC pop_options
#endif

#define VDPROJ_ISA_NS isa_base
#define VDPROJ_VBYTES 16
#define VDPROJ_ISA_NAME "baseline"
#include "cpu_kernels.h"
#undef VDPROJ_ISA_NS
#undef VDPROJ_VBYTES
#undef VDPROJ_ISA_NAME

namespace vdproj {
namespace {

using cpu::Kind;

enum class Isa { Base, Avx2, Avx512 };

// Best instruction set of this CPU; VDPROJ_CPU_ISA=baseline|avx2|avx512 can lower it (tests).
Isa cpu_isa() {
  static const Isa isa = [] {
    Isa best = Isa::Base;
#ifdef VDPROJ_MULTI_ISA
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) best = Isa::Avx2;
    if (best == Isa::Avx2 && __builtin_cpu_supports("avx512f") &&
        __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512dq"))
      best = Isa::Avx512;
#endif
    const char* env = std::getenv("VDPROJ_CPU_ISA");
    if (env != nullptr) {
      const std::string want(env);
      if (want == "baseline") best = Isa::Base;
      if (want == "avx2" && best == Isa::Avx512) best = Isa::Avx2;
    }
    return best;
  }();
  return isa;
}

#ifdef VDPROJ_MULTI_ISA
#define VDPROJ_ISA_CALL(fn, ...)                                          \
  switch (cpu_isa()) {                                                    \
    case Isa::Avx512: cpu::isa_avx512::fn(__VA_ARGS__); break;            \
    case Isa::Avx2: cpu::isa_avx2::fn(__VA_ARGS__); break;                \
    default: cpu::isa_base::fn(__VA_ARGS__); break;                       \
  }
#else
#define VDPROJ_ISA_CALL(fn, ...) cpu::isa_base::fn(__VA_ARGS__)
#endif

Kind kind_of(const at::Tensor& t, const char* name) {
  switch (t.scalar_type()) {
    case at::kFloat: return Kind::F32;
    case at::kDouble: return Kind::F64;
    case at::kBFloat16: return Kind::BF16;
    case at::kHalf: return Kind::F16;
    default:
      TORCH_CHECK(false, "vdproj_ext: ", name, " must be float32, float64, bfloat16 or float16, "
                  "got ", t.scalar_type());
  }
}

void check_cpu(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), "vdproj_ext CPU kernel: ", name,
              " must be a CPU tensor, got ", t.device());
}

void check_like(const at::Tensor& t, const at::Tensor& ref, const char* name) {
  check_cpu(t, name);
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), "vdproj_ext: ", name, " must have dtype ",
              ref.scalar_type(), " like q, got ", t.scalar_type());
}

void check_shape(const at::Tensor& t, const char* name, std::vector<int64_t> expected) {
  TORCH_CHECK(t.sizes() == at::IntArrayRef(expected), "vdproj_ext: ", name,
              " must have shape ", at::IntArrayRef(expected), ", got ", t.sizes());
}

void check_dim(const at::Tensor& t, const char* name, int64_t dim) {
  TORCH_CHECK(t.dim() == dim, "vdproj_ext: ", name, " must be ", dim, "-D, got shape ",
              t.sizes());
}

const void* opt_ptr(const std::optional<at::Tensor>& t) {
  return t.has_value() ? t->data_ptr() : nullptr;
}

struct AttnDims {
  int64_t B, Tq, H, D, Tk, R;
};

// q (B, Tq, H, D), k (B, Tk, H, D), v_c (B, Tk, R), w_r (H*D, R): the inputs forward and
// backward share. Checks device, dtype and shapes against q; returns the sizes.
AttnDims check_attention_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v_c,
                                const at::Tensor& w_r) {
  check_dim(q, "q", 4);
  check_dim(k, "k", 4);
  check_dim(v_c, "v_c", 3);
  check_dim(w_r, "w_r", 2);
  check_like(k, q, "k");
  check_like(v_c, q, "v_c");
  check_like(w_r, q, "w_r");
  const AttnDims d{q.size(0), q.size(1), q.size(2), q.size(3), k.size(1), v_c.size(2)};
  check_shape(k, "k", {d.B, d.Tk, d.H, d.D});
  check_shape(v_c, "v_c", {d.B, d.Tk, d.R});
  check_shape(w_r, "w_r", {d.H * d.D, d.R});
  return d;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> cva_forward_cpu(
    const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_c_in,
    const at::Tensor& w_r_in, const std::optional<at::Tensor>& b_r_in, bool causal,
    double softmax_scale) {
  check_cpu(q_in, "q");
  const Kind kind = kind_of(q_in, "q");
  const AttnDims dims = check_attention_inputs(q_in, k_in, v_c_in, w_r_in);
  const int64_t B = dims.B, Tq = dims.Tq, H = dims.H, D = dims.D, Tk = dims.Tk, R = dims.R;
  if (b_r_in.has_value()) {
    check_like(*b_r_in, q_in, "b_r");
    check_shape(*b_r_in, "b_r", {H * D});
  }
  TORCH_CHECK(std::isfinite(softmax_scale), "vdproj_ext: softmax_scale must be finite");
  // ops.py passes contiguous tensors; a direct call with views still works (copied here).
  const at::Tensor q = q_in.contiguous(), k = k_in.contiguous(), v_c = v_c_in.contiguous(),
                   w_r = w_r_in.contiguous();
  std::optional<at::Tensor> b_r;
  if (b_r_in.has_value()) b_r = b_r_in->contiguous();

  at::Tensor out = at::empty({B, Tq, H, D}, q.options());
  at::Tensor lse = at::empty({B, H, Tq}, q.options().dtype(at::kFloat));
  at::Tensor ctx = at::empty({B, Tq, H, R}, q.options());
  std::vector<int64_t> seqlen(B, Tk);
  cpu::AttnArgs a{};
  a.q = q.data_ptr();
  a.k = k.data_ptr();
  a.k_sb = Tk * H * D;
  a.k_st = H * D;
  a.k_sh = D;
  a.vc = v_c.data_ptr();
  a.v_sb = Tk * R;
  a.v_st = R;
  a.w_r = w_r.data_ptr();
  a.b_r = opt_ptr(b_r);
  a.seqlen = seqlen.data();
  a.out = out.data_ptr();
  a.lse = lse.data_ptr<float>();
  a.ctx = ctx.data_ptr();
  a.B = B; a.Tq = Tq; a.H = H; a.D = D; a.R = R;
  a.causal = causal;
  a.scale = softmax_scale;
  VDPROJ_ISA_CALL(attention, kind, a);
  return {out, lse, ctx};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> cva_backward_cpu(
    const at::Tensor& grad_out_in, const at::Tensor& q_in, const at::Tensor& k_in,
    const at::Tensor& v_c_in, const at::Tensor& w_r_in, const at::Tensor& lse_in,
    const at::Tensor& ctx_in, bool causal, double softmax_scale) {
  check_cpu(q_in, "q");
  const Kind kind = kind_of(q_in, "q");
  const AttnDims dims = check_attention_inputs(q_in, k_in, v_c_in, w_r_in);
  const int64_t B = dims.B, Tq = dims.Tq, H = dims.H, D = dims.D, Tk = dims.Tk, R = dims.R;
  check_like(grad_out_in, q_in, "grad_out");
  check_like(ctx_in, q_in, "ctx");
  check_cpu(lse_in, "softmax_lse");
  TORCH_CHECK(lse_in.scalar_type() == at::kFloat, "vdproj_ext: softmax_lse must be float32, got ",
              lse_in.scalar_type());
  check_shape(grad_out_in, "grad_out", {B, Tq, H, D});
  check_shape(lse_in, "softmax_lse", {B, H, Tq});
  check_shape(ctx_in, "ctx", {B, Tq, H, R});
  TORCH_CHECK(std::isfinite(softmax_scale), "vdproj_ext: softmax_scale must be finite");
  const at::Tensor dout = grad_out_in.contiguous(), q = q_in.contiguous(), k = k_in.contiguous(),
                   v_c = v_c_in.contiguous(), w_r = w_r_in.contiguous(),
                   lse = lse_in.contiguous(), ctx = ctx_in.contiguous();
  at::Tensor dq = at::empty({B, Tq, H, D}, q.options());
  at::Tensor dk = at::empty({B, Tk, H, D}, q.options());
  at::Tensor dvc = at::empty({B, Tk, R}, q.options());
  at::Tensor dwr = at::empty({H * D, R}, q.options());
  at::Tensor dbr = at::empty({H * D}, q.options());
  cpu::BwdArgs a{};
  a.dout = dout.data_ptr();
  a.q = q.data_ptr();
  a.k = k.data_ptr();
  a.vc = v_c.data_ptr();
  a.w_r = w_r.data_ptr();
  a.lse = lse.data_ptr<float>();
  a.ctx = ctx.data_ptr();
  a.dq = dq.data_ptr();
  a.dk = dk.data_ptr();
  a.dvc = dvc.data_ptr();
  a.dwr = dwr.data_ptr();
  a.dbr = dbr.data_ptr();
  a.B = B; a.Tq = Tq; a.Tk = Tk; a.H = H; a.D = D; a.R = R;
  a.causal = causal;
  a.scale = softmax_scale;
  VDPROJ_ISA_CALL(attention_backward, kind, a);
  return {dq, dk, dvc, dwr, dbr};
}

at::Tensor kvcache_attention_cpu(
    const at::Tensor& q_in, at::Tensor& k_cache, at::Tensor& vc_cache, const at::Tensor& w_r_in,
    const std::optional<at::Tensor>& b_r_in, const std::optional<at::Tensor>& k_in,
    const std::optional<at::Tensor>& v_in, const std::optional<at::Tensor>& w_c_in,
    const std::optional<at::Tensor>& b_c_in, const at::Tensor& cache_seqlens, bool causal,
    double softmax_scale) {
  check_cpu(q_in, "q");
  const Kind kind = kind_of(q_in, "q");
  check_dim(q_in, "q", 4);
  check_dim(k_cache, "k_cache", 4);
  check_dim(vc_cache, "vc_cache", 3);
  check_dim(w_r_in, "w_r", 2);
  check_like(k_cache, q_in, "k_cache");
  check_like(vc_cache, q_in, "vc_cache");
  check_like(w_r_in, q_in, "w_r");
  const int64_t B = q_in.size(0), Tq = q_in.size(1), H = q_in.size(2), D = q_in.size(3);
  const int64_t Tmax = k_cache.size(1), R = vc_cache.size(2);
  check_shape(k_cache, "k_cache", {B, Tmax, H, D});
  check_shape(vc_cache, "vc_cache", {B, Tmax, R});
  check_shape(w_r_in, "w_r", {H * D, R});
  TORCH_CHECK(k_cache.stride(3) == 1 || D <= 1,
              "vdproj_ext: k_cache must have unit stride in its last dimension, got strides ",
              k_cache.strides());
  TORCH_CHECK(vc_cache.stride(2) == 1 || R <= 1,
              "vdproj_ext: vc_cache must have unit stride in its last dimension, got strides ",
              vc_cache.strides());
  if (b_r_in.has_value()) {
    check_like(*b_r_in, q_in, "b_r");
    check_shape(*b_r_in, "b_r", {H * D});
  }
  TORCH_CHECK(k_in.has_value() == v_in.has_value(),
              "vdproj_ext: k and v must be given together or both omitted");
  int64_t Tnew = 0;
  if (k_in.has_value()) {
    check_dim(*k_in, "k", 4);
    check_dim(*v_in, "v", 3);
    check_like(*k_in, q_in, "k");
    check_like(*v_in, q_in, "v");
    Tnew = k_in->size(1);
    check_shape(*k_in, "k", {B, Tnew, H, D});
    check_shape(*v_in, "v", {B, Tnew, H * D});
    TORCH_CHECK(w_c_in.has_value(), "vdproj_ext: w_c (shape (R, H*D)) is required with k and v");
    check_like(*w_c_in, q_in, "w_c");
    check_shape(*w_c_in, "w_c", {R, H * D});
    if (b_c_in.has_value()) {
      check_like(*b_c_in, q_in, "b_c");
      check_shape(*b_c_in, "b_c", {R});
    }
  }
  check_cpu(cache_seqlens, "cache_seqlens");
  TORCH_CHECK(cache_seqlens.scalar_type() == at::kInt,
              "vdproj_ext: cache_seqlens must be int32, got ", cache_seqlens.scalar_type());
  check_shape(cache_seqlens, "cache_seqlens", {B});
  TORCH_CHECK(std::isfinite(softmax_scale), "vdproj_ext: softmax_scale must be finite");
  // Validate every length before writing anything: an overflow leaves the caches untouched.
  const at::Tensor lens = cache_seqlens.contiguous();
  const int32_t* lp = lens.data_ptr<int32_t>();
  // ValueError, with the messages of ops.py, which leaves this check to the op.
  std::vector<int64_t> pos(B), seqlen(B);
  if (B > 0) {
    const auto [lo, hi] = std::minmax_element(lp, lp + B);
    TORCH_CHECK_VALUE(*lo >= 0 && *hi <= Tmax, "cache_seqlens must lie in [0, ", Tmax,
                      "] (the cache's Tmax), got values in [", *lo, ", ", *hi, "]");
    TORCH_CHECK_VALUE(*hi + Tnew <= Tmax, "writing ", Tnew, " new tokens at cache_seqlens (max ",
                      *hi, ") would overflow the cache of Tmax=", Tmax, "; nothing was written");
  }
  for (int64_t b = 0; b < B; ++b) {
    pos[b] = lp[b];
    seqlen[b] = pos[b] + Tnew;
  }
  const at::Tensor q = q_in.contiguous(), w_r = w_r_in.contiguous();
  std::optional<at::Tensor> b_r;
  if (b_r_in.has_value()) b_r = b_r_in->contiguous();

  if (Tnew > 0 && B > 0) {
    const at::Tensor k = k_in->contiguous(), v = v_in->contiguous(), w_c = w_c_in->contiguous();
    std::optional<at::Tensor> b_c;
    if (b_c_in.has_value()) b_c = b_c_in->contiguous();
    cpu::AppendArgs ap{};
    ap.k = k.data_ptr();
    ap.v = v.data_ptr();
    ap.w_c = w_c.data_ptr();
    ap.b_c = opt_ptr(b_c);
    ap.k_cache = k_cache.data_ptr();
    ap.k_sb = k_cache.stride(0);
    ap.k_st = k_cache.stride(1);
    ap.k_sh = k_cache.stride(2);
    ap.vc_cache = vc_cache.data_ptr();
    ap.v_sb = vc_cache.stride(0);
    ap.v_st = vc_cache.stride(1);
    ap.pos = pos.data();
    ap.B = B; ap.Tnew = Tnew; ap.H = H; ap.D = D; ap.R = R;
    VDPROJ_ISA_CALL(append, kind, ap);
  }

  at::Tensor out = at::empty({B, Tq, H, D}, q.options());
  cpu::AttnArgs a{};
  a.q = q.data_ptr();
  a.k = k_cache.data_ptr();
  a.k_sb = k_cache.stride(0);
  a.k_st = k_cache.stride(1);
  a.k_sh = k_cache.stride(2);
  a.vc = vc_cache.data_ptr();
  a.v_sb = vc_cache.stride(0);
  a.v_st = vc_cache.stride(1);
  a.w_r = w_r.data_ptr();
  a.b_r = opt_ptr(b_r);
  a.seqlen = seqlen.data();
  a.out = out.data_ptr();
  a.lse = nullptr;
  a.ctx = nullptr;
  a.B = B; a.Tq = Tq; a.H = H; a.D = D; a.R = R;
  a.causal = causal;
  a.scale = softmax_scale;
  VDPROJ_ISA_CALL(attention, kind, a);
  return out;
}

// y = x @ weight.T + bias for decode-sized inputs (see linear_impl in cpu_kernels.h). Forward
// only: the Python side calls it when no gradient is needed and falls back to F.linear else.
at::Tensor decode_linear_cpu(const at::Tensor& x_in, const at::Tensor& weight_in,
                             const std::optional<at::Tensor>& bias_in) {
  check_cpu(x_in, "x");
  TORCH_CHECK(x_in.scalar_type() == at::kFloat || x_in.scalar_type() == at::kDouble,
              "vdproj_ext: decode_linear: x must be float32 or float64, got ",
              x_in.scalar_type());
  TORCH_CHECK(x_in.dim() >= 1, "vdproj_ext: decode_linear: x must have at least 1 dimension");
  check_dim(weight_in, "weight", 2);
  check_like(weight_in, x_in, "weight");
  const int64_t K = x_in.size(-1), N = weight_in.size(0);
  TORCH_CHECK(weight_in.size(1) == K, "vdproj_ext: decode_linear: weight must have shape (N, ",
              K, ") to match x's last dimension, got ", weight_in.sizes());
  if (bias_in.has_value()) {
    check_like(*bias_in, x_in, "bias");
    check_shape(*bias_in, "bias", {N});
  }
  const at::Tensor x = x_in.contiguous(), weight = weight_in.contiguous();
  std::optional<at::Tensor> bias;
  if (bias_in.has_value()) bias = bias_in->contiguous();
  std::vector<int64_t> out_shape(x.sizes().begin(), x.sizes().end());
  out_shape.back() = N;
  at::Tensor y = at::empty(out_shape, x.options());
  cpu::LinearArgs a{};
  a.x = x.data_ptr();
  a.w = weight.data_ptr();
  a.bias = opt_ptr(bias);
  a.y = y.data_ptr();
  a.M = K == 0 ? x.numel() : x.numel() / K;
  a.N = N;
  a.K = K;
  if (K == 0) {  // an empty sum: y is the bias (or zeros)
    if (bias.has_value()) y.copy_(bias->expand_as(y)); else y.zero_();
    return y;
  }
  VDPROJ_ISA_CALL(linear, x.scalar_type() == at::kDouble ? Kind::F64 : Kind::F32, a);
  return y;
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
  m.def("decode_linear(Tensor x, Tensor weight, Tensor? bias) -> Tensor");
}

TORCH_LIBRARY_IMPL(vdproj_ext, CPU, m) {
  m.impl("cva_forward", &vdproj::cva_forward_cpu);
  m.impl("cva_backward", &vdproj::cva_backward_cpu);
  m.impl("kvcache_attention", &vdproj::kvcache_attention_cpu);
  m.impl("decode_linear", &vdproj::decode_linear_cpu);
}

#ifdef VDPROJ_WITH_CUDA
namespace vdproj::cuda {
std::vector<int64_t> compiled_archs();  // csrc/cuda/attn_fwd.cu
std::vector<int64_t> kernel_smem_bytes(const std::string& dtype, int64_t Tq, int64_t H,
                                       int64_t D, int64_t R, int64_t Tnew);  // cuda_api.cpp
}
#endif

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "vdproj_ext compiled kernels (ops are registered under torch.ops.vdproj_ext)";
  m.def("build_info", []() {
    pybind11::dict info;
    info["torch_version"] = TORCH_VERSION;  // the headers this was compiled against
#ifdef VDPROJ_WITH_CUDA
    info["with_cuda"] = true;
    info["cuda_archs"] = vdproj::cuda::compiled_archs();
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
#ifdef VDPROJ_WITH_CUDA
  m.def("cuda_kernel_smem_bytes", &vdproj::cuda::kernel_smem_bytes,
        "Shared memory (bytes) the CUDA kernels need for a shape: [attention (one stage), "
        "compress-on-write, backward]",
        pybind11::arg("dtype"), pybind11::arg("tq"), pybind11::arg("heads"),
        pybind11::arg("head_dim"), pybind11::arg("rank"), pybind11::arg("t_new"));
#endif
}
