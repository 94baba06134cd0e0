// The forward kernels' work order and cuts (src/cuda/tile_order.h), checked on the host: the
// causal order visits every (head, row tile) once with the longest rows of a group first, and
// the key-range splits cover each tile's key blocks exactly once.
#include <gtest/gtest.h>

#include <vector>

#include "cuda/tile_order.h"

namespace intfa {
namespace {

TEST(TileOrder, CausalOrderIsABijectionLongestRowsFirstPerGroup) {
  for (int num_m : {1, 3, 8, 32, 128})
    for (int bh_count : {1, 2, 7, 64, 150})
      for (int group : {1, 4, 65, 150}) {
        if (group > bh_count) continue;
        SCOPED_TRACE("num_m " + std::to_string(num_m) + " heads " + std::to_string(bh_count) + " group " +
                     std::to_string(group));
        std::vector<int> seen(static_cast<size_t>(num_m) * bh_count, 0);
        int prev_group = -1, prev_mi = 0;
        for (int t = 0; t < num_m * bh_count; ++t) {
          int bh = -1, mi = -1;
          fwd::causal_tile(t, num_m, bh_count, group, bh, mi);
          ASSERT_GE(bh, 0);
          ASSERT_LT(bh, bh_count);
          ASSERT_GE(mi, 0);
          ASSERT_LT(mi, num_m);
          ++seen[static_cast<size_t>(bh) * num_m + mi];
          // Inside a group the rank never goes back: every head's longest tile before any shorter one.
          const int g = bh / group;
          if (g == prev_group) EXPECT_GE(mi, prev_mi);
          else EXPECT_EQ(g, prev_group + 1);
          prev_group = g;
          prev_mi = mi;
        }
        for (int v : seen) EXPECT_EQ(v, 1);
      }
}

TEST(TileOrder, CausalHeadGroupFitsTheBudgetAndTheHeads) {
  // 16 MiB of int8 K and V per group: 65 heads at N=1000, D=128; 4 at 16k.
  EXPECT_EQ(fwd::causal_head_group(2, 75, 1000, 128), 65);
  EXPECT_EQ(fwd::causal_head_group(4, 32, 16384, 128), 4);
  EXPECT_EQ(fwd::causal_head_group(1, 8, 1024, 64), 8);          // never more than the heads
  EXPECT_EQ(fwd::causal_head_group(1, 8, 1 << 20, 128), 1);      // never fewer than one
  EXPECT_EQ(fwd::causal_head_group(1, 8, 0, 128), 8);            // empty keys: no division by zero
}

TEST(TileOrder, SplitRangesCoverEveryKeyBlockOnce) {
  for (int n : {0, 1, 2, 5, 7, 16, 33, 128})
    for (int splits : {1, 2, 3, 4, 9, 19}) {
      int next = 0;
      for (int s = 0; s < splits; ++s) {
        int kb0 = -1, count = -1;
        fwd::split_range(n, splits, s, kb0, count);
        EXPECT_GE(count, 0);
        if (count > 0) {
          EXPECT_EQ(kb0, next) << "n " << n << " splits " << splits << " range " << s;
          next = kb0 + count;
        }
      }
      EXPECT_EQ(next, n) << "n " << n << " splits " << splits;
    }
}

TEST(TileOrder, SplitCountRule) {
  const int sms = 132;
  EXPECT_EQ(fwd::split_count(true, 32, 64, sms, 0), 2);     // B=1 H=2 N=4k: one wave of units
  EXPECT_EQ(fwd::split_count(true, 64, 64, sms, 0), 2);     // B=1 H=1 N=8k
  EXPECT_EQ(fwd::split_count(true, 256, 8, sms, 0), 16);    // few query tiles, long keys
  EXPECT_EQ(fwd::split_count(true, 40, 4, sms, 0), 10);     // at least 4 blocks per range
  EXPECT_EQ(fwd::split_count(true, 8, 64, sms, 0), 1);      // N=1k: too few blocks to pay
  EXPECT_EQ(fwd::split_count(true, 32, 67, sms, 0), 1);     // more than half a wave of tiles
  EXPECT_EQ(fwd::split_count(false, 256, 8, sms, 0), 1);    // paper: P against the running max
  EXPECT_EQ(fwd::split_count(true, 8, 1000, sms, 3), 3);    // forced (tests)
  EXPECT_EQ(fwd::split_count(true, 2, 1000, sms, 3), 2);    // forced, clamped to the key blocks
  EXPECT_EQ(fwd::split_count(false, 8, 10, sms, 3), 1);     // forced never splits paper
  for (int blocks = 1; blocks <= 300; blocks += 7)
    for (int tiles = 1; tiles <= 140; tiles += 3) {
      const int s = fwd::split_count(true, blocks, tiles, sms, 0);
      EXPECT_GE(s, 1);
      if (s > 1) {
        EXPECT_LE(s * tiles, sms);
        EXPECT_GE(blocks / s, 4);
      }
    }
}

}  // namespace
}  // namespace intfa
