// Instantiation: decode forward, head_dim 256, 2-stage K/V ring, paged KV.
#include "cuda/decode/fwd_decode_launch.cuh"

namespace intfa::decode {
template Status occupancy<256, 2, true>(int*);
template Status launch_fwd<256, 2, true>(const Params&, cudaStream_t);
}  // namespace intfa::decode
