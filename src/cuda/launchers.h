// Kernel-family launchers the CUDA backend dispatches to. Host-side; the kernels behind them
// never see the API layer.
#pragma once

#include <cuda_runtime.h>

#include "common/params.h"

namespace intfa::cuda {

// src/cuda/quant: fp16/bf16 -> int8 tensors and scales (bit-identical to ref::quantize).
Status launch_quantize(const QuantParams& p, cudaStream_t stream);

// src/cuda/sm80: mma.sync INT8 flash attention (runs on sm_80 and newer).
Status launch_fwd_sm80(const FwdParams& p, cudaStream_t stream);
int sm80_block_n();  // keys per block of the sm80 kernel

// src/cuda/sm90: wgmma / TMA / warp-specialized INT8 flash attention (sm_90a only). Returns
// not_available for operands TMA cannot describe (16-byte aligned bases and strides).
Status launch_fwd_sm90(const FwdParams& p, cudaStream_t stream);
// Test hook: the same 128x128 int32 score block through the sm90 smem layout and wgmma.
Status launch_qk_block_test_sm90(int head_dim, const int8_t* q8, const int8_t* k8, int32_t* s,
                                 cudaStream_t stream);

// Test hook: one 128x128 int32 score block through the sm80 QK^T fragment code.
Status launch_qk_block_test_sm80(int head_dim, const int8_t* q8, const int8_t* k8, int32_t* s,
                                 cudaStream_t stream);

// Turns the last CUDA error into a Status naming `what`.
Status check_cuda(cudaError_t err, const char* what);

}  // namespace intfa::cuda
