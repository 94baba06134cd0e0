// PLACEHOLDER (being replaced by the fused quantization kernels).
#include "cuda/launchers.h"
namespace intfa::cuda {
Status launch_quantize(const QuantParams&, cudaStream_t) {
  return Status(StatusCode::not_available, "GPU quantization kernels not built yet");
}
}  // namespace intfa::cuda
