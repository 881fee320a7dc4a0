// Block-sparse flash attention forward, Hopper path (sm_90a: wgmma + TMA + mbarrier pipeline).
//
// Same contract as the sm80 kernel (block_sparse_attn_kernel.cuh): one CTA computes 128 query rows
// of one (batch, query head, plan query block) and walks only the key blocks the plan selected, in
// key tiles of 128 tokens (64 for head dim 256, see Cfg), with an online softmax in float32 (exp2
// of scores pre-scaled by scale * log2(e)).
//
// Warp specialisation (384 threads, one CTA per SM):
//   warpgroup 0  producer: one thread walks the plan and issues the TMA loads (Q once, then K
//                and V tiles into two rings of shared-memory stages, one for K and one for V),
//                publishing each K stage's first key (and FP8 scale) beside it, then -1 in the
//                next stage once the walk ends; it gives up registers (setmaxnreg 24).
//   warpgroups 1, 2  consumers: rows [0, 64) and [64, 128) of the query tile (240 registers each).
//                S = Q K^T with wgmma (A and B from shared memory), masking and softmax in
//                registers, O += P V with wgmma (P from registers, V from shared memory,
//                transposed). Each consumer thread arrives on a K stage's "empty" barrier once
//                S has retired and on a V stage's once O += P V has, which lets the producer
//                refill the stage. The softmax of tile j runs while O += P V of tile j - 1 is on
//                the tensor cores (two P register buffers). 16-bit kernels: the two warpgroups
//                take turns issuing (ping-pong, Cfg::kPingPong; not at head dim 256).
// Shared memory tiles are TMA boxes of 128 (Q) or kBlockN (K, V) rows x 64 elements (128 bytes)
// with the 128-byte swizzle, the layout wgmma reads directly (K-major for Q and K, MN-major for V).
// TMA zero-fills rows outside the tensor (negative query rows of an unaligned q_offset, keys past
// Lk), so partial tiles need no special loads; masks handle them in the scores.
//
// Grid: one CTA per (batch, query head, 128-row query tile), ordered so that the CTAs in flight
// share one kv head (L2 reuse of K/V) and the latest (heaviest) query tiles start first.
//
// Precision (kPrec, Precision below): kNative, kFp8 or kFp8PV.
// FP8 (kFp8, head dim 128): the same schedule on e4m3 operands quantised beforehand (the stem
// `hub` executor's quantisers): Q (B, Hq, Lq, D) with one scale per row, K (B, Hkv, Lp, D) with
// one scale per 128-key tile, V transposed to (B, Hkv, D, Lp) with one scale per channel. Both
// products use wgmma k32 with B K-major (FP8 has no transposed form). S's accumulator fragment
// and the e4m3 A fragment of O += P V disagree on which keys a thread holds: the thread's 4 bytes
// at k-positions 4c..4c+3 of a 32-key step are keys 2c, 2c+1, 2c+8, 2c+9 (and 16 more for the
// second register pair). Rather than exchange registers, V's keys are stored in that order within
// every 32-key group (quantize_kv(..., permute32=True)), which leaves the contraction unchanged.
// The probabilities are cast to e4m3 as p * 2^kPShift (exact; keeps them out of the subnormal range),
// the output is (sum p v8) / (sum p) * v_scale per channel, written in the 16-bit output type T.
// kFp8PV: Q and K stay in T (S = Q K^T as in the native kernel), only O += P V runs in e4m3 with
// the V layout and scales above: under a third of the error of kFp8 on real models (emulated on
// SmolLM2), whose sharp scores suffer most from 3-bit Q and K (benchmarks/NOTES.md).
#pragma once

#include <cuda.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>

#include <cmath>
#include <cstdint>
#include <type_traits>

#include "block_sparse_attn.h"
#include "plan_walk.cuh"
#include "ptx_common.cuh"
#include "wgmma.cuh"

namespace stem_attn {
namespace sm90 {

// What runs in e4m3: nothing, both products, or only O += P V.
enum Precision : int { kNative = 0, kFp8 = 1, kFp8PV = 2 };

template <int kD, int kPrec = kNative>
struct Cfg {
  static constexpr bool kQK8 = kPrec == kFp8;      // S = Q K^T on e4m3 operands
  static constexpr bool kPV8 = kPrec != kNative;   // O += P V on e4m3 operands
  static constexpr int kElemBytes = kQK8 ? 1 : 2;  // of Q and K
  static constexpr int kVBytes = kPV8 ? 1 : 2;
  static constexpr int kBlockM = 128;  // two consumer warpgroups x 64 rows
  // Key tile: 128 keys, or 64 for D = 256, where O (64 x 256 float32: 128 registers a consumer
  // thread) leaves room only for a 64-key S (32 registers) and two 64-key P buffers (16 each).
  static constexpr int kBlockN = kD == 256 ? 64 : 128;
  // K and V rings, each with its own barriers: a K stage is free once S = QK^T has retired, a V
  // stage once O += PV has (a step later). Depths: the most that fit beside Q in 227 KB of shared
  // memory (D = 128: Q + 3 K + 3 V = 224 KB; D = 256: Q 64 KB + 2 K + 3 V tiles of 32 KB).
  // FP8 tiles are half the bytes: 4 + 4 stages (Q + 8 tiles = 144 KB); kFp8PV: 3 bf16 K stages
  // and 4 e4m3 V stages (32 + 96 + 64 KB).
  static constexpr int kStagesK = kQK8 ? 4 : kD == 256 ? 2 : 3;
  static constexpr int kStagesV = kPV8 ? 4 : 3;
  static constexpr int kThreads = 384;
  // Ping-pong: the consumer warpgroups take turns issuing their wgmmas (named barriers), so one's
  // softmax runs under the other's products. Measured (benchmarks/NOTES.md): 1% faster in 16-bit
  // at head dim 128, 2% slower in FP8, whose shorter products leave less to hide. Not at head dim
  // 256, where its bookkeeping makes ptxas spill.
  static constexpr bool kPingPong = kPrec == kNative && kD != 256;
  // Speculative exponentials against the running max (softmax_tile): not at head dim 64, where
  // ptxas spills with them (its 16-bit P buffers for 128-key tiles are as large as at 128).
  static constexpr bool kSpeculate = kD != 64;
  static constexpr int kBoxCols = 128 / kElemBytes;    // elements in one 128-byte swizzled row
  static constexpr int kChunks = kD / kBoxCols;        // TMA boxes per Q or K tile
  static constexpr int kBoxBytesQ = kBlockM * 128;     // kBlockM rows x 128 bytes
  static constexpr int kBoxBytesKV = kBlockN * 128;    // kBlockN rows x 128 bytes
  static constexpr int kTileBytesQ = kChunks * kBoxBytesQ;
  // A K tile; a V tile (FP8: V transposed, kD rows x kBlockN keys of one byte: one box).
  static constexpr int kTileBytesK = kBlockN * kD * kElemBytes;
  static constexpr int kTileBytesV = kBlockN * kD * kVBytes;
  // wgmma k-steps (32 bytes of the reduction axis each): of S = Q K^T, and of O += P V.
  static constexpr int kSSteps = kD * kElemBytes / 32;
  static constexpr int kPSteps = kBlockN * kVBytes / 32;
  static constexpr int kBarrierBytes = 8 * (1 + 2 * kStagesK + 2 * kStagesV);
  static constexpr int kStageInfoBytes = 8 * kStagesK;  // per K stage: its first key and K scale
  // 1024 bytes of slack to align the tiles to the 1024-byte swizzle period.
  static constexpr int kSmemBytes = 1024 + kTileBytesQ + kStagesK * kTileBytesK + kStagesV * kTileBytesV +
                                    kBarrierBytes + kStageInfoBytes;
  static_assert(kD % kBoxCols == 0, "head dim must be a multiple of 64");
  static_assert(!kPV8 || (kD == 128 && kBlockN == 128), "the FP8 paths are built for head dim 128 only");
  static_assert(kSmemBytes <= 227 * 1024, "shared memory of one CTA exceeds the 227 KB of an sm90 SM");
};

// ---------------------------------------------------------------------------------------------
// sm90 PTX helpers (mbarrier, TMA, wgmma bookkeeping, register reallocation)
// ---------------------------------------------------------------------------------------------
__device__ __forceinline__ void mbar_init(uint32_t bar, uint32_t count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(bar), "r"(count) : "memory");
}
__device__ __forceinline__ void mbar_arrive_expect_tx(uint32_t bar, uint32_t bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(bar), "r"(bytes) : "memory");
}
__device__ __forceinline__ void mbar_arrive(uint32_t bar) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(bar) : "memory");
}
__device__ __forceinline__ void mbar_wait(uint32_t bar, uint32_t parity) {
  uint32_t done = 0;
  do {
    asm volatile(
        "{\n.reg .pred p;\nmbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\nselp.u32 %0, 1, 0, p;\n}\n"
        : "=r"(done)
        : "r"(bar), "r"(parity)
        : "memory");
  } while (!done);
}
// One TMA box (4-d coordinates, innermost first) into shared memory; completes on `bar`.
__device__ __forceinline__ void tma_load_4d(uint32_t dst, const CUtensorMap* map, uint32_t bar, int c0, int c1, int c2,
                                            int c3) {
  asm volatile(
      "cp.async.bulk.tensor.4d.shared::cluster.global.tile.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3, %4, %5}], "
      "[%6];\n" ::"r"(dst),
      "l"(reinterpret_cast<uint64_t>(map)), "r"(c0), "r"(c1), "r"(c2), "r"(c3), "r"(bar)
      : "memory");
}
// Named barriers 1 and 2 (0 is __syncthreads): the consumer warpgroups' turns at the tensor cores.
// `count` threads take part: the 128 that wait and the 128 that arrive.
__device__ __forceinline__ void named_bar_sync(int id, int count) {
  asm volatile("bar.sync %0, %1;\n" ::"r"(id), "r"(count) : "memory");
}
__device__ __forceinline__ void named_bar_arrive(int id, int count) {
  asm volatile("bar.arrive %0, %1;\n" ::"r"(id), "r"(count) : "memory");
}
__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wgmma_wait_all() { asm volatile("wgmma.wait_group.sync.aligned 0;\n" ::: "memory"); }
// Keeps the compiler from touching accumulators before the wgmma that writes them has retired.
template <int N>
__device__ __forceinline__ void fence_regs(float (&r)[N]) {
#pragma unroll
  for (int i = 0; i < N; ++i) asm volatile("" : "+f"(r[i])::"memory");
}

// Shared-memory matrix descriptor, 128-byte swizzle. K-major operands (Q, K): 8-row groups
// 1024 bytes apart (stride byte offset), leading offset unused. MN-major (V): 64-column groups
// `lbo` bytes apart, 8-row groups 1024 bytes apart.
__device__ __forceinline__ uint64_t smem_desc_sw128(uint32_t addr, uint32_t lbo) {
  return static_cast<uint64_t>((addr & 0x3FFFF) >> 4) | (static_cast<uint64_t>(lbo >> 4) << 16) |
         (static_cast<uint64_t>(1024 >> 4) << 32) | (1ull << 62);
}

// Four float32 -> e4m3 (round to nearest, saturating), a in the lowest byte.
__device__ __forceinline__ uint32_t pack_e4m3x4(float a, float b, float c, float d) {
  uint16_t lo = 0, hi = 0;
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  // cvt ...e4m3x2.f32 d, x, y puts x in the upper byte
  asm("cvt.rn.satfinite.e4m3x2.f32 %0, %1, %2;\n" : "=h"(lo) : "f"(b), "f"(a));
  asm("cvt.rn.satfinite.e4m3x2.f32 %0, %1, %2;\n" : "=h"(hi) : "f"(d), "f"(c));
#endif
  return static_cast<uint32_t>(lo) | (static_cast<uint32_t>(hi) << 16);
}

// e4m3 probabilities (kPV8) are stored as p * 2^kPShift: a power of two, so exact, and it keeps
// them out of e4m3's subnormal range (p >= 2^-12 stays normal). Numerator and denominator carry
// the same factor, so it cancels in the output; only the log-sum-exp subtracts it.
constexpr float kPShift = 6.f;
// Lazy row max (log2 units): a tile's exponentials are computed against the running max, and the
// max is only raised when some row of the warp sees a score more than kLazy above it. Then
// p = exp2(s - m) < 2^kLazy: 256 for 16-bit P, and 2^2.75 * 2^kPShift = 431 < 448 (the largest
// e4m3) for e4m3 P.
template <bool kPV8>
constexpr float kLazy = kPV8 ? 2.75f : 8.f;

// Online-softmax step over one 64 x kN score tile of a warpgroup (this thread: 2 rows, kN / 4
// scores). acc_s[4 j + 2 i + c] is row qpos0 + 8 i (absolute position), key key0 + 8 j + c; its
// log2-domain score is acc_s * sc[i]. Writes the exponentiated scores as wgmma A fragments:
// bf16/fp16 (register r of k-step kk holds keys 8 kk + 2 r (+1) of row r % 2), or e4m3 (kPV8,
// scaled by 2^kPShift: register r of k-step kk holds, for row r % 2, the pairs of column groups
// 4 kk + 2 (r / 2) and the next one; see the FP8 note at the top). Updates the running max (log2
// domain) and this thread's partial sums, and returns the rescale factor of O in alpha (exactly 1
// when the max stays). acc_s is only read: a non-wgmma write to a wgmma accumulator while another
// wgmma is in flight makes ptxas serialise every wgmma of the kernel. Masking (kMasked) is a
// select, never a branch.
// `speculate`: the exponentials are first computed against the running max, independently of
// this tile's max, so that they do not wait for its reduction and shuffles; they are kept unless
// a row of the warp rises more than kLazy above the running max (a warp-uniform branch), which
// once the max has settled is rare. Otherwise (and for the first tile: speculate false) the max
// is updated and the exponentials computed against it.
template <bool kMasked, typename T, int kN, bool kPV8 = false>
__device__ __forceinline__ void softmax_tile(const float (&acc_s)[kN / 2],
                                             uint32_t (&pout)[kN / (kPV8 ? 32 : 16)][4], float (&m_run)[2],
                                             float (&l_run)[2], float (&alpha)[2], const float (&sc)[2], int key0,
                                             int qpos0, int Lk, bool speculate) {
  auto score = [&](int e) -> float {
    if constexpr (kMasked) {
      const int key = key0 + (e / 4) * 8 + (e & 1);
      const int qpos = qpos0 + ((e / 2) % 2) * 8;
      return (key >= Lk || key > qpos) ? -INFINITY : acc_s[e];
    } else {
      return acc_s[e];
    }
  };
  // P fragments and this thread's partial row sums against the log2-domain reference mu.
  auto exponentials = [&](const float (&mu)[2], float (&sum)[2]) {
    sum[0] = sum[1] = 0.f;
    if constexpr (kPV8) {
      const float nmu[2] = {kPShift - mu[0], kPShift - mu[1]};
#pragma unroll
      for (int kk = 0; kk < kN / 32; ++kk) {
#pragma unroll
        for (int r = 0; r < 4; ++r) {
          const int i = r % 2, e0 = 4 * (4 * kk + 2 * (r / 2)) + 2 * i, e1 = e0 + 4;
          const float p0 = fast_exp2(fmaf(score(e0), sc[i], nmu[i]));
          const float p1 = fast_exp2(fmaf(score(e0 + 1), sc[i], nmu[i]));
          const float p2 = fast_exp2(fmaf(score(e1), sc[i], nmu[i]));
          const float p3 = fast_exp2(fmaf(score(e1 + 1), sc[i], nmu[i]));
          sum[i] += (p0 + p1) + (p2 + p3);
          pout[kk][r] = pack_e4m3x4(p0, p1, p2, p3);
        }
      }
    } else {
#pragma unroll
      for (int kk = 0; kk < kN / 16; ++kk) {
#pragma unroll
        for (int r = 0; r < 4; ++r) {
          const float p0 = fast_exp2(fmaf(score(8 * kk + 2 * r), sc[r % 2], -mu[r % 2]));
          const float p1 = fast_exp2(fmaf(score(8 * kk + 2 * r + 1), sc[r % 2], -mu[r % 2]));
          sum[r % 2] += p0 + p1;
          pout[kk][r] = Mma<T>::pack(p0, p1);
        }
      }
    }
  };
  float sum[2];
  if (speculate) {
    const float mu0[2] = {m_run[0] == -INFINITY ? 0.f : m_run[0], m_run[1] == -INFINITY ? 0.f : m_run[1]};
    exponentials(mu0, sum);
  }
  float mx[2] = {-INFINITY, -INFINITY};
#pragma unroll
  for (int e = 0; e < kN / 2; ++e) mx[(e / 2) % 2] = fmaxf(mx[(e / 2) % 2], score(e));
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 1));
    mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 2));
    mx[r] *= sc[r];
  }
  // m_run = -inf (nothing visible yet) rises for any finite score.
  const bool rise = mx[0] > m_run[0] + kLazy<kPV8> || mx[1] > m_run[1] + kLazy<kPV8>;
  if (!speculate || __any_sync(0xffffffffu, rise)) {
    float mu[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const float m_new = fmaxf(m_run[r], mx[r]);
      mu[r] = m_new == -INFINITY ? 0.f : m_new;  // a row with nothing visible yet stays at 0
      alpha[r] = fast_exp2(m_run[r] - mu[r]);
      m_run[r] = m_new;
      l_run[r] *= alpha[r];
    }
    exponentials(mu, sum);
  } else {
    alpha[0] = alpha[1] = 1.f;
  }
  l_run[0] += sum[0];
  l_run[1] += sum[1];
}

// ---------------------------------------------------------------------------------------------
// Kernel
// ---------------------------------------------------------------------------------------------
template <typename T, int kD, int kPrec>
__global__ void __launch_bounds__(384, 1)
    block_sparse_attn_sm90_kernel(const __grid_constant__ Params p, const __grid_constant__ CUtensorMap tm_q,
                                  const __grid_constant__ CUtensorMap tm_k, const __grid_constant__ CUtensorMap tm_v) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  using C = Cfg<kD, kPrec>;
  constexpr bool kQK8 = C::kQK8, kPV8 = C::kPV8;
  using EK = std::conditional_t<kQK8, __nv_fp8_e4m3, T>;  // element type of S = Q K^T
  using EV = std::conditional_t<kPV8, __nv_fp8_e4m3, T>;  // element type of O += P V
  constexpr int kBlockN = C::kBlockN;
  constexpr int kPSteps = C::kPSteps;
  constexpr int kStagesK = C::kStagesK;
  constexpr int kStagesV = C::kStagesV;

  extern __shared__ __align__(1024) unsigned char smem_raw[];
  const uint32_t s_q = (smem_u32(smem_raw) + 1023u) & ~1023u;
  const uint32_t s_k = s_q + C::kTileBytesQ;              // K stage s at s_k + s * kTileBytesK
  const uint32_t s_v = s_k + kStagesK * C::kTileBytesK;   // V stage s at s_v + s * kTileBytesV
  const uint32_t bar_q = s_v + kStagesV * C::kTileBytesV;
  // then full and empty barriers of the K stages, then those of the V stages
  const uint32_t bar_kfull = bar_q + 8;
  const uint32_t bar_kempty = bar_kfull + 8 * kStagesK;
  const uint32_t bar_vfull = bar_kempty + 8 * kStagesK;
  const uint32_t bar_vempty = bar_vfull + 8 * kStagesV;
  // Per K stage: the first key of its tile (-1: the walk has ended) and the tile's K scale (FP8),
  // written by the producer before it arms the stage's full barrier. The consumers never walk the
  // plan themselves: they read these after the barrier's wait (its acquire makes them visible).
  const uint32_t s_info = bar_vempty + 8 * kStagesV;
  int* s_kpos = reinterpret_cast<int*>(smem_raw + (s_info - smem_u32(smem_raw)));
  float* s_ksc = reinterpret_cast<float*>(s_kpos + kStagesK);

  const int tid = threadIdx.x;
  const int bs = p.block_size;
  const int sub = bs / C::kBlockM;
  const int n_tiles = p.nQ * sub;
  const int group = p.Hq / p.Hkv;
  // CTA order (1-d grid): the query heads of one kv head side by side, then query tiles latest
  // (heaviest) first, then kv heads, then batch: the CTAs in flight share one kv head's K/V in L2.
  int lin = static_cast<int>(blockIdx.x);
  const int g = lin % group;
  lin /= group;
  const int tile_rev = lin % n_tiles;
  lin /= n_tiles;
  const int h = (lin % p.Hkv) * group + g;
  const int b = lin / p.Hkv;
  const int tile = n_tiles - 1 - tile_rev;
  const int qi = tile / sub;
  const int hk = h / group;
  const SeqView sq = seq_view(p, b);
  const int tb = p.cu_seqlens_q != nullptr ? 0 : b;  // batch coordinate in the tensor maps
  const QueryTile qt = query_tile(p, sq, qi, tile % sub, C::kBlockM);
  if (qt.empty) return;  // a sub-tile of a plan block with no query rows (uniform per CTA)
  const int a0 = qt.a0;
  const int q_row0 = qt.q_row0;

  if (tid == 0) {
    mbar_init(bar_q, 1);
    for (int s = 0; s < kStagesK; ++s) {
      mbar_init(bar_kfull + 8 * s, 1);
      mbar_init(bar_kempty + 8 * s, 256);
    }
    for (int s = 0; s < kStagesV; ++s) {
      mbar_init(bar_vfull + 8 * s, 1);
      mbar_init(bar_vempty + 8 * s, 256);
    }
    asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
  }
  __syncthreads();

  if (tid < 128) {
    // ------------------------------- producer -------------------------------
    asm volatile("setmaxnreg.dec.sync.aligned.u32 24;\n" ::: "memory");
    if (tid == 0) {
      mbar_arrive_expect_tx(bar_q, C::kTileBytesQ);
#pragma unroll
      for (int c = 0; c < C::kChunks; ++c) tma_load_4d(s_q + c * C::kBoxBytesQ, &tm_q, bar_q, c * C::kBoxCols,
                                                       static_cast<int>(sq.q_start) + q_row0, h, tb);
      KeyTileWalk<kBlockN> walk(p, b, h, qi, qt.key_limit);
      int it = 0;
      for (int kcur = walk.current(); kcur >= 0; walk.next(), kcur = walk.current(), ++it) {
        const int key_row = static_cast<int>(sq.k_start) + kcur;
        const int sk = it % kStagesK;
        mbar_wait(bar_kempty + 8 * sk, ((it / kStagesK) & 1) ^ 1);
        s_kpos[sk] = kcur;
        if constexpr (kQK8) {
          s_ksc[sk] = p.k_scale[static_cast<int64_t>(b * p.Hkv + hk) * p.k_scale_tiles + kcur / kBlockN];
        }
        mbar_arrive_expect_tx(bar_kfull + 8 * sk, C::kTileBytesK);
#pragma unroll
        for (int c = 0; c < C::kChunks; ++c) {
          tma_load_4d(s_k + sk * C::kTileBytesK + c * C::kBoxBytesKV, &tm_k, bar_kfull + 8 * sk, c * C::kBoxCols,
                      key_row, hk, tb);
        }
        const int sv = it % kStagesV;
        mbar_wait(bar_vempty + 8 * sv, ((it / kStagesV) & 1) ^ 1);
        mbar_arrive_expect_tx(bar_vfull + 8 * sv, C::kTileBytesV);
        if constexpr (kPV8) {  // V^T: kD rows (channels) x kBlockN keys from column key_row
          tma_load_4d(s_v + sv * C::kTileBytesV, &tm_v, bar_vfull + 8 * sv, key_row, 0, hk, tb);
        } else {
#pragma unroll
          for (int c = 0; c < C::kChunks; ++c) {
            tma_load_4d(s_v + sv * C::kTileBytesV + c * C::kBoxBytesKV, &tm_v, bar_vfull + 8 * sv, c * 64,
                        key_row, hk, tb);
          }
        }
      }
      // The end of the walk, in the next K stage: no data, a plain arrival completes its phase.
      const int sk = it % kStagesK;
      mbar_wait(bar_kempty + 8 * sk, ((it / kStagesK) & 1) ^ 1);
      s_kpos[sk] = -1;
      mbar_arrive(bar_kfull + 8 * sk);
    }
  } else {
    // ------------------------------- consumers ------------------------------
    asm volatile("setmaxnreg.inc.sync.aligned.u32 240;\n" ::: "memory");
    const int cw = tid / 128 - 1;  // rows [64 cw, 64 cw + 64) of the tile
    const int t = tid % 128;
    const int lane = t % 32;
    const int row_in_tile = cw * 64 + (t / 32) * 16 + lane / 4;  // rows row_in_tile and row_in_tile + 8
    const int first_row_pos = a0 + cw * 64;

    float acc_o[kD / 2];
#pragma unroll
    for (int i = 0; i < kD / 2; ++i) acc_o[i] = 0.f;
    float acc_s[kBlockN / 2];
#pragma unroll
    for (int i = 0; i < kBlockN / 2; ++i) acc_s[i] = 0.f;
    uint32_t pf[kPSteps][4];                  // P as wgmma A fragments, one set per k-step of O += P V
    float m_run[2] = {-INFINITY, -INFINITY};  // running row max (log2 domain)
    float l_run[2] = {0.f, 0.f};              // this thread's partial row sums
    const uint32_t q_base = s_q + cw * 64 * 128;  // this warpgroup's 64 rows, in every box
    // log2-domain factor of this thread's two rows' scores; e4m3 Q and K (kQK8) multiply in the
    // row's Q scale here and the K tile's scale per tile (tile_scale; the producer reads it).
    float row_sc[2] = {p.scale_log2, p.scale_log2};
    if constexpr (kQK8) {
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        const int row = q_row0 + row_in_tile + 8 * r;
        row_sc[r] *= (row >= 0 && row < sq.Lq) ? p.q_scale[(static_cast<int64_t>(b) * p.Hq + h) * p.Lq + row] : 1.f;
      }
    }

    // After a wait: the wgmma that read pf (registers) and wrote acc_o has retired; until here the
    // compiler must neither reuse pf's registers nor touch acc_o.
    auto fence_pv = [&](uint32_t (&pa)[kPSteps][4]) {
      fence_regs(acc_o);
#pragma unroll
      for (int kk = 0; kk < kPSteps; ++kk) {
#pragma unroll
        for (int r = 0; r < 4; ++r) asm volatile("" : "+r"(pa[kk][r])::"memory");
      }
    };

    // S = Q K^T for the tile in K stage s (64 x kBlockN per warpgroup), issued, not waited for.
    auto issue_s = [&](int s) {
      // Descriptors of k-step kk: the base descriptor plus the step's byte offset / 16 (address
      // field, bits 0-13; no carry out of it: shared addresses are below 2^18).
      const uint64_t dq0 = smem_desc_sw128(q_base, 16);
      const uint64_t dk0 = smem_desc_sw128(s_k + s * C::kTileBytesK, 16);
      wgmma_fence();
#pragma unroll
      for (int kk = 0; kk < C::kSSteps; ++kk) {
        Wgmma<EK, kBlockN>::ss(acc_s, dq0 + (((kk / 4) * C::kBoxBytesQ + (kk % 4) * 32) >> 4),
                              dk0 + (((kk / 4) * C::kBoxBytesKV + (kk % 4) * 32) >> 4), kk > 0);
      }
      wgmma_commit();
    };
    // O += P V for the tile in V stage s, issued, not waited for.
    // No register fences in here: in the overlapped loop it follows issue_s, and any instruction
    // that (re)defines pf or acc_o after a wgmma has started makes ptxas serialise the wgmmas.
    auto v_descs = [&](int s, uint64_t (&dv)[kPSteps]) {
#pragma unroll
      for (int kk = 0; kk < kPSteps; ++kk) {
        if constexpr (kPV8) {  // K-major (keys contiguous): k-step kk is 32 bytes into each row
          dv[kk] = smem_desc_sw128(s_v + s * C::kTileBytesV + kk * 32, 16);
        } else {  // MN-major: 16 keys (rows) per k-step
          dv[kk] = smem_desc_sw128(s_v + s * C::kTileBytesV + kk * 16 * 128, C::kBoxBytesKV);
        }
      }
    };
    auto issue_pv = [&](const uint32_t (&pa)[kPSteps][4], const uint64_t (&dv)[kPSteps]) {
      wgmma_fence();
#pragma unroll
      for (int kk = 0; kk < kPSteps; ++kk) Wgmma<EV, kD>::rs(acc_o, pa[kk], dv[kk], 1);
      wgmma_commit();
    };
    // Masked (where the tile holds keys past Lk or after one of this warpgroup's queries: diagonal
    // tiles), exponentiated scores of acc_s packed into P fragments `pout`; see softmax_tile.
    auto softmax = [&](int kcur, uint32_t (&pout)[kPSteps][4], float (&alpha)[2], float tile_scale,
                       bool speculate) {
      const int qpos0 = a0 + row_in_tile;
      const float sc[2] = {row_sc[0] * tile_scale, row_sc[1] * tile_scale};
      if ((kcur + kBlockN - 1 > first_row_pos) || (kcur + kBlockN > sq.Lk)) {
        softmax_tile<true, T, kBlockN, kPV8>(acc_s, pout, m_run, l_run, alpha, sc, kcur + 2 * (lane % 4), qpos0,
                                             sq.Lk, speculate);
      } else {
        softmax_tile<false, T, kBlockN, kPV8>(acc_s, pout, m_run, l_run, alpha, sc, kcur + 2 * (lane % 4), qpos0,
                                              sq.Lk, speculate);
      }
    };
    // The scale of the K tile in stage sk (FP8; 1 otherwise), published by the producer.
    auto tile_scale = [&](int sk) -> float {
      if constexpr (kQK8) {
        return s_ksc[sk];
      } else {
        return 1.f;
      }
    };
    auto rescale_o = [&](const float (&alpha)[2]) {
#pragma unroll
      for (int e = 0; e < kD / 2; ++e) acc_o[e] *= alpha[(e / 2) % 2];
    };
    // Ping-pong turns (C::kPingPong): warpgroup cw waits on barrier 1 + cw before issuing and then
    // arrives on the other's. Both see the same tiles, so the turns pair up.
    auto take_turn = [&] {
      if constexpr (C::kPingPong) named_bar_sync(1 + cw, 256);
    };
    auto pass_turn = [&] {
      if constexpr (C::kPingPong) named_bar_arrive(2 - cw, 256);
    };
    mbar_wait(bar_q, 0);
    int it = 0;
    float alpha[2];
    // Softmax of tile j overlaps O += P V of tile j - 1 on the tensor cores: S_j and PV_{j-1}
    // are issued back to back, S_j is waited for alone (wait_group 1; its K stage is released),
    // then PV_{j-1} (its V stage is released).
    // Two P buffers used alternately (the loop body is written out twice), so that the P of
    // tile j is produced while the wgmma of tile j - 1 still reads its own P registers.
    uint32_t pf2[kPSteps][4];
    int prev = 0;  // V stage of tile j - 1
    // One steady-state step: S_j and PV_{j-1} in flight together, softmax of S_j under PV_{j-1}.
    auto step = [&](int kcur, uint32_t (&p_in)[kPSteps][4], uint32_t (&p_out)[kPSteps][4]) {
      const int sk = it % kStagesK;
      const float tsc = tile_scale(sk);
      uint64_t dv[kPSteps];
      v_descs(prev, dv);
      take_turn();
      issue_s(sk);
      issue_pv(p_in, dv);
      pass_turn();
      asm volatile("wgmma.wait_group.sync.aligned 1;\n" ::: "memory");
      fence_regs(acc_s);
      mbar_arrive(bar_kempty + 8 * sk);  // this thread's reads of that K stage have retired
      softmax(kcur, p_out, alpha, tsc, C::kSpeculate);
      wgmma_wait_all();
      fence_pv(p_in);
      mbar_arrive(bar_vempty + 8 * prev);  // likewise for the V stage of tile j - 1
      // Once the running max settles, most tiles leave it unchanged (alpha exactly 1): skip the
      // multiplies then (a warp-uniform branch; no wgmma is in flight here).
      if (__any_sync(0xffffffffu, alpha[0] != 1.f || alpha[1] != 1.f)) rescale_o(alpha);
      const int sv = it % kStagesV;
      mbar_wait(bar_vfull + 8 * sv, (it / kStagesV) & 1);  // V of tile j, for the next step
      prev = sv;
      ++it;
    };
    // Waits for the next K stage; returns the first key of its tile, or -1 past the last.
    auto next_key = [&]() -> int {
      const int sk = it % kStagesK;
      mbar_wait(bar_kfull + 8 * sk, (it / kStagesK) & 1);
      return *reinterpret_cast<volatile int*>(s_kpos + sk);
    };
    auto last_pv = [&](uint32_t (&p_in)[kPSteps][4]) {
      uint64_t dv[kPSteps];
      v_descs(prev, dv);
      issue_pv(p_in, dv);
      wgmma_wait_all();
      fence_pv(p_in);
      mbar_arrive(bar_vempty + 8 * prev);
    };
    // Prologue: S and P of the first tile.
    if (C::kPingPong && cw == 1) named_bar_arrive(1, 256);  // warpgroup 0 takes the first turn
    int kcur = next_key();
    if (kcur >= 0) {
      const float tsc = tile_scale(0);
      take_turn();
      issue_s(0);
      pass_turn();
      wgmma_wait_all();
      fence_regs(acc_s);
      mbar_arrive(bar_kempty);
      softmax(kcur, pf, alpha, tsc, false);  // alpha multiplies an all-zero O: not needed
      mbar_wait(bar_vfull, 0);
      ++it;
      while (true) {
        kcur = next_key();
        if (kcur < 0) {
          last_pv(pf);
          break;
        }
        step(kcur, pf, pf2);
        kcur = next_key();
        if (kcur < 0) {
          last_pv(pf2);
          break;
        }
        step(kcur, pf2, pf);
      }
    }
    // Both warpgroups took the same number of turns; warpgroup 0 consumes the one arrival left
    // (its first turn's), so every named barrier ends balanced.
    if (C::kPingPong && cw == 0) named_bar_sync(1, 256);

    // ---- epilogue: normalise and store (rows outside [0, Lq) are never stored) ----
    float inv[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      l_run[r] += __shfl_xor_sync(0xffffffffu, l_run[r], 1);
      l_run[r] += __shfl_xor_sync(0xffffffffu, l_run[r], 2);
      inv[r] = l_run[r] > 0.f ? 1.f / l_run[r] : 0.f;
    }
    T* og = static_cast<T*>(p.o) + b * p.o_stride_b + h * p.o_stride_h + sq.q_start * p.o_stride_l;
    // FP8: per-channel V scales of this thread's channels 8 j + 2 (lane % 4) (+1)
    const float* vsc = kPV8 ? p.v_scale + static_cast<int64_t>(b * p.Hkv + hk) * kD + 2 * (lane % 4) : nullptr;
    constexpr float kLseShift = kPV8 ? kPShift : 0.f;  // e4m3 P: the sums are of p * 2^kPShift
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const int row = q_row0 + row_in_tile + 8 * r;
      if (row >= 0 && row < sq.Lq) {
        T* orow = og + static_cast<int64_t>(row) * p.o_stride_l + 2 * (lane % 4);
#pragma unroll
        for (int j = 0; j < kD / 8; ++j) {
          float s0 = inv[r], s1 = inv[r];
          if constexpr (kPV8) {
            const float2 vs = *reinterpret_cast<const float2*>(vsc + 8 * j);
            s0 *= vs.x;
            s1 *= vs.y;
          }
          *reinterpret_cast<uint32_t*>(orow + 8 * j) = Mma<T>::pack(acc_o[4 * j + 2 * r] * s0, acc_o[4 * j + 2 * r + 1] * s1);
        }
        if (p.lse != nullptr && lane % 4 == 0) {
          p.lse[b * p.lse_stride_b + h * p.lse_stride_h + sq.q_start + row] =
              l_run[r] > 0.f ? (m_run[r] + __log2f(l_run[r]) - kLseShift) * 0.69314718055994531f : -INFINITY;
        }
      }
    }
  }
#endif  // __CUDA_ARCH_FEAT_SM90_ALL
}

// ---------------------------------------------------------------------------------------------
// Host side
// ---------------------------------------------------------------------------------------------
// cuTensorMapEncodeTiled, fetched from the driver at run time (no link against libcuda).
using EncodeTiledFn = CUresult (*)(CUtensorMap*, CUtensorMapDataType, cuuint32_t, void*, const cuuint64_t*,
                                   const cuuint64_t*, const cuuint32_t*, const cuuint32_t*, CUtensorMapInterleave,
                                   CUtensorMapSwizzle, CUtensorMapL2promotion, CUtensorMapFloatOOBfill);

inline EncodeTiledFn encode_tiled() {
  static const EncodeTiledFn fn = [] {
    void* ptr = nullptr;
    cudaDriverEntryPointQueryResult status{};
    if (cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &ptr, 12000, cudaEnableDefault, &status) !=
            cudaSuccess ||
        status != cudaDriverEntryPointSuccess) {
      ptr = nullptr;
    }
    return reinterpret_cast<EncodeTiledFn>(ptr);
  }();
  return fn;
}

// 4-d tensor map over a (B, H, L, D) tensor with element strides (sb, sh, sl, 1): boxes of
// `rows` rows x 128 bytes (64 16-bit or 128 one-byte elements), 128-byte swizzle, zero fill outside
// the tensor. dtype: CU_TENSOR_MAP_DATA_TYPE_{BFLOAT16, FLOAT16, UINT8} (UINT8 for e4m3).
inline bool make_tile_map(CUtensorMap* map, const void* base, CUtensorMapDataType dtype, int B, int H, int L, int D,
                          int64_t sb, int64_t sh, int64_t sl, int rows) {
  const EncodeTiledFn enc = encode_tiled();
  if (enc == nullptr) return false;
  const int elem = dtype == CU_TENSOR_MAP_DATA_TYPE_UINT8 ? 1 : 2;
  auto stride_bytes = [elem](int64_t s, int n, uint64_t fallback) -> cuuint64_t {
    // A dimension of size 1 is never stepped over; give it any legal (16-byte multiple) stride.
    return n == 1 ? fallback : static_cast<cuuint64_t>(s) * elem;
  };
  const cuuint64_t l_bytes = stride_bytes(sl, L, static_cast<uint64_t>(D) * elem);
  const cuuint64_t h_bytes = stride_bytes(sh, H, l_bytes * static_cast<uint64_t>(L));
  const cuuint64_t b_bytes = stride_bytes(sb, B, h_bytes * static_cast<uint64_t>(H));
  const cuuint64_t dims[4] = {static_cast<cuuint64_t>(D), static_cast<cuuint64_t>(L), static_cast<cuuint64_t>(H),
                              static_cast<cuuint64_t>(B)};
  const cuuint64_t strides[3] = {l_bytes, h_bytes, b_bytes};
  const cuuint32_t box[4] = {static_cast<cuuint32_t>(128 / elem), static_cast<cuuint32_t>(rows), 1, 1};
  const cuuint32_t elem_strides[4] = {1, 1, 1, 1};
  const CUresult r = enc(map, dtype, 4, const_cast<void*>(base), dims, strides, box, elem_strides,
                         CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B, CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
                         CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  return r == CUDA_SUCCESS;
}

// True when this build holds an sm_90a binary of the kernel for the current device.
template <typename T, int kD, int kPrec>
bool available() {
  static const bool ok = [] {
    cudaFuncAttributes attr{};
    const cudaError_t e = cudaFuncGetAttributes(&attr, block_sparse_attn_sm90_kernel<T, kD, kPrec>);
    if (e != cudaSuccess) {
      (void)cudaGetLastError();  // clear the (non-sticky) "no kernel image" error
      return false;
    }
    return attr.binaryVersion == 90;
  }();
  return ok;
}

// Launches the sm90 kernel; cudaErrorNotSupported when this build or device cannot run it (the
// dispatch then uses the sm80 kernel, unless the sm90 kernel was asked for by name).
// kFp8: q, k, v are the e4m3 copies described at the top (v transposed, p.Lk_pad keys per row),
// with p.q_scale, p.k_scale, p.v_scale; kFp8PV: q, k in T, v and p.v_scale as for kFp8. The output
// is T.
template <typename T, int kD, int kPrec = kNative>
cudaError_t run(const Params& p, cudaStream_t stream) {
  using C = Cfg<kD, kPrec>;
  const int64_t ctas = static_cast<int64_t>(p.nQ) * (p.block_size / C::kBlockM) * p.Hq * p.B;
  if (p.block_size % C::kBlockM != 0 || ctas > 0x7fffffff || !available<T, kD, kPrec>()) {
    return cudaErrorNotSupported;
  }
  CUtensorMap tm_q, tm_k, tm_v;
  const int tensor_b = p.cu_seqlens_q != nullptr ? 1 : p.B;  // a packed batch is one (1, H, total, D) tensor
  const CUtensorMapDataType dt16 = p.is_bf16 ? CU_TENSOR_MAP_DATA_TYPE_BFLOAT16 : CU_TENSOR_MAP_DATA_TYPE_FLOAT16;
  const CUtensorMapDataType dt = C::kQK8 ? CU_TENSOR_MAP_DATA_TYPE_UINT8 : dt16;  // Q and K
  const int lk_rows = C::kQK8 ? p.Lk_pad : p.Lk;
  bool ok = make_tile_map(&tm_q, p.q, dt, tensor_b, p.Hq, p.Lq, kD, p.q_stride_b, p.q_stride_h, p.q_stride_l,
                          C::kBlockM) &&
            make_tile_map(&tm_k, p.k, dt, tensor_b, p.Hkv, lk_rows, kD, p.k_stride_b, p.k_stride_h, p.k_stride_l,
                          C::kBlockN);
  if constexpr (C::kPV8) {  // V^T (B, Hkv, D, Lk_pad): "rows" are channels, kBlockN keys a box row
    ok = ok && make_tile_map(&tm_v, p.v, CU_TENSOR_MAP_DATA_TYPE_UINT8, tensor_b, p.Hkv, kD, p.Lk_pad, p.v_stride_b,
                             p.v_stride_h, p.v_stride_l, kD);
  } else {
    ok = ok && make_tile_map(&tm_v, p.v, dt16, tensor_b, p.Hkv, p.Lk, kD, p.v_stride_b, p.v_stride_h, p.v_stride_l,
                             C::kBlockN);
  }
  if (!ok) return cudaErrorNotSupported;
  auto kernel = block_sparse_attn_sm90_kernel<T, kD, kPrec>;
  // Per call: the attribute belongs to the current device's context (a host-side call, no sync).
  const cudaError_t e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, C::kSmemBytes);
  if (e != cudaSuccess) return e;
  kernel<<<static_cast<unsigned>(ctas), C::kThreads, C::kSmemBytes, stream>>>(p, tm_q, tm_k, tm_v);
  return cudaGetLastError();
}

}  // namespace sm90
}  // namespace stem_attn
