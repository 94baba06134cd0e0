// Instantiation: sm90 forward, head_dim 128, logit soft-capping (the contiguous sliding-window
// kernel, which also runs causal and non-causal calls without a window: one kernel per head dim).
#include "cuda/sm90/fwd_sm90_launch.cuh"

namespace intfa::sm90 {
template Status launch_fwd<128, true, true, false, true, false, true>(const Params&, cudaStream_t);
}  // namespace intfa::sm90
