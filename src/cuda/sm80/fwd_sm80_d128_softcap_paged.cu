// Instantiation: sm80 forward, head_dim 128, logit soft-capping, paged K / V (pages of a multiple
// of 128 keys).
#include "cuda/sm80/fwd_sm80_launch.cuh"

namespace intfa::sm80 {
template Status launch_fwd<128, true, true, false, true>(const FwdParams&, cudaStream_t);
}  // namespace intfa::sm80
