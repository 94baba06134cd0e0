// The CUDA backend as the API layer sees it: host-safe declarations, no CUDA headers. When the
// library is built without CUDA, src/api/no_cuda.cpp defines these to report "not available".
#pragma once

#include <cstddef>

#include "common/params.h"
#include "intfa/intfa.h"

namespace intfa::cuda {

bool built();
int kernel_block_n(int head_dim, GpuPath path);  // of the kernels a path runs (automatic: sm80's)
const char* compiled_archs();
DeviceInfo device_info(int device_index);
// Picks the kernel family for the current device (or checks the requested one can run).
Status resolve_path(GpuPath requested, int device_index, GpuPath* resolved);

Status quantize(const QuantParams& p, void* stream);
Status quantize_cache(const CacheQuantParams& p, void* stream);
// `path` as resolve_path() chose it; with `fallback` (the caller asked for auto) operands the
// sm90 kernel cannot take run on sm80 instead.
// ran (optional): receives the kernel family that ran the call (Options::ran).
Status attention_int8(const FwdParams& p, GpuPath path, bool fallback, void* stream, GpuPath* ran = nullptr);
// attention() / attention_varlen() on fp16 / bf16 inputs: quantize(qp), then attend (fp, as
// attention_int8). fp.q_in is Q itself: when the sm90 kernel takes the call and no row needs
// lse_offset, that kernel quantizes Q (bit-identical to quantize()) and the quantizer skips it.
Status attention(const QuantParams& qp, const FwdParams& fp, GpuPath path, bool fallback, void* stream,
                 GpuPath* ran = nullptr);

// Calls without keys: out rows 0, LSE the sink logit or -inf (NoKeyRows; out rows 16-byte aligned).
Status fill_no_key_rows(const NoKeyRows& r, void* stream);

// Stream-ordered scratch memory (graph-capturable) and small transfers for validation.
Status malloc_async(void** ptr, size_t bytes, void* stream);
Status free_async(void* ptr, void* stream);
// Copies device memory to the host synchronously; *capturing is set (and nothing copied) when
// the stream is capturing a CUDA graph, where a synchronous copy is not allowed.
Status copy_to_host_sync(void* dst, const void* src, size_t bytes, void* stream, bool* capturing);

// Test hook: int32 S = Q8 K8^T of one 128 x 128 block (row-major int8 inputs of 128 x head_dim
// in device memory) through the sm80 kernel's fragment code.
Status debug_qk_block_sm80(int head_dim, const int8_t* q8, const int8_t* k8, int32_t* s);
// The same through the sm90 kernel's layout and wgmma (not_available without the sm90 build).
Status debug_qk_block_sm90(int head_dim, const int8_t* q8, const int8_t* k8, int32_t* s);
// y[i] = fwd::exp2_poly(x[i]) for n device floats: the kernels' FMA-pipe exponential.
Status debug_exp2_poly(const float* x, float* y, int n);
// Launches made as programmatic dependents so far in this process (cuda::launch_dependent), so a
// test can see that the guard on the loaded kernel's PTX target lets them happen on sm_90.
Status debug_programmatic_launches(long long* count);
// Test hook: attention() calls so far whose Q the sm90 kernel quantized (cuda::attention).
Status debug_fused_q_calls(long long* count);
// check_cuda(err, what) for a CUDA error code given as an int (tests without CUDA headers).
Status debug_check_cuda(int err, const char* what);

Status gpu_malloc(void** ptr, size_t bytes, int device_index);
Status gpu_free(void* ptr);
Status gpu_copy(void* dst, const void* src, size_t bytes, bool to_device);
Status gpu_memset(void* ptr, int byte, size_t bytes);
Status gpu_synchronize();
Status gpu_time_ms(Status (*run)(void* ctx), void* ctx, int warmup, int reps, void* stream,
                   double* median_ms);
Status gpu_graph_time_ms(Status (*run)(void* ctx, void* stream), void* ctx, int calls, int reps,
                         double* median_ms);

}  // namespace intfa::cuda
