// Instantiation: sm90 forward, head_dim 256 (two value-channel passes), non-causal, key-range splits over pages of 16, 32 or 64 tokens.
#include "cuda/sm90/fwd_sm90_launch.cuh"

namespace intfa::sm90 {
template Status launch_fwd<256, false, true, true, false, true>(const Params&, cudaStream_t);
}  // namespace intfa::sm90
