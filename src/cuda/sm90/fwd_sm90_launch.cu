// Dispatch of the sm90 forward kernel: TMA descriptors for Q, K and V^T, then one of the
// (head dim, causal) instantiations.
#include <cudaTypedefs.h>

#include <algorithm>
#include <cstdlib>
#include <string>

#include "cuda/launchers.h"
#include "cuda/sm90/fwd_sm90.cuh"

namespace intfa::sm90 {
namespace {

// cuTensorMapEncodeTiled from the driver through the runtime, so the library needs no -lcuda.
PFN_cuTensorMapEncodeTiled_v12000 encode_fn() {
  static PFN_cuTensorMapEncodeTiled_v12000 fn = [] {
    void* f = nullptr;
    cudaDriverEntryPointQueryResult q = cudaDriverEntryPointSymbolNotFound;
    if (cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &f, 12000, cudaEnableDefault, &q) !=
            cudaSuccess ||
        q != cudaDriverEntryPointSuccess)
      return static_cast<PFN_cuTensorMapEncodeTiled_v12000>(nullptr);
    return reinterpret_cast<PFN_cuTensorMapEncodeTiled_v12000>(f);
  }();
  return fn;
}

// A 4-D map of int8 (or 16-bit) elements {d0 (contiguous), d1, d2, d3} with byte strides s1..s3
// and a box of {b0, b1, 1, 1}. A dimension of extent 1 takes a harmless stride (TMA wants
// multiples of 16). map null: only the checks (check_fwd_sm90, before the quantizer's launch,
// where host time leaves the GPU idle).
Status encode_4d(CUtensorMap* map, const void* ptr, const char* what, const uint64_t (&dim)[4],
                 int64_t s1, int64_t s2, int64_t s3, uint32_t b0, uint32_t b1, CUtensorMapSwizzle swz,
                 CUtensorMapDataType type = CU_TENSOR_MAP_DATA_TYPE_UINT8) {
  if (dim[2] == 1) s2 = s1 * static_cast<int64_t>(dim[1]);
  if (dim[3] == 1) s3 = s2 * static_cast<int64_t>(dim[2]);
  const int64_t strides[3] = {s1, s2, s3};
  // A string, not a stream: a launch encodes several maps, and constructing a stream costs
  // ~0.3 us of host time each (api::MessageStream).
  std::string why;
  if (reinterpret_cast<uintptr_t>(ptr) % 16 != 0) why = "base address not 16-byte aligned";
  for (int i = 0; i < 3 && why.empty(); ++i)
    if (strides[i] <= 0 || strides[i] % 16 != 0 || strides[i] >= (int64_t(1) << 40))
      why = "stride " + std::to_string(strides[i]) + " bytes is not a positive multiple of 16";
  if (!why.empty()) return Status(StatusCode::not_available, std::string("sm90 path: ") + what + ": " + why);
  auto fn = encode_fn();
  if (!fn) return Status(StatusCode::not_available, "sm90 path: the driver has no cuTensorMapEncodeTiled");
  if (!map) return Status::OK();
  const cuuint64_t gdim[4] = {dim[0], dim[1], dim[2], dim[3]};
  const cuuint64_t gstride[3] = {cuuint64_t(s1), cuuint64_t(s2), cuuint64_t(s3)};
  const cuuint32_t box[4] = {b0, b1, 1, 1};
  const cuuint32_t estride[4] = {1, 1, 1, 1};
  const CUresult r = fn(map, type, 4, const_cast<void*>(ptr), gdim, gstride, box,
                        estride, CU_TENSOR_MAP_INTERLEAVE_NONE, swz, CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
                        CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  if (r != CUDA_SUCCESS)
    return Status(StatusCode::not_available,
                  std::string("sm90 path: ") + what + ": cuTensorMapEncodeTiled failed (" + std::to_string(r) + ")");
  return Status::OK();
}

// Exclusive prefix sum over the block's threads (blockDim.x a multiple of 32, <= 1024); *total
// receives the block's sum. Every thread must call it.
__device__ int block_exclusive_scan(int v, int* total) {
  __shared__ int warp_sums[32];
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, warps = blockDim.x / 32;
  int x = v;
#pragma unroll
  for (int d = 1; d < 32; d *= 2) {
    const int y = __shfl_up_sync(0xffffffffu, x, d);
    if (lane >= d) x += y;
  }
  if (lane == 31) warp_sums[warp] = x;
  __syncthreads();
  if (warp == 0) {
    int w = lane < warps ? warp_sums[lane] : 0;
#pragma unroll
    for (int d = 1; d < 32; d *= 2) {
      const int y = __shfl_up_sync(0xffffffffu, w, d);
      if (lane >= d) w += y;
    }
    if (lane < warps) warp_sums[lane] = w;
  }
  __syncthreads();
  const int before = (warp > 0 ? warp_sums[warp - 1] : 0) + x - v;
  *total = warp_sums[warps - 1];
  __syncthreads();  // warp_sums is reused by the next call
  return before;
}

// The work order of a varlen launch, before it on the stream (one block): every query tile
// {sequence, row block} once, sorted by the key blocks it sees (most first; a counting sort, so
// tiles of equal length come in any order, which only moves where they run), and the tile
// counter zeroed. header = {tile counter, tile count}; first = per-sequence first tile (nseq + 1).
// Tiles whose rows see no key (empty key sequences) come last: their rows still get zeros and
// LSE -inf. A sequence counts at most max_q rows (the launch's row blocks), and at most `cap`
// tiles are listed, so cu_seqlens that contradict max_seqlen_q or total_q cannot write past the
// scratch (their rows past max_q are not computed, as before this order existed).
__global__ void __launch_bounds__(1024) varlen_order_kernel(const int32_t* cu_q, const int32_t* cu_kv, int nseq,
                                                            int max_q, bool causal, int bins, int cap, int* header,
                                                            int* first, int2* entries) {
  extern __shared__ int hist[];  // bins counters, then their start positions
  for (int i = threadIdx.x; i < bins; i += blockDim.x) hist[i] = 0;
  int carry = 0;
  for (int b0 = 0; b0 < nseq; b0 += blockDim.x) {
    const int b = b0 + threadIdx.x;
    const int rows = b < nseq ? min(max(cu_q[b + 1] - cu_q[b], 0), max_q) : 0;
    int chunk = 0;
    const int before = block_exclusive_scan((rows + kBlockM - 1) / kBlockM, &chunk);
    if (b < nseq) first[b] = carry + before;
    carry += chunk;
  }
  const int nt = min(carry, cap);
  if (threadIdx.x == 0) first[nseq] = carry;
  __syncthreads();  // first[] and hist[] complete
  // Tile e: sequence b with first[b] <= e < first[b + 1], its key blocks.
  auto tile_of = [&](int e, int& b, int& mb) {
    int lo = 0, hi = nseq - 1;
    while (lo < hi) {
      const int mid = (lo + hi + 1) / 2;
      if (first[mid] <= e) lo = mid;
      else hi = mid - 1;
    }
    b = lo;
    mb = e - first[b];
    const int sq = min(max(cu_q[b + 1] - cu_q[b], 0), max_q), skv = cu_kv[b + 1] - cu_kv[b];
    const int end = causal ? min(skv, (mb + 1) * kBlockM + skv - sq) : skv;
    const int blocks = end > 0 ? (end + kBlockN - 1) / kBlockN : 0;
    return min(blocks, bins - 1);
  };
  for (int e = threadIdx.x; e < nt; e += blockDim.x) {
    int b, mb;
    atomicAdd(&hist[tile_of(e, b, mb)], 1);
  }
  __syncthreads();
  // Start of each bin, the longest bins first: a scan over the reversed bins.
  carry = 0;
  for (int i0 = 0; i0 < bins; i0 += blockDim.x) {
    const int i = bins - 1 - (i0 + int(threadIdx.x));
    const int n = i >= 0 ? hist[i] : 0;
    int chunk = 0;
    const int before = block_exclusive_scan(n, &chunk);
    if (i >= 0) hist[i] = carry + before;
    carry += chunk;
  }
  __syncthreads();
  for (int e = threadIdx.x; e < nt; e += blockDim.x) {
    int b, mb;
    const int bin = tile_of(e, b, mb);
    entries[atomicAdd(&hist[bin], 1)] = make_int2(b, mb);
  }
  if (threadIdx.x == 0) {
    header[0] = 0;
    header[1] = nt;
  }
}

}  // namespace

// fwd::split_count with the INTFA_SM90_SPLITS override (tests) read once.
int choose_splits(const FwdParams& p, int num_tiles, int sms) {
  static const int forced = [] {
    const char* e = std::getenv("INTFA_SM90_SPLITS");
    return e ? std::atoi(e) : 0;
  }();
  const int key_blocks = fwd::window_key_blocks(p, p.row_period > 0 ? p.row_period : kBlockM, kBlockN,
                                                (p.seqlen_kv + kBlockN - 1) / kBlockN);
  return fwd::split_count(p.scheme == Scheme::accurate, key_blocks, num_tiles, sms, forced);
}

// Q and K rows (D bytes) swizzled to their width, V^T rows (kBlockN = 128 keys) with 128-byte
// swizzle, as the wgmma descriptors expect. Out-of-range boxes are zero-filled. Head dim 256:
// Q and K boxes of 128-byte half rows (the kernel loads both halves), V^T boxes of one pass's
// 128 channels (kVPasses).
// encode false: the checks only (the maps are left unset).
Status make_params(const FwdParams& p, bool small, Params* prm, bool encode = true) {
  prm->p = p;
  const uint64_t D = p.head_dim;
  const bool varlen = p.cu_q != nullptr;
  const CUtensorMapSwizzle swz = D >= 128 ? CU_TENSOR_MAP_SWIZZLE_128B : CU_TENSOR_MAP_SWIZZLE_64B;
  // Q / K box rows (128-byte halves at D = 256) and V^T box rows (one pass's channels): both
  // min(D, 128) bytes or rows.
  const uint32_t row_box = uint32_t(std::min<uint64_t>(D, 128));
  const uint64_t tq = varlen ? p.total_q : p.seqlen_q, tk = varlen ? p.total_kv : p.seqlen_kv;
  const uint64_t nb = varlen ? 1 : p.batch;
  // Fused Q (p.q_in): the fp16 / bf16 rows unswizzled, read by the consumers' plain loads.
  Status st = p.q_in ? encode_4d(encode ? &prm->tm_q : nullptr, p.q_in, "q", {D, tq, uint64_t(p.heads_q), nb}, 2 * p.qin_st.ts,
                                 2 * p.qin_st.hs, 2 * p.qin_st.bs, uint32_t(D), kBlockM, CU_TENSOR_MAP_SWIZZLE_NONE,
                                 CU_TENSOR_MAP_DATA_TYPE_UINT16)
                     : encode_4d(encode ? &prm->tm_q : nullptr, p.q8, "q8", {D, tq, uint64_t(p.heads_q), nb}, p.q_st.ts, p.q_st.hs,
                                 p.q_st.bs, row_box, kBlockM, swz);
  // Paged KV: the maps span the page pools (page_size tokens by num_pages pages, a box of
  // kBlockN keys inside one page); the kernel's batch coordinate is then the block's page. Pages
  // smaller than a key block (small, as check_paged reports it; fwd_kernel's SmallPages): a K
  // box is one page, and V^T has no map (the permute warps copy it).
  const bool paged = p.block_table != nullptr;
  const uint64_t kv_tokens = paged ? uint64_t(p.page_size) : tk, kv_batch = paged ? uint64_t(p.num_pages) : nb;
  if (st.ok())
    st = encode_4d(encode ? &prm->tm_k : nullptr, p.k8, "k8", {D, kv_tokens, uint64_t(p.heads_kv), kv_batch}, p.k_st.ts, p.k_st.hs,
                   p.k_st.bs, row_box, small ? uint32_t(p.page_size) : kBlockN, swz);
  const uint64_t cols = paged    ? uint64_t(p.page_size)
                        : varlen ? uint64_t(vt_varlen_columns(p.total_kv, p.batch))
                                 : uint64_t(p.seqlen_kv);
  if (st.ok() && !small)
    st = encode_4d(encode ? &prm->tm_v : nullptr, p.vt8, "vt8", {cols, D, uint64_t(p.heads_kv), kv_batch}, p.vt_st.ts, p.vt_st.hs,
                   p.vt_st.bs, kBlockN, row_box, CU_TENSOR_MAP_SWIZZLE_128B);
  if (!st.ok()) return st;
  prm->num_m_blocks = (p.seqlen_q + kBlockM - 1) / kBlockM;
  const int64_t tiles = int64_t(prm->num_m_blocks) * p.heads_q * p.batch;
  // Tile indices (and a tile counter that runs up to a grid past the last tile) stay in int.
  if (tiles * sm90::value_passes(p.head_dim) >= (int64_t(1) << 30))
    return Status(StatusCode::invalid_argument, "sm90 path: more than 2^30 query tiles");
  prm->num_tiles = static_cast<int>(tiles);
  // Varlen: the head group over one sequence's heads (the tiles of one entry run for every head).
  if (p.causal || varlen)
    prm->head_group = fwd::causal_head_group(varlen ? 1 : p.batch, p.heads_q, p.seqlen_kv, p.head_dim);
  return Status::OK();
}

}  // namespace intfa::sm90

namespace intfa::cuda {
namespace {

// What launch_fwd_sm90 refuses (not_available) before it launches, and the kernel's parameters
// (with encode false, all but the TMA maps).
Status prepare_sm90(const FwdParams& p, sm90::Params* prm, bool* small, bool encode) {
  if (p.scheme == Scheme::half)
    return Status(StatusCode::not_available, "scheme: half is not available on the sm90 path");
  // Head dim 256: every kernel in two value-channel passes (sm90::kVPasses), with int8 Q; fused
  // Q (its staging rows do not fit) runs the quantizer.
  if (Status st = check_head_dim(p, "sm90"); !st.ok()) return st;
  if (p.head_dim == 256 && p.q_in)
    return Status(StatusCode::not_available,
                  "sm90 path: head_dim 256 with Q quantized in the kernel is not built (the quantizer runs it)");
  // Paged KV: a key block (one TMA box) lies in one page, or spans pages of 16, 32 or 64 tokens.
  if (Status st = check_paged(p, "sm90", sm90::kBlockN, small); !st.ok()) return st;
  // TMA needs 16-byte aligned bases and strides: other tensors are refused (not_available), and
  // the automatic path then runs them on sm80.
  return sm90::make_params(p, *small, prm, encode);
}

// The sm90 instantiations of one head dim (one .cu file each): kLaunch [causal][whole tiles,
// split, split over pages, split over small pages]; sliding windows and soft-capping (the window
// kernels' Softcap instantiations) [contiguous, paged, small pages].
template <int D>
struct Kernels {
  using L = Status (*)(const sm90::Params&, cudaStream_t);
  static constexpr L kLaunch[2][4] = {
      {sm90::launch_fwd<D, false, false, false>, sm90::launch_fwd<D, false, true, false>,
       sm90::launch_fwd<D, false, true, true>, sm90::launch_fwd<D, false, true, true, false, true>},
      {sm90::launch_fwd<D, true, false, false>, sm90::launch_fwd<D, true, true, false>,
       sm90::launch_fwd<D, true, true, true>, sm90::launch_fwd<D, true, true, true, false, true>}};
  static constexpr L kWindow[3] = {sm90::launch_fwd<D, true, true, false, true>, sm90::launch_fwd<D, true, true, true, true>,
                                   sm90::launch_fwd<D, true, true, true, true, true>};
  static constexpr L kSoftcap[3] = {sm90::launch_fwd<D, true, true, false, true, false, true>,
                                    sm90::launch_fwd<D, true, true, true, true, false, true>,
                                    sm90::launch_fwd<D, true, true, true, true, true, true>};
};

}  // namespace

Status check_fwd_sm90(const FwdParams& p) {
  sm90::Params prm;
  bool small = false;
  return prepare_sm90(p, &prm, &small, false);
}

Status launch_fwd_sm90(const FwdParams& p, cudaStream_t stream, bool automatic) {
  const bool paged = p.block_table != nullptr;
  bool small = false;
  sm90::Params prm;
  Status st = prepare_sm90(p, &prm, &small, true);
  if (!st.ok() || prm.num_tiles == 0) return st;
  int sms = 1;
  st = check_cuda(device_sm_count(&sms), "sm90 forward: SM count");
  if (!st.ok()) return st;
  prm.num_splits = sm90::choose_splits(p, prm.num_tiles, sms);
  // Head dim 256 on path auto: calls of one key range per tile (whole tiles, sliding windows,
  // pages, key counts, sinks; H200, 4k causal, window 1023: 362 against sm80's 300 TOPS; the
  // others 1.1-1.5x, PERF_LOG s45). Soft-capping measured equal (315 / 317 TOPS) and calls the
  // split rule cuts into ranges slower (B=1 over 32k keys 0.099 against 0.071 ms: each pass
  // redoes a range's QK^T and softmax; PERF_LOG s44): those go to sm80.
  if (automatic && p.head_dim == 256 && (p.softcap > 0.f || prm.num_splits > 1))
    return Status(StatusCode::not_available, "sm90 path: head_dim 256 with soft-capping or key-range splits runs "
                                             "faster on sm80 (path auto)");
  // Only the split kernels read per-sequence key counts (decode_tile), pages, a sliding window's
  // left edge and sinks; with one range (the rule's choice, and always for paper) they write
  // final rows as the whole-tile kernels do.
  // Soft-capping runs the window kernels (split kernels), with or without a window.
  const bool softcap = p.softcap > 0.f;
  const bool window = p.window_left >= 0 || softcap;
  const bool split_kernel = prm.num_splits > 1 || p.seqused_kv != nullptr || paged || window || p.sinks;
  prm.num_units = prm.num_tiles * prm.num_splits * sm90::value_passes(p.head_dim);
  // Scratch: [tile counter, tile count | (m, l) per split and row | O per split and row | varlen:
  // first tile per sequence, tile entries]. Causal and varlen units are handed out by the counter
  // (sm90::kDynamic), so an SM that drew short tiles takes more: a static stride left causal 4k
  // ~10% idle in a simulation with the measured per-tile costs. Varlen launches run the causal
  // kernels (prm.diag_shift when not causal) in the order varlen_order_kernel builds, so no CTA
  // walks the empty tiles of short sequences and the longest tiles go first. H200, three uneven
  // batches of 8-16 sequences (docs/PERF_LOG.md s26): 0-6% less time non-causal, 1-15% causal.
  const bool varlen = p.cu_q != nullptr;
  // Sliding windows run the causal split kernels too: the right edge is the diagonal moved by
  // window_right (0 for plain causal), or past every key when there is none.
  const bool causal_kernel = p.causal || varlen || window;
  if (causal_kernel) prm.diag_shift = p.causal ? p.window_right : kNoEdge;
  const bool dynamic = causal_kernel ? sm90::kDynamic<true> : sm90::kDynamic<false>;
  // Partial rows per (tile, key range): head dim 256's two passes write the halves of one row.
  const size_t part_rows = prm.num_splits > 1 ? size_t(prm.num_tiles) * prm.num_splits * sm90::kBlockM : 0;
  const size_t ml_off = 16, o_off = ml_off + part_rows * sizeof(float2);
  const size_t first_off = o_off + part_rows * p.head_dim * sizeof(float);
  // Tiles of a varlen launch: sum of ceil(rows / kBlockM) <= total_q / kBlockM + nseq.
  const int64_t max_entries = varlen ? p.total_q / sm90::kBlockM + p.batch : 0;
  const size_t entries_off = (first_off + (varlen ? size_t(p.batch + 1) * sizeof(int) : 0) + 15) / 16 * 16;
  const size_t bytes = entries_off + size_t(max_entries) * sizeof(int2);
  void* scratch = nullptr;
  if (dynamic || part_rows > 0) {
    st = scratch_alloc(&scratch, bytes, stream, "sm90 forward: scratch");
    if (!st.ok()) return st;
    char* base = static_cast<char*>(scratch);
    if (varlen) {
      // Bins of the counting sort by key blocks (one int each in shared memory); longer tiles
      // share the last bin.
      const int bins = std::min((p.seqlen_kv + sm90::kBlockN - 1) / sm90::kBlockN + 1, 8192);
      prm.tile_counter = reinterpret_cast<int*>(base);
      prm.entry_count = prm.tile_counter + 1;
      prm.entries = reinterpret_cast<const int2*>(base + entries_off);
      sm90::varlen_order_kernel<<<1, 1024, bins * sizeof(int), stream>>>(
          p.cu_q, p.cu_kv, p.batch, p.seqlen_q, p.causal, bins, static_cast<int>(max_entries), prm.tile_counter,
          reinterpret_cast<int*>(base + first_off), reinterpret_cast<int2*>(base + entries_off));
      st = check_cuda(cudaGetLastError(), "sm90 forward: varlen tile order");
    } else if (dynamic) {
      prm.tile_counter = reinterpret_cast<int*>(base);
      st = check_cuda(cudaMemsetAsync(prm.tile_counter, 0, sizeof(int), stream), "sm90 forward: tile counter");
    }
    if (part_rows > 0) {
      prm.part_ml = reinterpret_cast<float2*>(base + ml_off);
      prm.part_o = reinterpret_cast<float*>(base + o_off);
    }
  }
  if (st.ok()) {
    const int pages = small ? 2 : paged ? 1 : 0;  // contiguous, paged, small pages
    const int kernel = paged ? 1 + pages : split_kernel ? 1 : 0;
    auto run = [&](auto kernels) {
      using K = decltype(kernels);
      return softcap  ? K::kSoftcap[pages](prm, stream)
             : window ? K::kWindow[pages](prm, stream)
                      : K::kLaunch[causal_kernel][kernel](prm, stream);
    };
    st = p.head_dim == 64    ? run(Kernels<64>{})
         : p.head_dim == 128 ? run(Kernels<128>{})
                             : run(Kernels<256>{});
  }
  if (!scratch) return st;
  const Status fst = scratch_free(scratch, stream, "sm90 forward: scratch");
  return st.ok() ? fst : st;
}

Status launch_qk_block_test_sm90(int head_dim, const int8_t* q8, const int8_t* k8, int32_t* s,
                                 cudaStream_t stream) {
  if (head_dim == 64)
    sm90::qk_block_test_kernel<64><<<2, 128, 0, stream>>>(q8, k8, s);
  else if (head_dim == 128)
    sm90::qk_block_test_kernel<128><<<2, 128, 0, stream>>>(q8, k8, s);
  else
    return Status(StatusCode::invalid_argument, "head_dim: expected 64 or 128");
  return check_cuda(cudaGetLastError(), "sm90 qk block test kernel");
}

}  // namespace intfa::cuda
