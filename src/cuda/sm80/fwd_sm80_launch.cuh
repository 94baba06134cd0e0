// Host launcher template for the sm80 forward kernel; each fwd_sm80_d*_*.cu instantiates one.
#pragma once

#include "cuda/launchers.h"
#include "cuda/sm80/fwd_sm80.cuh"

namespace intfa::sm80 {

template <int D, bool Causal>
Status launch_fwd(const FwdParams& p, cudaStream_t stream) {
  auto kernel = fwd_kernel<D, Causal>;
  constexpr int kSmem = Smem<D>::kBytes;
  // Above 48 KB a kernel must opt in to dynamic shared memory (once per device).
  static cuda::PerDevice setup;
  int unused = 0;
  Status st = cuda::check_cuda(cuda::once_per_device(setup, [&](int, int*) {
    return cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kSmem);
  }, &unused), "sm80 forward: cudaFuncSetAttribute");
  if (!st.ok()) return st;
  const dim3 grid((p.seqlen_q + kBlockM - 1) / kBlockM, p.heads_q, p.batch);
  kernel<<<grid, kThreads, kSmem, stream>>>(p);
  return cuda::check_cuda(cudaGetLastError(), "sm80 forward kernel launch");
}

}  // namespace intfa::sm80
