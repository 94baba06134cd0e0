// The CUDA backend's interface in a build without CUDA: every GPU request says so plainly.
#include "cuda/backend.h"

namespace intfa::cuda {

static Status unavailable() {
  return Status(StatusCode::not_available,
                "GPU backend not available in this build (configured with INTFA_CUDA=OFF or no "
                "nvcc found); use backend cpu");
}

bool built() { return false; }
int kernel_block_n(int, GpuPath) { return 0; }
const char* compiled_archs() { return ""; }
DeviceInfo device_info(int) {
  DeviceInfo info;
  info.error = "built without CUDA";
  return info;
}
Status resolve_path(GpuPath, int, GpuPath*) { return unavailable(); }
Status quantize(const QuantParams&, void*) { return unavailable(); }
Status quantize_cache(const CacheQuantParams&, void*) { return unavailable(); }
Status attention_int8(const FwdParams&, GpuPath, bool, void*, GpuPath*) { return unavailable(); }
Status attention(const QuantParams&, const FwdParams&, GpuPath, bool, void*, GpuPath*) { return unavailable(); }
Status fill_no_key_rows(const NoKeyRows&, void*) { return unavailable(); }
Status malloc_async(void**, size_t, void*) { return unavailable(); }
Status free_async(void*, void*) { return unavailable(); }
Status copy_to_host_sync(void*, const void*, size_t, void*, bool*) { return unavailable(); }

Status debug_qk_block_sm80(int, const int8_t*, const int8_t*, int32_t*) { return unavailable(); }
Status debug_qk_block_sm90(int, const int8_t*, const int8_t*, int32_t*) { return unavailable(); }
Status debug_exp2_poly(const float*, float*, int) { return unavailable(); }
Status debug_programmatic_launches(long long*) { return unavailable(); }
Status debug_fused_q_calls(long long*) { return unavailable(); }
Status debug_check_cuda(int, const char*) { return unavailable(); }
Status gpu_malloc(void**, size_t, int) { return unavailable(); }
Status gpu_free(void*) { return unavailable(); }
Status gpu_copy(void*, const void*, size_t, bool) { return unavailable(); }
Status gpu_memset(void*, int, size_t) { return unavailable(); }
Status gpu_synchronize() { return unavailable(); }
Status gpu_time_ms(Status (*)(void*), void*, int, int, void*, double*) { return unavailable(); }
Status gpu_graph_time_ms(Status (*)(void*, void*), void*, int, int, double*) { return unavailable(); }

}  // namespace intfa::cuda
