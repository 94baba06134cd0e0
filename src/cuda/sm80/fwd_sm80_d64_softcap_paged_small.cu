// Instantiation: sm80 forward, head_dim 64, logit soft-capping, paged K / V in pages of 16, 32 or
// 64 keys.
#include "cuda/sm80/fwd_sm80_launch.cuh"

namespace intfa::sm80 {
template Status launch_fwd<64, true, true, true, true>(const FwdParams&, cudaStream_t);
}  // namespace intfa::sm80
