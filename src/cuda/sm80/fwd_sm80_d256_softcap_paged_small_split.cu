// Instantiation: sm80 forward, head_dim 256, logit soft-capping, key-range splits,
// paged K/V in pages of 16, 32 or 64 keys.
#include "cuda/sm80/fwd_sm80_split_launch.cuh"

namespace intfa::sm80 {
template Status launch_fwd_split<256, true, true, true, true>(const FwdParams&, int, cudaStream_t);
}  // namespace intfa::sm80
