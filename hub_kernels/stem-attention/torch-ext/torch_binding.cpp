// Torch op registration and input checks for the stem block-sparse attention kernel.
#include "torch_binding.h"

#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <string>
#include <utility>
#include <vector>

#include "block_sparse_attn.h"
#include "supported.h"

namespace {

constexpr const char* kPrefix = "stem_attention.block_sparse_attn_fwd: ";

void check_layout(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.dim() == 4, kPrefix, name, " must be 4-d (B, H, L, D), got ", t.sizes());
  TORCH_CHECK(t.stride(3) == 1, kPrefix, name, " needs unit stride on the head dim; pass ", name,
              ".contiguous()");
  for (int d = 0; d < 3; ++d) {
    TORCH_CHECK(t.stride(d) % 8 == 0 || t.size(d) == 1, kPrefix, name,
                " strides must be multiples of 8 elements (16-byte rows); got ", t.strides(), "; pass ", name,
                ".contiguous()");
  }
  TORCH_CHECK(reinterpret_cast<std::uintptr_t>(t.data_ptr()) % 16 == 0, kPrefix, name,
              " must be 16-byte aligned; pass ", name, ".contiguous()");
}

// An int64 op argument as an int: values outside int32 become INT32_MIN (never a supported value).
int clamp_int(int64_t x) {
  return x < std::numeric_limits<int32_t>::min() || x > std::numeric_limits<int32_t>::max()
             ? std::numeric_limits<int32_t>::min()
             : static_cast<int>(x);
}

// The device's compute capability (major, minor), after checking that supported.h runs q's dtype,
// this head dim and block size there for `sm` (the op kernel_path says the same). The caller holds
// a CUDAGuard for q's device.
std::pair<int, int> check_supported(const at::Tensor& q, int64_t head_dim, int64_t block_size, int64_t sm,
                                    const char* prefix) {
  int major = 0, minor = 0;
  TORCH_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, q.get_device()) == cudaSuccess &&
                  cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, q.get_device()) == cudaSuccess,
              prefix, "cannot read the device's compute capability");
  const auto dtype = q.scalar_type();
  const int dtype_code = dtype == at::kHalf ? stem_attn::kFloat16 : dtype == at::kBFloat16 ? stem_attn::kBFloat16 : -1;
  const int d = clamp_int(head_dim), bs = clamp_int(block_size), req = clamp_int(sm);
  TORCH_CHECK(stem_attn::kernel_path(dtype_code, d, bs, major, minor, req).path != stem_attn::kUnsupported, prefix,
              stem_attn::kernel_path_reason(dtype_code, d, bs, major, minor, req), " (q is ", dtype, ")");
  return {major, minor};
}

// Launch on q's current stream; a launch error (or the sm90 kernel asked for where it cannot run)
// raises with `prefix`.
void launch(const stem_attn::Params& p, std::pair<int, int> cc, int64_t sm, const at::Tensor& q, const char* prefix) {
  const int req = clamp_int(sm);
  const cudaError_t err = stem_attn::block_sparse_attn_fwd_launch(
      p, cc.first, cc.second, req, c10::cuda::getCurrentCUDAStream(q.get_device()).stream());
  TORCH_CHECK(!(err == cudaErrorNotSupported && req == stem_attn::kSm90), prefix,
              "the sm90 kernel was asked for (sm=90) but cannot run: this build holds no sm_90a code for the device, "
              "or the grid is too large");
  TORCH_CHECK(err == cudaSuccess, prefix, "kernel launch failed: ", cudaGetErrorString(err));
}

// Params of a (B, H, L, D) call: pointers, strides, sizes and the plan; the caller sets is_bf16
// and, for FP8, the scales; the packed (varlen) op then sets its sequences.
stem_attn::Params batch_params(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
                               const at::Tensor& lse, bool return_lse, const at::Tensor& kv_counts,
                               const at::Tensor& kv_indices, int64_t Lk, int64_t nQ, int64_t block_size,
                               int64_t q_offset, double scale) {
  const int64_t B = q.size(0), Hq = q.size(1), Lq = q.size(2);
  stem_attn::Params p{};
  p.q = q.data_ptr();
  p.k = k.data_ptr();
  p.v = v.data_ptr();
  p.o = out.data_ptr();
  p.lse = return_lse ? lse.data_ptr<float>() : nullptr;
  p.kv_counts = kv_counts.data_ptr<int32_t>();
  p.kv_indices = kv_indices.data_ptr<int32_t>();
  p.q_stride_b = q.stride(0), p.q_stride_h = q.stride(1), p.q_stride_l = q.stride(2);
  p.k_stride_b = k.stride(0), p.k_stride_h = k.stride(1), p.k_stride_l = k.stride(2);
  p.v_stride_b = v.stride(0), p.v_stride_h = v.stride(1), p.v_stride_l = v.stride(2);
  p.o_stride_b = out.stride(0), p.o_stride_h = out.stride(1), p.o_stride_l = out.stride(2);
  p.lse_stride_b = Hq * Lq, p.lse_stride_h = Lq;
  p.cu_seqlens_q = nullptr, p.cu_seqlens_k = nullptr;
  p.B = static_cast<int>(B), p.Hq = static_cast<int>(Hq), p.Hkv = static_cast<int>(k.size(1));
  p.Lq = static_cast<int>(Lq), p.Lk = static_cast<int>(Lk), p.D = static_cast<int>(q.size(3));
  p.nQ = static_cast<int>(nQ), p.W = static_cast<int>(kv_indices.size(3));
  p.block_size = static_cast<int>(block_size);
  p.q_offset = static_cast<int>(q_offset);
  p.scale_log2 = static_cast<float>(scale * 1.4426950408889634);
  return p;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> block_sparse_attn_fwd(const at::Tensor& q, const at::Tensor& k,
                                                         const at::Tensor& v, const at::Tensor& kv_counts,
                                                         const at::Tensor& kv_indices, int64_t block_size,
                                                         int64_t q_offset, double scale, bool return_lse, int64_t sm) {
  TORCH_CHECK(q.is_cuda() && k.is_cuda() && v.is_cuda() && kv_counts.is_cuda() && kv_indices.is_cuda(), kPrefix,
              "q, k, v, kv_counts and kv_indices must be CUDA tensors");
  TORCH_CHECK(q.device() == k.device() && q.device() == v.device() && q.device() == kv_counts.device() &&
                  q.device() == kv_indices.device(),
              kPrefix, "all tensors must be on one device");
  const auto dtype = q.scalar_type();
  TORCH_CHECK(k.scalar_type() == dtype && v.scalar_type() == dtype, kPrefix, "q, k, v must share one dtype");
  check_layout(q, "q");
  check_layout(k, "k");
  check_layout(v, "v");
  const int64_t B = q.size(0), Hq = q.size(1), Lq = q.size(2), D = q.size(3);
  const int64_t Hkv = k.size(1), Lk = k.size(2);
  TORCH_CHECK(k.size(0) == B && k.size(3) == D && v.sizes() == k.sizes(), kPrefix,
              "k and v must be (B, Hkv, Lk, D) matching q; got q ", q.sizes(), ", k ", k.sizes(), ", v ", v.sizes());
  TORCH_CHECK(Hkv > 0 && Hq % Hkv == 0, kPrefix, "query heads (", Hq, ") must be a multiple of kv heads (", Hkv, ")");

  const c10::cuda::CUDAGuard guard(q.device());
  const auto cc = check_supported(q, D, block_size, sm, kPrefix);

  TORCH_CHECK(Lq > 0 && Lq <= Lk && Lk < std::numeric_limits<int32_t>::max() / 2, kPrefix,
              "need 0 < Lq <= Lk < 2^30, got Lq=", Lq, ", Lk=", Lk);
  TORCH_CHECK(q_offset >= 0 && q_offset + Lq <= Lk, kPrefix, "q_offset (", q_offset, ") must lie in [0, Lk - Lq] = [0, ",
              Lk - Lq, "]");
  TORCH_CHECK(std::isfinite(scale) && scale > 0, kPrefix, "scale must be finite and > 0, got ", scale);
  const int64_t nQ = (q_offset + Lq - 1) / block_size - q_offset / block_size + 1;
  TORCH_CHECK(kv_counts.scalar_type() == at::kInt && kv_indices.scalar_type() == at::kInt, kPrefix,
              "kv_counts and kv_indices must be int32");
  TORCH_CHECK(kv_counts.is_contiguous() && kv_indices.is_contiguous(), kPrefix,
              "kv_counts and kv_indices must be contiguous");
  TORCH_CHECK(kv_counts.dim() == 3 && kv_counts.size(0) == B && kv_counts.size(1) == Hq && kv_counts.size(2) == nQ,
              kPrefix, "kv_counts must be (B, Hq, nQ) = (", B, ", ", Hq, ", ", nQ, "), got ", kv_counts.sizes());
  TORCH_CHECK(kv_indices.dim() == 4 && kv_indices.size(0) == B && kv_indices.size(1) == Hq &&
                  kv_indices.size(2) == nQ && kv_indices.size(3) >= 1,
              kPrefix, "kv_indices must be (B, Hq, nQ, W>=1), got ", kv_indices.sizes());
  TORCH_CHECK(B < 65536 && Hq < 65536, kPrefix, "batch and heads must be < 65536");

  at::Tensor out = at::empty({B, Hq, Lq, D}, q.options());
  at::Tensor lse = return_lse ? at::empty({B, Hq, Lq}, q.options().dtype(at::kFloat))
                              : at::empty({0}, q.options().dtype(at::kFloat));

  // block_size checked by check_supported
  stem_attn::Params p =
      batch_params(q, k, v, out, lse, return_lse, kv_counts, kv_indices, Lk, nQ, block_size, q_offset, scale);
  p.is_bf16 = dtype == at::kBFloat16;

  launch(p, cc, sm, q, kPrefix);
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor> block_sparse_attn_varlen_fwd(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& cu_seqlens_q,
    const at::Tensor& cu_seqlens_k, const at::Tensor& kv_counts, const at::Tensor& kv_indices, int64_t block_size,
    double scale, bool return_lse, int64_t sm) {
  constexpr const char* kVPrefix = "stem_attention.block_sparse_attn_varlen_fwd: ";
  TORCH_CHECK(q.is_cuda() && k.is_cuda() && v.is_cuda() && kv_counts.is_cuda() && kv_indices.is_cuda() &&
                  cu_seqlens_q.is_cuda() && cu_seqlens_k.is_cuda(),
              kVPrefix, "every tensor must be a CUDA tensor");
  for (const at::Tensor* t : {&k, &v, &kv_counts, &kv_indices, &cu_seqlens_q, &cu_seqlens_k}) {
    TORCH_CHECK(t->device() == q.device(), kVPrefix, "all tensors must be on one device");
  }
  const auto dtype = q.scalar_type();
  TORCH_CHECK(k.scalar_type() == dtype && v.scalar_type() == dtype, kVPrefix, "q, k, v must share one dtype");
  TORCH_CHECK(q.dim() == 3 && k.dim() == 3 && v.sizes() == k.sizes() && k.size(2) == q.size(2), kVPrefix,
              "q must be (total_q, Hq, D) and k, v (total_k, Hkv, D); got q ", q.sizes(), ", k ", k.sizes(), ", v ",
              v.sizes());
  const int64_t Tq = q.size(0), Hq = q.size(1), D = q.size(2), Tk = k.size(0), Hkv = k.size(1);
  TORCH_CHECK(Hkv > 0 && Hq % Hkv == 0, kVPrefix, "query heads (", Hq, ") must be a multiple of kv heads (", Hkv, ")");
  TORCH_CHECK(cu_seqlens_q.scalar_type() == at::kInt && cu_seqlens_k.scalar_type() == at::kInt &&
                  cu_seqlens_q.dim() == 1 && cu_seqlens_q.sizes() == cu_seqlens_k.sizes() && cu_seqlens_q.size(0) >= 1 &&
                  cu_seqlens_q.is_contiguous() && cu_seqlens_k.is_contiguous(),
              kVPrefix, "cu_seqlens_q and cu_seqlens_k must be contiguous int32 (batch + 1,) tensors");
  const int64_t B = cu_seqlens_q.size(0) - 1;
  TORCH_CHECK(kv_counts.scalar_type() == at::kInt && kv_indices.scalar_type() == at::kInt &&
                  kv_counts.is_contiguous() && kv_indices.is_contiguous(),
              kVPrefix, "kv_counts and kv_indices must be contiguous int32");
  TORCH_CHECK(kv_counts.dim() == 3 && kv_counts.size(0) == B && kv_counts.size(1) == Hq && kv_indices.dim() == 4 &&
                  kv_indices.size(0) == B && kv_indices.size(1) == Hq && kv_indices.size(2) == kv_counts.size(2) &&
                  kv_indices.size(3) >= 1,
              kVPrefix, "kv_counts must be (B, Hq, nQ) and kv_indices (B, Hq, nQ, W) with B = ", B, ", Hq = ", Hq,
              "; got ", kv_counts.sizes(), " and ", kv_indices.sizes());
  TORCH_CHECK((Tk < std::numeric_limits<int32_t>::max() / 2 && Tq <= Tk) || Tq == 0, kVPrefix,
              "need total_q <= total_k < 2^30, got ", Tq, ", ", Tk);
  TORCH_CHECK(std::isfinite(scale) && scale > 0, kVPrefix, "scale must be finite and > 0, got ", scale);
  // (T, H, D) tensors seen as (B, H, T, D) with stride 0 over b: the kernels' strided layout
  const at::Tensor q4 = q.unsqueeze(0).transpose(1, 2), k4 = k.unsqueeze(0).transpose(1, 2),
                   v4 = v.unsqueeze(0).transpose(1, 2);
  check_layout(q4, "q");
  check_layout(k4, "k");
  check_layout(v4, "v");

  const c10::cuda::CUDAGuard guard(q.device());
  const auto cc = check_supported(q, D, block_size, sm, kVPrefix);
  TORCH_CHECK(B < 65536 && Hq < 65536, kVPrefix, "sequences and heads must be < 65536");

  at::Tensor out = at::empty({Tq, Hq, D}, q.options());
  at::Tensor lse = return_lse ? at::empty({Hq, Tq}, q.options().dtype(at::kFloat))
                              : at::empty({0}, q.options().dtype(at::kFloat));
  if (B == 0 || Tq == 0 || kv_counts.size(2) == 0) return {out, lse};
  const at::Tensor o4 = out.unsqueeze(0).transpose(1, 2);

  // the (1, H, T, D) views as one batch entry of totals (tensor maps); per sequence in-kernel
  stem_attn::Params p = batch_params(q4, k4, v4, o4, lse, return_lse, kv_counts, kv_indices, Tk, kv_counts.size(2),
                                     block_size, 0, scale);  // block_size checked by check_supported
  p.B = static_cast<int>(B);  // sequences, located by cu_seqlens (no batch strides)
  p.q_stride_b = 0, p.k_stride_b = 0, p.v_stride_b = 0, p.o_stride_b = 0, p.lse_stride_b = 0;
  p.cu_seqlens_q = cu_seqlens_q.data_ptr<int32_t>();
  p.cu_seqlens_k = cu_seqlens_k.data_ptr<int32_t>();
  p.is_bf16 = dtype == at::kBFloat16;

  launch(p, cc, sm, q, kVPrefix);
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor> block_sparse_attn_fp8_fwd(
    const at::Tensor& q8, const at::Tensor& k8, const at::Tensor& vt8, const at::Tensor& q_scale,
    const at::Tensor& k_scale, const at::Tensor& v_scale, const at::Tensor& kv_counts, const at::Tensor& kv_indices,
    int64_t block_size, int64_t q_offset, int64_t lk, double scale, bool return_lse, int64_t out_dtype) {
  constexpr const char* kFPrefix = "stem_attention.block_sparse_attn_fp8_fwd: ";
  const std::initializer_list<const at::Tensor*> all = {&q8, &k8, &vt8, &q_scale, &k_scale, &v_scale, &kv_counts,
                                                        &kv_indices};
  for (const at::Tensor* t : all) {
    TORCH_CHECK(t->is_cuda() && t->device() == q8.device(), kFPrefix, "every tensor must be on q8's CUDA device");
    TORCH_CHECK(t->is_contiguous(), kFPrefix, "every tensor must be contiguous");
  }
  TORCH_CHECK(out_dtype == stem_attn::kFloat16 || out_dtype == stem_attn::kBFloat16, kFPrefix,
              "out_dtype must be 0 (float16) or 1 (bfloat16), got ", out_dtype);
  const auto out_type = out_dtype == stem_attn::kBFloat16 ? at::kBFloat16 : at::kHalf;
  // q8 and k8 in the output's 16-bit type: only O += P V runs in e4m3 (their scales are unused)
  const bool pv_only = q8.scalar_type() == out_type;
  for (const at::Tensor* t : {&q8, &k8, &vt8}) {
    TORCH_CHECK(t->dim() == 4 && reinterpret_cast<std::uintptr_t>(t->data_ptr()) % 16 == 0, kFPrefix,
                "q8, k8 and vt8 must be 4-d and 16-byte aligned");
  }
  TORCH_CHECK(vt8.scalar_type() == at::kFloat8_e4m3fn, kFPrefix, "vt8 must be float8_e4m3fn");
  TORCH_CHECK((q8.scalar_type() == at::kFloat8_e4m3fn || pv_only) && k8.scalar_type() == q8.scalar_type(), kFPrefix,
              "q8 and k8 must both be float8_e4m3fn, or both in the output dtype (", out_type,
              ": only P V in FP8); got ", q8.scalar_type(), " and ", k8.scalar_type());
  const std::vector<const at::Tensor*> scales =
      pv_only ? std::vector<const at::Tensor*>{&v_scale} : std::vector<const at::Tensor*>{&q_scale, &k_scale, &v_scale};
  for (const at::Tensor* t : scales) {
    TORCH_CHECK(t->scalar_type() == at::kFloat && t->dim() == 3, kFPrefix, "the scales must be 3-d float32 tensors");
  }
  const int64_t B = q8.size(0), Hq = q8.size(1), Lq = q8.size(2), D = q8.size(3);
  const int64_t Hkv = k8.size(1), Lp = vt8.size(3);
  TORCH_CHECK(D == 128, kFPrefix, "the FP8 kernel is built for head dim 128, got ", D);
  TORCH_CHECK(block_size == 128 || block_size == 256, kFPrefix, "plan blocks must be 128 or 256 tokens, got ",
              block_size);
  TORCH_CHECK(Hkv > 0 && Hq % Hkv == 0 && k8.size(0) == B && k8.size(3) == D, kFPrefix,
              "k8 must be (B, Hkv, Lp, 128) with Hq % Hkv == 0; got q8 ", q8.sizes(), ", k8 ", k8.sizes());
  TORCH_CHECK(vt8.size(0) == B && vt8.size(1) == Hkv && vt8.size(2) == D, kFPrefix,
              "vt8 must be (B, Hkv, D, Lp) = V transposed; got ", vt8.sizes());
  TORCH_CHECK(k8.size(2) == (pv_only ? lk : Lp), kFPrefix, "k8 must hold ", pv_only ? "lk" : "Lp (vt8's)",
              " keys; got ", k8.size(2));
  TORCH_CHECK(Lp % 128 == 0 && lk > 0 && lk <= Lp && Lp < std::numeric_limits<int32_t>::max() / 2, kFPrefix,
              "need 0 < lk <= Lp, Lp a multiple of 128 below 2^30; got lk=", lk, ", Lp=", Lp);
  TORCH_CHECK(Lq > 0 && Lq <= lk && q_offset >= 0 && q_offset + Lq <= lk, kFPrefix,
              "need 0 < Lq <= lk and q_offset in [0, lk - Lq]; got Lq=", Lq, ", lk=", lk, ", q_offset=", q_offset);
  TORCH_CHECK(pv_only || (q_scale.size(0) == B && q_scale.size(1) == Hq && q_scale.size(2) == Lq), kFPrefix,
              "q_scale must be (B, Hq, Lq), got ", q_scale.sizes());
  TORCH_CHECK(pv_only || (k_scale.size(0) == B && k_scale.size(1) == Hkv && k_scale.size(2) == Lp / 128), kFPrefix,
              "k_scale must be (B, Hkv, Lp / 128), got ", k_scale.sizes());
  TORCH_CHECK(v_scale.size(0) == B && v_scale.size(1) == Hkv && v_scale.size(2) == D, kFPrefix,
              "v_scale must be (B, Hkv, D), got ", v_scale.sizes());
  TORCH_CHECK(std::isfinite(scale) && scale > 0, kFPrefix, "scale must be finite and > 0, got ", scale);
  const int64_t nQ = (q_offset + Lq - 1) / block_size - q_offset / block_size + 1;
  TORCH_CHECK(kv_counts.scalar_type() == at::kInt && kv_indices.scalar_type() == at::kInt, kFPrefix,
              "kv_counts and kv_indices must be int32");
  TORCH_CHECK(kv_counts.dim() == 3 && kv_counts.size(0) == B && kv_counts.size(1) == Hq && kv_counts.size(2) == nQ &&
                  kv_indices.dim() == 4 && kv_indices.size(0) == B && kv_indices.size(1) == Hq &&
                  kv_indices.size(2) == nQ && kv_indices.size(3) >= 1,
              kFPrefix, "kv_counts must be (B, Hq, nQ) = (", B, ", ", Hq, ", ", nQ, ") and kv_indices (B, Hq, nQ, W); got ",
              kv_counts.sizes(), ", ", kv_indices.sizes());
  TORCH_CHECK(B < 65536 && Hq < 65536, kFPrefix, "batch and heads must be < 65536");

  const c10::cuda::CUDAGuard guard(q8.device());
  const auto opts = q8.options().dtype(out_type);
  at::Tensor out = at::empty({B, Hq, Lq, D}, opts);
  at::Tensor lse = return_lse ? at::empty({B, Hq, Lq}, q8.options().dtype(at::kFloat))
                              : at::empty({0}, q8.options().dtype(at::kFloat));
  stem_attn::Params p =
      batch_params(q8, k8, vt8, out, lse, return_lse, kv_counts, kv_indices, lk, nQ, block_size, q_offset, scale);
  p.is_bf16 = out_dtype == stem_attn::kBFloat16;
  p.q_scale = pv_only ? nullptr : q_scale.data_ptr<float>();
  p.k_scale = pv_only ? nullptr : k_scale.data_ptr<float>();
  p.v_scale = v_scale.data_ptr<float>();
  p.k_scale_tiles = static_cast<int>(Lp / 128);
  p.Lk_pad = static_cast<int>(Lp);
  const cudaError_t err =
      stem_attn::block_sparse_attn_fp8_fwd_launch(p, pv_only, c10::cuda::getCurrentCUDAStream(q8.get_device()).stream());
  TORCH_CHECK(err != cudaErrorNotSupported, kFPrefix,
              "the FP8 kernel cannot run here: it needs compute capability 9.0 and a build with sm_90a code");
  TORCH_CHECK(err == cudaSuccess, kFPrefix, "kernel launch failed: ", cudaGetErrorString(err));
  return {out, lse};
}

int64_t last_kernel_path() { return stem_attn::last_kernel_path(); }

int64_t kernel_path(int64_t dtype, int64_t head_dim, int64_t block_size, int64_t cc_major, int64_t cc_minor, int64_t sm) {
  return stem_attn::kernel_path(clamp_int(dtype), clamp_int(head_dim), clamp_int(block_size), clamp_int(cc_major),
                                clamp_int(cc_minor), clamp_int(sm))
      .path;
}

std::string kernel_path_reason(int64_t dtype, int64_t head_dim, int64_t block_size, int64_t cc_major, int64_t cc_minor,
                               int64_t sm) {
  return stem_attn::kernel_path_reason(clamp_int(dtype), clamp_int(head_dim), clamp_int(block_size),
                                       clamp_int(cc_major), clamp_int(cc_minor), clamp_int(sm));
}

TORCH_LIBRARY_EXPAND(TORCH_EXTENSION_NAME, ops) {
  ops.def(
      "block_sparse_attn_fwd(Tensor q, Tensor k, Tensor v, Tensor kv_counts, Tensor kv_indices, int block_size, "
      "int q_offset, float scale, bool return_lse, int sm=0) -> (Tensor, Tensor)");
  ops.impl("block_sparse_attn_fwd", torch::kCUDA, &block_sparse_attn_fwd);
  ops.def(
      "block_sparse_attn_varlen_fwd(Tensor q, Tensor k, Tensor v, Tensor cu_seqlens_q, Tensor cu_seqlens_k, "
      "Tensor kv_counts, Tensor kv_indices, int block_size, float scale, bool return_lse, int sm=0) -> (Tensor, Tensor)");
  ops.impl("block_sparse_attn_varlen_fwd", torch::kCUDA, &block_sparse_attn_varlen_fwd);
  ops.def(
      "block_sparse_attn_fp8_fwd(Tensor q8, Tensor k8, Tensor vt8, Tensor q_scale, Tensor k_scale, Tensor v_scale, "
      "Tensor kv_counts, Tensor kv_indices, int block_size, int q_offset, int lk, float scale, bool return_lse, "
      "int out_dtype) -> (Tensor, Tensor)");
  ops.impl("block_sparse_attn_fp8_fwd", torch::kCUDA, &block_sparse_attn_fp8_fwd);
  ops.def("kernel_path(int dtype, int head_dim, int block_size, int cc_major, int cc_minor, int sm=0) -> int",
          &kernel_path);
  ops.def("kernel_path_reason(int dtype, int head_dim, int block_size, int cc_major, int cc_minor, int sm=0) -> str",
          &kernel_path_reason);
  ops.def("last_kernel_path() -> int", &last_kernel_path);
}

#ifdef REGISTER_EXTENSION
REGISTER_EXTENSION(TORCH_EXTENSION_NAME)
#endif
