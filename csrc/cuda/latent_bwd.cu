// Latent keys (SPEC 3b): backward of the absorbed attention (the part of ckv_backward that is
// not a plain GEMM). With q_eff_h = [q_rope_h | q_lat_h], key_j,h = [k_rope_j,h | K_lat_j],
// ctx_h = P_h @ V_c and dctx_h = dO_h @ w_r[h] (cuda_api.cpp, cuBLAS):
//   dP_ij = dctx_i . v_c_j       dS_ij = P_ij (dP_ij - delta_i),  delta_i = dctx_i . ctx_i
//   dq_eff_i   = scale sum_j dS_ij key_j
//   dk_rope_jh = scale sum_i dS_ij q_rope_i
//   dK_lat_j   = scale sum_h sum_i dS_ij q_lat_i      (the latent is shared by the heads)
//   dV_c_j     = sum_h sum_i P_ij dctx_i              (+ dK_lat_j with the joint latent)
// The gradients of q and w_kr follow from dq_eff with two GEMMs (csrc/common/absorbed_query.h).
//
// As attn_bwd.cu: one block = one batch element and kTileKeys keys, looping over every head and
// over the queries that see the tile in groups of kRowsPerBlock, so that dK_lat and dV_c sum
// over heads in shared memory without atomics; dq_eff is accumulated with float atomics across
// key tiles; P is recomputed from the saved log-sum-exp. The widths Dr, Rk, Rv are runtime
// values: the per-key accumulators live in shared memory, each element owned by one thread.
#include "device_utils.h"

namespace vdproj {
namespace cuda {
namespace {

constexpr int TJ = kTileKeys;
constexpr int RB = kRowsPerBlock;

// Offsets in floats. Staged key / value rows are padded by 4 floats so that lanes reading
// different keys with float4 loads at the same column fall in different banks.
struct LatentBwdLayout {
  int64_t KP, LP, VP;  // row strides of ks, ls, vs
  int64_t ks, ls, vs, dv, dl, dkr, qs, dcs, lse2, delta, pp, pds, total;
};

inline __host__ __device__ LatentBwdLayout latent_bwd_layout(int64_t Dr, int64_t Rk, int64_t Rv,
                                                             bool joint) {
  LatentBwdLayout L;
  L.KP = Dr + 4;
  L.LP = joint ? 0 : Rk + 4;  // the joint latent's rows are the V_c rows (vs)
  L.VP = Rv + 4;
  L.ks = 0;
  L.ls = L.ks + TJ * L.KP;
  L.vs = L.ls + TJ * L.LP;
  L.dv = L.vs + TJ * L.VP;
  L.dl = L.dv + TJ * Rv;
  L.dkr = L.dl + (joint ? 0 : TJ * Rk);
  L.qs = L.dkr + TJ * Dr;
  L.dcs = L.qs + RB * (Dr + Rk);
  L.lse2 = L.dcs + RB * Rv;
  L.delta = L.lse2 + RB;
  L.pp = L.delta + RB;
  L.pds = L.pp + RB * TJ;
  L.total = L.pds + RB * TJ;
  return L;
}

__device__ __forceinline__ float dot4(const float* a, const float* b, int64_t n, float acc) {
  for (int64_t d = 0; d < n; d += 4) {
    const float4 x = *reinterpret_cast<const float4*>(a + d);
    const float4 y = *reinterpret_cast<const float4*>(b + d);
    acc = fmaf(x.x, y.x, fmaf(x.y, y.y, fmaf(x.z, y.z, fmaf(x.w, y.w, acc))));
  }
  return acc;
}

template <typename T>
__global__ void __launch_bounds__(kThreads) latent_bwd_kernel(const LatentBwdParams p) {
  extern __shared__ __align__(16) float sm[];
  const int64_t Dr = p.Dr, Rk = p.Rk, Rv = p.Rv, Dq = Dr + Rk;
  const LatentBwdLayout lay = latent_bwd_layout(Dr, Rk, Rv, p.joint);
  float* ks = sm + lay.ks;    // [TJ][KP] rotary keys of the current head
  float* vs = sm + lay.vs;    // [TJ][VP]
  float* dv = sm + lay.dv;    // [TJ][Rv]
  float* dkr = sm + lay.dkr;  // [TJ][Dr], the current head
  float* qs = sm + lay.qs;    // [RB][Dq]
  float* dcs = sm + lay.dcs;  // [RB][Rv]
  float* lse2 = sm + lay.lse2;
  float* delta = sm + lay.delta;
  float* pp = sm + lay.pp;    // [RB][TJ]
  float* pds = sm + lay.pds;  // [RB][TJ]
  // The key latent and its gradient: separate rows, or the V_c rows and dV_c (joint).
  float* ls = p.joint ? vs : sm + lay.ls;
  float* dl = p.joint ? dv : sm + lay.dl;
  const int64_t LP = p.joint ? lay.VP : lay.LP, DLP = p.joint ? Rv : Rk;

  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const int64_t j0 = int64_t(blockIdx.x) * TJ, b = blockIdx.y;
  const int64_t Tq = p.Tq, Tk = p.Tk, H = p.H;
  const float scale_log2 = p.scale * kLog2eF;
  const T* kr = static_cast<const T*>(p.krope);
  const T* vc = static_cast<const T*>(p.vc);

  for (int64_t idx = tid; idx < TJ * Rv; idx += kThreads) {
    const int64_t j = idx / Rv, r = idx - j * Rv, pos = j0 + j;
    vs[j * lay.VP + r] = pos < Tk ? to_float(vc[(b * Tk + pos) * Rv + r]) : 0.f;
    dv[idx] = 0.f;
  }
  if (!p.joint) {
    const T* kl = static_cast<const T*>(p.klat);
    for (int64_t idx = tid; idx < TJ * Rk; idx += kThreads) {
      const int64_t j = idx / Rk, c = idx - j * Rk, pos = j0 + j;
      ls[j * LP + c] = pos < Tk ? to_float(kl[(b * Tk + pos) * Rk + c]) : 0.f;
      dl[idx] = 0.f;
    }
  }
  // Queries i with i + Tk - Tq >= j0 can see some key of this tile.
  int64_t i_min = 0;
  if (p.causal) i_min = max(int64_t(0), j0 + Tq - Tk);

  for (int64_t h = 0; h < H; ++h) {
    for (int64_t idx = tid; idx < TJ * Dr; idx += kThreads) {
      const int64_t j = idx / Dr, d = idx - j * Dr, pos = j0 + j;
      ks[j * lay.KP + d] = pos < Tk ? to_float(kr[((b * Tk + pos) * H + h) * Dr + d]) : 0.f;
      dkr[idx] = 0.f;
    }

    for (int64_t i0 = i_min; i0 < Tq; i0 += RB) {
      for (int64_t idx = tid; idx < RB * Dq; idx += kThreads) {
        const int64_t w = idx / Dq, d = idx - w * Dq, i = i0 + w;
        qs[idx] = i < Tq ? p.q_eff[((b * Tq + i) * H + h) * Dq + d] : 0.f;
      }
      for (int64_t idx = tid; idx < RB * Rv; idx += kThreads) {
        const int64_t w = idx / Rv, r = idx - w * Rv, i = i0 + w;
        dcs[idx] = i < Tq ? p.dctx[((b * Tq + i) * H + h) * Rv + r] : 0.f;
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
          const float* qr = qs + warp * Dq;
          const float s = dot4(qr + Dr, ls + lane * LP, Rk, dot4(qr, ks + lane * lay.KP, Dr, 0.f));
          pr = exp2f(s * scale_log2 - lse2[warp]);
          const float dp = dot4(dcs + warp * Rv, vs + lane * lay.VP, Rv, 0.f);
          ds = pr * (dp - delta[warp]) * p.scale;
        }
        pp[warp * TJ + lane] = pr;
        pds[warp * TJ + lane] = ds;
      }
      __syncthreads();

      // dk_rope[j] += sum_w dS[w, j] q_rope[w]   (each thread owns fixed elements: no races)
      for (int64_t idx = tid; idx < TJ * Dr; idx += kThreads) {
        const int64_t j = idx / Dr, d = idx - j * Dr;
        float a = dkr[idx];
#pragma unroll
        for (int w = 0; w < RB; ++w) a = fmaf(pds[w * TJ + j], qs[w * Dq + d], a);
        dkr[idx] = a;
      }
      // dK_lat[j] += sum_w dS[w, j] q_lat[w]   (into dV_c with the joint latent: Rk == Rv, so
      // the thread that updates an element here also updates it in the dV_c loop below)
      for (int64_t idx = tid; idx < TJ * Rk; idx += kThreads) {
        const int64_t j = idx / Rk, c = idx - j * Rk;
        float a = dl[j * DLP + c];
#pragma unroll
        for (int w = 0; w < RB; ++w) a = fmaf(pds[w * TJ + j], qs[w * Dq + Dr + c], a);
        dl[j * DLP + c] = a;
      }
      // dV_c[j] += sum_w P[w, j] dctx[w]
      for (int64_t idx = tid; idx < TJ * Rv; idx += kThreads) {
        const int64_t j = idx / Rv, r = idx - j * Rv;
        float a = dv[idx];
#pragma unroll
        for (int w = 0; w < RB; ++w) a = fmaf(pp[w * TJ + j], dcs[w * Rv + r], a);
        dv[idx] = a;
      }
      // dq_eff[w] += sum_j dS[w, j] key[j]
      for (int64_t idx = tid; idx < RB * Dq; idx += kThreads) {
        const int64_t w = idx / Dq, d = idx - w * Dq, i = i0 + w;
        if (i >= Tq) continue;
        const float* col = d < Dr ? ks + d : ls + (d - Dr);
        const int64_t stride = d < Dr ? lay.KP : LP;
        float a = 0.f;
#pragma unroll 8
        for (int j = 0; j < TJ; ++j) a = fmaf(pds[w * TJ + j], col[j * stride], a);
        atomicAdd(p.dq_eff + ((b * Tq + i) * H + h) * Dq + d, a);
      }
      __syncthreads();
    }

    const int64_t done = min(int64_t(TJ), Tk - j0);
    for (int64_t idx = tid; idx < done * Dr; idx += kThreads) {
      const int64_t j = idx / Dr, d = idx - j * Dr;
      p.dkrope[((b * Tk + j0 + j) * H + h) * Dr + d] = dkr[idx];
    }
    __syncthreads();  // ks and dkr are reloaded for the next head
  }

  const int64_t done = min(int64_t(TJ), Tk - j0);
  for (int64_t idx = tid; idx < done * Rv; idx += kThreads) p.dvc[(b * Tk + j0) * Rv + idx] = dv[idx];
  if (!p.joint) {
    for (int64_t idx = tid; idx < done * Rk; idx += kThreads) p.dklat[(b * Tk + j0) * Rk + idx] = dl[idx];
  }
}

}  // namespace

size_t latent_bwd_smem_bytes(int64_t Dr, int64_t Rk, int64_t Rv, bool joint) {
  return size_t(latent_bwd_layout(Dr, Rk, Rv, joint).total) * sizeof(float);
}

void launch_latent_attention_bwd(const LatentBwdParams& p, cudaStream_t stream) {
  if (p.B == 0 || p.Tk == 0 || p.Tq == 0 || p.H == 0) return;
  TORCH_CHECK(p.Dr % 4 == 0 && p.Rk % 4 == 0 && p.Rv % 4 == 0 && p.Rk > 0 && p.Rv > 0,
              "vdproj_ext CUDA latent backward: Dr, Rk and Rv must be multiples of 4");
  TORCH_CHECK(!p.joint || p.Rk == p.Rv, "vdproj_ext CUDA: the joint latent needs Rk == Rv");
  const int64_t tiles = (p.Tk + TJ - 1) / TJ;
  TORCH_CHECK(tiles <= 2147483647 && p.B <= 65535, "vdproj_ext CUDA latent backward: grid too large");
  const size_t bytes = latent_bwd_smem_bytes(p.Dr, p.Rk, p.Rv, p.joint);
  const int limit = max_smem_optin();
  TORCH_CHECK(bytes <= size_t(limit), "vdproj_ext CUDA latent backward: needs ", bytes,
              " bytes of shared memory (Dr=", p.Dr, ", Rk=", p.Rk, ", Rv=", p.Rv,
              "), the device allows ", limit);
  VDPROJ_DISPATCH_DTYPE(p.dtype, [&] {
    auto kernel = latent_bwd_kernel<T>;
    set_smem_limit(kernel, bytes);
    kernel<<<dim3(unsigned(tiles), unsigned(p.B)), kThreads, bytes, stream>>>(p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace cuda
}  // namespace vdproj
