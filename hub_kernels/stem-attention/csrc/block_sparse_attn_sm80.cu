// Dispatch of the sm80 (mma.sync) block-sparse attention kernel over dtype and head dim.
// The kernel instantiations live in inst/*.cu (one per dtype x head dim, built in parallel).
#include "block_sparse_attn.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace stem_attn {

template <typename T, int kD>
cudaError_t run_block_sparse_attn(const Params& p, cudaStream_t stream);

cudaError_t block_sparse_attn_fwd_launch(const Params& p, cudaStream_t stream) {
  if (p.Hkv <= 0 || p.Hq % p.Hkv != 0 || p.block_size % 64 != 0 || p.block_size > 256) return cudaErrorInvalidValue;
  if (p.nQ <= 0 || p.B <= 0 || p.Hq <= 0 || p.Lq <= 0) return cudaSuccess;  // nothing to do
  switch (p.D) {
    case 64:
      return p.is_bf16 ? run_block_sparse_attn<__nv_bfloat16, 64>(p, stream) : run_block_sparse_attn<__half, 64>(p, stream);
    case 128:
      return p.is_bf16 ? run_block_sparse_attn<__nv_bfloat16, 128>(p, stream)
                       : run_block_sparse_attn<__half, 128>(p, stream);
    case 256:
      return p.is_bf16 ? run_block_sparse_attn<__nv_bfloat16, 256>(p, stream)
                       : run_block_sparse_attn<__half, 256>(p, stream);
    default:
      return cudaErrorInvalidValue;
  }
}

}  // namespace stem_attn
