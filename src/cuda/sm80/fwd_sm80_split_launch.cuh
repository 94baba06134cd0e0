// Host launcher template of the sm80 split kernels (key-range splits, fwd_sm80.cuh); each
// fwd_sm80_d256_*_split.cu instantiates one. Kept out of fwd_sm80_launch.cuh so the whole-tile
// instantiations do not compile the split kernels too.
#pragma once

#include "cuda/sm80/fwd_sm80_launch.cuh"

namespace intfa::sm80 {

// The split launch: the partial rows' scratch (units x kBlockM rows of (m, l) and D floats; at
// most ~2 x the CTA slots units, fwd::split_count: ~17 MB at D = 256 on 132 SMs), the split
// kernel, then combine_kernel as its programmatic dependent.
template <int D, bool Causal, bool Paged, bool SmallPages, bool Softcap>
Status launch_fwd_split(const FwdParams& p, int num_splits, cudaStream_t stream) {
  auto kernel = fwd_kernel<D, Causal, Paged, SmallPages, true, Softcap>;
  constexpr int kSmem = Smem<D>::kBytes;
  static cuda::PerDevice setup;
  Status st = cuda::check_cuda(cuda::opt_in_smem_once(setup, kernel, kSmem), "sm80 forward: cudaFuncSetAttribute");
  if (!st.ok()) return st;
  Params prm;
  prm.p = p;
  prm.num_splits = num_splits;
  const int64_t tiles = query_tiles(p);
  prm.num_tiles = static_cast<int>(tiles);  // < 2^30 (choose_splits)
  dim3 grid;
  st = make_grid(p, Causal, num_splits, &grid);
  if (!st.ok()) return st;
  const size_t rows = size_t(tiles) * num_splits * kBlockM;
  void* scratch = nullptr;
  st = cuda::scratch_alloc(&scratch, rows * (sizeof(float2) + sizeof(float) * D), stream, "sm80 forward: partial rows");
  if (!st.ok()) return st;
  prm.part_ml = static_cast<float2*>(scratch);
  prm.part_o = reinterpret_cast<float*>(prm.part_ml + rows);
  kernel<<<grid, kThreads, kSmem, stream>>>(prm);
  st = cuda::check_cuda(cudaGetLastError(), "sm80 split forward kernel launch");
  if (st.ok()) {
    static cuda::PerDevice pdl_combine;
    st = cuda::check_cuda(cuda::launch_dependent(pdl_combine, combine_kernel<D>,
                                                 dim3(static_cast<unsigned>(tiles * (kBlockM / 4))), 128, 0, stream,
                                                 prm),
                          "sm80 split combine kernel launch");
  }
  const Status fst = cuda::scratch_free(scratch, stream, "sm80 forward: partial rows");
  return st.ok() ? fst : st;
}

}  // namespace intfa::sm80
