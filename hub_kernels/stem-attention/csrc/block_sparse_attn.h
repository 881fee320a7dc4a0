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
  float* lse;              // (B, Hq, Lq) contiguous float32, or nullptr
  const int* kv_counts;    // (B, Hq, nQ) contiguous int32
  const int* kv_indices;   // (B, Hq, nQ, W) contiguous int32, ascending in the first count entries
  int64_t q_stride_b, q_stride_h, q_stride_l;
  int64_t k_stride_b, k_stride_h, k_stride_l;
  int64_t v_stride_b, v_stride_h, v_stride_l;
  int64_t o_stride_b, o_stride_h, o_stride_l;
  int B, Hq, Hkv, Lq, Lk, D;
  int nQ, W;
  int block_size;   // plan block size: 64, 128 or 256
  int q_offset;     // absolute position of query row 0
  float scale_log2; // softmax scale * log2(e)
  bool is_bf16;     // else float16
  int tuning;       // 0: default tiles; 1: experimental register budget (see run_block_sparse_attn)
  int sm;           // compute capability of the device, major * 10 + minor
  bool allow_sm90;  // use the Hopper (wgmma + TMA) kernel where it applies (else always sm80)
  int sm90_order;   // sm90 CTA order: 0 kv-head-major (default), 1 query-heads fastest (experiment)
  int sm90_stages;  // sm90 K/V pipeline depth: 0 default, else 2 or 3 (experiment)
  int sm90_overlap; // sm90 softmax / P V overlap inside a warpgroup: 1 on (default), 0 off (experiment)
  int sm90_pingpong; // sm90 warpgroups take turns at the tensor cores: 0 off (default), 1 on (experiment)
  int sm90_l2_hint;  // sm90 K/V loads with an L2 evict-last hint: 0 off (default), 1 on (experiment)
};

// Which kernel ran the last launch of this process: 90 (wgmma + TMA), 80 (mma.sync) or 0 (none).
int last_kernel_path();

// Launches the kernel on `stream`: the sm90 kernel on compute capability 9.0 for head dims 64 and
// 128 with plan blocks of 128 or 256 tokens (when the build holds sm_90a code), else the sm80
// kernel. Returns cudaErrorInvalidValue for unsupported shapes (head dim not 64/128/256, block
// size not 64/128/256), else the launch status.
cudaError_t block_sparse_attn_fwd_launch(const Params& p, cudaStream_t stream);

}  // namespace stem_attn
