// Dispatch of the decode kernel: the shapes it takes, the key-range split, the partials' scratch.
#include <cstdlib>
#include <string>

#include "cuda/decode/fwd_decode.cuh"
#include "cuda/launchers.h"
#include "cuda/tile_order.h"

namespace intfa::cuda {

bool decode_takes(const FwdParams& p) {
  return decode::kSameBlocksAsSm80 && p.scheme != Scheme::half && (p.head_dim == 64 || p.head_dim == 128) &&
         p.seqlen_q >= 1 && p.seqlen_q <= decode::kRows;
}

Status launch_fwd_decode(const FwdParams& p, cudaStream_t stream) {
  if (p.scheme == Scheme::half)
    return Status(StatusCode::not_available, "scheme: half is not available on the decode path");
  if (!decode::kSameBlocksAsSm80)
    return Status(StatusCode::not_available, "path: decode needs the sm80 kernel's 128-key blocks (this build "
                                             "sets INTFA_SM80_BLOCK_N to another size)");
  if (p.head_dim != 64 && p.head_dim != 128)
    return Status(StatusCode::invalid_argument,
                  "head_dim: expected 64 or 128 on the decode path, got " + std::to_string(p.head_dim));
  if (p.seqlen_q > decode::kRows)
    return Status(StatusCode::not_available,
                  "path: decode takes at most " + std::to_string(decode::kRows) +
                      " query rows per (batch, K/V head) after GQA packing (heads_q / heads_kv x seqlen_q, or "
                      "seqlen_q when the heads cannot pack), got " + std::to_string(p.seqlen_q) +
                      "; use path auto, sm80 or sm90");
  if (p.seqlen_q < 1 || p.batch < 1) return Status::OK();
  // Shared memory: D = 128 takes ~100 KB (three 32 KB stages), more than sm_86 / sm_89 give one
  // block (99 KB); there the automatic path runs the prefill kernel instead.
  static PerDevice smem_cache;
  int smem_max = 0;
  Status st = check_cuda(once_per_device(smem_cache, [](int dev, int* n) {
    return cudaDeviceGetAttribute(n, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev);
  }, &smem_max), "decode forward: shared memory per block");
  if (!st.ok()) return st;
  const int smem_need = p.head_dim == 128 ? decode::Smem<128>::kBytes : decode::Smem<64>::kBytes;
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
  if (st.ok()) st = p.head_dim == 128 ? decode::occupancy<128>(&ctas) : decode::occupancy<64>(&ctas);
  if (!st.ok()) return st;
  // INTFA_DECODE_SPLITS forces the ranges per head (tests, sanitizer runs).
  static const int forced = [] {
    const char* e = std::getenv("INTFA_DECODE_SPLITS");
    return e ? std::atoi(e) : 0;
  }();
  const int key_blocks = (p.seqlen_kv + decode::kBlockN - 1) / decode::kBlockN;
  prm.num_splits = fwd::decode_split_count(p.scheme == Scheme::accurate, key_blocks, heads, sms * ctas, forced);
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
  st = p.head_dim == 128 ? decode::launch_fwd<128>(prm, stream) : decode::launch_fwd<64>(prm, stream);
  if (!scratch) return st;
  const Status fst = scratch_free(scratch, stream, "decode forward: partial rows");
  return st.ok() ? fst : st;
}

}  // namespace intfa::cuda
