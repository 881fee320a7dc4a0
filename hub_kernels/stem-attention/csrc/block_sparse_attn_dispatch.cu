// Dispatch of the block-sparse attention kernels: kernel_path (supported.h) decides, then a switch
// over dtype and head dim reaches the instantiation. The instantiations live in inst/*.cu, one per
// kernel x dtype x head dim that kernel_path can select (built in parallel):
//   sm80: {bf16, fp16} x {64, 128, 256};  sm90: {bf16, fp16} x {64, 128, 256}; sm90 FP8, both
//   products or only P V: {bf16, fp16} (output; and Q, K for P V only) x head dim 128.
#include <atomic>

#include "block_sparse_attn.h"
#include "supported.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace stem_attn {

template <typename T, int kD>
cudaError_t run_block_sparse_attn(const Params& p, cudaStream_t stream);

namespace sm90 {
template <typename T, int kD, int kPrec>
cudaError_t run(const Params& p, cudaStream_t stream);
}  // namespace sm90

namespace {
std::atomic<int> g_last_path{0};

template <typename T, int kD>
cudaError_t run_path(const Params& p, int path, int sm, cudaStream_t stream) {
  if constexpr (sm90_head_dim(kD)) {
    if (path == kSm90) {
      const cudaError_t e = sm90::run<T, kD, 0>(p, stream);  // native precision
      if (e != cudaErrorNotSupported) {  // ran (or failed for real)
        g_last_path.store(kSm90);
        return e;
      }
      if (sm == kSm90) return e;  // asked for by name: no fallback
      // Auto: no sm_90a code for this device in the build (or too many CTAs): the sm80 kernel runs.
    }
  }
  g_last_path.store(kSm80);
  return run_block_sparse_attn<T, kD>(p, stream);
}
}  // namespace

int last_kernel_path() { return g_last_path.load(); }

cudaError_t block_sparse_attn_fp8_fwd_launch(const Params& p, bool pv_only, cudaStream_t stream) {
  if (p.D != 128 || !sm90_block_size(p.block_size) || p.Hkv <= 0 || p.Hq % p.Hkv != 0 ||
      p.cu_seqlens_q != nullptr || p.v_scale == nullptr ||
      (!pv_only && (p.q_scale == nullptr || p.k_scale == nullptr))) {
    return cudaErrorInvalidValue;
  }
  if (p.nQ <= 0 || p.B <= 0 || p.Hq <= 0 || p.Lq <= 0) return cudaSuccess;  // nothing to do
  constexpr int kFp8 = 1, kFp8PV = 2;  // sm90::Precision
  const cudaError_t e = pv_only ? (p.is_bf16 ? sm90::run<__nv_bfloat16, 128, kFp8PV>(p, stream)
                                             : sm90::run<__half, 128, kFp8PV>(p, stream))
                                : (p.is_bf16 ? sm90::run<__nv_bfloat16, 128, kFp8>(p, stream)
                                             : sm90::run<__half, 128, kFp8>(p, stream));
  if (e == cudaSuccess) g_last_path.store(kSm90);
  return e;
}

cudaError_t block_sparse_attn_fwd_launch(const Params& p, int cc_major, int cc_minor, int sm, cudaStream_t stream) {
  const Support s = kernel_path(p.is_bf16 ? kBFloat16 : kFloat16, p.D, p.block_size, cc_major, cc_minor, sm);
  if (s.path == kUnsupported || p.Hkv <= 0 || p.Hq % p.Hkv != 0) return cudaErrorInvalidValue;
  if (p.nQ <= 0 || p.B <= 0 || p.Hq <= 0 || p.Lq <= 0) return cudaSuccess;  // nothing to do
  switch (p.D) {
    case 64:
      return p.is_bf16 ? run_path<__nv_bfloat16, 64>(p, s.path, sm, stream)
                       : run_path<__half, 64>(p, s.path, sm, stream);
    case 128:
      return p.is_bf16 ? run_path<__nv_bfloat16, 128>(p, s.path, sm, stream)
                       : run_path<__half, 128>(p, s.path, sm, stream);
    case 256:
      return p.is_bf16 ? run_path<__nv_bfloat16, 256>(p, s.path, sm, stream)
                       : run_path<__half, 256>(p, s.path, sm, stream);
    default:
      return cudaErrorInvalidValue;
  }
}

}  // namespace stem_attn
