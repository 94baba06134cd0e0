// Instantiation: sm80 forward, head_dim 128, logit soft-capping (the causal kernel: it takes
// non-causal calls, windows and sinks too).
#include "cuda/sm80/fwd_sm80_launch.cuh"

namespace intfa::sm80 {
template Status launch_fwd<128, true, false, false, true>(const FwdParams&, cudaStream_t);
}  // namespace intfa::sm80
