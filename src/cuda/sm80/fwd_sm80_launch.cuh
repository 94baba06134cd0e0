// Host launcher template for the sm80 forward kernel; each fwd_sm80_d*_*.cu instantiates one.
#pragma once

#include "cuda/launchers.h"
#include "cuda/sm80/fwd_sm80.cuh"

namespace intfa::sm80 {

template <int D, bool Causal, bool Paged, bool SmallPages>
Status launch_fwd(const FwdParams& p, cudaStream_t stream) {
  auto kernel = fwd_kernel<D, Causal, Paged, SmallPages>;
  constexpr int kSmem = Smem<D>::kBytes;
  static cuda::PerDevice setup;
  Status st = cuda::check_cuda(cuda::opt_in_smem_once(setup, kernel, kSmem), "sm80 forward: cudaFuncSetAttribute");
  if (!st.ok()) return st;
  const int num_m = (p.seqlen_q + kBlockM - 1) / kBlockM;
  // Causal: one dimension in the kernel's longest-first order (fwd::causal_tile), which the
  // hardware hands out in index order as SMs free up.
  const int64_t tiles = int64_t(num_m) * p.heads_q * p.batch;
  if (Causal && tiles >= (int64_t(1) << 31))
    return Status(StatusCode::invalid_argument, "sm80 path: more than 2^31 - 1 causal query tiles");
  const dim3 grid = Causal ? dim3(static_cast<unsigned>(tiles)) : dim3(num_m, p.heads_q, p.batch);
  kernel<<<grid, kThreads, kSmem, stream>>>(p);
  return cuda::check_cuda(cudaGetLastError(), "sm80 forward kernel launch");
}

}  // namespace intfa::sm80
