// Dispatch of the decode kernel: the shapes it takes, the key-range split, the partials' scratch.
#include <cstdlib>
#include <string>
#include <type_traits>

#include "cuda/decode/fwd_decode.cuh"
#include "cuda/launchers.h"
#include "cuda/tile_order.h"

namespace intfa::cuda {
namespace {

// Calls f(D, Stages, Paged, SmallPages, Softcap), as std::integral_constant arguments, for the
// decode kernel a launch of head dim 64, 128 or 256, ring depth `stages` (4 only at D = 128, and
// not with pages smaller than a block or soft-capping; always 2 at D = 256) and contiguous KV,
// pages of a multiple of the key block or smaller pages runs: the one place that maps those to
// an instantiation.
template <typename F>
Status with_kernel(int head_dim, int stages, bool paged, bool small, bool softcap, F&& f) {
  using std::integral_constant;
  using Yes = std::true_type;
  using No = std::false_type;
  auto pick = [&](auto d, auto s, auto sc) {
    if (!paged) return f(d, s, No{}, No{}, sc);
    if constexpr (decltype(s)::value != 4)
      if (small) return f(d, s, Yes{}, Yes{}, sc);
    return f(d, s, Yes{}, No{}, sc);
  };
  // The 2- and 3-stage kernels come with and without soft-capping and for every page kind, the
  // 4-stage one (D = 128) only without either.
  auto pick_all = [&](auto d, auto s) { return softcap ? pick(d, s, Yes{}) : pick(d, s, No{}); };
  const integral_constant<int, 3> s3;
  if (head_dim == 64) return pick_all(integral_constant<int, 64>{}, s3);
  if (head_dim == 256) return pick_all(integral_constant<int, 256>{}, integral_constant<int, 2>{});
  if (stages == 4 && !small && !softcap) return pick(integral_constant<int, 128>{}, integral_constant<int, 4>{}, No{});
  return pick_all(integral_constant<int, 128>{}, s3);
}

}  // namespace

int decode_block_n() { return decode::kSameBlocksAsSm80 ? decode::kBlockN : 0; }

bool decode_takes(const FwdParams& p) {
  return decode::kSameBlocksAsSm80 && p.scheme != Scheme::half &&
         (p.head_dim == 64 || p.head_dim == 128 || p.head_dim == 256) && p.seqlen_q >= 1 &&
         p.seqlen_q <= decode::kRows;
}

Status launch_fwd_decode(const FwdParams& p, cudaStream_t stream) {
  if (p.scheme == Scheme::half)
    return Status(StatusCode::not_available, "scheme: half is not available on the decode path");
  if (!decode::kSameBlocksAsSm80)
    return Status(StatusCode::not_available, "path: decode needs the sm80 kernel's 128-key blocks (this build "
                                             "sets INTFA_SM80_BLOCK_N to another size)");
  if (Status st = check_head_dim(p, "decode"); !st.ok()) return st;
  if (p.seqlen_q > decode::kRows)
    return Status(StatusCode::not_available,
                  "path: decode takes at most " + std::to_string(decode::kRows) +
                      " query rows per (batch, K/V head) after GQA packing (heads_q / heads_kv x seqlen_q, or "
                      "seqlen_q when the heads cannot pack), got " + std::to_string(p.seqlen_q) +
                      "; use path auto, sm80 or sm90");
  const bool paged = p.block_table != nullptr, softcap = p.softcap > 0.f;
  bool small = false;  // pages of 16, 32 or 64 tokens: the SmallPages kernels
  if (Status st = check_paged(p, "decode", decode::kBlockN, &small); !st.ok()) return st;
  if (p.seqlen_q < 1 || p.batch < 1) return Status::OK();
  // Shared memory: D = 128 takes ~100 KB (three 32 KB stages), D = 256 ~134 KB (two 64 KB
  // stages), more than sm_86 / sm_89 give one block (99 KB); there the automatic path runs the
  // prefill kernel instead. 4 stages only where they fit.
  static PerDevice smem_cache;
  int smem_max = 0;
  Status st = check_cuda(once_per_device(smem_cache, [](int dev, int* n) {
    return cudaDeviceGetAttribute(n, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev);
  }, &smem_max), "decode forward: shared memory per block");
  if (!st.ok()) return st;
  const bool d128 = p.head_dim == 128;
  // The ring depth of every launch but D = 128's 4-stage ones: 3, at D = 256 2 (64 KB stages, one
  // CTA per SM either way; H200, docs/PERF_LOG.md d15: 3 stages took 7-10% longer, the ~65 KB
  // more of shared memory leaving less L1 for the spilled registers, which is a guess).
  const int base_stages = p.head_dim == 256 ? 2 : 3;
  const int smem_need = p.head_dim == 64    ? decode::Smem<64, 3>::kBytes
                        : p.head_dim == 128 ? decode::Smem<128, 3>::kBytes
                                            : decode::Smem<256, 2>::kBytes;
  const int smem4 = decode::Smem<128, 4>::kBytes;
  if (smem_need > smem_max)
    return Status(StatusCode::not_available, "path: decode needs " + std::to_string(smem_need) +
                                                 " bytes of shared memory per block at head_dim " +
                                                 std::to_string(p.head_dim) + ", the device allows " +
                                                 std::to_string(smem_max) + "; use path auto, sm80 or sm90");
  decode::Params prm;
  prm.p = p;
  const long long heads = static_cast<long long>(p.batch) * p.heads_q;
  int sms = 1, ctas = 1;
  st = check_cuda(device_sm_count(&sms), "decode forward: SM count");
  // Resident CTAs per SM of the kernel a launch of `stages` would run.
  auto occupancy = [&](int stages, int* n) {
    return with_kernel(p.head_dim, stages, paged, small, softcap, [&](auto d, auto s, auto pg, auto sp, auto sc) {
      return decode::occupancy<decltype(d)::value, decltype(s)::value, decltype(pg)::value, decltype(sp)::value,
                               decltype(sc)::value>(n);
    });
  };
  if (st.ok()) st = occupancy(base_stages, &ctas);
  if (!st.ok()) return st;
  // INTFA_DECODE_SPLITS forces the ranges per head, INTFA_DECODE_STAGES (3 or 4, D = 128) the ring
  // depth (tests, sanitizer runs, A/B timing).
  static const int forced = [] {
    const char* e = std::getenv("INTFA_DECODE_SPLITS");
    return e ? std::atoi(e) : 0;
  }();
  static const int forced_stages = [] {
    const char* e = std::getenv("INTFA_DECODE_STAGES");
    return e ? std::atoi(e) : 0;
  }();
  const int key_blocks = fwd::window_key_blocks(p, p.row_period > 0 ? p.row_period : p.seqlen_q, decode::kBlockN,
                                                (p.seqlen_kv + decode::kBlockN - 1) / decode::kBlockN);
  const bool accurate = p.scheme == Scheme::accurate;
  prm.num_splits = fwd::decode_split_count(accurate, key_blocks, heads, sms * ctas, forced);
  // Ring depth: at D = 128, 4 stages where the 3-stage launch is at most one wave (few long
  // units: one CTA per SM streams with three blocks in flight), 3 where units queue (two CTAs
  // per SM then overlap one's compute with the other's loads). H200, Hq = 32, Hkv = 8, kernel
  // ms, 3 stages -> this rule (docs/PERF_LOG.md d4): B = 1 with 32k keys 0.041 -> 0.038,
  // B = 16 with 8k 0.083 -> 0.078, B = 64 with 2k (two waves, 3 stages) 0.081 either way. At
  // D = 64 (16 KB stages, four CTAs per SM at 3 stages) 4 stages gained nowhere and lost 20% at
  // B = 64 with 2k, so D = 64 has only the 3-stage kernel.
  int stages = heads * prm.num_splits <= static_cast<long long>(sms) * ctas ? 4 : 3;
  if (forced_stages == 3 || forced_stages == 4) stages = forced_stages;
  // Pages smaller than a block: 3 stages always (two CTAs per SM hid the longer load issue of
  // the first small-page loader, one entry per K row; H200, B = 16 with 8k keys, page 64 / 32 /
  // 16: 4 stages 0.107 / 0.123 / 0.166 ms, 3 stages 0.088 / 0.095 / 0.117; no 4-stage kernel
  // for them, not re-measured with SmallPageTile).
  // Soft-capping: 3 stages (its one instantiation per head dim and page kind).
  if (!d128 || smem4 > smem_max || small || softcap) stages = base_stages;
  if (stages == 4) {
    st = occupancy(4, &ctas);
    if (!st.ok()) return st;
    prm.num_splits = fwd::decode_split_count(accurate, key_blocks, heads, sms * ctas, forced);
  }
  const long long units = heads * prm.num_splits;
  // Grid limits: the units, and the combine kernel's heads x kRows / 4 blocks.
  if (units >= (1LL << 31) || (prm.num_splits > 1 && heads * (decode::kRows / 4) >= (1LL << 31)))
    return Status(StatusCode::invalid_argument, "decode path: more than 2^31 - 1 (batch, head, key range) units");
  prm.num_units = static_cast<int>(units);
  void* scratch = nullptr;
  if (prm.num_splits > 1) {
    const size_t rows = size_t(units) * decode::kRows;
    st = scratch_alloc(&scratch, rows * (sizeof(float2) + sizeof(float) * p.head_dim), stream,
                       "decode forward: partial rows");
    if (!st.ok()) return st;
    prm.part_ml = static_cast<float2*>(scratch);
    prm.part_o = reinterpret_cast<float*>(prm.part_ml + rows);
  }
  st = with_kernel(p.head_dim, stages, paged, small, softcap, [&](auto d, auto s, auto pg, auto sp, auto sc) {
    return decode::launch_fwd<decltype(d)::value, decltype(s)::value, decltype(pg)::value, decltype(sp)::value,
                              decltype(sc)::value>(prm, stream);
  });
  if (!scratch) return st;
  const Status fst = scratch_free(scratch, stream, "decode forward: partial rows");
  return st.ok() ? fst : st;
}

}  // namespace intfa::cuda
