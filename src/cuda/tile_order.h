// How the forward kernels order and cut their work: the causal tile order, the key-range splits
// (sm90 and decode), the rows' causal diagonals and the GQA row packing. Host- and device-safe,
// so the rules are checked on the host (tests/tile_order_test.cpp).
#pragma once

#include "common/params.h"

namespace intfa::fwd {

// Causal tile order. Causal tiles differ in length, and a launch whose last tiles are long
// leaves SMs idle at its end, so the longest rows go first: tile t of a launch with num_m row
// tiles per head maps to rank mi (0 = the last rows, which see the most keys) of head bh, rank
// by rank over a group of `group` heads, group after group. The group is sized so its heads'
// int8 K and V (what its concurrent tiles stream) fit in a third of a Hopper L2; the last group
// may be smaller. A simulation with the measured per-tile costs (B=4, H=32, D=128, 132 SMs,
// tiles handed out as SMs free up) puts the busy share at 0.99 at N=1k and 4k against
// 0.89 / 0.97 for head after head.
INTFA_HD int causal_head_group(int batch, int heads_q, int seqlen_kv, int head_dim) {
  const long long kv_bytes = 2LL * (seqlen_kv > 1 ? seqlen_kv : 1) * head_dim;
  const long long g = (16LL << 20) / kv_bytes, bh = static_cast<long long>(batch) * heads_q;
  return static_cast<int>(g < 1 ? 1 : g > bh ? bh : g);
}
INTFA_HD void causal_tile(int tile, int num_m, int bh_count, int group, int& bh, int& mi) {
  const int per = group * num_m;
  const int gi = tile / per, rem = tile - gi * per;
  const int left = bh_count - gi * group;
  const int gsz = group < left ? group : left;
  mi = rem / gsz;
  bh = gi * group + rem - mi * gsz;
}

// Key-range splits per tile (sm90). A launch with fewer tiles than SMs (few heads, short queries)
// would leave SMs idle, so each tile's key blocks are split into ranges that run as units of
// their own and are merged by a combine kernel: up to one wave of units, at least four key
// blocks per range, and only from 16 key blocks on. H200, same call, B=1 kernel ms without /
// with: H=2 N=4k D=128 0.072 / 0.057 (2 ranges), causal 0.076 / 0.059; H=8 N=1k 0.030 / 0.034
// (2 ranges of 4 blocks, an earlier rule: the second launch and the partial rows cost more than
// the halved loop saves). `accurate` only: `paper` quantizes P against the running max, which a
// range would restart, so its P8 would change. forced > 0 overrides (tests; clamped to the key
// blocks and to 2^30 units).
INTFA_HD int split_count(bool accurate, int key_blocks, int num_tiles, int sms, int forced) {
  if (!accurate || key_blocks < 2 || num_tiles < 1) return 1;
  if (forced > 0) {
    const int cap = (1 << 30) / num_tiles;
    const int s = forced < key_blocks ? forced : key_blocks;
    return s < cap ? s : (cap > 1 ? cap : 1);
  }
  if (2 * num_tiles > sms || key_blocks < 16) return 1;
  const int by_sms = sms / num_tiles, by_blocks = key_blocks / 4;
  return by_sms < by_blocks ? by_sms : by_blocks;
}

// The most key blocks (of block_n keys, aligned to key 0) that a tile of rows at `positions`
// consecutive query positions sees under a sliding window with both edges; key_blocks (the whole
// sequence) otherwise. The split rules size their ranges by it.
INTFA_HD int window_key_blocks(const FwdParams& p, int positions, int block_n, int key_blocks) {
  if (p.window_left < 0 || !p.causal) return key_blocks;
  const long long span = (long long)p.window_left + p.window_right + positions;
  const long long blocks = (span + block_n - 1) / block_n + 1;
  return blocks < key_blocks ? static_cast<int>(blocks) : key_blocks;
}

// Range `split` of a tile's n key blocks cut into `splits`: blocks kb0 .. kb0 + count - 1. Equal
// ranges of ceil(n / splits) blocks; trailing ranges may be short or empty.
INTFA_HD void split_range(int n, int splits, int split, int& kb0, int& count) {
  const int per = (n + splits - 1) / splits;
  const int start = split * per;
  kb0 = start < n ? start : n;
  const int end = kb0 + per < n ? kb0 + per : n;
  count = end - kb0;
}

// Key ranges per (batch, head) of the decode kernel (src/cuda/decode), whose units (one CTA each)
// are all alike in a dense launch: so the count minimizes waves x (blocks per range + 1), waves =
// ceil(units / slots) with `slots` resident CTAs (SMs x CTAs per SM), the + 1 standing for a
// unit's start (Q and its first block's latency) and its partial rows. H200, B=1 Hq=32 Hkv=8
// Skv=32k, a first rule (twice the slots, >= 4 blocks per range) gave 512 units on 396 slots:
// 1.3 waves. Ties go to fewer ranges. `accurate` only (as split_count); forced > 0 overrides.
// The counts that take the same waves form runs, and within a run the cost falls with the
// count, so the search visits one count per run and stops once 2 x waves (a cost no range can
// go below) passes the best: a few dozen steps where a scan of every count up to the blocks took
// ~10 us of host time per call at 1024 blocks (a paged call's table sized for 128k tokens),
// longer than the decode step it sized.
INTFA_HD int decode_split_count(bool accurate, int key_blocks, long long heads, int slots, int forced) {
  if (!accurate || key_blocks < 2 || heads < 1) return 1;
  if (forced > 0) return forced < key_blocks ? forced : key_blocks;
  if (slots < 1) slots = 1;
  const long long most = key_blocks < 1024 ? key_blocks : 1024;
  long long best = 1, best_cost = -1;
  for (long long s = 1; s <= most;) {
    const long long waves = (heads * s + slots - 1) / slots;
    if (best_cost >= 0 && 2 * waves > best_cost) break;
    long long last = waves * slots / heads;  // the run of counts with these waves: s .. last
    if (last > most) last = most;
    const long long per = (key_blocks + last - 1) / last;             // blocks per range at `last`
    const long long first = (key_blocks + per - 1) / per;             // the fewest ranges of `per`
    const long long cost = waves * (per + 1);
    if (best_cost < 0 || cost < best_cost) {
      best = first > s ? first : s;
      best_cost = cost;
    }
    s = last + 1;
  }
  return static_cast<int>(best);
}

// Bottom-right causal masking. A row at query position r sees keys <= r + diag, diag = Skv - Sq.
// Packed GQA rows (pack_gqa_rows) are query positions r % period of heads of `period` rows each
// (period 0: row r is position r), so Sq is the period there.
INTFA_HD int row_position(int row, int period) { return period > 0 ? row % period : row; }
INTFA_HD int causal_diag(int skv, int sq, int period) { return skv - (period > 0 ? period : sq); }

// Query positions of rows r0 .. r1 (r0 <= r1): the lowest and the highest. Rows that cross a
// period boundary hold positions from 0 to period - 1.
INTFA_HD void row_positions(int r0, int r1, int period, int& lo, int& hi) {
  if (period <= 0) {
    lo = r0;
    hi = r1;
  } else if (r0 / period == r1 / period) {
    lo = r0 % period;
    hi = r1 % period;
  } else {
    lo = 0;
    hi = period - 1;
  }
}

// The lowest query position of rows r0 .. r1: past its diagonal, a key block needs the mask.
INTFA_HD int lowest_position(int r0, int r1, int period) {
  int lo, hi;
  row_positions(r0, r1, period, lo, hi);
  return lo;
}

// The end (exclusive, <= skv) of the keys that causal rows r0 .. r1 see; <= 0 when none.
INTFA_HD int causal_key_end(int r0, int r1, int period, int diag, int skv) {
  int lo, hi;
  row_positions(r0, r1, period, lo, hi);
  return hi + 1 + diag < skv ? hi + 1 + diag : skv;
}

// Grouped-query heads packed into rows (every GPU path, dense launches). The g = Hq / Hkv query
// heads that share a K/V head run as one head of g * Sq rows when each per-row tensor (Q, O, the
// row scales, the LSE) keeps a head's rows right after the previous head's (head stride = Sq *
// token stride, or Sq = 1: the head stride then steps the packed rows). Causal launches keep
// each row's own diagonal through row_period (row r is position r % Sq); with one query row the
// bottom-right diagonal shows it every key, so that launch becomes non-causal. Then the K/V of
// a head are streamed once per row tile instead of once per query head, and a decode step
// (Sq = 1) fills g rows of a tile instead of one. The packed row r of K/V head hk in batch b is
// row r % Sq of query head hk * g + r / Sq: the same address, so nothing else changes. Returns
// whether it packed.
inline bool pack_gqa_rows(FwdParams& p) {
  if (p.cu_q != nullptr || p.heads_kv < 1 || p.heads_q <= p.heads_kv || p.heads_q % p.heads_kv != 0) return false;
  const int64_t g = p.heads_q / p.heads_kv, rows = g * p.seqlen_q;
  if (rows >= (int64_t(1) << 30)) return false;
  auto packable = [&](const Strides3& st) { return p.seqlen_q == 1 || st.hs == int64_t(p.seqlen_q) * st.ts; };
  if (!packable(p.q_st) || !packable(p.o_st) || !packable(p.qs_st) || (p.lse && !packable(p.lse_st)) ||
      (p.q_in && !packable(p.qin_st)))
    return false;
  auto pack = [&](Strides3& st) {
    if (p.seqlen_q == 1) st.ts = st.hs;
    st.hs *= g;
  };
  pack(p.q_st);
  if (p.q_in) pack(p.qin_st);
  pack(p.o_st);
  pack(p.qs_st);  // q_scale and lse_offset
  if (p.lse) pack(p.lse_st);
  // A sliding window's left edge holds at any Sq, so then every row keeps its position (Sq = 1:
  // period 1, every row at position 0).
  if ((p.causal && p.seqlen_q > 1) || p.window_left >= 0) p.row_period = p.seqlen_q;
  p.causal = p.causal && p.seqlen_q > 1;  // a single query row sees every key up to its diagonal
  p.sink_g = static_cast<int>(g);  // row r's query head: h * g + r / seqlen_q
  p.sink_rows = p.seqlen_q;
  p.heads_q = p.heads_kv;
  p.seqlen_q = static_cast<int>(rows);
  return true;
}

}  // namespace intfa::fwd
