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
#include "attn_tiles.h"

namespace vdproj {
namespace cuda {
namespace {

constexpr int TJ = kTileKeys;
constexpr int RB = kRowsPerBlock;

// Offsets in floats. Staged key / value rows are padded by 4 floats so that lanes reading
// different keys with float4 loads at the same column fall in different banks.
struct LatentBwdLayout {
  int64_t KP, LP, VP;  // row strides of ks, ls, vs
  int64_t ks, ls, vs, dv, dl, dkr;
  BwdGroupLayout g;    // the query group's part, after them
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
  L.g = bwd_group_layout(L.dkr + TJ * Dr, Dr + Rk, Rv);
  return L;
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
  float* qs = sm + lay.g.qs;    // [RB][Dq]
  float* dcs = sm + lay.g.dcs;  // [RB][Rv]
  float* lse2 = sm + lay.g.lse2;
  float* delta = sm + lay.g.delta;
  float* pp = sm + lay.g.pp;    // [RB][TJ]
  float* pds = sm + lay.g.pds;  // [RB][TJ]
  // The key latent and its gradient: separate rows, or the V_c rows and dV_c (joint).
  float* ls = p.joint ? vs : sm + lay.ls;
  float* dl = p.joint ? dv : sm + lay.dl;
  const int64_t LP = p.joint ? lay.VP : lay.LP, DLP = p.joint ? Rv : Rk;

  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const int64_t j0 = int64_t(blockIdx.x) * TJ, b = blockIdx.y;
  const int64_t Tq = p.Tq, Tk = p.Tk, H = p.H;
  const T* kr = static_cast<const T*>(p.krope);

  stage_key_rows(vs, lay.VP, dv, static_cast<const T*>(p.vc) + b * Tk * Rv, Rv, Rv, j0, Tk, tid);
  if (!p.joint) {
    stage_key_rows(ls, LP, dl, static_cast<const T*>(p.klat) + b * Tk * Rk, Rk, Rk, j0, Tk, tid);
  }
  const int64_t i_min = first_query_of_tile(p.causal, j0, Tq, Tk);

  for (int64_t h = 0; h < H; ++h) {
    if (Dr > 0) stage_key_rows(ks, lay.KP, dkr, kr + (b * Tk * H + h) * Dr, H * Dr, Dr, j0, Tk, tid);

    for (int64_t i0 = i_min; i0 < Tq; i0 += RB) {
      stage_query_group(p, p.q_eff, Dq, Rv, qs, dcs, lse2, delta, b, h, i0, tid);
      __syncthreads();

      probs_and_dscores(p, [&] {
        const float* qr = qs + warp * Dq;
        return dot4(qr + Dr, ls + lane * LP, Rk, dot4(qr, ks + lane * lay.KP, Dr, 0.f));
      }, dcs, vs, lay.VP, Rv, lse2, delta, pp, pds, i0, j0, warp, lane);
      __syncthreads();

      // Each thread owns fixed elements of the accumulators: no races. With the joint latent
      // (Rk == Rv, dl == dv) the thread that adds dK_lat to an element also adds its dV_c.
      accumulate_key_grads(dkr, Dr, Dr, pds, qs, Dq, tid);      // dk_rope[j] += dS q_rope
      accumulate_key_grads(dl, DLP, Rk, pds, qs + Dr, Dq, tid);  // dK_lat[j] += dS q_lat
      accumulate_key_grads(dv, Rv, Rv, pp, dcs, Rv, tid);        // dV_c[j] += P dctx
      // dq_eff[w] += sum_j dS[w, j] key[j]
      accumulate_query_grads(p.dq_eff, Dq, [&](int64_t d, int64_t& stride) {
        stride = d < Dr ? lay.KP : LP;
        return d < Dr ? ks + d : ls + (d - Dr);
      }, pds, Tq, H, b, h, i0, tid);
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
  return size_t(latent_bwd_layout(Dr, Rk, Rv, joint).g.end) * sizeof(float);
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
    launch_kernel(latent_bwd_kernel<T>, dim3(unsigned(tiles), unsigned(p.B)), bytes, stream, p);
  });
}

}  // namespace cuda
}  // namespace vdproj
