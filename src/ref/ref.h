// CPU reference backend: the oracle every GPU path is tested against, and the embedded default
// when no GPU is present. Three parts: the quantizers (bit-exact contract with the GPU), the
// blocked INT8 flash-attention loop of each scheme (design.md §1), and exact float64 attention.
#pragma once

#include <cstdint>
#include <functional>

#include "common/params.h"

namespace intfa::ref {

// Exact attention in float64: softmax(scale Q K^T) V over float inputs of any dtype.
struct ExactParams {
  int batch = 0, heads_q = 0, heads_kv = 0, seqlen_q = 0, seqlen_kv = 0, head_dim = 0;
  const int32_t* cu_q = nullptr;
  const int32_t* cu_kv = nullptr;
  float softmax_scale = 0.f;
  bool causal = false;
  int window_left = -1, window_right = 0;  // as in FwdParams
  DType in_dtype = DType::f16;
  const void* q = nullptr;  Strides3 q_st;
  const void* k = nullptr;  Strides3 k_st;
  const void* v = nullptr;  Strides3 v_st;
  void* out = nullptr;  Strides3 o_st;  DType out_dtype = DType::f64;
  void* lse = nullptr;  Strides3 lse_st;  DType lse_dtype = DType::f64;
  const float* sinks = nullptr;  // [heads_q] or null (Options::sinks)
  double softcap = 0.0;          // Options::softcap (0: none)
};

void quantize(const QuantParams& p);
// quantize_q() / append_kv(): rows quantized with the statistics given (CacheQuantParams).
void quantize_cache(const CacheQuantParams& p);
void attention_int8(const FwdParams& p);
void attention_exact(const ExactParams& p);
void fill_no_key_rows(const NoKeyRows& r);

// Runs fn(0..n-1) on a pool of INTFA_NUM_THREADS (default: hardware) threads, read at the first
// call.
void parallel_for(int64_t n, const std::function<void(int64_t)>& fn);

// Element access for the dtypes the reference reads and writes.
double load_scalar(const void* base, DType dt, int64_t idx);
void store_scalar(void* base, DType dt, int64_t idx, double value);
// Rounds to the precision of dt (f16/bf16/f32); identity for f64.
float round_to_dtype(float x, DType dt);

}  // namespace intfa::ref
