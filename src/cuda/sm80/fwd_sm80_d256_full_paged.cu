// Instantiation: sm80 forward, head_dim 256, non-causal, paged KV.
#include "cuda/sm80/fwd_sm80_launch.cuh"

namespace intfa::sm80 {
template Status launch_fwd<256, false, true>(const FwdParams&, cudaStream_t);
}  // namespace intfa::sm80
