// PyTorch op of the stem block-sparse attention kernel (declared for the registration unit).
#pragma once

#include <torch/all.h>

#include <tuple>

// Registration macros. kernel-builder ships its own "registration.h" with the same names; this
// fallback keeps the binding buildable with plain torch.utils.cpp_extension (hub_kernels/build.py).
#if __has_include("registration.h")
#include "registration.h"
#endif
#ifndef TORCH_LIBRARY_EXPAND
#define TORCH_LIBRARY_EXPAND(NAME, MODULE) TORCH_LIBRARY(NAME, MODULE)
#endif

// Forward block-sparse flash attention over a stem BlockPlan.
//   q (B, Hq, Lq, D), k/v (B, Hkv, Lk, D): float16 or bfloat16, CUDA, unit stride on D.
//   kv_counts int32 (B, Hq, nQ), kv_indices int32 (B, Hq, nQ, W): contiguous, ascending indices.
//   block_size: plan block size (64, 128 or 256); q_offset: absolute position of query row 0.
// Returns (out (B, Hq, Lq, D) like q, lse float32 (B, Hq, Lq), or an empty tensor without lse).
std::tuple<at::Tensor, at::Tensor> block_sparse_attn_fwd(const at::Tensor& q, const at::Tensor& k,
                                                         const at::Tensor& v, const at::Tensor& kv_counts,
                                                         const at::Tensor& kv_indices, int64_t block_size,
                                                         int64_t q_offset, double scale, bool return_lse);

// Which kernel ran the last block_sparse_attn_fwd of this process: 90 (sm90 wgmma + TMA), 80
// (sm80 mma.sync), 0 (none yet).
int64_t last_kernel_path();
