// Backward of the absorbed attention (the part of cva_backward that is not a plain GEMM).
// With ctx_h = P_h @ V_c and dctx_h = dO_h @ w_r[h] (computed by cuda_api.cpp with cuBLAS):
//   dP_ij = dctx_i . v_c_j       dS_ij = P_ij (dP_ij - delta_i),  delta_i = dctx_i . ctx_i
//   dQ_i = scale sum_j dS_ij k_j   dK_j = scale sum_i dS_ij q_i   dV_c_j = sum_h sum_i P_ij dctx_i
// One block = one batch element and kTileKeys keys, looping over every head (so dV_c sums over
// heads in shared memory, without atomics) and over the queries that see the tile in groups of
// kRowsPerBlock. dQ is accumulated with float atomics across key tiles (as FlashAttention-2).
// P is recomputed from the saved log-sum-exp.
#include "attn_tiles.h"

namespace vdproj {
namespace cuda {
namespace {

constexpr int TJ = kTileKeys;
constexpr int RB = kRowsPerBlock;

struct BwdLayout {
  int64_t ks, vs, dv;  // float offsets
  BwdGroupLayout g;    // the query group's part, after them
};

// Rows of K and V_c are padded by 4 floats so that lanes reading different keys with float4
// loads at the same column fall in different banks.
inline __host__ __device__ BwdLayout bwd_layout(int64_t D, int64_t R) {
  BwdLayout L;
  L.ks = 0;
  L.vs = L.ks + TJ * (D + 4);
  L.dv = L.vs + TJ * (R + 4);
  L.g = bwd_group_layout(L.dv + TJ * R, D, R);
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
  float* qs = sm + lay.g.qs;
  float* dcs = sm + lay.g.dcs;
  float* lse2 = sm + lay.g.lse2;
  float* delta = sm + lay.g.delta;
  float* pp = sm + lay.g.pp;
  float* pds = sm + lay.g.pds;

  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const int64_t j0 = int64_t(blockIdx.x) * TJ, b = blockIdx.y;
  const int64_t Tq = p.Tq, Tk = p.Tk, H = p.H, R = p.R;
  const int64_t KP = D + 4, VP = R + 4;

  const T* q = static_cast<const T*>(p.q);
  const T* k = static_cast<const T*>(p.k);
  const T* vc = static_cast<const T*>(p.vc);

  stage_key_rows(vs, VP, dv, vc + b * Tk * R, R, R, j0, Tk, tid);
  const int64_t i_min = first_query_of_tile(p.causal, j0, Tq, Tk);

  const int kj = tid >> 3, kg = tid & 7;  // dK ownership: key kj, values kg*NK .. +NK
  for (int64_t h = 0; h < H; ++h) {
    stage_key_rows(ks, KP, nullptr, k + (b * Tk * H + h) * D, H * D, int64_t(D), j0, Tk, tid);
    float dk[NK];
#pragma unroll
    for (int e = 0; e < NK; ++e) dk[e] = 0.f;

    for (int64_t i0 = i_min; i0 < Tq; i0 += RB) {
      stage_query_group(p, q, D, R, qs, dcs, lse2, delta, b, h, i0, tid);
      __syncthreads();

      probs_and_dscores(p, [&] { return dot4<D>(qs + warp * D, ks + lane * KP, D, 0.f); },
                        dcs, vs, VP, R, lse2, delta, pp, pds, i0, j0, warp, lane);
      __syncthreads();

      // dK[key kj] += sum_w dS[w, kj] q[w]
#pragma unroll
      for (int w = 0; w < RB; ++w) {
        const float g = pds[w * TJ + kj];
#pragma unroll
        for (int e = 0; e < NK; ++e) dk[e] = fmaf(g, qs[w * D + kg * NK + e], dk[e]);
      }
      accumulate_key_grads(dv, R, R, pp, dcs, R, tid);  // dV_c[j] += sum_w P[w, j] dctx[w]
      // dQ[w] += sum_j dS[w, j] k[j]
      accumulate_query_grads(p.dq, D, [&](int64_t d, int64_t& stride) {
        stride = KP;
        return ks + d;
      }, pds, Tq, H, b, h, i0, tid);
      __syncthreads();
    }

    const int64_t pos = j0 + kj;
    if (pos < Tk) {
#pragma unroll
      for (int e = 0; e < NK; ++e) p.dk[((b * Tk + pos) * H + h) * D + kg * NK + e] = dk[e];
    }
    __syncthreads();  // ks is reloaded for the next head
  }

  const int64_t done = min(int64_t(TJ), Tk - j0);
  for (int64_t idx = tid; idx < done * R; idx += kThreads) p.dvc[(b * Tk + j0) * R + idx] = dv[idx];
}

}  // namespace

size_t bwd_smem_bytes(const BwdParams& p) {
  return size_t(bwd_layout(p.head_dim, p.R).g.end) * sizeof(float);
}

void launch_attention_bwd(const BwdParams& p, cudaStream_t stream) {
  if (p.B == 0 || p.Tk == 0 || p.Tq == 0 || p.H == 0) return;
  TORCH_CHECK(p.R % 8 == 0 && p.R > 0, "vdproj_ext CUDA backward: R must be a multiple of 8");
  const int64_t tiles = (p.Tk + TJ - 1) / TJ;
  TORCH_CHECK(tiles <= 2147483647 && p.B <= 65535, "vdproj_ext CUDA backward: grid too large");
  const size_t bytes = bwd_smem_bytes(p);
  const int limit = max_smem_optin();
  TORCH_CHECK(bytes <= size_t(limit), "vdproj_ext CUDA backward: needs ", bytes,
              " bytes of shared memory (R=", p.R, ", head_dim=", p.head_dim, "), the device allows ",
              limit);
  VDPROJ_DISPATCH_DTYPE(p.dtype, [&] {
    VDPROJ_DISPATCH_HEADDIM(p.head_dim, [&] {
      launch_kernel(attn_bwd_kernel<T, kD>, dim3(unsigned(tiles), unsigned(p.B)), bytes, stream, p);
    });
  });
}

}  // namespace cuda
}  // namespace vdproj
