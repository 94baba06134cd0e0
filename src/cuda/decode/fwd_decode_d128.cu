// Instantiation: decode forward, head_dim 128.
#include "cuda/decode/fwd_decode_launch.cuh"

namespace intfa::decode {
template Status occupancy<128>(int*);
template Status launch_fwd<128>(const Params&, cudaStream_t);
}  // namespace intfa::decode
