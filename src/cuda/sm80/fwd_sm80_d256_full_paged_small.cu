// Instantiation: sm80 forward, head_dim 256, non-causal, pages of 16, 32 or 64 tokens.
#include "cuda/sm80/fwd_sm80_launch.cuh"

namespace intfa::sm80 {
template Status launch_fwd<256, false, true, true>(const FwdParams&, cudaStream_t);
}  // namespace intfa::sm80
