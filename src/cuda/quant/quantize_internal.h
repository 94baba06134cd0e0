// Pieces of the quantization launcher shared by quantize_launch.cu and the per-head-dim kernel
// files: the scratch layout and the entry of each instantiation.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "common/params.h"

namespace intfa::quant {

// Stream-ordered scratch of one launch_quantize call. The first `zero_bytes` bytes (ksum .. tickets)
// are zeroed by the prep kernel; the rest is written before it is read.
// Index [s] below is 0 for K, 1 for V; tables are [batch][heads_kv][D].
struct QuantScratch {
  double* ksum = nullptr;       // fp64 K channel sums (accurate, half)
  unsigned* vmax = nullptr;     // bits of the V channel amax (paper: the all-channel max in [..][0])
  unsigned* done = nullptr;     // [s][batch][heads_kv] tokens reduced so far
  unsigned* ready = nullptr;    // [s][batch][heads_kv] 1 once the tables below are final
  unsigned long long* tickets = nullptr;  // [3] work counters: fused, split stats, split quant
  size_t zero_bytes = 0;
  float* kmean = nullptr;       // K smoothing mean (dtype-rounded), written by the finalizer
  float* vinv = nullptr;        // 127 / V amax (or 1) per channel, written by the finalizer
  int* max_len_kv = nullptr;    // varlen: longest kv sequence (after sanitizing)
  int32_t* cu_q = nullptr;      // varlen: sanitized copies of cu_seqlens (monotonic, [0] = 0)
  int32_t* cu_kv = nullptr;
  int slack_pct = 150;          // fused order: dep items trail their statistics by this % of a grid
                                // (launch_quantize picks it per device)
};

enum class Order : int { fused, split };

// Runs the main kernel (fused: one launch; split: stats launch, then quantization launch) for
// head dim D, after the prep kernel has initialised `s`.
template <int D>
Status launch_main(const QuantParams& p, const QuantScratch& s, Order order, cudaStream_t stream);

}  // namespace intfa::quant
