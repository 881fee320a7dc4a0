// Dispatch of the block-sparse attention kernels over architecture, dtype and head dim.
// The kernel instantiations live in inst/*.cu (one per kernel x dtype x head dim, built in parallel).
#include <atomic>

#include "block_sparse_attn.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace stem_attn {

template <typename T, int kD>
cudaError_t run_block_sparse_attn(const Params& p, cudaStream_t stream);

namespace sm90 {
template <typename T, int kD>
cudaError_t run(const Params& p, cudaStream_t stream);
}  // namespace sm90

namespace {
std::atomic<int> g_last_path{0};

template <typename T, int kD>
cudaError_t run_any(const Params& p, cudaStream_t stream) {
  if constexpr (kD == 64 || kD == 128) {
    if (p.allow_sm90 && p.sm == 90) {
      const cudaError_t e = sm90::run<T, kD>(p, stream);
      if (e != cudaErrorNotSupported) {  // ran (or failed for real)
        g_last_path.store(90);
        return e;
      }
    }
  }
  g_last_path.store(80);
  return run_block_sparse_attn<T, kD>(p, stream);
}
}  // namespace

int last_kernel_path() { return g_last_path.load(); }

cudaError_t block_sparse_attn_fwd_launch(const Params& p, cudaStream_t stream) {
  if (p.Hkv <= 0 || p.Hq % p.Hkv != 0 || p.block_size % 64 != 0 || p.block_size > 256) return cudaErrorInvalidValue;
  if (p.nQ <= 0 || p.B <= 0 || p.Hq <= 0 || p.Lq <= 0) return cudaSuccess;  // nothing to do
  switch (p.D) {
    case 64:
      return p.is_bf16 ? run_any<__nv_bfloat16, 64>(p, stream) : run_any<__half, 64>(p, stream);
    case 128:
      return p.is_bf16 ? run_any<__nv_bfloat16, 128>(p, stream) : run_any<__half, 128>(p, stream);
    case 256:
      return p.is_bf16 ? run_any<__nv_bfloat16, 256>(p, stream) : run_any<__half, 256>(p, stream);
    default:
      return cudaErrorInvalidValue;
  }
}

}  // namespace stem_attn
