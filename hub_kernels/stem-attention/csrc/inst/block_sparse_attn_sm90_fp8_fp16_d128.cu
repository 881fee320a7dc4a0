// The FP8 (e4m3) instantiation of the sm90 kernel with fp16 output, head dim 128.
#include "../block_sparse_attn_sm90.cuh"

namespace stem_attn {
namespace sm90 {
template cudaError_t run<__half, 128, kFp8>(const Params&, cudaStream_t);
}  // namespace sm90
}  // namespace stem_attn
