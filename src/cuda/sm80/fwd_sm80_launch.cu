// Dispatch of the sm80 forward kernel over its two compile-time axes (head dim, causal).
#include <type_traits>

#include "cuda/launchers.h"
#include "cuda/sm80/fwd_sm80.cuh"

namespace intfa::cuda {

Status launch_fwd_sm80(const FwdParams& p, cudaStream_t stream) {
  if (p.scheme == Scheme::half)
    return Status(StatusCode::not_available, "scheme: half is not available on the sm80 path");
  if (static_cast<int64_t>(p.batch) > 65535 || p.heads_q > 65535)
    return Status(StatusCode::invalid_argument, "batch/heads: the sm80 grid takes at most 65535 of each");
  const bool paged = p.block_table != nullptr;
  // Paged KV: a key block must lie in one page (one table entry per block). 128 for both GPU
  // paths (the decode kernel's block), which every sm80 block size divides.
  if (paged && p.page_size % 128 != 0)
    return Status(StatusCode::not_available, "block_table: the GPU sm80 path takes pages of a multiple of 128 "
                                             "tokens, got page_size " + std::to_string(p.page_size) +
                                                 " (the CPU backend takes multiples of 16)");
  static_assert(128 % sm80::kBlockN == 0, "pages of 128 keys hold whole key blocks");
  if (paged && p.cu_q)
    return Status(StatusCode::invalid_argument, "block_table: paged KV takes dense queries (no cu_seqlens_q)");
  auto launch = [&](auto d, auto causal) {
    constexpr int D = decltype(d)::value;
    constexpr bool C = decltype(causal)::value;
    return paged ? sm80::launch_fwd<D, C, true>(p, stream) : sm80::launch_fwd<D, C, false>(p, stream);
  };
  using T = std::true_type;
  using F = std::false_type;
  switch (p.head_dim) {
    case 64: return p.causal ? launch(std::integral_constant<int, 64>{}, T{}) : launch(std::integral_constant<int, 64>{}, F{});
    case 128: return p.causal ? launch(std::integral_constant<int, 128>{}, T{}) : launch(std::integral_constant<int, 128>{}, F{});
    default:
      return Status(StatusCode::invalid_argument,
                    "head_dim: expected 64 or 128 on the sm80 path, got " + std::to_string(p.head_dim));
  }
}

int sm80_block_n() { return sm80::kBlockN; }

Status launch_qk_block_test_sm80(int head_dim, const int8_t* q8, const int8_t* k8, int32_t* s,
                                 cudaStream_t stream) {
  if (head_dim == 64)
    sm80::qk_block_test_kernel<64><<<128 / sm80::kBlockM, sm80::kThreads, 0, stream>>>(q8, k8, s);
  else if (head_dim == 128)
    sm80::qk_block_test_kernel<128><<<128 / sm80::kBlockM, sm80::kThreads, 0, stream>>>(q8, k8, s);
  else
    return Status(StatusCode::invalid_argument, "head_dim: expected 64 or 128");
  return check_cuda(cudaGetLastError(), "qk block test kernel");
}

}  // namespace intfa::cuda
