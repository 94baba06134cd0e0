// Host launcher template for the sm90 forward kernel; each fwd_sm90_d*_*.cu instantiates one
// (head dim, causal) pair, with and without key-range splits, the split kernels over paged KV
// caches (pages of a multiple of 128 tokens, or small: 16, 32 or 64), and the sliding-window
// kernels (causal, split, contiguous or paged).
#pragma once

#include "cuda/launchers.h"
#include "cuda/sm90/fwd_sm90.cuh"

#include <cstdio>
#include <cstdlib>

namespace intfa::sm90 {

template <int D, bool Causal, bool Split, bool Paged, bool Window, bool SmallPages, bool Softcap>
Status launch_fwd(const Params& prm, cudaStream_t stream) {
  static_assert(!Window || (Causal && Split), "windows run the causal split kernels");
  static_assert(!Paged || Split, "paged launches run the split kernels");
  auto kernel = fwd_kernel<D, Causal, Split, Paged, Window, SmallPages, Softcap>;
  // Launches that quantize Q themselves (FwdParams::q_in) take its staging rows on top.
  constexpr int kSmemMax = Smem<D>::kAllocFusedQ;
  static_assert(kSmemMax <= 227 * 1024, "shared memory of one sm90 CTA");
  const int smem = prm.p.q_in ? kSmemMax : Smem<D>::kAlloc;
  static cuda::PerDevice setup;
  int sms = 1;
  Status st = cuda::check_cuda(cuda::opt_in_smem_once(setup, kernel, kSmemMax), "sm90 forward: cudaFuncSetAttribute");
  if (st.ok()) st = cuda::check_cuda(cuda::device_sm_count(&sms), "sm90 forward: SM count");
  if (!st.ok()) return st;
  // Persistent: one CTA per SM walks the tiles (a CTA uses most of an SM's registers).
  // INTFA_SM90_GRID caps the grid, so that small test shapes (e.g. under compute-sanitizer) give
  // each CTA many tiles and wrap the tile ring.
  static const int grid_cap = [] {
    const char* e = std::getenv("INTFA_SM90_GRID");
    return e && std::atoi(e) > 0 ? std::atoi(e) : 0;
  }();
  if (grid_cap > 0 && grid_cap < sms) sms = grid_cap;
  const int grid = prm.num_units < sms ? prm.num_units : sms;
  // A programmatic dependent of the stream's previous kernel (the quantizer in attention()): the
  // CTAs initialize their barriers while it ends and wait for its writes before any load.
  static cuda::PerDevice pdl_fwd, pdl_combine;
  st = cuda::check_cuda(cuda::launch_dependent(pdl_fwd, kernel, dim3(grid), kThreads, smem, stream, prm),
                        "sm90 forward kernel launch");
  if (!st.ok()) return st;
  if (Split && prm.num_splits > 1)
    return cuda::check_cuda(cuda::launch_dependent(pdl_combine, combine_kernel<D, Causal>,
                                                   dim3(unsigned(prm.num_tiles * (kBlockM / 4))), 128, 0, stream, prm),
                            "sm90 split combine kernel launch");
#if INTFA_SM90_TRACE
  static int traced = 0;
  static const int trace_at = [] {
    const char* e = std::getenv("INTFA_SM90_TRACE_AT");
    return e ? std::atoi(e) : 3;
  }();
  if (traced++ == trace_at && cudaStreamSynchronize(stream) == cudaSuccess) {
    long long tr[2][kTraceIters][kTracePhases];
    if (cudaMemcpyFromSymbol(tr, g_trace, sizeof(tr)) == cudaSuccess)
      for (int i = 1; i < kTraceIters; ++i)
        for (int w = 0; w < 2; ++w) {
          // 0 start, 1 V ready, 2 max done, 3 P done, 4 PV done (turn + issue + wait), 5 QK done
          const long long* x = tr[w][i];
          std::printf("trace wg%d it%2d: vwait %5lld max %5lld exp %5lld pv %5lld qk %5lld | period %5lld\n", w, i,
                      x[1] - x[0], x[2] - x[1], x[3] - x[2], x[4] - x[3], x[5] - x[4], x[0] - tr[w][i - 1][0]);
          // Last block of a tile: 4 PV + fold done, 6 next tile decoded, 5 epilogue done, 7 Q landed
          // (epilogue: 8 slice free, 9 rows written, 10 written rows visible to the copies)
          if (x[6] != 0)
            std::printf("  tile end wg%d: next tile %5lld epilogue %5lld (bar1 %lld writes %lld bar2 %lld store %lld)"
                        " q wait %5lld first QK %5lld\n", w, x[6] - x[4], x[5] - x[6], x[8] - x[6], x[9] - x[8],
                        x[10] - x[9], x[5] - x[10], x[7] - x[5], tr[w][i + 1 < kTraceIters ? i + 1 : i][0] - x[7]);
        }
  }
#endif
  return cuda::check_cuda(cudaGetLastError(), "sm90 forward kernel launch");
}

}  // namespace intfa::sm90
