// The GPU quantizer's work order (src/cuda/quant/quantize_schedule.h), checked on the host: every
// item is handed out exactly once, and in the fused single-launch order (the default) a
// quantization item only ever waits for statistics items with smaller tickets, taken at least
// `slack` tickets earlier. The kernel relies on the first property for its output and on the
// second for never deadlocking whatever the residency (a CTA only waits for the statistics of
// its next item, all at smaller tickets, and runs every item it holds before that one without
// waiting).
#include <gtest/gtest.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "cuda/quant/quantize_schedule.h"

namespace intfa::quant {
namespace {

// Dense problem: `seqs` sequences of `cps` chunks each, per kv head; nso statistics ops (K mean
// and/or V amax). Stats/dep index = (h * chunks + c) * nso + op, chunk c of sequence c / cps.
struct Dense {
  int heads, seqs, cps, nso;
  int64_t chunks() const { return int64_t(seqs) * cps; }
  int64_t ns() const { return int64_t(nso) * heads * chunks(); }
  int64_t seq_of(int64_t index) const { return (index / nso) % chunks() / cps; }
  int64_t head_of(int64_t index) const { return index / nso / chunks(); }
};

void check_fused(const Dense& d, int64_t slack, int nq) {
  Schedule s;
  s.ns = d.ns();
  s.nkf = 0;
  s.nq = nq;
  s.no = 3;
  s.lag = fused_lag(s.ns, d.nso, d.cps, slack);
  ASSERT_GE(s.lag, 0);
  ASSERT_LE(s.lag, s.ns);
  std::vector<int64_t> stats_ticket(s.ns, -1), dep_ticket(s.ns, -1);
  int64_t tails = 0;
  for (int64_t t = 0; t < s.fused_tickets(); ++t) {
    const Item it = fused_item(s, t);
    switch (it.kind) {
      case ItemKind::stats:
        ASSERT_LT(it.index, s.ns);
        ASSERT_EQ(stats_ticket[it.index], -1) << "stats " << it.index << " handed out twice";
        stats_ticket[it.index] = t;
        break;
      case ItemKind::dep:
        ASSERT_LT(it.index, s.ns);
        ASSERT_EQ(dep_ticket[it.index], -1) << "dep " << it.index << " handed out twice";
        dep_ticket[it.index] = t;
        break;
      case ItemKind::none:
        FAIL() << "ticket " << t << " of " << s.fused_tickets() << " names no item";
        break;
      default:
        ++tails;
        break;
    }
  }
  EXPECT_EQ(tails, s.nkf + s.nq + s.no);
  for (int64_t i = 0; i < s.ns; ++i) {
    ASSERT_NE(stats_ticket[i], -1) << "stats " << i << " never handed out";
    ASSERT_NE(dep_ticket[i], -1) << "dep " << i << " never handed out";
  }
  // dep(i) waits for every stats item of its (head, op, sequence).
  for (int64_t i = 0; i < s.ns; ++i) {
    int64_t last = -1;
    for (int64_t k = 0; k < s.ns; ++k)
      if (k % d.nso == i % d.nso && d.head_of(k) == d.head_of(i) && d.seq_of(k) == d.seq_of(i))
        last = std::max(last, stats_ticket[k]);
    ASSERT_LT(last, dep_ticket[i]) << "dep " << i << " would wait for a later ticket";
    if (s.lag < s.ns)  // all stats first when the lag covers them: nothing to keep apart
      EXPECT_GE(dep_ticket[i] - last, slack) << "dep " << i << " follows its last dependency too closely";
  }
}

TEST(QuantSchedule, FusedOrderHandsOutEveryItemOnceAndWaitsOnlyBackwards) {
  for (int nso : {1, 2})
    for (int64_t slack : {0, 1, 7, 132, 396})
      for (const Dense& d : {Dense{1, 1, 1, nso}, Dense{2, 3, 5, nso}, Dense{4, 2, 32, nso},
                             Dense{3, 7, 1, nso}, Dense{8, 4, 16, nso}})
        check_fused(d, slack, 11);
}

TEST(QuantSchedule, SplitOrderHandsOutEveryItemOnce) {
  Schedule s;
  s.ns = 40;
  s.nkf = 6;
  s.nq = 9;
  s.no = 2;
  std::vector<int> seen(s.ns, 0);
  int64_t tails = 0;
  for (int64_t t = 0; t < s.split_quant_tickets(); ++t) {
    const Item it = split_quant_item(s, t);
    if (it.kind == ItemKind::dep) ++seen[it.index];
    else if (it.kind == ItemKind::none) ADD_FAILURE() << "ticket " << t << " names no item";
    else ++tails;
  }
  for (int64_t i = 0; i < s.ns; ++i) EXPECT_EQ(seen[i], 1) << "dep " << i;
  EXPECT_EQ(tails, s.nkf + s.nq + s.no);
  EXPECT_EQ(s.split_stats_tickets(), s.ns);
}

}  // namespace
}  // namespace intfa::quant
