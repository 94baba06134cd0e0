// Instantiation: sm90 forward, head_dim 64, causal, key-range splits (the kernels
// that read per-sequence key counts), paged KV.
#include "cuda/sm90/fwd_sm90_launch.cuh"

namespace intfa::sm90 {
template Status launch_fwd<64, true, true, true>(const Params&, cudaStream_t);
}  // namespace intfa::sm90
