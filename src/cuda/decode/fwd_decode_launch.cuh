// Host launcher template for the decode kernel; fwd_decode_d{64_s3,128_s3,128_s4,256_s2}[_paged].cu,
// fwd_decode_d{64_s3,128_s3,256_s2}_paged_small.cu and fwd_decode_d{64_s3,128_s3,256_s2}_softcap*.cu
// instantiate one (head dim, ring depth, contiguous KV / pages / pages smaller than a key block,
// soft-capping) each.
#pragma once

#include "cuda/decode/fwd_decode.cuh"
#include "cuda/launchers.h"

namespace intfa::decode {

// Resident CTAs per SM of the kernel for head dim D (cached per device), for the split rule.
template <int D, int Stages, bool Paged, bool SmallPages, bool Softcap>
Status occupancy(int* ctas) {
  static cuda::PerDevice cache;
  using S = Smem<D, Stages>;
  return cuda::check_cuda(cuda::once_per_device(cache, [](int, int* n) {
    cudaError_t e = cudaFuncSetAttribute(fwd_kernel<D, Stages, Paged, SmallPages, Softcap>, cudaFuncAttributeMaxDynamicSharedMemorySize, S::kBytes);
    if (e == cudaSuccess)
      e = cudaOccupancyMaxActiveBlocksPerMultiprocessor(n, fwd_kernel<D, Stages, Paged, SmallPages, Softcap>, kThreads, S::kBytes);
    return e;
  }, ctas), "decode forward: occupancy");
}

template <int D, int Stages, bool Paged, bool SmallPages, bool Softcap>
Status launch_fwd(const Params& prm, cudaStream_t stream) {
  int ctas = 0;  // also opts the kernel in to its shared memory
  Status st = occupancy<D, Stages, Paged, SmallPages, Softcap>(&ctas);
  if (!st.ok()) return st;
  // A programmatic dependent of the step's previous kernel (quantize_q, append_kv): its CTAs set
  // up while that kernel ends and wait for its writes at the top.
  static cuda::PerDevice pdl_fwd, pdl_combine;
  st = cuda::check_cuda(cuda::launch_dependent(pdl_fwd, fwd_kernel<D, Stages, Paged, SmallPages, Softcap>, dim3(prm.num_units),
                                               kThreads, Smem<D, Stages>::kBytes, stream, prm),
                        "decode forward kernel launch");
  if (!st.ok() || prm.num_splits == 1) return st;
  const int64_t blocks = int64_t(prm.p.batch) * prm.p.heads_q * (kRows / 4);
  return cuda::check_cuda(cuda::launch_dependent(pdl_combine, combine_kernel<D>, dim3(static_cast<unsigned>(blocks)), 128,
                                                 0, stream, prm),
                          "decode split combine kernel launch");
}

}  // namespace intfa::decode
