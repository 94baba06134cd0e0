// Host launcher template for the sm90 forward kernel; each fwd_sm90_d*_*.cu instantiates one.
#pragma once

#include "cuda/launchers.h"
#include "cuda/sm90/fwd_sm90.cuh"

namespace intfa::sm90 {

int device_sm_count();  // fwd_sm90_launch.cu

template <int D, bool Causal>
Status launch_fwd(const Params& prm, cudaStream_t stream) {
  auto kernel = fwd_kernel<D, Causal>;
  constexpr int kSmem = Smem<D>::kAlloc;
  // Above 48 KB a kernel must opt in to dynamic shared memory (once per process is enough).
  static const cudaError_t attr_err =
      cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kSmem);
  Status st = cuda::check_cuda(attr_err, "sm90 forward: cudaFuncSetAttribute");
  if (!st.ok()) return st;
  // Persistent: one CTA per SM walks the tiles (a CTA uses most of an SM's registers).
  const int grid = prm.num_tiles < device_sm_count() ? prm.num_tiles : device_sm_count();
  kernel<<<grid, kThreads, kSmem, stream>>>(prm);
  return cuda::check_cuda(cudaGetLastError(), "sm90 forward kernel launch");
}

}  // namespace intfa::sm90
