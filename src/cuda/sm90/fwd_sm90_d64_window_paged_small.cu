// Instantiation: sm90 forward, head_dim 64, sliding window (causal, key-range splits), paged
// KV with pages of 16, 32 or 64 tokens (smaller than the key block).
#include "cuda/sm90/fwd_sm90_launch.cuh"

namespace intfa::sm90 {
template Status launch_fwd<64, true, true, true, true, true>(const Params&, cudaStream_t);
}  // namespace intfa::sm90
