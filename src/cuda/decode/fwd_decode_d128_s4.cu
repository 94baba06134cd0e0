// Instantiation: decode forward, head_dim 128, 4-stage K/V ring, contiguous KV.
#include "cuda/decode/fwd_decode_launch.cuh"

namespace intfa::decode {
template Status occupancy<128, 4, false>(int*);
template Status launch_fwd<128, 4, false>(const Params&, cudaStream_t);
}  // namespace intfa::decode
