// Instantiation: sm90 forward, head_dim 128, logit soft-capping over paged K / V in pages of 16,
// 32 or 64 tokens (the small-page sliding-window kernel, with or without a window).
#include "cuda/sm90/fwd_sm90_launch.cuh"

namespace intfa::sm90 {
template Status launch_fwd<128, true, true, true, true, true, true>(const Params&, cudaStream_t);
}  // namespace intfa::sm90
