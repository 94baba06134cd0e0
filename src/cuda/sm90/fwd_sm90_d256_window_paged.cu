// Instantiation: sm90 forward, head_dim 256 (two value-channel passes), sliding window over a paged KV cache.
#include "cuda/sm90/fwd_sm90_launch.cuh"

namespace intfa::sm90 {
template Status launch_fwd<256, true, true, true, true>(const Params&, cudaStream_t);
}  // namespace intfa::sm90
