// Block-sparse flash attention forward (sm80+ mma.sync path) over a stem BlockPlan.
//
// One CTA computes kBlockM query rows of one (batch, query head, plan query block) and walks only
// the key blocks the plan selected for that query block, in key tiles of kBlockN = 64 tokens,
// with an online softmax in float32 (scores pre-scaled by scale * log2(e), exp2).
//
// Warps: kBlockM / 16; warp w owns query rows [16 w, 16 w + 16) of the tile, so the softmax
// statistics never leave a warp (two rows per thread, reduced over the 4 threads of a quad).
// Tensor cores: mma.sync.m16n8k16 (bf16/fp16 in, fp32 accumulate); operands come from shared
// memory through ldmatrix (.trans for V). Shared memory rows are padded by 16 bytes so that the
// 8 row addresses of one ldmatrix hit 8 different 16-byte bank groups.
// Pipeline (one stage each for K and V, cp.async): V of tile j loads while S = Q K^T of tile j
// and its softmax run; K of tile j + 1 loads while O += P V of tile j runs.
//
// Masking: key positions >= Lk and keys after the query (token causal mask) get -inf; only tiles
// that can contain such keys pay for the check. Rows of the tile outside [0, Lq) are computed on
// zero-filled Q and never stored. A row that sees no key at all (a plan with a zero count) gets
// output 0 and LSE -inf.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cmath>
#include <cstdint>

#include "block_sparse_attn.h"
#include "plan_walk.cuh"
#include "ptx_common.cuh"

namespace stem_attn {

// ---------------------------------------------------------------------------------------------
// Kernel
// ---------------------------------------------------------------------------------------------
template <typename T, int kD, int kBlockM>
struct Cfg {
  static constexpr int kBlockN = 64;
  static constexpr int kWarps = kBlockM / 16;
  static constexpr int kThreads = kWarps * 32;
  static constexpr int kLds = kD + 8;     // padded smem row, in elements
  static constexpr int kChunks = kD / 8;  // 16-byte chunks per row
  static constexpr int kSmemBytes = (kBlockM + 2 * kBlockN) * kLds * static_cast<int>(sizeof(T));
  // Register cap through the occupancy hint: 128 registers a thread for 256-thread CTAs (two per
  // SM) and for D = 64; 168 for 128-thread CTAs at D = 128 (three per SM); 255 for D = 256 (its
  // accumulator alone is 128 registers).
  static constexpr int kMinBlocks = kD == 256 ? 1 : (kThreads == 256 ? 2 : (kD == 128 ? 3 : 4));
  static_assert(kD % 16 == 0, "head dim must be a multiple of 16");
  static_assert(kBlockM == 64 || kBlockM == 128, "kBlockM must be 64 or 128");
};

// Async copy of kRows rows (row r at g + r * stride, valid when lo <= r0 + r < hi, else zeros).
template <typename T, int kRows, int kD, int kThreads>
__device__ __forceinline__ void load_rows(T* s, const T* g, int64_t stride, int r0, int lo, int hi, int tid) {
  constexpr int kChunks = kD / 8;
  constexpr int kLds = kD + 8;
  constexpr int kTotal = kRows * kChunks;
  static_assert(kTotal % kThreads == 0, "tile chunks must split evenly over the threads");
#pragma unroll
  for (int it = 0; it < kTotal / kThreads; ++it) {
    const int c = tid + it * kThreads;
    const int rr = c / kChunks;
    const int cc = c % kChunks;
    const int r = r0 + rr;
    const bool ok = r >= lo && r < hi;
    const T* src = ok ? g + static_cast<int64_t>(r) * stride + cc * 8 : g;
    cp_async_16(smem_u32(s + rr * kLds + cc * 8), src, ok);
  }
}

template <typename T, int kD, int kBlockM>
__global__ void __launch_bounds__(Cfg<T, kD, kBlockM>::kThreads, Cfg<T, kD, kBlockM>::kMinBlocks)
    block_sparse_attn_fwd_kernel(const Params p) {
  using C = Cfg<T, kD, kBlockM>;
  constexpr int kBlockN = C::kBlockN;
  constexpr int kThreads = C::kThreads;
  constexpr int kLds = C::kLds;
  constexpr int kChunks = C::kChunks;
  constexpr int kNTiles = kBlockN / 8;  // n8 tiles of S per warp
  constexpr int kDTiles = kD / 8;       // n8 tiles of O per warp

  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* sQ = reinterpret_cast<T*>(smem_raw);
  T* sK = sQ + kBlockM * kLds;
  T* sV = sK + kBlockN * kLds;

  const int tid = threadIdx.x;
  const int warp = tid / 32;
  const int lane = tid % 32;
  const int bs = p.block_size;
  const int sub = bs / kBlockM;
  const int tile = p.nQ * sub - 1 - static_cast<int>(blockIdx.x);  // late (heavier) query tiles first
  const int qi = tile / sub;
  const int h = blockIdx.y;
  const int b = blockIdx.z;
  const int hk = h / (p.Hq / p.Hkv);

  const SeqView sq = seq_view(p, b);
  const QueryTile qt = query_tile(p, sq, qi, tile % sub, kBlockM);
  if (qt.empty) return;  // a sub-tile of a plan block with no query rows (uniform per CTA)
  const int a0 = qt.a0;
  const int q_row0 = qt.q_row0;

  const T* qg = static_cast<const T*>(p.q) + b * p.q_stride_b + h * p.q_stride_h + sq.q_start * p.q_stride_l;
  const T* kg = static_cast<const T*>(p.k) + b * p.k_stride_b + hk * p.k_stride_h + sq.k_start * p.k_stride_l;
  const T* vg = static_cast<const T*>(p.v) + b * p.v_stride_b + hk * p.v_stride_h + sq.k_start * p.v_stride_l;
  KeyTileWalk<kBlockN> walk(p, b, h, qi, qt.key_limit);

  int kcur = walk.current();
  load_rows<T, kBlockM, kD, kThreads>(sQ, qg, p.q_stride_l, q_row0, 0, sq.Lq, tid);
  if (kcur >= 0) load_rows<T, kBlockN, kD, kThreads>(sK, kg, p.k_stride_l, kcur, 0, sq.Lk, tid);
  cp_async_commit();

  // Per-lane ldmatrix addresses (bytes, shared space).
  const uint32_t q_addr = smem_u32(sQ + (warp * 16 + (lane % 16)) * kLds + (lane / 16) * 8);
  const uint32_t k_addr = smem_u32(sK + ((lane / 16) * 8 + (lane % 8)) * kLds + ((lane / 8) % 2) * 8);
  const uint32_t v_addr = smem_u32(sV + (((lane / 8) % 2) * 8 + (lane % 8)) * kLds + (lane / 16) * 8);

  float acc_o[kDTiles][4];
#pragma unroll
  for (int d = 0; d < kDTiles; ++d) acc_o[d][0] = acc_o[d][1] = acc_o[d][2] = acc_o[d][3] = 0.f;
  float m_run[2] = {-INFINITY, -INFINITY};  // running row max (log2 domain)
  float l_run[2] = {0.f, 0.f};              // this thread's partial row sums
  const int row_in_tile = warp * 16 + lane / 4;  // rows row_in_tile and row_in_tile + 8

  while (kcur >= 0) {
    cp_async_wait_all();
    __syncthreads();  // K(kcur) visible; every warp is done with V of the previous tile
    load_rows<T, kBlockN, kD, kThreads>(sV, vg, p.v_stride_l, kcur, 0, sq.Lk, tid);
    cp_async_commit();

    // ---- S = Q K^T (16 x 64 per warp) ----
    float s[kNTiles][4];
#pragma unroll
    for (int n = 0; n < kNTiles; ++n) s[n][0] = s[n][1] = s[n][2] = s[n][3] = 0.f;
#pragma unroll
    for (int kk = 0; kk < kD / 16; ++kk) {
      uint32_t a[4];
      ldsm_x4(a, q_addr + kk * 32);
#pragma unroll
      for (int np = 0; np < kNTiles / 2; ++np) {
        uint32_t bfr[4];
        ldsm_x4(bfr, k_addr + (np * 16 * kLds + kk * 16) * 2);
        Mma<T>::mma(s[2 * np], a, bfr[0], bfr[1]);
        Mma<T>::mma(s[2 * np + 1], a, bfr[2], bfr[3]);
      }
    }

    // ---- scale, mask, online softmax ----
    const bool need_mask = (kcur + kBlockN - 1 > a0) || (kcur + kBlockN > sq.Lk);
#pragma unroll
    for (int n = 0; n < kNTiles; ++n) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        float x = s[n][e] * p.scale_log2;
        if (need_mask) {
          const int key = kcur + n * 8 + 2 * (lane % 4) + (e & 1);
          const int qpos = a0 + row_in_tile + (e >= 2 ? 8 : 0);
          if (key >= sq.Lk || key > qpos) x = -INFINITY;
        }
        s[n][e] = x;
      }
    }
    float mx[2] = {m_run[0], m_run[1]};
#pragma unroll
    for (int n = 0; n < kNTiles; ++n) {
      mx[0] = fmaxf(mx[0], fmaxf(s[n][0], s[n][1]));
      mx[1] = fmaxf(mx[1], fmaxf(s[n][2], s[n][3]));
    }
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 1));
      mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 2));
    }
    float mu[2], alpha[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      mu[r] = mx[r] == -INFINITY ? 0.f : mx[r];  // a row with nothing visible yet stays at 0
      alpha[r] = fast_exp2(m_run[r] - mu[r]);
      m_run[r] = mx[r];
      l_run[r] *= alpha[r];
    }
#pragma unroll
    for (int n = 0; n < kNTiles; ++n) {
      s[n][0] = fast_exp2(s[n][0] - mu[0]);
      s[n][1] = fast_exp2(s[n][1] - mu[0]);
      s[n][2] = fast_exp2(s[n][2] - mu[1]);
      s[n][3] = fast_exp2(s[n][3] - mu[1]);
      l_run[0] += s[n][0] + s[n][1];
      l_run[1] += s[n][2] + s[n][3];
    }
    // P as the A operand of the next mma (16 x 16 fragments, bf16/fp16), packed now so that the
    // float scores die before the barrier below.
    uint32_t pf[kBlockN / 16][4];
#pragma unroll
    for (int kk = 0; kk < kBlockN / 16; ++kk) {
      pf[kk][0] = Mma<T>::pack(s[2 * kk][0], s[2 * kk][1]);
      pf[kk][1] = Mma<T>::pack(s[2 * kk][2], s[2 * kk][3]);
      pf[kk][2] = Mma<T>::pack(s[2 * kk + 1][0], s[2 * kk + 1][1]);
      pf[kk][3] = Mma<T>::pack(s[2 * kk + 1][2], s[2 * kk + 1][3]);
    }
#pragma unroll
    for (int d = 0; d < kDTiles; ++d) {
      acc_o[d][0] *= alpha[0];
      acc_o[d][1] *= alpha[0];
      acc_o[d][2] *= alpha[1];
      acc_o[d][3] *= alpha[1];
    }

    walk.next();
    const int knext = walk.current();
    cp_async_wait_all();
    __syncthreads();  // V(kcur) visible; every warp is done reading K(kcur)
    if (knext >= 0) load_rows<T, kBlockN, kD, kThreads>(sK, kg, p.k_stride_l, knext, 0, sq.Lk, tid);
    cp_async_commit();

    // ---- O += P V ----
#pragma unroll
    for (int kk = 0; kk < kBlockN / 16; ++kk) {
#pragma unroll
      for (int dp = 0; dp < kD / 16; ++dp) {
        uint32_t bfr[4];
        ldsm_x4_trans(bfr, v_addr + (kk * 16 * kLds + dp * 16) * 2);
        Mma<T>::mma(acc_o[2 * dp], pf[kk], bfr[0], bfr[1]);
        Mma<T>::mma(acc_o[2 * dp + 1], pf[kk], bfr[2], bfr[3]);
      }
    }
    kcur = knext;
  }

  // ---- epilogue: normalise, stage through this warp's own rows of sQ, 16-byte stores ----
  cp_async_wait_all();
  __syncthreads();  // all async copies (Q included) have landed before sQ is overwritten
  float inv[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    l_run[r] += __shfl_xor_sync(0xffffffffu, l_run[r], 1);
    l_run[r] += __shfl_xor_sync(0xffffffffu, l_run[r], 2);
    inv[r] = l_run[r] > 0.f ? 1.f / l_run[r] : 0.f;
  }
#pragma unroll
  for (int d = 0; d < kDTiles; ++d) {
    const int col = d * 8 + 2 * (lane % 4);
    *reinterpret_cast<uint32_t*>(sQ + row_in_tile * kLds + col) = Mma<T>::pack(acc_o[d][0] * inv[0], acc_o[d][1] * inv[0]);
    *reinterpret_cast<uint32_t*>(sQ + (row_in_tile + 8) * kLds + col) =
        Mma<T>::pack(acc_o[d][2] * inv[1], acc_o[d][3] * inv[1]);
  }
  __syncwarp();
  T* og = static_cast<T*>(p.o) + b * p.o_stride_b + h * p.o_stride_h + sq.q_start * p.o_stride_l;
#pragma unroll
  for (int c = lane; c < 16 * kChunks; c += 32) {
    const int rr = c / kChunks;
    const int cc = c % kChunks;
    const int r = q_row0 + warp * 16 + rr;
    if (r >= 0 && r < sq.Lq) {
      *reinterpret_cast<uint4*>(og + static_cast<int64_t>(r) * p.o_stride_l + cc * 8) =
          *reinterpret_cast<const uint4*>(sQ + (warp * 16 + rr) * kLds + cc * 8);
    }
  }
  if (p.lse != nullptr && lane % 4 == 0) {
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const int row = q_row0 + row_in_tile + 8 * r;
      if (row >= 0 && row < sq.Lq) {
        const float v = l_run[r] > 0.f ? (m_run[r] + __log2f(l_run[r])) * 0.69314718055994531f : -INFINITY;
        p.lse[b * p.lse_stride_b + h * p.lse_stride_h + sq.q_start + row] = v;
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Host side
// ---------------------------------------------------------------------------------------------
template <typename T, int kD, int kBlockM>
cudaError_t launch_block_sparse_attn(const Params& p, cudaStream_t stream) {
  using C = Cfg<T, kD, kBlockM>;
  auto kernel = block_sparse_attn_fwd_kernel<T, kD, kBlockM>;
  const int smem = C::kSmemBytes;
  if (smem > 48 * 1024) {
    const cudaError_t e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
    if (e != cudaSuccess) return e;
  }
  const dim3 grid(static_cast<unsigned>(p.nQ * (p.block_size / kBlockM)), static_cast<unsigned>(p.Hq),
                  static_cast<unsigned>(p.B));
  kernel<<<grid, C::kThreads, smem, stream>>>(p);
  return cudaGetLastError();
}

// Tile choice for one head dim: 128-row tiles where a plan block holds them (more reuse of each
// K/V tile), 64-row tiles for 64-token plan blocks and for D = 256 (register and smem budget).
template <typename T, int kD>
cudaError_t run_block_sparse_attn(const Params& p, cudaStream_t stream) {
  if (p.block_size % 64 != 0) return cudaErrorInvalidValue;
  if constexpr (kD <= 128) {
    if (p.block_size % 128 == 0) return launch_block_sparse_attn<T, kD, 128>(p, stream);
  }
  return launch_block_sparse_attn<T, kD, 64>(p, stream);
}

}  // namespace stem_attn
