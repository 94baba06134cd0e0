// Instantiation: sm90 forward, head_dim 128, logit soft-capping over paged K / V (pages of a
// multiple of the key block; the paged sliding-window kernel, with or without a window).
#include "cuda/sm90/fwd_sm90_launch.cuh"

namespace intfa::sm90 {
template Status launch_fwd<128, true, true, true, true, false, true>(const Params&, cudaStream_t);
}  // namespace intfa::sm90
