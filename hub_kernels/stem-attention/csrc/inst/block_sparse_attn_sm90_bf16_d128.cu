// One (dtype, head dim) instantiation of the sm90 kernel per file, built in parallel.
#include "../block_sparse_attn_sm90.cuh"

namespace stem_attn {
namespace sm90 {
template cudaError_t run<__nv_bfloat16, 128, kNative>(const Params&, cudaStream_t);
}  // namespace sm90
}  // namespace stem_attn
