// One (dtype, head dim) instantiation per file so that the build compiles them in parallel.
#include "../block_sparse_attn_kernel.cuh"

namespace stem_attn {
template cudaError_t run_block_sparse_attn<__half, 64>(const Params&, cudaStream_t);
}  // namespace stem_attn
