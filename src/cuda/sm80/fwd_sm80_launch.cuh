// Host launcher template for the sm80 forward kernel; each fwd_sm80_d*_*.cu instantiates one
// (the *_split.cu files launch_fwd_split, fwd_sm80_split_launch.cuh).
#pragma once

#include <cstdlib>

#include "cuda/launchers.h"
#include "cuda/sm80/fwd_sm80.cuh"
#include "cuda/tile_order.h"

namespace intfa::sm80 {

// Query tiles of kBlockM rows: ceil(seqlen_q / kBlockM) per (batch, head).
inline int64_t query_tiles(const FwdParams& p) {
  return int64_t((p.seqlen_q + kBlockM - 1) / kBlockM) * p.heads_q * p.batch;
}

// Key ranges per query tile: fwd::split_count over the CTA slots (SMs x resident CTAs of the
// whole-tile kernel, which the split kernel matches: same threads, shared memory and register
// cap), with the INTFA_SM80_SPLITS override (tests, sanitizer runs) read once. Only for head dims
// with split kernels (kSplitsBuilt). The occupancy is the launched kernel's (Softcap included),
// which launch_fwd has opted in to its shared memory: another instantiation not yet launched in
// the process would report 0 resident CTAs, and so no split.
template <int D, bool Causal, bool Paged, bool SmallPages, bool Softcap>
Status choose_splits(const FwdParams& p, int64_t tiles, int* splits) {
  static_assert(kSplitsBuilt<D>, "no split kernels at this head dim");
  *splits = 1;
  if (tiles < 1 || tiles >= (int64_t(1) << 30)) return Status::OK();
  static const int forced = [] {
    const char* e = std::getenv("INTFA_SM80_SPLITS");
    return e ? std::atoi(e) : 0;
  }();
  static cuda::PerDevice occupancy;
  int sms = 1, ctas = 1;
  Status st = cuda::check_cuda(cuda::device_sm_count(&sms), "sm80 forward: SM count");
  if (st.ok())
    st = cuda::check_cuda(cuda::once_per_device(occupancy, [](int, int* n) {
      return cudaOccupancyMaxActiveBlocksPerMultiprocessor(n, fwd_kernel<D, Causal, Paged, SmallPages, false, Softcap>,
                                                           kThreads, Smem<D>::kBytes);
    }, &ctas), "sm80 forward: occupancy");
  if (!st.ok()) return st;
  constexpr int kBN = kBlockNFor<D>;
  const int key_blocks = fwd::window_key_blocks(p, p.row_period > 0 ? p.row_period : kBlockM, kBN,
                                                (p.seqlen_kv + kBN - 1) / kBN);
  *splits = fwd::split_count(p.scheme == Scheme::accurate, key_blocks, static_cast<int>(tiles), sms * ctas, forced);
  return Status::OK();
}

// The grid: causal kernels one dimension in the kernel's longest-first order (fwd::causal_tile),
// which the hardware hands out in index order as SMs free up; (row tile, head, batch) otherwise.
// Split kernels take num_splits units per tile along x.
inline Status make_grid(const FwdParams& p, bool causal, int num_splits, dim3* grid) {
  const int64_t units = query_tiles(p) * num_splits;
  if (causal && units >= (int64_t(1) << 31))
    return Status(StatusCode::invalid_argument, "sm80 path: more than 2^31 - 1 causal query tiles");
  const int num_m = (p.seqlen_q + kBlockM - 1) / kBlockM;
  *grid = causal ? dim3(static_cast<unsigned>(units)) : dim3(num_m * num_splits, p.heads_q, p.batch);
  return Status::OK();
}

template <int D, bool Causal, bool Paged, bool SmallPages, bool Softcap>
Status launch_fwd(const FwdParams& p, cudaStream_t stream) {
  auto kernel = fwd_kernel<D, Causal, Paged, SmallPages, false, Softcap>;
  constexpr int kSmem = Smem<D>::kBytes;
  static cuda::PerDevice setup;
  Status st = cuda::check_cuda(cuda::opt_in_smem_once(setup, kernel, kSmem), "sm80 forward: cudaFuncSetAttribute");
  if (!st.ok()) return st;
  if constexpr (kSplitsBuilt<D>) {
    int splits = 1;
    st = choose_splits<D, Causal, Paged, SmallPages, Softcap>(p, query_tiles(p), &splits);
    if (!st.ok()) return st;
    if (splits > 1) return launch_fwd_split<D, Causal, Paged, SmallPages, Softcap>(p, splits, stream);
  }
  dim3 grid;
  st = make_grid(p, Causal, 1, &grid);
  if (!st.ok()) return st;
  kernel<<<grid, kThreads, kSmem, stream>>>(p);
  return cuda::check_cuda(cudaGetLastError(), "sm80 forward kernel launch");
}

}  // namespace intfa::sm80
