// Backward of the absorbed attention (the part of cva_backward that is not a plain GEMM).
// With ctx_h = P_h @ V_c and dctx_h = dO_h @ w_r[h] (computed by cuda_api.cpp with cuBLAS):
//   dP_ij = dctx_i . v_c_j       dS_ij = P_ij (dP_ij - delta_i),  delta_i = dctx_i . ctx_i
//   dQ_i = scale sum_j dS_ij k_j   dK_j = scale sum_i dS_ij q_i   dV_c_j = sum_h sum_i P_ij dctx_i
// One block = one batch element and kTileKeys keys, looping over every head (so dV_c sums over
// heads in shared memory, without atomics) and over the queries that see the tile in groups of
// kRowsPerBlock. dQ is accumulated with float atomics across key tiles (as FlashAttention-2).
// P is recomputed from the saved log-sum-exp.
#include "device_utils.h"

namespace vdproj {
namespace cuda {
namespace {

constexpr int TJ = kTileKeys;
constexpr int RB = kRowsPerBlock;

struct BwdLayout {
  int64_t ks, vs, dv, qs, dcs, lse2, delta, pp, pds, total;  // float offsets
};

// Rows of K and V_c are padded by 4 floats so that lanes reading different keys with float4
// loads at the same column fall in different banks.
inline __host__ __device__ BwdLayout bwd_layout(int64_t D, int64_t R) {
  BwdLayout L;
  L.ks = 0;
  L.vs = L.ks + TJ * (D + 4);
  L.dv = L.vs + TJ * (R + 4);
  L.qs = L.dv + TJ * R;
  L.dcs = L.qs + RB * D;
  L.lse2 = L.dcs + RB * R;
  L.delta = L.lse2 + RB;
  L.pp = L.delta + RB;
  L.pds = L.pp + RB * TJ;
  L.total = L.pds + RB * TJ;
  return L;
}

template <typename T, int D>
__global__ void __launch_bounds__(kThreads) attn_bwd_kernel(const BwdParams p) {
  static_assert(kThreads == TJ * 8, "dK mapping: 8 threads per key");
  constexpr int NK = D / 8;  // dK values per thread
  extern __shared__ __align__(16) float sm[];
  const BwdLayout lay = bwd_layout(D, p.R);
  float* ks = sm + lay.ks;
  float* vs = sm + lay.vs;
  float* dv = sm + lay.dv;
  float* qs = sm + lay.qs;
  float* dcs = sm + lay.dcs;
  float* lse2 = sm + lay.lse2;
  float* delta = sm + lay.delta;
  float* pp = sm + lay.pp;
  float* pds = sm + lay.pds;

  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const int64_t j0 = int64_t(blockIdx.x) * TJ, b = blockIdx.y;
  const int64_t Tq = p.Tq, Tk = p.Tk, H = p.H, R = p.R;
  const int64_t KP = D + 4, VP = R + 4;
  const float scale_log2 = p.scale * kLog2eF;

  const T* q = static_cast<const T*>(p.q);
  const T* k = static_cast<const T*>(p.k);
  const T* vc = static_cast<const T*>(p.vc);

  for (int64_t idx = tid; idx < TJ * R; idx += kThreads) {
    const int64_t j = idx / R, r = idx - j * R, pos = j0 + j;
    vs[j * VP + r] = pos < Tk ? to_float(vc[(b * Tk + pos) * R + r]) : 0.f;
    dv[idx] = 0.f;
  }
  // Queries i with i + Tk - Tq >= j0 can see some key of this tile.
  int64_t i_min = 0;
  if (p.causal) i_min = max(int64_t(0), j0 + Tq - Tk);

  const int kj = tid >> 3, kg = tid & 7;  // dK ownership: key kj, values kg*NK .. +NK
  for (int64_t h = 0; h < H; ++h) {
    for (int64_t idx = tid; idx < TJ * D; idx += kThreads) {
      const int64_t j = idx / D, d = idx - j * D, pos = j0 + j;
      ks[j * KP + d] = pos < Tk ? to_float(k[((b * Tk + pos) * H + h) * D + d]) : 0.f;
    }
    float dk[NK];
#pragma unroll
    for (int e = 0; e < NK; ++e) dk[e] = 0.f;

    for (int64_t i0 = i_min; i0 < Tq; i0 += RB) {
      for (int64_t idx = tid; idx < RB * D; idx += kThreads) {
        const int64_t w = idx / D, d = idx - w * D, i = i0 + w;
        qs[idx] = i < Tq ? to_float(q[((b * Tq + i) * H + h) * D + d]) : 0.f;
      }
      for (int64_t idx = tid; idx < RB * R; idx += kThreads) {
        const int64_t w = idx / R, r = idx - w * R, i = i0 + w;
        dcs[idx] = i < Tq ? p.dctx[((b * Tq + i) * H + h) * R + r] : 0.f;
      }
      if (tid < RB) {
        const int64_t i = i0 + tid;
        lse2[tid] = i < Tq ? p.lse[(b * H + h) * Tq + i] * kLog2eF : -INFINITY;
        delta[tid] = i < Tq ? p.delta[(b * H + h) * Tq + i] : 0.f;
      }
      __syncthreads();

      {  // warp = query row, lane = key
        const int64_t i = i0 + warp, pos = j0 + lane;
        const bool valid = i < Tq && pos < Tk && (!p.causal || pos <= i + Tk - Tq) &&
                           lse2[warp] != -INFINITY;
        float pr = 0.f, ds = 0.f;
        if (valid) {
          float s = 0.f;
          const float* qr = qs + warp * D;
          const float* kr = ks + lane * KP;
#pragma unroll
          for (int d = 0; d < D; d += 4) {
            const float4 a = *reinterpret_cast<const float4*>(qr + d);
            const float4 c = *reinterpret_cast<const float4*>(kr + d);
            s = fmaf(a.x, c.x, fmaf(a.y, c.y, fmaf(a.z, c.z, fmaf(a.w, c.w, s))));
          }
          pr = exp2f(s * scale_log2 - lse2[warp]);
          float dp = 0.f;
          const float* gr = dcs + warp * R;
          const float* vr = vs + lane * VP;
          for (int64_t r = 0; r < R; r += 4) {
            const float4 a = *reinterpret_cast<const float4*>(gr + r);
            const float4 c = *reinterpret_cast<const float4*>(vr + r);
            dp = fmaf(a.x, c.x, fmaf(a.y, c.y, fmaf(a.z, c.z, fmaf(a.w, c.w, dp))));
          }
          ds = pr * (dp - delta[warp]) * p.scale;
        }
        pp[warp * TJ + lane] = pr;
        pds[warp * TJ + lane] = ds;
      }
      __syncthreads();

      // dK[key kj] += sum_w dS[w, kj] q[w]
#pragma unroll
      for (int w = 0; w < RB; ++w) {
        const float g = pds[w * TJ + kj];
#pragma unroll
        for (int e = 0; e < NK; ++e) dk[e] = fmaf(g, qs[w * D + kg * NK + e], dk[e]);
      }
      // dV_c[j] += sum_w P[w, j] dctx[w]   (each thread owns fixed elements: no races)
      for (int64_t idx = tid; idx < TJ * R; idx += kThreads) {
        const int64_t j = idx / R, r = idx - j * R;
        float a = dv[idx];
#pragma unroll
        for (int w = 0; w < RB; ++w) a = fmaf(pp[w * TJ + j], dcs[w * R + r], a);
        dv[idx] = a;
      }
      // dQ[w] += sum_j dS[w, j] k[j]
      for (int64_t idx = tid; idx < RB * D; idx += kThreads) {
        const int64_t w = idx / D, d = idx - w * D, i = i0 + w;
        if (i >= Tq) continue;
        float a = 0.f;
#pragma unroll 8
        for (int j = 0; j < TJ; ++j) a = fmaf(pds[w * TJ + j], ks[j * KP + d], a);
        atomicAdd(p.dq + ((b * Tq + i) * H + h) * D + d, a);
      }
      __syncthreads();
    }

    const int64_t pos = j0 + kj;
    if (pos < Tk) {
#pragma unroll
      for (int e = 0; e < NK; ++e) p.dk[((b * Tk + pos) * H + h) * D + kg * NK + e] = dk[e];
    }
    __syncthreads();  // ks is reloaded for the next head
  }

  for (int64_t idx = tid; idx < TJ * R; idx += kThreads) {
    const int64_t j = idx / R, r = idx - j * R, pos = j0 + j;
    if (pos < Tk) p.dvc[(b * Tk + pos) * R + r] = dv[idx];
  }
}

}  // namespace

size_t bwd_smem_bytes(const BwdParams& p) {
  return size_t(bwd_layout(p.head_dim, p.R).total) * sizeof(float);
}

void launch_attention_bwd(const BwdParams& p, cudaStream_t stream) {
  if (p.B == 0 || p.Tk == 0 || p.Tq == 0 || p.H == 0) return;
  TORCH_CHECK(p.R % 8 == 0 && p.R > 0, "vdproj_ext CUDA backward: R must be a multiple of 8");
  const int64_t tiles = (p.Tk + TJ - 1) / TJ;
  TORCH_CHECK(tiles <= 2147483647 && p.B <= 65535, "vdproj_ext CUDA backward: grid too large");
  const size_t bytes = bwd_smem_bytes(p);
  int dev = 0, limit = 0;
  C10_CUDA_CHECK(cudaGetDevice(&dev));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&limit, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev));
  TORCH_CHECK(bytes <= size_t(limit), "vdproj_ext CUDA backward: needs ", bytes,
              " bytes of shared memory (R=", p.R, ", head_dim=", p.head_dim, "), the device allows ",
              limit);
  VDPROJ_DISPATCH_DTYPE(p.dtype, [&] {
    VDPROJ_DISPATCH_HEADDIM(p.head_dim, [&] {
      auto kernel = attn_bwd_kernel<T, kD>;
      set_smem_limit(kernel, bytes);
      kernel<<<dim3(unsigned(tiles), unsigned(p.B)), kThreads, bytes, stream>>>(p);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
}

}  // namespace cuda
}  // namespace vdproj
