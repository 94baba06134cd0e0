// Host launcher template for the sm80 forward kernel; each fwd_sm80_d*_*.cu instantiates one.
#pragma once

#include "cuda/launchers.h"
#include "cuda/sm80/fwd_sm80.cuh"

namespace intfa::sm80 {

template <int D, bool Causal>
Status launch_fwd(const FwdParams& p, cudaStream_t stream) {
  auto kernel = fwd_kernel<D, Causal>;
  constexpr int kSmem = Smem<D>::kBytes;
  static cuda::PerDevice setup;
  Status st = cuda::check_cuda(cuda::opt_in_smem_once(setup, kernel, kSmem), "sm80 forward: cudaFuncSetAttribute");
  if (!st.ok()) return st;
  const dim3 grid((p.seqlen_q + kBlockM - 1) / kBlockM, p.heads_q, p.batch);
  kernel<<<grid, kThreads, kSmem, stream>>>(p);
  return cuda::check_cuda(cudaGetLastError(), "sm80 forward kernel launch");
}

}  // namespace intfa::sm80
