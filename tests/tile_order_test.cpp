// The forward kernels' work order and cuts (src/cuda/tile_order.h), checked on the host: the
// causal order visits every (head, row tile) once with the longest rows of a group first, and
// the key-range splits cover each tile's key blocks exactly once.
#include <gtest/gtest.h>

#include <algorithm>
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

// The decode kernel's ranges per head: whole waves of alike units (H200: 132 SMs x 3 CTAs).
TEST(TileOrder, DecodeSplitCountRule) {
  const int slots = 396;
  EXPECT_EQ(fwd::decode_split_count(true, 64, 128, slots, 0), 3);   // B=16 Hkv=8 8k: 384 units, one wave
  EXPECT_EQ(fwd::decode_split_count(true, 256, 8, slots, 0), 43);   // B=1 Hkv=8 32k: 344 units
  EXPECT_EQ(fwd::decode_split_count(true, 16, 512, slots, 0), 2);   // B=64 2k: 3 waves of 8 blocks
  EXPECT_EQ(fwd::decode_split_count(true, 1, 8, slots, 0), 1);      // one block
  EXPECT_EQ(fwd::decode_split_count(false, 256, 8, slots, 0), 1);   // paper: P against the running max
  EXPECT_EQ(fwd::decode_split_count(true, 8, 1000, slots, 3), 3);   // forced (tests)
  EXPECT_EQ(fwd::decode_split_count(true, 2, 1000, slots, 3), 2);   // forced, clamped to the blocks
  EXPECT_EQ(fwd::decode_split_count(false, 8, 10, slots, 3), 1);    // forced never splits paper
  for (int blocks = 1; blocks <= 600; blocks += 13)
    for (long long heads = 1; heads <= 5000; heads = heads * 3 + 1) {
      const int s = fwd::decode_split_count(true, blocks, heads, slots, 0);
      EXPECT_GE(s, 1);
      EXPECT_LE(s, blocks);
      // The model's time (waves x (blocks per range + 1)) no worse than one range per head or
      // one block per range.
      auto cost = [&](long long r) { return (heads * r + slots - 1) / slots * ((blocks + r - 1) / r + 1); };
      EXPECT_LE(cost(s), cost(1));
      if (blocks <= 1024) EXPECT_LE(cost(s), cost(blocks));
    }
  // The rule visits one count per run of equal waves; a scan of every count up to 1024 (the
  // rule's definition) picks the same, ties to the fewer ranges included.
  auto scan = [](int blocks, long long heads, int slots) {
    int best = 1;
    long long best_cost = -1;
    for (int s = 1; s <= blocks && s <= 1024; ++s) {
      const long long cost = (heads * s + slots - 1) / slots * ((blocks + s - 1) / s + 1);
      if (best_cost < 0 || cost < best_cost) best = s, best_cost = cost;
    }
    return best;
  };
  for (int sl : {1, 7, 132, 264, 396, 528})
    for (int blocks : {2, 3, 5, 16, 17, 31, 64, 100, 255, 256, 1000, 1024, 1025, 4096, 100000})
      for (long long heads : {1LL, 2LL, 3LL, 8LL, 31LL, 64LL, 133LL, 512LL, 2048LL, 100000LL})
        EXPECT_EQ(fwd::decode_split_count(true, blocks, heads, sl, 0), scan(blocks, heads, sl))
            << "blocks " << blocks << " heads " << heads << " slots " << sl;
}

// Query positions of packed rows: within one period, across a boundary, over several periods,
// and unpacked.
TEST(TileOrder, RowPositions) {
  int lo = 0, hi = 0;
  fwd::row_positions(0, 127, 0, lo, hi);
  EXPECT_EQ(lo, 0); EXPECT_EQ(hi, 127);
  fwd::row_positions(128, 255, 0, lo, hi);
  EXPECT_EQ(lo, 128); EXPECT_EQ(hi, 255);
  fwd::row_positions(200, 215, 100, lo, hi);  // rows 200..215 of 100-row heads: positions 0..15
  EXPECT_EQ(lo, 0); EXPECT_EQ(hi, 15);
  fwd::row_positions(128, 143, 100, lo, hi);  // 28..43
  EXPECT_EQ(lo, 28); EXPECT_EQ(hi, 43);
  fwd::row_positions(192, 207, 100, lo, hi);  // 92..99, then 0..7: crosses a head
  EXPECT_EQ(lo, 0); EXPECT_EQ(hi, 99);
  fwd::row_positions(0, 127, 5, lo, hi);      // many heads of 5 rows
  EXPECT_EQ(lo, 0); EXPECT_EQ(hi, 4);
  for (int period : {1, 3, 16, 100, 1000})
    for (int r0 = 0; r0 < 300; r0 += 7) {
      const int r1 = r0 + 15;
      fwd::row_positions(r0, r1, period, lo, hi);
      int want_lo = period, want_hi = -1;
      for (int r = r0; r <= r1; ++r) {
        want_lo = std::min(want_lo, r % period);
        want_hi = std::max(want_hi, r % period);
      }
      EXPECT_EQ(lo, want_lo) << period << " " << r0;
      EXPECT_EQ(hi, want_hi) << period << " " << r0;
      EXPECT_EQ(fwd::lowest_position(r0, r1, period), want_lo);
      // The causal key range of those rows: every row's own last key (position + diag), capped.
      const int skv = 250, diag = fwd::causal_diag(skv, 7, period);
      EXPECT_EQ(diag, skv - period);
      int want_end = -(1 << 30);
      for (int r = r0; r <= r1; ++r) want_end = std::max(want_end, fwd::row_position(r, period) + diag + 1);
      EXPECT_EQ(fwd::causal_key_end(r0, r1, period, diag, skv), std::min(want_end, skv)) << period << " " << r0;
    }
  EXPECT_EQ(fwd::causal_diag(300, 40, 0), 260);  // unpacked: Skv - Sq
  EXPECT_EQ(fwd::causal_key_end(0, 9, 0, -20, 300), -10);  // rows that see no key
  EXPECT_EQ(fwd::row_position(17, 0), 17);
}

// GQA packing: every packed row addresses the query row it stands for (Q, O, row scales, LSE),
// the K/V head is the same, and layouts or masks that cannot pack are left as they were.
TEST(TileOrder, PackGqaRowsAddressesTheSameRows) {
  struct Cfg { int b, hq, hkv, sq, d; bool bshd, causal, lse; bool packs; };
  for (const Cfg& c : std::vector<Cfg>{{2, 8, 2, 100, 128, false, false, true, true},   // BHSD, tiles straddle heads
                                       {3, 32, 8, 1, 128, false, true, true, true},    // decode, causal = all keys
                                       {3, 32, 8, 1, 64, true, true, false, true},     // decode, BSHD
                                       {2, 8, 2, 100, 128, true, false, true, false},  // BSHD, Sq > 1
                                       {2, 8, 2, 100, 128, false, true, true, true},   // causal, Sq > 1: row_period
                                       {2, 8, 8, 100, 128, false, false, true, false}}) {  // MHA
    FwdParams p;
    p.batch = c.b; p.heads_q = c.hq; p.heads_kv = c.hkv; p.seqlen_q = c.sq; p.seqlen_kv = 300;
    p.head_dim = c.d; p.causal = c.causal;
    auto dense = [&](int64_t row_elems) {  // [b, h, s, .] or [b, s, h, .]
      Strides3 st;
      st.ts = c.bshd ? c.hq * row_elems : row_elems;
      st.hs = c.bshd ? row_elems : c.sq * row_elems;
      st.bs = int64_t(c.hq) * c.sq * row_elems;
      return st;
    };
    p.q_st = dense(c.d);
    p.o_st = dense(c.d);
    uint16_t q_in_dummy = 0;  // the sm90 kernel's own Q (FwdParams::q_in): packed with q8
    p.q_in = &q_in_dummy;
    p.qin_st = dense(c.d);
    Strides3 rows;  // q_scale, lse_offset, LSE: [b, h, s]
    rows.ts = 1; rows.hs = c.sq; rows.bs = int64_t(c.hq) * c.sq;
    p.qs_st = rows;
    float lse_dummy = 0.f;
    p.lse = c.lse ? &lse_dummy : nullptr;
    p.lse_st = rows;
    std::vector<float> sinks(c.hq);
    for (int h = 0; h < c.hq; ++h) sinks[h] = float(h);  // each head's sink names its head
    p.sinks = sinks.data();
    const FwdParams before = p;
    EXPECT_EQ(fwd::pack_gqa_rows(p), c.packs);
    if (!c.packs) {
      for (int h = 0; h < c.hq; ++h) EXPECT_EQ(sink_of(p, h, c.sq - 1), float(h));
      EXPECT_EQ(p.heads_q, before.heads_q);
      EXPECT_EQ(p.seqlen_q, before.seqlen_q);
      EXPECT_EQ(p.causal, before.causal);
      EXPECT_EQ(p.q_st.ts, before.q_st.ts);
      continue;
    }
    const int g = c.hq / c.hkv;
    EXPECT_EQ(p.heads_q, c.hkv);
    EXPECT_EQ(p.seqlen_q, g * c.sq);
    EXPECT_EQ(p.causal, c.causal && c.sq > 1);
    EXPECT_EQ(p.row_period, c.causal && c.sq > 1 ? c.sq : 0);
    for (int b = 0; b < c.b; ++b)
      for (int hk = 0; hk < c.hkv; ++hk)
        for (int r = 0; r < g * c.sq; ++r) {
          const int h = hk * g + r / c.sq, s = r % c.sq;
          auto at = [](const Strides3& st, int b_, int h_, int t_) { return b_ * st.bs + h_ * st.hs + t_ * st.ts; };
          ASSERT_EQ(at(p.q_st, b, hk, r), at(before.q_st, b, h, s));
          ASSERT_EQ(at(p.qin_st, b, hk, r), at(before.qin_st, b, h, s));
          ASSERT_EQ(at(p.o_st, b, hk, r), at(before.o_st, b, h, s));
          ASSERT_EQ(at(p.qs_st, b, hk, r), at(before.qs_st, b, h, s));
          if (c.lse) ASSERT_EQ(at(p.lse_st, b, hk, r), at(before.lse_st, b, h, s));
          ASSERT_EQ(sink_of(p, hk, r), float(h)) << "the sink of the row's query head";
          // The K/V head of the packed head is the query head's.
          ASSERT_EQ(hk / (p.heads_q / p.heads_kv), h / (before.heads_q / before.heads_kv));
        }
  }
}

// A Q the sm90 kernel quantizes itself (FwdParams::q_in) whose rows of a head do not follow
// each other (a padded head stride) keeps the call unpacked, even where q8's rows would pack:
// the kernel reads both through the same row numbers.
TEST(TileOrder, PackGqaRowsNeedsAPackableFusedQ) {
  FwdParams p;
  p.batch = 2; p.heads_q = 8; p.heads_kv = 2; p.seqlen_q = 100; p.seqlen_kv = 300; p.head_dim = 128;
  p.q_st = {8 * 100 * 128, 100 * 128, 128};
  p.o_st = p.q_st;
  p.qs_st = {8 * 100, 100, 1};
  uint16_t q_in_dummy = 0;
  p.q_in = &q_in_dummy;
  p.qin_st = {8 * (100 * 128 + 64), 100 * 128 + 64, 128};
  FwdParams q = p;
  EXPECT_FALSE(fwd::pack_gqa_rows(p));
  EXPECT_EQ(p.heads_q, 8);
  q.q_in = nullptr;  // without it (the quantizer made Q8) the same call packs
  EXPECT_TRUE(fwd::pack_gqa_rows(q));
  EXPECT_EQ(q.heads_q, 2);
}

}  // namespace
}  // namespace intfa
