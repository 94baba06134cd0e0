// Test and benchmark inputs: the distributions of design.md §4, generated on the host in BHSD
// order and rounded to the working dtype, plus the accuracy metrics and the work a mask leaves.
// Shared by the CLI and the tests; includes only the public header.
#pragma once

#include <algorithm>
#include <cstdint>
#include <string>
#include <vector>

#include "intfa/intfa.h"

namespace intfa::tools {

enum class Dist { normal, uniform, llm };
const char* to_string(Dist);
bool parse_dist(const std::string&, Dist*);

// Host tensor of 16-bit floats (fp16 or bf16 bits) in BHSD order [b, h, s, d].
struct HostQKV {
  int batch = 0, heads_q = 0, heads_kv = 0, seqlen_q = 0, seqlen_kv = 0, head_dim = 0;
  DType dtype = DType::bf16;
  std::vector<uint16_t> q, k, v;
  Tensor tq() { return make_tensor(q.data(), dtype, {batch, heads_q, seqlen_q, head_dim}); }
  Tensor tk() { return make_tensor(k.data(), dtype, {batch, heads_kv, seqlen_kv, head_dim}); }
  Tensor tv() { return make_tensor(v.data(), dtype, {batch, heads_kv, seqlen_kv, head_dim}); }
};

// normal: q,k,v ~ N(0,1); uniform: U[0,1); llm: q ~ N(0,1), k ~ N(0,1) + 4 b (b ~ N(0,1) per
// channel, per batch·head), v ~ N(0,1), then channels 0-3 of q and k times 10.
HostQKV make_inputs(Dist dist, int batch, int heads_q, int heads_kv, int seqlen_q, int seqlen_kv,
                    int head_dim, DType dtype, uint64_t seed);

// The same distributions with each (tensor, batch, head) slice drawn from a generator of its own
// (a splitmix64 stream seeded from `seed` and the slice; normals by Box-Muller), the slices on all
// host threads: other values than make_inputs', the same for any thread count. For shapes where
// only timing matters (intfa bench): make_inputs draws ~15-30M values per second on one core, so
// one bench shape of 800M values (B=4, H=32, N=16k, D=128) took ~30-60 s of a lent GPU machine
// before its first launch.
HostQKV make_inputs_parallel(Dist dist, int batch, int heads_q, int heads_kv, int seqlen_q, int seqlen_kv,
                             int head_dim, DType dtype, uint64_t seed);

float to_float(uint16_t bits, DType dtype);

struct Metrics {
  double rel_l2 = 0, rel_l1 = 0, cosine = 0, max_abs = 0, mean_rel = 0;
  int64_t nonfinite = 0;
};
// Compares `got` to `ref` (same length). mean_rel is the paper's mean relative error,
// mean(|got - ref| / (|ref| + eps)) with eps = 1e-3 * mean|ref| so near-zero outputs do not
// dominate it.
Metrics compare(const std::vector<double>& got, const std::vector<double>& ref);

// A paged copy of a contiguous BHSD host cache c (the tests' and the bench's paged KV) (seqlen cap, a multiple of `page`): each
// sequence's pages scattered over a pool in a shuffled order, with `spare` pages of garbage
// (bytes 0x7f, NaN scales) the table never names. k8 in `layout` ([P, Hkv, page, D] or
// [P, page, Hkv, D]); per-sequence parts (v_scale, k_mean) copied. vt_pad: V^T pages with rows
// of page + vt_pad bytes (a strided vt8 [P, Hkv, D, page]; the pad is garbage too).
struct PagedCopy {
  std::vector<int8_t> k8, vt8;
  std::vector<float> ks, vs, km;
  std::vector<int32_t> table;
  QuantizedQKV x;
  // seed 0: the pages in order (sequence b's page i is page b * max_pages + i).
  PagedCopy(const QuantizedQKV& c, int page, Layout layout, int spare, uint32_t seed, int vt_pad = 0);
  // Table entries of the pages past sequence b's first counts[b] tokens (clamped to [0, the
  // table's tokens]) set to -1: a call that touches only those tokens never reads them.
  template <typename Int>
  void drop_pages_past(const std::vector<Int>& counts) {
    const int64_t maxp = x.block_table.shape[1], page = x.k_scale.shape[2];
    for (size_t b = 0; b < counts.size(); ++b)
      for (int64_t i = (std::clamp<int64_t>(counts[b], 0, maxp * page) + page - 1) / page; i < maxp; ++i)
        table[b * maxp + i] = -1;
  }
  // Table entries of the pages wholly before sequence b's token firsts[b] set to -1: pages a
  // local layer's cache gave back once its window had passed them.
  template <typename Int>
  void drop_pages_before(const std::vector<Int>& firsts) {
    const int64_t maxp = x.block_table.shape[1], page = x.k_scale.shape[2];
    for (size_t b = 0; b < firsts.size(); ++b)
      for (int64_t i = 0; i < std::clamp<int64_t>(firsts[b], 0, maxp * page) / page; ++i) table[b * maxp + i] = -1;
  }
};

// Attention sinks for the CLI's --sinks runs (Options::sinks): one logit per query head,
// uniform in [kSinkLo, kSinkHi), from `seed` (drawn apart from make_inputs' values of the same
// seed). The range is about the log-sum-exp of rows of one to a few thousand N(0,1) keys, so the
// sink takes a real share of each row: neither negligible nor the whole softmax.
constexpr float kSinkLo = 0.f, kSinkHi = 8.f;
std::vector<float> make_sinks(int heads_q, uint64_t seed);

// Query-key pairs a mask leaves visible (the bench's TOPS count them): row r of sq sees the keys
// j of [0, skv) with r + skv - sq - left <= j <= r + skv - sq + right (the bottom-right
// diagonal; causal is right = 0; -1 leaves a side open: Options' window).
double visible_pairs(int sq, int skv, bool causal, int left, int right);

}  // namespace intfa::tools
