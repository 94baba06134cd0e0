// Work order of the quantization kernel: which item a ticket names. Host- and device-safe so
// the dependency rule below can be checked on the host.
//
// Items (one CTA each): a "chunk" is kChunk consecutive rows of one head (dense: inside one
// sequence; varlen: of the packed columns, so a chunk may span sequences).
//   stats(i)  reduces chunk i of K (fp64 channel sums) or V (channel amax) into per-(sequence,
//             head) accumulators; the item that completes a sequence makes its final tables;
//   dep(i)    quantizes the same rows as stats(i) once every sequence in them is final;
//   kfree     paper scheme: K rows (no smoothing, no dependency);
//   q         Q rows (+ lse_offset, which needs the K mean of the sequence);
//   outputs   k_mean and v_scale entries no stats item writes (paper's k_mean, empty sequences).
// Split order: a first launch runs every stats item, a second one the rest.
// Fused order (one launch, the default): tickets are taken in order from one counter and an item only waits
// for items with smaller tickets, so it cannot deadlock whatever the residency; dep(i) comes
// right after stats(i + lag), while its rows are still in L2.
#pragma once

#include <cstdint>

#include "common/params.h"

namespace intfa::quant {

enum class ItemKind : int { stats, dep, kfree, q, outputs, none };

struct Item {
  ItemKind kind;
  int64_t index;
};

struct Schedule {
  int64_t ns = 0;   // stats items (= dep items): heads_kv * kv chunks * stats ops
  int64_t nkf = 0;  // free K items (paper only)
  int64_t nq = 0;   // Q items
  int64_t no = 0;   // output items
  int64_t lag = 0;  // fused order: dep(i) follows stats(i + lag); 0 <= lag <= ns

  INTFA_HD int64_t fused_tickets() const { return 2 * ns + nkf + nq + no; }
  INTFA_HD int64_t split_stats_tickets() const { return ns; }
  INTFA_HD int64_t split_quant_tickets() const { return ns + nkf + nq + no; }
};

// n / d for 0 <= n < 2^31 and a run-time constant d >= 1, without a division instruction
// (Granlund-Montgomery): with s = ceil(log2 d) and m = floor(2^32 (2^s - d) / d) + 1,
// n / d = (umulhi(n, m) + n) >> s; the sum fits 32 bits because umulhi(n, m) <= n < 2^31.
struct FastDiv {
  uint32_t d = 1, m = 0, s = 0;
  FastDiv() = default;
  INTFA_HD explicit FastDiv(uint32_t divisor) : d(divisor) {
    while ((uint64_t(1) << s) < divisor) ++s;
    m = static_cast<uint32_t>(((uint64_t(1) << 32) * ((uint64_t(1) << s) - divisor)) / divisor + 1);
  }
  INTFA_HD uint32_t div(uint32_t n) const {
#if defined(__CUDA_ARCH__)
    const uint32_t hi = __umulhi(n, m);
#else
    const uint32_t hi = static_cast<uint32_t>((uint64_t(n) * m) >> 32);
#endif
    return (hi + n) >> s;
  }
};

// Tail shared by both orders: free K rows, then Q rows, then the per-sequence outputs.
INTFA_HD Item tail_item(const Schedule& s, int64_t t) {
  if (t < s.nkf) return {ItemKind::kfree, t};
  t -= s.nkf;
  if (t < s.nq) return {ItemKind::q, t};
  t -= s.nq;
  if (t < s.no) return {ItemKind::outputs, t};
  return {ItemKind::none, 0};
}

// Fused order: stats(0..lag-1), then stats(lag + j) / dep(j) alternately, then the last deps.
INTFA_HD Item fused_item(const Schedule& s, int64_t t) {
  const int64_t L = s.lag, n = s.ns;
  if (t < L) return {ItemKind::stats, t};
  if (t < 2 * n - L) {
    const int64_t j = t - L;
    return (j % 2 == 0) ? Item{ItemKind::stats, L + j / 2} : Item{ItemKind::dep, j / 2};
  }
  if (t < 2 * n) return {ItemKind::dep, t - n};
  return tail_item(s, t - 2 * n);
}

// Split order, second launch: deps last-reduced first (the end of the stats launch is in L2).
INTFA_HD Item split_quant_item(const Schedule& s, int64_t t) {
  if (t < s.ns) return {ItemKind::dep, s.ns - 1 - t};
  return tail_item(s, t - s.ns);
}

// Lag that keeps every dependency of dep(i) at a smaller ticket: a sequence covers at most
// `span` chunks, so its stats items lie within nso * span of any of its dep items. `slack`
// (about a grid) lets those stats finish before the dep item is taken.
INTFA_HD int64_t fused_lag(int64_t ns, int nso, int64_t span, int64_t slack) {
  const int64_t lag = static_cast<int64_t>(nso) * span + slack;
  return lag < ns ? lag : ns;
}

}  // namespace intfa::quant
