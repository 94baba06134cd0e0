// Instantiation: decode forward, head_dim 256, 2-stage K/V ring, logit soft-capping,
// pages of 16, 32 or 64 tokens.
#include "cuda/decode/fwd_decode_launch.cuh"

namespace intfa::decode {
template Status occupancy<256, 2, true, true, true>(int*);
template Status launch_fwd<256, 2, true, true, true>(const Params&, cudaStream_t);
}  // namespace intfa::decode
