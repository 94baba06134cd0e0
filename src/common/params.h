// Plain parameter structs passed by value from the API layer to every backend (CPU reference and
// CUDA kernels alike), so all backends address memory the same way. Host- and device-safe.
#pragma once

#include <cstdint>

#include "intfa/intfa.h"

#if defined(__CUDACC__)
#define INTFA_HD __host__ __device__ __forceinline__
#else
#define INTFA_HD inline
#endif

namespace intfa {

// One operand indexed as [batch b, head h, token t, dim d]:
//   base + b*bs + h*hs + (tok0(b) + t)*ts + d
// where tok0(b) = cu[b] for packed varlen tensors (then bs is 0) and 0 otherwise.
// Per-token scale arrays use the same form with d absent; per-channel arrays (v_scale, k_mean)
// use [b, h, d] with ts unused; V transposed uses [b, h, d, t] with ds the stride of d.
struct Strides3 {
  int64_t bs = 0, hs = 0, ts = 0;
};

struct QuantParams {
  // Problem. For varlen, batch = number of sequences, seqlen_* = max over sequences.
  int batch = 0, heads_q = 0, heads_kv = 0, seqlen_q = 0, seqlen_kv = 0, head_dim = 0;
  const int32_t* cu_q = nullptr;   // [batch+1] or nullptr
  const int32_t* cu_kv = nullptr;
  DType in_dtype = DType::f16;
  Scheme scheme = Scheme::accurate;
  float softmax_scale = 0.f;

  // Inputs (fp16/bf16).
  const void* q = nullptr;  Strides3 q_st;
  const void* k = nullptr;  Strides3 k_st;
  const void* v = nullptr;  Strides3 v_st;

  // Outputs.
  int8_t* q8 = nullptr;  Strides3 q8_st;
  float* q_scale = nullptr;  Strides3 qs_st;     // ts == 1
  float* lse_offset = nullptr;                   // same strides as q_scale; may be null
  int8_t* k8 = nullptr;  Strides3 k8_st;
  float* k_scale = nullptr;  Strides3 ks_st;     // ts == 1
  float* k_mean = nullptr;  Strides3 km_st;      // [b,h,d]: bs, hs (d contiguous); may be null
  int8_t* vt8 = nullptr;  Strides3 vt_st;        // [b,h,d,t]: bs, hs, ts = stride of d
  float* v_scale = nullptr;  Strides3 vs_st;     // [b,h,d]
};

// quantize_q() and append_kv() (an INT8 KV cache): token rows quantized with statistics given
// instead of measured. Row [b, h, t] of x (t < tokens) goes to token pos + t of x8 and scale.
struct CacheQuantParams {
  int batch = 0, heads = 0, heads_kv = 0, tokens = 0, head_dim = 0;  // heads of x; heads_kv of mean
  int64_t pos = 0;
  // append_kv with per-sequence positions (device memory on the GPU): sequence b's tokens go to
  // pos_b[b] + t; tokens that would land outside [0, cap) are not written (the host cannot read
  // the positions without a synchronization, so the kernels keep every write in bounds).
  const int32_t* pos_b = nullptr;
  int64_t cap = 0;
  DType in_dtype = DType::f16;
  float softmax_scale = 0.f;
  const void* x = nullptr;  Strides3 x_st;         // q or k_new (fp16/bf16)
  // [b, hkv, d] (d contiguous), may be null. K rows (subtract_mean): x8 quantizes x - mean;
  // Q rows: lse_offset = softmax_scale * (x . mean), x8 quantizes x.
  const float* mean = nullptr;  Strides3 mean_st;
  bool subtract_mean = false;
  int8_t* x8 = nullptr;  Strides3 x8_st;
  float* scale = nullptr;  Strides3 s_st;          // ts == 1
  float* lse_offset = nullptr;                     // Q rows, strides of scale; may be null
  // append_kv's V (null for quantize_q): v [b, hkv, t, d] to column pos + t of vt8 [b, hkv, d, t]
  // with v_scale, which grows (and the vt_cols columns already there are requantized) where the
  // new values would clamp: per channel, or for the whole (b, hkv) with v_per_tensor (paper).
  const void* v = nullptr;  Strides3 v_st;
  float* v_scale = nullptr;  Strides3 vs_st;
  int8_t* vt8 = nullptr;  Strides3 vt_st;          // ts = stride of d
  int64_t vt_cols = 0;
  bool v_per_tensor = false;
  // Options::fixed_v_scale: v_scale is only read (it may be shared by the sequences, batch
  // stride 0); new values past 127 levels saturate, nothing already in the cache changes.
  bool fixed_v_scale = false;
  // append_kv into a paged cache: column c of sequence b is token c % page_size of page
  // block_table[b * bt_stride + c / page_size], the page standing where a sequence stands in
  // x8_st, s_st and vt_st; a V sweep requantizes only the columns before the new tokens (the
  // table's later entries may name no page yet). The GPU kernels cannot have the entries checked
  // on the host: they write nothing through an entry outside [0, num_pages).
  const int32_t* block_table = nullptr;
  int64_t bt_stride = 0;
  int page_size = 0;
  int64_t num_pages = 0;
};

struct FwdParams {
  int batch = 0, heads_q = 0, heads_kv = 0, seqlen_q = 0, seqlen_kv = 0, head_dim = 0;
  int64_t total_q = 0, total_kv = 0;  // varlen: tokens of the packed tensors (sm90 TMA extents)
  const int32_t* cu_q = nullptr;
  const int32_t* cu_kv = nullptr;
  Scheme scheme = Scheme::accurate;
  float softmax_scale = 0.f;
  bool causal = false;
  int block_n = 64;  // CPU emulation only

  const int8_t* q8 = nullptr;  Strides3 q_st;
  const int8_t* k8 = nullptr;  Strides3 k_st;
  const int8_t* vt8 = nullptr; Strides3 vt_st;   // [b,h,d,t], ts = stride of d
  const void* v = nullptr;     Strides3 v_st;    // half scheme: fp16/bf16 V [b,h,t,d]
  DType v_dtype = DType::f16;
  const float* q_scale = nullptr;  Strides3 qs_st;
  const float* lse_offset = nullptr;              // like q_scale, may be null
  const float* k_scale = nullptr;  Strides3 ks_st;
  const float* v_scale = nullptr;  Strides3 vs_st;

  void* out = nullptr;  Strides3 o_st;
  DType out_dtype = DType::f16;
  // Packed GQA rows (fwd::pack_gqa_rows): row r is query position r % row_period of its head,
  // which the causal mask uses; 0: row r is position r.
  int row_period = 0;
  float* lse = nullptr; Strides3 lse_st;          // ts == 1; may be null
  // Per-sequence key counts (seqused_kv, e.g. a cache's lengths; device memory on the GPU, read
  // by the kernels): sequence b attends to its first seqused_kv[b] keys, clamped to [0, its
  // length]. Null: every key.
  const int32_t* seqused_kv = nullptr;
  // Paged KV (QuantizedQKV::block_table): key t of sequence b is token t % page_size of page
  // block_table[b * bt_stride + t / page_size], the page standing where a sequence stands in
  // k_st, ks_st and vt_st. Null: each sequence's keys are its own rows. The GPU kernel reads
  // zeros (K, V and K scales) through an entry outside [0, num_pages), never memory past the pool.
  const int32_t* block_table = nullptr;
  int64_t bt_stride = 0;
  int page_size = 0;
  int64_t num_pages = 0;
  // Sliding window (Options::window_left / window_right), against a row's bottom-right diagonal
  // pos + diag (diag = skv - sq). causal: keys <= pos + diag + window_right are visible
  // (window_right >= 0; 0 for plain causal). window_left >= 0: keys >= pos + diag - window_left
  // (-1: none). Last in the struct, so the kernels' parameter offsets stay as they were.
  int window_left = -1;
  int window_right = 0;
  // Attention sinks (Options::sinks): f32 [heads_q] of the call, or null. Packed GQA rows
  // (fwd::pack_gqa_rows) hold sink_g query heads of sink_rows rows each (sink_of).
  const float* sinks = nullptr;
  int sink_g = 1;
  int sink_rows = 0x7fffffff;
  // Logit soft-capping (Options::softcap; 0: none): scores become softcap * tanh(s / softcap),
  // s = scale * q.k + score_offset[row] (the smoothed schemes' K-mean term, lse_offset's rows,
  // moved here so the LSE and sinks take no offset: the capped scores are unsmoothed). Set by
  // make_fwd_params. Last, so the other kernels' parameter offsets stay.
  float softcap = 0.f;
  const float* score_offset = nullptr;  // like q_scale, may be null (paper: none)
  // Q in fp16 / bf16 (strides like q_st, in elements) for a kernel that quantizes it itself:
  // set only by cuda::attention (run_fp_attention's calls) when the sm90 kernel runs the call
  // and no row needs lse_offset; q8 and q_scale are then null (the quantizer skipped Q).
  const void* q_in = nullptr;  Strides3 qin_st;
  DType q_in_dtype = DType::bf16;
};

// attention() / attention_varlen() calls without a single key (Skv = 0; varlen: total_kv = 0):
// every row of out [batch, heads, tokens, head_dim] (strides in elements) becomes 0 and its LSE
// the head's sink logit, or -inf without sinks, as the kernels give rows that see no key.
struct NoKeyRows {
  void* out = nullptr;  Strides3 o_st;
  int elem_bytes = 0;  // of out's dtype; 0 is all zero bits in each of them
  int64_t batch = 0, heads = 0, tokens = 0, head_dim = 0;
  float* lse = nullptr; Strides3 lse_st;  // may be null
  const float* sinks = nullptr;           // [heads] or null
};

// Window edges of a row at query position pos with diagonal diag = skv - sq: its last visible
// key and its first. kNoEdge moves the last key past every key of a non-causal launch
// (Sq < 2^29); kNoFirstKey (no left edge) lies below every key, also after a key-range offset.
constexpr int kNoEdge = 1 << 29;
constexpr int kNoFirstKey = -(1 << 30);
INTFA_HD int last_key(const FwdParams& p, int pos, int diag) {
  return pos + diag + (p.causal ? p.window_right : kNoEdge);
}
INTFA_HD int first_key(const FwdParams& p, int pos, int diag) {
  return p.window_left >= 0 ? pos + diag - p.window_left : kNoFirstKey;
}

// The sink logit of row `row` (index within its sequence) of head h.
INTFA_HD float sink_of(const FwdParams& p, int h, int64_t row) {
  return p.sinks[int64_t(h) * p.sink_g + row / p.sink_rows];
}

// Token range of sequence b: [tok0, tok0 + len).
INTFA_HD int64_t seq_start(const int32_t* cu, int b) { return cu ? cu[b] : 0; }
INTFA_HD int seq_len(const int32_t* cu, int b, int dense_len) {
  return cu ? cu[b + 1] - cu[b] : dense_len;
}
// Keys sequence b attends to: its length, or fewer where seqused_kv says so.
INTFA_HD int kv_len(const FwdParams& p, int b) {
  const int n = seq_len(p.cu_kv, b, p.seqlen_kv);
  if (!p.seqused_kv) return n;
  const int u = p.seqused_kv[b];
  return u < 0 ? 0 : (u < n ? u : n);
}
// append_kv: sequence b's first position (read once per kernel: the int8 stores may alias
// pos_b, so a load inside a store loop is not hoisted), where its token t goes (-1: outside the
// cache, not written), and whether the new tokens write column `col` (a V sweep requantizes
// every other column).
INTFA_HD int64_t cache_pos0(const CacheQuantParams& p, int b) { return p.pos_b ? int64_t(p.pos_b[b]) : p.pos; }
INTFA_HD int64_t cache_pos(const CacheQuantParams& p, int64_t pos0, int t) {
  const int64_t c = pos0 + t;
  return c >= 0 && c < p.cap ? c : -1;
}
INTFA_HD bool cache_writes(const CacheQuantParams& p, int64_t pos0, int64_t col) {
  return col >= pos0 && col < pos0 + p.tokens && col < p.cap;
}
// Where token / column t of sequence b lives: batch-like index `sb` (the sequence, or the page
// its block table names) and token / column `tok` there.
struct CachePlace {
  int sb;
  int64_t tok;
};
INTFA_HD CachePlace page_place(const int32_t* table, int64_t bt_stride, int page_size, int b, int64_t t) {
  const int64_t page = t / page_size;
  return {table[b * bt_stride + page], t - page * page_size};
}
INTFA_HD CachePlace cache_place(const CacheQuantParams& p, int b, int64_t col) {
  return p.block_table ? page_place(p.block_table, p.bt_stride, p.page_size, b, col) : CachePlace{b, col};
}
// The V^T byte of channel c of (sb, h) at column tok, as an offset into vt8.
INTFA_HD int64_t cache_vt_offset(const CacheQuantParams& p, CachePlace w, int h, int c) {
  return w.sb * p.vt_st.bs + h * p.vt_st.hs + c * p.vt_st.ts + w.tok;
}
// Varlen V-transposed columns: sequence b starts at a 16-aligned column (so 16-byte vector and
// cp.async loads work for every sequence): round_up(cu[b], 16) + 16*b, which never overlaps the
// previous sequence. The packed vt8 row therefore holds total_kv + 16*(nseq+1) columns.
INTFA_HD int64_t vt_seq_start(const int32_t* cu, int b) {
  return cu ? ((static_cast<int64_t>(cu[b]) + 15) & ~int64_t(15)) + 16 * static_cast<int64_t>(b) : 0;
}
INTFA_HD int64_t vt_varlen_columns(int64_t total_kv, int nseq) { return total_kv + 16 * (int64_t(nseq) + 1); }
// Where key t of sequence b lives: K rows and scales at offset(st, sb, h, tok), its V^T column
// at vt8 + sb * vt_st.bs + h * vt_st.hs + col (+ d * vt_st.ts).
struct KvPlace {
  int sb;
  int64_t tok, col;
};
INTFA_HD KvPlace kv_place(const FwdParams& p, int b, int64_t t) {
  if (p.block_table) {
    const CachePlace w = page_place(p.block_table, p.bt_stride, p.page_size, b, t);
    return {w.sb, w.tok, w.tok};
  }
  return {b, seq_start(p.cu_kv, b) + t, vt_seq_start(p.cu_kv, b) + t};
}

INTFA_HD int64_t offset(const Strides3& s, int b, int h, int64_t tok) {
  return b * s.bs + h * s.hs + tok * s.ts;
}

}  // namespace intfa
