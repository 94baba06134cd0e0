// Instantiation: decode forward, head_dim 256, 2-stage K/V ring, logit soft-capping,
// pages of a multiple of 128 tokens.
#include "cuda/decode/fwd_decode_launch.cuh"

namespace intfa::decode {
template Status occupancy<256, 2, true, false, true>(int*);
template Status launch_fwd<256, 2, true, false, true>(const Params&, cudaStream_t);
}  // namespace intfa::decode
