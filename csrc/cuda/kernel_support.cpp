// What the fused CUDA kernels accept, in one place. The public API asks it to route inputs
// (vdproj_ext._C.cuda_kernel_support) and the CUDA ops check it before they launch (cuda_api.cpp),
// so the Python side restates no kernel limit.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/util/Exception.h>
#include <c10/util/StringUtil.h>
#include <cuda_runtime_api.h>

#include <array>
#include <cstdint>
#include <map>
#include <mutex>

#include "../common/checks.h"
#include "cuda_api.h"

namespace vdproj {
namespace cuda {
namespace {

// CUDA's grid limits: blocks along x, and along y or z.
constexpr int64_t kMaxGridX = 2147483647;
constexpr int64_t kMaxGridYZ = 65535;

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Shared memory one block may opt in to on `device` (bytes). A property of the device, read once:
// a decode loop asks for every layer at every step.
int64_t smem_optin_bytes(int device) {
  static std::mutex mu;
  static std::map<int, int64_t> cache;
  const std::lock_guard<std::mutex> lock(mu);
  const auto hit = cache.find(device);
  if (hit != cache.end()) return hit->second;
  int bytes = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&bytes, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  cache.emplace(device, bytes);
  return bytes;
}

std::string rank_reason(const char* name, int64_t rank) {
  if (rank <= 0 || rank % 8 != 0 || rank > kMaxRank) {
    return c10::str("rank ", name, "=", rank, " (kernels: a positive multiple of 8, at most ",
                    kMaxRank, ")");
  }
  return "";
}

// The head dims and ranks the kernels are instantiated and laid out for.
std::string dims_reason(int64_t head_dim, int64_t rank) {
  if (head_dim != 64 && head_dim != 128) {
    return c10::str("head_dim ", head_dim, " (kernels: 64 or 128)");
  }
  return rank_reason("R", rank);
}

// Latent keys: rotary dims the 16-byte copies move whole (a multiple of 8 elements), and the
// key latent's rank (k_rank 0: the joint latent, whose rank is R).
std::string latent_dims_reason(int64_t head_dim, int64_t rope_dim, int64_t k_rank) {
  if (rope_dim < 0 || rope_dim >= head_dim || rope_dim % 8 != 0) {
    return c10::str("rotary dims Dr=", rope_dim, " (kernels: a multiple of 8 below head_dim ",
                    head_dim, ")");
  }
  return k_rank == 0 ? "" : rank_reason("Rk", k_rank);
}

// The launch grids of attn_fwd.cu, attn_bwd.cu and kvcache.cu (batch on y or z; row groups,
// and for kvcache the combined rows, on x; heads on y of the restore).
std::string grid_reason(bool kvcache, int64_t B, int64_t Tq, int64_t H) {
  if (B > kMaxGridYZ) return c10::str("batch ", B, " (kernel grids: at most ", kMaxGridYZ, ")");
  if (ceil_div(Tq * H, kRowsPerBlock) > kMaxGridX) {
    return c10::str(Tq * H, " (head, query) rows per sequence (kernel grids: at most ",
                    kMaxGridX * kRowsPerBlock, ")");
  }
  if (kvcache && H > kMaxGridYZ) {
    return c10::str(H, " heads (kernel grids: at most ", kMaxGridYZ, ")");
  }
  if (kvcache && B * Tq * H > kMaxGridX) {
    return c10::str(B * Tq * H, " (batch, head, query) rows (kernel grids: at most ", kMaxGridX,
                    ")");
  }
  return "";
}

// The kernels move these tensors in 16-byte vectors: the base address and every outer stride
// must be 16-byte aligned, and the last dimension dense.
std::string alignment_reason(const std::vector<std::optional<at::Tensor>>& vector_loaded) {
  for (const std::optional<at::Tensor>& t : vector_loaded) {
    if (!t.has_value() || t->numel() == 0) continue;
    const int64_t elt = t->element_size();
    bool aligned = reinterpret_cast<uintptr_t>(t->data_ptr()) % 16 == 0;
    aligned = aligned && (t->dim() == 0 || t->size(-1) == 1 || t->stride(-1) == 1);
    for (int64_t d = 0; d + 1 < t->dim(); ++d) {
      aligned = aligned && (t->size(d) == 1 || (t->stride(d) * elt) % 16 == 0);
    }
    if (!aligned) {
      return c10::str("an input of shape ", py_tuple(t->sizes()), " and strides ",
                      py_tuple(t->strides()), " whose rows are not 16-byte aligned (the kernels "
                      "read it with 16-byte vector loads)");
    }
  }
  return "";
}

// Quantized caches (SPEC 3c). The kvcache ops list their caches first in vector_loaded
// (k_cache, vc_cache; krope_cache, kc_cache, vc_cache): the kernels take them all in q's dtype,
// or all quantized alike (int8, or float8_e4m3fn). Sets *cache to what they hold.
std::string cache_storage_reason(const std::string& op, const at::Tensor& q,
                                 const std::vector<std::optional<at::Tensor>>& vector_loaded,
                                 CacheType* cache) {
  const size_t n_caches = op == "kvcache" ? 2 : op == "ckv_kvcache" ? 3 : 0;
  std::vector<at::ScalarType> cache_types;
  for (size_t i = 0; i < vector_loaded.size(); ++i) {
    if (!vector_loaded[i].has_value()) continue;
    const at::ScalarType type = vector_loaded[i]->scalar_type();
    if (i < n_caches) {
      cache_types.push_back(type);
    } else if (type != q.scalar_type()) {
      return c10::str("an input of dtype ", py_dtype(type), " (kernels: q's dtype ",
                      py_dtype(q.scalar_type()), n_caches > 0 ? ", or quantized caches" : "",
                      ")");
    }
  }
  *cache = CacheType::kModel;
  bool all_model = true, all_same = true;
  for (const at::ScalarType type : cache_types) {
    all_model = all_model && type == q.scalar_type();
    all_same = all_same && type == cache_types.front();
  }
  if (all_model) return "";
  const at::ScalarType type = cache_types.front();
  if (!all_same || type == q.scalar_type()) {
    return "caches of mixed storage (the fused CUDA kernels take quantized caches only when "
           "every cache tensor of the call is quantized with the same dtype, torch.int8 or "
           "torch.float8_e4m3fn; the ATen path runs the others)";
  }
  if (type != at::kChar && type != at::kFloat8_e4m3fn) {
    return c10::str("caches of dtype ", py_dtype(type), " (kernels: q's dtype, torch.int8 or "
                    "torch.float8_e4m3fn)");
  }
  *cache = type == at::kChar ? CacheType::kInt8 : CacheType::kE4M3;
  return "";
}

// Quantized rows move in 16-byte copies of 1-byte elements: every cached row width (head_dim,
// Dr, Rk, Rv) must be a multiple of 16 elements.
std::string quantized_dims_reason(int64_t head_dim, int64_t rank, int64_t rope_dim,
                                  int64_t k_rank) {
  const std::pair<const char*, int64_t> widths[] = {
      {"head_dim", head_dim}, {"R", rank}, {"Dr", rope_dim}, {"Rk", k_rank}};
  for (const auto& [name, width] : widths) {
    if (width % 16 != 0) {
      return c10::str(name, "=", width, " with a quantized cache (kernels: a multiple of 16, as "
                      "1-byte rows move in 16-byte copies)");
    }
  }
  return "";
}

// {attention with one stage, compress-on-write, backward}: the least each kernel runs with.
std::array<int64_t, 3> smem_bytes(DType dtype, int64_t Tq, int64_t H, int64_t D, int64_t R,
                                  int64_t Tnew, CacheType cache = CacheType::kModel) {
  const int64_t attention =
      Tq > 0 ? int64_t(attn_min_smem_bytes(dtype, int(D), heads_per_tile(H, Tq), R, cache)) : 0;
  CompressParams c{};
  c.H = H;
  c.R = R;
  c.cache = cache;
  c.head_dim = static_cast<int>(D);
  const int64_t compress = Tnew > 0 ? int64_t(compress_smem_bytes(c)) : 0;
  BwdParams b{};
  b.head_dim = static_cast<int>(D);
  b.R = R;
  return {attention, compress, int64_t(bwd_smem_bytes(b))};
}

std::string smem_reason(bool kvcache, DType dtype, CacheType cache, const at::Tensor& q,
                        int64_t R, int64_t Tnew, bool backward) {
  const int64_t limit = smem_optin_bytes(q.device().index());
  const auto [attention, compress, bwd] =
      smem_bytes(dtype, q.size(1), q.size(2), q.size(3), R, kvcache ? Tnew : 0, cache);
  const std::pair<const char*, int64_t> needs[] = {
      {"attention", attention}, {"compress-on-write", compress},
      {"backward", !kvcache && backward ? bwd : 0}};
  for (const auto& [name, bytes] : needs) {
    if (bytes > limit) {
      return c10::str("the ", name, " kernel needs ", bytes, " bytes of shared memory per block, "
                      "the device allows ", limit);
    }
  }
  return "";
}

// The latent-key kernels: attention (one stage) and absorbed query, and per op the
// compress-on-write and restore (decode) or the backward (training).
std::string latent_smem_reason(bool kvcache, DType dtype, CacheType cache, const at::Tensor& q,
                               int64_t Rv, int64_t rope_dim, int64_t k_rank, int64_t t_new,
                               bool backward) {
  const int64_t limit = smem_optin_bytes(q.device().index());
  const int64_t Tq = q.size(1), H = q.size(2), D = q.size(3);
  const bool joint = k_rank == 0;
  const int64_t Rk = joint ? Rv : k_rank;
  const bool queries = Tq > 0;
  const std::pair<const char*, int64_t> needs[] = {
      {"latent attention",
       queries ? int64_t(latent_attn_min_smem_bytes(dtype, H, Tq, rope_dim, Rk, Rv, joint, cache))
               : 0},
      {"absorbed query", queries ? int64_t(latent_query_smem_bytes(D, rope_dim)) : 0},
      {"latent compress-on-write",
       kvcache && t_new > 0
           ? int64_t(latent_compress_smem_bytes(H, D, rope_dim, cache, joint ? Rv : Rk + Rv))
           : 0},
      {"restore", kvcache ? int64_t(kCombineRows) * Rv * 4 : 0},
      {"latent backward",
       !kvcache && backward ? int64_t(latent_bwd_smem_bytes(rope_dim, Rk, Rv, joint)) : 0}};
  for (const auto& [name, bytes] : needs) {
    if (bytes > limit) {
      return c10::str("the ", name, " kernel needs ", bytes, " bytes of shared memory per "
                      "block, the device allows ", limit);
    }
  }
  return "";
}

}  // namespace

std::optional<DType> kernel_dtype(at::ScalarType type) {
  switch (type) {
    case at::kFloat: return DType::kFloat32;
    case at::kHalf: return DType::kFloat16;
    case at::kBFloat16: return DType::kBFloat16;
    default: return std::nullopt;
  }
}

std::string kernel_support(const std::string& op, const at::Tensor& q, int64_t rank,
                           const std::vector<std::optional<at::Tensor>>& vector_loaded,
                           int64_t t_new, bool backward, int64_t rope_dim, int64_t k_rank) {
  TORCH_CHECK_VALUE(op == "cva" || op == "kvcache" || op == "ckv" || op == "ckv_kvcache",
                    "cuda_kernel_support: op must be \"cva\", \"kvcache\", \"ckv\" or "
                    "\"ckv_kvcache\", got \"", op, "\"");
  TORCH_CHECK_VALUE(q.dim() == 4, "cuda_kernel_support: q must be 4-D, got shape ",
                    py_tuple(q.sizes()));
  if (!q.is_cuda()) return c10::str("q is on ", q.device().str(), ", not a CUDA device");
  const std::optional<DType> dtype = kernel_dtype(q.scalar_type());
  if (!dtype) {
    return c10::str("dtype ", py_dtype(q.scalar_type()),
                    " (kernels: float32, float16 or bfloat16)");
  }
  const bool latent = op == "ckv" || op == "ckv_kvcache";
  const bool kvcache = op == "kvcache" || op == "ckv_kvcache";
  CacheType cache = CacheType::kModel;
  const std::string storage = cache_storage_reason(op, q, vector_loaded, &cache);
  if (!storage.empty()) return storage;
  const bool quantized = cache != CacheType::kModel;
  // The latent ops' query kernel has the restore's grid (heads on y): checked as for kvcache.
  for (const std::string& reason :
       {dims_reason(q.size(3), rank),
        latent ? latent_dims_reason(q.size(3), rope_dim, k_rank) : std::string(),
        quantized ? quantized_dims_reason(q.size(3), rank, latent ? rope_dim : 0,
                                          latent ? k_rank : 0)
                  : std::string(),
        grid_reason(kvcache || latent, q.size(0), q.size(1), q.size(2)),
        alignment_reason(vector_loaded)}) {
    if (!reason.empty()) return reason;
  }
  if (latent) {
    return latent_smem_reason(kvcache, *dtype, cache, q, rank, rope_dim, k_rank, t_new, backward);
  }
  return smem_reason(kvcache, *dtype, cache, q, rank, t_new, backward);
}

std::vector<int64_t> kernel_smem_bytes(const std::string& dtype, int64_t Tq, int64_t H, int64_t D,
                                       int64_t R, int64_t Tnew) {
  std::optional<DType> dt;
  if (dtype == "float32") dt = DType::kFloat32;
  if (dtype == "float16") dt = DType::kFloat16;
  if (dtype == "bfloat16") dt = DType::kBFloat16;
  TORCH_CHECK_VALUE(dt.has_value(), "kernel_smem_bytes: dtype must be float32, float16 or "
                    "bfloat16, got ", dtype);
  const std::string reason = dims_reason(D, R);
  TORCH_CHECK_VALUE(reason.empty(), "kernel_smem_bytes: ", reason);
  const auto bytes = smem_bytes(*dt, Tq, H, D, R, Tnew);
  return {bytes.begin(), bytes.end()};
}

}  // namespace cuda
}  // namespace vdproj
