// Work order of the fused quantization kernel: which item a ticket names. Host- and device-safe
// so the dependency rule below can be checked on the host.
//
// Items (one CTA each): a "chunk" is kChunk consecutive tokens of one head (dense: inside one
// sequence; varlen: of the packed tokens, so a chunk may span sequences).
//   stats(i)  reduces chunk i of K (fp64 channel sums) or V (channel amax) into per-(sequence,
//             head) accumulators and counts the tokens it added;
//   dep(i)    quantizes the same rows as stats(i) once every sequence in them is fully reduced;
//   kfree     paper scheme: K rows (no smoothing, no dependency);
//   q         Q rows (+ lse_offset, which needs the K mean of the sequence);
//   outputs   k_mean and v_scale of a block of sequences (also covers empty sequences).
// Tickets are taken in order from one counter, and an item only waits for items with smaller
// tickets, so the kernel cannot deadlock whatever the residency. In the fused order dep(i) comes
// right after stats(i + lag): its rows were read shortly before and are still in L2.
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
// (about half the grid) lets those stats finish before the dep item is taken.
INTFA_HD int64_t fused_lag(int64_t ns, int nso, int64_t span, int64_t slack) {
  const int64_t lag = static_cast<int64_t>(nso) * span + slack;
  return lag < ns ? lag : ns;
}

}  // namespace intfa::quant
