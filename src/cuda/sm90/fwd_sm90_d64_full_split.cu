// Instantiation: sm90 forward, head_dim 64, non-causal, key-range splits (few tiles).
#include "cuda/sm90/fwd_sm90_launch.cuh"

namespace intfa::sm90 {
template Status launch_fwd<64, false, true, false>(const Params&, cudaStream_t);
}  // namespace intfa::sm90
