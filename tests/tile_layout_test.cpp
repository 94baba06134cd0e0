// The sm80 fragment code's shared-memory layouts (src/cuda/sm80/tile_layout.h), checked on the
// host: every chunk has one place, the ldmatrix reads the kernels issue hit eight different bank
// groups, a copy's 32-byte global sectors land whole in shared memory where the layout promises
// it, and the permuted QK^T columns are the PV operand's keys. The GPU tests check the kernels'
// results; these name the rule a layout change would break.
#include <gtest/gtest.h>

#include <set>
#include <string>
#include <vector>

#include "cuda/sm80/tile_layout.h"

namespace intfa {
namespace {

// Bank group (16 bytes of the 128-byte bank line) of a shared-memory byte offset.
int bank_group(int byte) { return (byte >> 4) & 7; }

template <int BlockN>
void check_vt_layout(int D, bool cm) {
  SCOPED_TRACE("BlockN " + std::to_string(BlockN) + " D " + std::to_string(D) + (cm ? " core-matrix" : " row"));
  constexpr int kChunks = BlockN / 16;
  std::vector<int> seen(static_cast<size_t>(D) * kChunks, 0);
  for (int c = 0; c < D; ++c)
    for (int q = 0; q < kChunks; ++q) {
      const int off = sm80::vt_chunk_offset<BlockN>(c, q, cm);
      ASSERT_EQ(off % 16, 0);
      ASSERT_GE(off, 0);
      ASSERT_LT(off, D * BlockN);
      ++seen[static_cast<size_t>(off / 16)];
      // The PV reads add 8 * BlockN per 8 channels to lane offsets taken at the first 8 (row order
      // with 64-byte rows: the first 16, one per parity of the 8-channel tile, sm80's kVPar).
      const int step = cm || BlockN == 128 ? 8 : 16;
      if (c + step < D) EXPECT_EQ(sm80::vt_chunk_offset<BlockN>(c + step, q, cm), off + step * BlockN);
    }
  for (int n : seen) ASSERT_EQ(n, 1);  // a bijection onto the tile's chunks
  // One ldmatrix tile: channels 8a .. 8a + 7 of one 16-key chunk, eight bank groups.
  for (int a = 0; a < D / 8; ++a)
    for (int q = 0; q < kChunks; ++q) {
      std::set<int> groups;
      for (int e = 0; e < 8; ++e) groups.insert(bank_group(sm80::vt_chunk_offset<BlockN>(8 * a + e, q, cm)));
      EXPECT_EQ(groups.size(), 8u) << "channels " << 8 * a << "+, chunk " << q;
    }
}

TEST(TileLayout, VtTileOrdersAreBijectionsWithConflictFreeReads) {
  for (int D : {64, 128, 256})
    for (bool cm : {false, true}) {
      check_vt_layout<128>(D, cm);
      check_vt_layout<64>(D, cm);
    }
}

// The 32-byte global sectors of a page's V^T: at 16 tokens, channels 2k and 2k + 1 of one
// 16-key piece (one sector); at 32 or more, pieces 2k and 2k + 1 of one channel. Each pair must
// land in one 32-byte piece of shared memory, or the copy reads the sector twice (PERF_LOG d12).
TEST(TileLayout, SixteenTokenPagesKeepTheirSectorsWhole) {
  for (int c = 0; c < 128; c += 2)
    for (int q = 0; q < 8; ++q) {
      const int a = sm80::vt_chunk_offset<128>(c, q, true), b = sm80::vt_chunk_offset<128>(c + 1, q, true);
      EXPECT_EQ(a / 32, b / 32) << "core-matrix order, channels " << c << ", " << c + 1 << ", chunk " << q;
      EXPECT_NE(sm80::vt_chunk_offset<128>(c, q, false) / 32, sm80::vt_chunk_offset<128>(c + 1, q, false) / 32)
          << "row order splits the sector (why 16-token pages take core-matrix order)";
    }
  for (int c = 0; c < 128; ++c)
    for (int q = 0; q < 8; q += 2)
      EXPECT_EQ(sm80::vt_chunk_offset<128>(c, q, false) / 32, sm80::vt_chunk_offset<128>(c, q + 1, false) / 32)
          << "row order, channel " << c << ", chunks " << q << ", " << q + 1;
}

// The K tile: rows are keys, read by ldmatrix eight rows at a time at one 16-byte column chunk:
// for n-tile pair jj, the keys of n-tile j = 0 / 1 (permuted_key(j, 0 .. 7)) plus 16 jj, the sets
// {16 jj + 2 j + 4a + e : a < 4, e < 2} (k_lane_offsets in fwd_sm80.cuh).
template <int D>
void check_k_layout() {
  SCOPED_TRACE("D " + std::to_string(D));
  constexpr int kBlockN = 128, kChunks = D / 16;
  std::vector<int> seen(static_cast<size_t>(kBlockN) * kChunks, 0);
  for (int r = 0; r < kBlockN; ++r)
    for (int k = 0; k < kChunks; ++k) {
      const int off = sm80::k_tile_offset<D>(r, k);
      ASSERT_GE(off, r * D);
      ASSERT_LT(off, (r + 1) * D);  // the swizzle stays inside the row
      ++seen[static_cast<size_t>(off / 16)];
    }
  for (int n : seen) ASSERT_EQ(n, 1);
  for (int jj = 0; jj < kBlockN / 16; ++jj)
    for (int j = 0; j < 2; ++j)
      for (int k = 0; k < kChunks; ++k) {
        std::set<int> groups;
        for (int n = 0; n < 8; ++n) groups.insert(bank_group(sm80::k_tile_offset<D>(16 * jj + sm80::permuted_key(j, n), k)));
        EXPECT_EQ(groups.size(), 8u) << "n-tile pair " << jj << ", n-tile " << j << ", chunk " << k;
      }
}

TEST(TileLayout, KTileRowSetsReadConflictFree) {
  check_k_layout<64>();
  check_k_layout<128>();
  check_k_layout<256>();
}

// The loaders place pass it's K chunk from the thread's first offset (k_pass_offset): it must be
// where k_tile_offset puts that row, for every rows-per-pass step the loaders use (the contiguous
// and paged loaders: 128 threads / (D / 16) chunks per row; the small-page pieces: 2 .. 8). At
// D = 256 the contiguous step is 8 rows, and a plain "+ rows * D" misplaced every other pass.
template <int D>
void check_k_passes() {
  for (int step : {1, 2, 4, 8, 16, 32})
    for (int row0 = 0; row0 < step; ++row0)
      for (int c = 0; c < D / 16; ++c)
        for (int it = 0; step * (it + 1) <= 128; ++it)
          ASSERT_EQ(sm80::k_pass_offset<D>(sm80::k_tile_offset<D>(row0, c), step, it),
                    sm80::k_tile_offset<D>(row0 + step * it, c))
              << "D " << D << " step " << step << " row " << row0 << " chunk " << c << " pass " << it;
}

TEST(TileLayout, KLoaderPassesLandOnTheirRows) {
  check_k_passes<64>();
  check_k_passes<128>();
  check_k_passes<256>();
}

// The Q tile (64 rows of D bytes): every chunk one place inside its line, and the A-fragment
// reads (ldmatrix: rows 8a .. 8a + 7 at one column chunk) on eight bank groups. At D = 256 the
// 128-byte-line swizzle would give rows r and r + 4 the same group (a row is two lines).
template <int D>
void check_q_layout() {
  SCOPED_TRACE("D " + std::to_string(D));
  constexpr int kRows = 64, kChunks = D / 16;
  std::vector<int> seen(static_cast<size_t>(kRows) * kChunks, 0);
  for (int r = 0; r < kRows; ++r)
    for (int c = 0; c < kChunks; ++c) {
      const int off = sm80::q_tile_offset<D>(r, c);
      ASSERT_EQ(off % 16, 0);
      // Rows of 64 bytes share a line, and the line swizzle moves chunks between the two.
      ASSERT_GE(off, D >= 128 ? r * D : r / 2 * 128);
      ASSERT_LT(off, D >= 128 ? (r + 1) * D : (r / 2 + 1) * 128);
      ++seen[static_cast<size_t>(off / 16)];
    }
  for (int n : seen) ASSERT_EQ(n, 1);
  for (int a = 0; a < kRows / 8; ++a)
    for (int c = 0; c < kChunks; ++c) {
      std::set<int> groups, line_swizzle;
      for (int e = 0; e < 8; ++e) {
        groups.insert(bank_group(sm80::q_tile_offset<D>(8 * a + e, c)));
        line_swizzle.insert(bank_group(sm80::swz128((8 * a + e) * D + 16 * c)));
      }
      EXPECT_EQ(groups.size(), 8u) << "rows " << 8 * a << "+, chunk " << c;
      if (D > 128) EXPECT_EQ(line_swizzle.size(), 4u) << "why D = 256 has its own Q swizzle";
    }
}

TEST(TileLayout, QTileReadsConflictFree) {
  check_q_layout<64>();
  check_q_layout<128>();
  check_q_layout<256>();
  // D <= 128 keeps the line swizzle the kernels had (their code is unchanged).
  for (int r = 0; r < 64; ++r)
    for (int c = 0; c < 8; ++c) EXPECT_EQ(sm80::q_tile_offset<128>(r, c), sm80::swz128(r * 128 + 16 * c));
}

// The register-layout trick: thread t (lane % 4) holds accumulator columns 2t and 2t + 1 of every
// n-tile; over the n-tiles 4w .. 4w + 3 of k step w those must be keys 32w + 4t .. 4t + 3 (A
// registers 0 / 2) and 32w + 16 + 4t .. 4t + 3 (registers 1 / 3), in byte order, and the 16
// n-tiles of 8 columns must hold each of the block's 128 keys once.
TEST(TileLayout, PermutedKeysAreThePvOperandsKeys) {
  std::vector<int> seen(128, 0);
  for (int j = 0; j < 16; ++j)
    for (int n = 0; n < 8; ++n) ++seen[static_cast<size_t>(sm80::permuted_key(j, n))];
  for (int k : seen) EXPECT_EQ(k, 1);
  for (int w = 0; w < 4; ++w)
    for (int t = 0; t < 4; ++t) {
      const int lo[4] = {sm80::permuted_key(4 * w, 2 * t), sm80::permuted_key(4 * w, 2 * t + 1),
                         sm80::permuted_key(4 * w + 1, 2 * t), sm80::permuted_key(4 * w + 1, 2 * t + 1)};
      const int hi[4] = {sm80::permuted_key(4 * w + 2, 2 * t), sm80::permuted_key(4 * w + 2, 2 * t + 1),
                         sm80::permuted_key(4 * w + 3, 2 * t), sm80::permuted_key(4 * w + 3, 2 * t + 1)};
      for (int i = 0; i < 4; ++i) {
        EXPECT_EQ(lo[i], 32 * w + 4 * t + i) << "step " << w << " thread " << t;
        EXPECT_EQ(hi[i], 32 * w + 16 + 4 * t + i) << "step " << w << " thread " << t;
      }
    }
}

}  // namespace
}  // namespace intfa
