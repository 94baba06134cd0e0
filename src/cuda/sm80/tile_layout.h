// Shared-memory tile layouts of the sm80 fragment code (the sm80 and decode kernels): where each
// 16-byte chunk of the Q, K and V^T tiles goes, and which key each QK^T column holds.
// Host- and device-safe, so the properties the kernels rely on (every chunk one place,
// conflict-free ldmatrix reads, a copy's 32-byte sectors landing whole, the permuted keys
// matching the PV operand) are checked on the host (tests/tile_layout_test.cpp).
#pragma once

#include "common/params.h"

namespace intfa::sm80 {

// 128-byte-line XOR swizzle of 16-byte chunks: eight consecutive rows read at the same column
// chunk (ldmatrix) hit eight different bank groups.
INTFA_HD int swz128(int byte) { return byte ^ (((byte >> 7) & 7) << 4); }

// Offset of V^T chunk (channel c, 16-key chunk q) in a stage's V^T tile of BlockN keys. Row
// order: channel rows of BlockN bytes, 128-byte swizzle (swz128). Core-matrix order (`cm`, pages
// of 16 tokens): each 8-channel x 16-key ldmatrix tile is 128 contiguous bytes. A 16-token page
// holds a head's V^T as 16-byte channel rows back to back, and a copy's two halves of one 32-byte
// global sector are read as one sector only if they land in one 32-byte piece of shared memory:
// channels c, c + 1 are 16 bytes apart in core-matrix order, a row apart in row order (ncu, H200,
// decode: twice the V sectors from L2). Either order steps 8 * BlockN bytes per 8 channels (row
// order with 64-byte rows: per 16 channels, so sm80's lane offsets depend on the tile's parity).
template <int BlockN>
INTFA_HD int vt_chunk_offset(int c, int q, bool cm) {
  return cm ? (c >> 3) * 8 * BlockN + q * 128 + (c & 7) * 16 : swz128(c * BlockN + q * 16);
}

// Q tile: rows of D bytes, 16-byte chunks swizzled so that the eight rows one ldmatrix reads
// at a column chunk hit eight bank groups. Rows of up to 128 bytes: swz128 over the tile. At
// D = 256 a row spans two lines and swz128 would give rows r and r + 4 the same XOR (it keys on
// the line, 2r or 2r + 1), so the chunk's low three bits take the row's instead.
template <int D>
INTFA_HD int q_tile_offset(int row, int chunk) {
  if constexpr (D > 128) return row * D + ((chunk ^ (row & 7)) << 4);
  else return swz128(row * D + chunk * 16);
}

// K tile swizzle matched to the permuted row sets {base + 4a + e : a < 4, e < 2} that one
// ldmatrix reads: XOR with bits (0, 2, 3) of the row makes those eight rows conflict-free.
template <int D>
INTFA_HD constexpr int k_swizzle_bits(int row) {
  constexpr int kShift = D >= 128 ? 0 : 1;  // D = 64: two rows share a 128-byte line
  return ((row & 1) | (((row >> 2) & 3) << 1)) >> kShift;
}
template <int D>
INTFA_HD int k_tile_offset(int row, int chunk) {
  return row * D + ((chunk ^ k_swizzle_bits<D>(row)) << 4);
}

// The loaders' K destinations: a thread copies chunk c of rows row0 + step * it (row0 < step, a
// power of two) from one offset computed once, k_tile_offset(row0, c). Row row0 + step * it has
// row0's swizzle bits XOR those of step * it (each swizzle bit is one row bit, and the two rows'
// bits do not overlap), so its offset is that first one XOR a per-pass constant plus whole rows.
// The constant is 0 when step is a multiple of 16 (the swizzle keys on row bits 0-3), not at
// D = 256, whose 128-thread copies cover 8 rows per pass.
template <int D>
INTFA_HD int k_pass_offset(int first, int step, int it) {
  return (first ^ (k_swizzle_bits<D>(step * it) << 4)) + step * it * D;
}

// Key (within a 128-key block) that column n of n-tile j of the QK^T product holds: thread t's
// accumulator columns 2t, 2t + 1 of n-tiles 4w .. 4w + 3 then hold keys 32w + 4t .. 4t + 3 and
// 32w + 16 + 4t .. 4t + 3, the u8 A operand of the PV mma's k step w (fwd_sm80.cuh's header).
INTFA_HD int permuted_key(int j, int n) {
  return 32 * (j >> 2) + ((j & 1) << 1) + ((j & 2) << 3) + 4 * (n >> 1) + (n & 1);
}

}  // namespace intfa::sm80
