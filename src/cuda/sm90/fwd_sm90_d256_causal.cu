// Instantiation: sm90 forward, head_dim 256, causal (whole tiles, two value-channel passes).
#include "cuda/sm90/fwd_sm90_launch.cuh"

namespace intfa::sm90 {
template Status launch_fwd<256, true, false, false>(const Params&, cudaStream_t);
}  // namespace intfa::sm90
