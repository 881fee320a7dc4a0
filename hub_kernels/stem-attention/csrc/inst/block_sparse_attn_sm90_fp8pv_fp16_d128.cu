// The sm90 kernel with only O += P V in e4m3 (Q, K and the output fp16), head dim 128.
#include "../block_sparse_attn_sm90.cuh"

namespace stem_attn {
namespace sm90 {
template cudaError_t run<__half, 128, kFp8PV>(const Params&, cudaStream_t);
}  // namespace sm90
}  // namespace stem_attn
