// Instantiation: decode forward, head_dim 256, 2-stage K/V ring,
// pages of 16, 32 or 64 tokens (smaller than the key block).
#include "cuda/decode/fwd_decode_launch.cuh"

namespace intfa::decode {
template Status occupancy<256, 2, true, true>(int*);
template Status launch_fwd<256, 2, true, true>(const Params&, cudaStream_t);
}  // namespace intfa::decode
