// PyTorch op of the stem block-sparse attention kernel (declared for the registration unit).
#pragma once

#include <torch/all.h>

#include <string>
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
//   sm: which kernel, 0 = auto (the sm90 kernel where it applies, else the sm80 kernel), 80 = the
//   sm80 kernel, 90 = the sm90 kernel (an error where it cannot run). See csrc/supported.h.
// Returns (out (B, Hq, Lq, D) like q, lse float32 (B, Hq, Lq), or an empty tensor without lse).
std::tuple<at::Tensor, at::Tensor> block_sparse_attn_fwd(const at::Tensor& q, const at::Tensor& k,
                                                         const at::Tensor& v, const at::Tensor& kv_counts,
                                                         const at::Tensor& kv_indices, int64_t block_size,
                                                         int64_t q_offset, double scale, bool return_lse, int64_t sm);

// The same over a packed variable-length batch (FlashAttention's varlen layout): q (total_q, Hq, D),
// k/v (total_k, Hkv, D), int32 (B + 1,) cumulative lengths (sequence b's queries are the last of its
// keys), kv_counts (B, Hq, nQ) / kv_indices (B, Hq, nQ, W) one padded row block per sequence.
// Returns (out (total_q, Hq, D), lse float32 (Hq, total_q) or an empty tensor). One launch.
std::tuple<at::Tensor, at::Tensor> block_sparse_attn_varlen_fwd(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& cu_seqlens_q,
    const at::Tensor& cu_seqlens_k, const at::Tensor& kv_counts, const at::Tensor& kv_indices, int64_t block_size,
    double scale, bool return_lse, int64_t sm);

// Forward block-sparse attention on FP8 (e4m3) tensor cores, sm90, head dim 128, plan blocks of 128
// or 256: q8 (B, Hq, Lq, 128), k8 (B, Hkv, Lp, 128), vt8 (B, Hkv, 128, Lp) (V transposed, keys
// permuted within 32-key groups: csrc/block_sparse_attn_sm90.cuh), all float8_e4m3fn with Lp a
// multiple of 128 (zero padding past lk, the true key count); q_scale (B, Hq, Lq), k_scale
// (B, Hkv, Lp / 128), v_scale (B, Hkv, 128) float32: q ~ q8 * q_scale, k ~ k8 * k_scale (per
// 128-key tile), v ~ v8 * v_scale (per channel). out_dtype: 0 float16, 1 bfloat16. Returns (out
// (B, Hq, Lq, 128), lse float32 (B, Hq, Lq) of these scores, or an empty tensor).
std::tuple<at::Tensor, at::Tensor> block_sparse_attn_fp8_fwd(
    const at::Tensor& q8, const at::Tensor& k8, const at::Tensor& vt8, const at::Tensor& q_scale,
    const at::Tensor& k_scale, const at::Tensor& v_scale, const at::Tensor& kv_counts, const at::Tensor& kv_indices,
    int64_t block_size, int64_t q_offset, int64_t lk, double scale, bool return_lse, int64_t out_dtype);

// The kernel block_sparse_attn_fwd runs for (dtype code: 0 float16, 1 bfloat16; head dim; plan
// block size) on a device of compute capability cc_major.cc_minor when asked for `sm`: 90, 80, or
// 0 when the call is not supported; kernel_path_reason says why not ("" when supported).
int64_t kernel_path(int64_t dtype, int64_t head_dim, int64_t block_size, int64_t cc_major, int64_t cc_minor, int64_t sm);
std::string kernel_path_reason(int64_t dtype, int64_t head_dim, int64_t block_size, int64_t cc_major, int64_t cc_minor,
                               int64_t sm);

// Which kernel ran the last block_sparse_attn_fwd of this process: 90 (sm90 wgmma + TMA), 80
// (sm80 mma.sync), 0 (none yet).
int64_t last_kernel_path();
