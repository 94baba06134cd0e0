// Dispatch of the sm80 forward kernel over its compile-time axes (head dim, causal, paged KV).
#include "cuda/launchers.h"
#include "cuda/sm80/fwd_sm80.cuh"

namespace intfa::cuda {

Status launch_fwd_sm80(const FwdParams& p, cudaStream_t stream) {
  if (p.scheme == Scheme::half)
    return Status(StatusCode::not_available, "scheme: half is not available on the sm80 path");
  if (static_cast<int64_t>(p.batch) > 65535 || p.heads_q > 65535)
    return Status(StatusCode::invalid_argument, "batch/heads: the sm80 grid takes at most 65535 of each");
  // Paged KV: pages of a multiple of 128 keys (the decode and sm90 kernels' block), which the
  // sm80 block (64 or 128) divides, or of 16, 32 or 64 keys (the SmallPages kernels).
  static_assert(128 % sm80::kBlockN == 0, "pages of 128 keys hold whole key blocks");
  bool small = false;
  if (Status st = check_paged(p, "sm80", 128, &small); !st.ok()) return st;
  const int dim_index = p.head_dim == 64 ? 0 : p.head_dim == 128 ? 1 : p.head_dim == 256 ? 2 : -1;
  if (dim_index < 0)
    return Status(StatusCode::invalid_argument,
                  "head_dim: expected 64, 128 or 256 on the sm80 path, got " + std::to_string(p.head_dim));
  using L = Status (*)(const FwdParams&, cudaStream_t);
  const int pages = small ? 2 : p.block_table ? 1 : 0;
  if (p.softcap > 0.f) {
    // Soft-capping: the causal kernel (it runs non-causal calls, windows and sinks too) per head
    // dim and page kind; at D = 256 with its key-range splits (fwd_sm80_d256_softcap*_split.cu).
#define INTFA_SM80_SOFTCAP_ROW(D)                                                        \
  {sm80::launch_fwd<D, true, false, false, true>, sm80::launch_fwd<D, true, true, false, true>, \
   sm80::launch_fwd<D, true, true, true, true>}
    static constexpr L kSoftcap[3][3] = {INTFA_SM80_SOFTCAP_ROW(64), INTFA_SM80_SOFTCAP_ROW(128),
                                         INTFA_SM80_SOFTCAP_ROW(256)};
#undef INTFA_SM80_SOFTCAP_ROW
    return kSoftcap[dim_index][pages](p, stream);
  }
  // [head dim 64 / 128 / 256][causal kernel][contiguous, paged, pages smaller than 128 keys]. The
  // causal kernels also take sliding windows and sinks (non-causal calls with the diagonal past
  // every key, last_key): the non-causal kernels stay without them (H200, 4k D=128: 2.5% slower
  // with the sink fold in their epilogue).
  const bool causal_kernel = p.causal || p.window_left >= 0 || p.sinks != nullptr;
#define INTFA_SM80_ROW(D)                                                                                  \
  {{sm80::launch_fwd<D, false, false>, sm80::launch_fwd<D, false, true>, sm80::launch_fwd<D, false, true, true>}, \
   {sm80::launch_fwd<D, true, false>, sm80::launch_fwd<D, true, true>, sm80::launch_fwd<D, true, true, true>}}
  static constexpr L kLaunch[3][2][3] = {INTFA_SM80_ROW(64), INTFA_SM80_ROW(128), INTFA_SM80_ROW(256)};
#undef INTFA_SM80_ROW
  return kLaunch[dim_index][causal_kernel][pages](p, stream);
}

int sm80_block_n(int head_dim) {
  switch (head_dim) {
    case 64: return sm80::kBlockNFor<64>;
    case 128: return sm80::kBlockNFor<128>;
    case 256: return sm80::kBlockNFor<256>;
    default: return 0;
  }
}

Status launch_qk_block_test_sm80(int head_dim, const int8_t* q8, const int8_t* k8, int32_t* s,
                                 cudaStream_t stream) {
  if (head_dim == 64)
    sm80::qk_block_test_kernel<64><<<128 / sm80::kBlockM, sm80::kThreads, 0, stream>>>(q8, k8, s);
  else if (head_dim == 128)
    sm80::qk_block_test_kernel<128><<<128 / sm80::kBlockM, sm80::kThreads, 0, stream>>>(q8, k8, s);
  else if (head_dim == 256)
    sm80::qk_block_test_kernel<256><<<128 / sm80::kBlockM, sm80::kThreads, 0, stream>>>(q8, k8, s);
  else
    return Status(StatusCode::invalid_argument, "head_dim: expected 64, 128 or 256");
  return check_cuda(cudaGetLastError(), "qk block test kernel");
}

}  // namespace intfa::cuda
