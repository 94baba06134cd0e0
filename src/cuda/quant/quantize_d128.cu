// Quantization kernels for head_dim 128 (fp16 and bf16).
#include "cuda/quant/quantize_kernel.cuh"

namespace intfa::quant {
template Status launch_main<128>(const QuantParams&, const QuantScratch&, Order, cudaStream_t);
}  // namespace intfa::quant
