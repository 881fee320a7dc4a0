// Block-sparse flash attention forward over a stem BlockPlan: parameters and launcher.
// Torch-free on purpose: the CUDA sources compile with plain nvcc (see hub_kernels/README.md).
#pragma once

#include <cstdint>
#include <cuda_runtime.h>

namespace stem_attn {

struct Params {
  // Tensors. q (B, Hq, Lq, D); k, v (B, Hkv, Lk, D); o like q. Unit stride on D, other strides in
  // elements (multiples of 8, base pointers 16-byte aligned: checked by the binding).
  const void* q;
  const void* k;
  const void* v;
  void* o;
  float* lse;              // float32 at lse[b * lse_stride_b + h * lse_stride_h + row], or nullptr
  const int* kv_counts;    // (B, Hq, nQ) contiguous int32
  const int* kv_indices;   // (B, Hq, nQ, W) contiguous int32, ascending in the first count entries
  int64_t q_stride_b, q_stride_h, q_stride_l;
  int64_t k_stride_b, k_stride_h, k_stride_l;
  int64_t v_stride_b, v_stride_h, v_stride_l;
  int64_t o_stride_b, o_stride_h, o_stride_l;
  int64_t lse_stride_b, lse_stride_h;
  // A packed variable-length batch when not nullptr: int32 (B + 1,) cumulative lengths. q/k/v/o are
  // then (total, H, D) tensors seen as (B, H, total, D) with stride 0 over b; sequence b owns rows
  // [cu_seqlens[b], cu_seqlens[b + 1]), its queries are the last of its keys, and Lq, Lk, q_offset
  // below are replaced per sequence (Lq/Lk keep the totals, for the tensor maps).
  const int* cu_seqlens_q;
  const int* cu_seqlens_k;
  int B, Hq, Hkv, Lq, Lk, D;
  int nQ, W;
  int block_size;   // plan block size: 64, 128 or 256
  int q_offset;     // absolute position of query row 0
  float scale_log2; // softmax scale * log2(e)
  bool is_bf16;     // else float16 (FP8: the output's type)
  // FP8 only (block_sparse_attn_fp8_fwd_launch), else unused: q, k are e4m3 (B, Hq, Lq, D) and
  // (B, Hkv, Lk_pad, D), v is e4m3 V transposed, (B, Hkv, D, Lk_pad), its keys permuted within
  // every 32-key group (block_sparse_attn_sm90.cuh); Lk stays the true key count (masking).
  const float* q_scale;  // (B, Hq, Lq): one per query row
  const float* k_scale;  // (B, Hkv, k_scale_tiles): one per 128-key tile
  const float* v_scale;  // (B, Hkv, D): one per channel
  int k_scale_tiles;
  int Lk_pad;
};

// Which kernel ran the last launch of this process: 90 (wgmma + TMA), 80 (mma.sync) or 0 (none).
int last_kernel_path();

// Launches the kernel that kernel_path (supported.h) names for these parameters on a device of
// compute capability cc_major.cc_minor, on `stream`. `sm`: 0 (auto), 80 or 90 (see kernel_path).
// Returns cudaErrorInvalidValue for a call kernel_path rules out; cudaErrorNotSupported when the
// sm90 kernel was asked for (sm = 90) but cannot run (this build holds no sm_90a code for the
// device, or the grid is too large); else the launch status. With sm = 0 the sm80 kernel runs
// where the sm90 kernel cannot.
cudaError_t block_sparse_attn_fwd_launch(const Params& p, int cc_major, int cc_minor, int sm, cudaStream_t stream);

// The FP8 (e4m3) sm90 kernel, head dim 128, plan blocks of 128 or 256 (Params' FP8 fields set):
// both products in e4m3, or with pv_only only O += P V (q, k in the output's 16-bit type, their
// scales unused). cudaErrorInvalidValue for other shapes, cudaErrorNotSupported where this build
// or device cannot run it (no sm_90a code for the device); else the launch status.
cudaError_t block_sparse_attn_fp8_fwd_launch(const Params& p, bool pv_only, cudaStream_t stream);

}  // namespace stem_attn
