// A minimal fork-join pool for the CPU backend: tasks are claimed from an atomic counter, so
// uneven tasks (causal rows, varlen sequences) balance themselves.
#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <thread>
#include <vector>

#include "ref/ref.h"

namespace intfa::ref {

// Read once: hardware_concurrency() asks the OS (glibc reads /sys/devices/system/cpu/online),
// ~5 us that a tiny call (a decode step on the CPU backend) paid on every parallel_for.
static int num_threads() {
  static const int n = [] {
    if (const char* env = std::getenv("INTFA_NUM_THREADS")) {
      const int v = std::atoi(env);
      if (v > 0) return v;
    }
    const unsigned hw = std::thread::hardware_concurrency();
    return hw ? static_cast<int>(hw) : 1;
  }();
  return n;
}

void parallel_for(int64_t n, const std::function<void(int64_t)>& fn) {
  if (n <= 0) return;
  int threads = static_cast<int>(std::min<int64_t>(num_threads(), n));
  if (threads <= 1) {
    for (int64_t i = 0; i < n; ++i) fn(i);
    return;
  }
  std::atomic<int64_t> next{0};
  auto worker = [&] {
    for (int64_t i = next.fetch_add(1); i < n; i = next.fetch_add(1)) fn(i);
  };
  std::vector<std::thread> pool;
  pool.reserve(threads - 1);
  for (int t = 1; t < threads; ++t) pool.emplace_back(worker);
  worker();
  for (auto& t : pool) t.join();
}

}  // namespace intfa::ref
