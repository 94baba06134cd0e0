// Instantiation: decode forward, head_dim 256, 2-stage K/V ring, contiguous KV.
#include "cuda/decode/fwd_decode_launch.cuh"

namespace intfa::decode {
template Status occupancy<256, 2, false>(int*);
template Status launch_fwd<256, 2, false>(const Params&, cudaStream_t);
}  // namespace intfa::decode
