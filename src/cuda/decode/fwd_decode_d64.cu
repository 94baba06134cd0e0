// Instantiation: decode forward, head_dim 64.
#include "cuda/decode/fwd_decode_launch.cuh"

namespace intfa::decode {
template Status occupancy<64>(int*);
template Status launch_fwd<64>(const Params&, cudaStream_t);
}  // namespace intfa::decode
