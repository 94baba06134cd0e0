// Thin wrappers over the sm_90 / sm_90a PTX the Hopper kernel uses: mbarriers, the bulk tensor
// copy engine (TMA), warpgroup MMA (wgmma) and register reallocation. One function per
// instruction, named as PTX names it. wgmma and setmaxnreg need the sm_90a target.
#pragma once

#include <cstdint>

namespace intfa::ptx {

// ---- mbarrier (PTX §9.7.12.15) ----------------------------------------------------------------
__device__ __forceinline__ void mbarrier_init(uint32_t bar, uint32_t count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(bar), "r"(count));
}
// Makes the initialised barriers visible to the async proxy (TMA) before first use.
__device__ __forceinline__ void fence_barrier_init() {
  asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
}
__device__ __forceinline__ void mbarrier_arrive(uint32_t bar) {
  asm volatile("{\n.reg .b64 st;\nmbarrier.arrive.shared::cta.b64 st, [%0];\n}\n" ::"r"(bar) : "memory");
}
// Arrives and tells the barrier how many bytes the copies of this phase will deliver.
__device__ __forceinline__ void mbarrier_arrive_expect_tx(uint32_t bar, uint32_t bytes) {
  asm volatile("{\n.reg .b64 st;\nmbarrier.arrive.expect_tx.shared::cta.b64 st, [%0], %1;\n}\n" ::"r"(bar),
               "r"(bytes) : "memory");
}
// Blocks until the phase with the given parity has completed. A fresh barrier counts the phase
// "before" phase 0 (parity 1) as complete, which is how the producer's first waits pass.
__device__ __forceinline__ void mbarrier_wait(uint32_t bar, uint32_t parity) {
  asm volatile(
      "{\n.reg .pred P1;\n"
      "LAB_WAIT:\n"
      "mbarrier.try_wait.parity.shared::cta.b64 P1, [%0], %1;\n"
      "@!P1 bra LAB_WAIT;\n"
      "}\n" ::"r"(bar), "r"(parity) : "memory");
}

// Non-blocking look at the phase: true if it has completed (acquire, like the wait). Issued early,
// its result is ready by the time a wait would have started, so a completed phase costs no
// SYNCS round trip at that point.
__device__ __forceinline__ bool mbarrier_test(uint32_t bar, uint32_t parity) {
  uint32_t ok;
  asm volatile(
      "{\n.reg .pred P1;\n"
      "mbarrier.test_wait.parity.shared::cta.b64 P1, [%1], %2;\n"
      "selp.u32 %0, 1, 0, P1;\n"
      "}\n" : "=r"(ok) : "r"(bar), "r"(parity) : "memory");
  return ok != 0;
}

// ---- bulk tensor copy (TMA, PTX §9.7.9.27) --------------------------------------------------------
// 4-D tile load global -> shared, completion counted in bytes on `bar`. `tmap` is the generic
// address of a CUtensorMap kernel parameter (__grid_constant__).
__device__ __forceinline__ void tma_load_4d(uint32_t dst, const void* tmap, uint32_t bar, int c0,
                                            int c1, int c2, int c3) {
  asm volatile(
      "cp.async.bulk.tensor.4d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%3, %4, "
      "%5, %6}], [%2];\n" ::"r"(dst), "l"(tmap), "r"(bar), "r"(c0), "r"(c1), "r"(c2), "r"(c3)
      : "memory");
}
// Plain (non-tensor) bulk copy shared -> global of `bytes` (a multiple of 16, both addresses
// 16-byte aligned), tracked by bulk groups of the issuing thread (PTX §9.7.9.25).
__device__ __forceinline__ void bulk_store(void* dst, uint32_t src, uint32_t bytes) {
  asm volatile("cp.async.bulk.global.shared::cta.bulk_group [%0], [%1], %2;\n" ::"l"(dst), "r"(src), "r"(bytes)
               : "memory");
}
__device__ __forceinline__ void bulk_commit() { asm volatile("cp.async.bulk.commit_group;\n" ::: "memory"); }
// This thread's committed bulk copies have read their shared-memory source (it may be rewritten).
__device__ __forceinline__ void bulk_wait_read() { asm volatile("cp.async.bulk.wait_group.read 0;\n" ::: "memory"); }
// ... and have completed (their writes are performed).
__device__ __forceinline__ void bulk_wait() { asm volatile("cp.async.bulk.wait_group 0;\n" ::: "memory"); }
__device__ __forceinline__ void prefetch_tensormap(const void* tmap) {
  asm volatile("prefetch.tensormap [%0];\n" ::"l"(tmap) : "memory");
}
// Generic-proxy writes to shared memory (st.shared) become visible to the async proxy (wgmma
// operand reads, TMA) only after this fence in the writing thread.
__device__ __forceinline__ void fence_proxy_async_shared() {
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
}

// ---- named barriers (PTX §9.7.12.1) -----------------------------------------------------------
__device__ __forceinline__ void named_bar_sync(int id, int threads) {
  asm volatile("bar.sync %0, %1;\n" ::"r"(id), "r"(threads) : "memory");
}
__device__ __forceinline__ void named_bar_arrive(int id, int threads) {
  asm volatile("bar.arrive %0, %1;\n" ::"r"(id), "r"(threads) : "memory");
}

// ---- register reallocation between warpgroups (sm_90a, PTX §9.7.17.x) ---------------------------
template <int N>
__device__ __forceinline__ void setmaxnreg_inc() {
  asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(N));
}
template <int N>
__device__ __forceinline__ void setmaxnreg_dec() {
  asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(N));
}

// ---- warpgroup MMA (sm_90a, PTX §9.7.15) ----------------------------------------------------------
// Shared-memory matrix descriptor (§9.7.15.5.1) of a K-major tile whose rows (`row_bytes` = 64 or
// 128) are swizzled by the matching TMA mode: start address >> 4 in bits 0-13, the leading byte
// offset (unused for swizzled K-major tiles, 1) in 16-29, the stride between 8-row groups >> 4
// in 32-45, and the swizzle mode in 62-63 (1 = 128 B, 2 = 64 B). Tiles sit 1024-byte aligned,
// so the base-offset field stays 0; a k step inside the swizzle atom just advances the start.
__device__ __forceinline__ uint64_t wgmma_desc(uint32_t smem_addr, int row_bytes) {
  const uint64_t mode = row_bytes == 128 ? 1 : 2;
  return uint64_t((smem_addr & 0x3FFFF) >> 4) | (uint64_t(1) << 16) |
         (uint64_t((8 * row_bytes) >> 4) << 32) | (mode << 62);
}
// The descriptor of the same tile `bytes` further on (a k step: the start field counts 16-byte
// units and cannot carry out of its 14 bits inside shared memory), without rebuilding it.
__device__ __forceinline__ uint64_t wgmma_desc_advance(uint64_t desc, uint32_t bytes) { return desc + (bytes >> 4); }
__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
template <int N>
__device__ __forceinline__ void wgmma_wait() {
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
}
// Ties registers to this point of the instruction stream: after a wgmma_wait the compiler may
// not read accumulators earlier, nor reuse an in-flight A fragment's registers before it.
template <int N>
__device__ __forceinline__ void fence_regs(int (&r)[N]) {
#pragma unroll
  for (int i = 0; i < N; ++i) asm volatile("" : "+r"(r[i])::"memory");
}
template <int N>
__device__ __forceinline__ void fence_regs(uint32_t (&r)[N]) {
#pragma unroll
  for (int i = 0; i < N; ++i) asm volatile("" : "+r"(r[i])::"memory");
}

// wgmma.mma_async m64nNk32 with s32 accumulators: D (+)= A * B, both operands K-major.
// Accumulator fragment of a warpgroup: warp w holds rows 16w..16w+15; in the warp, register
// 4j+e holds row g + 8(e/2), column 8j + 2t + e%2 (g = lane/4, t = lane%4), i.e. the mma.sync
// m16n8 C layout repeated along N. The register A fragment (RS form) is the m16n8k32 A layout:
// a0 row g k 4t..4t+3, a1 row g+8, a2 row g k 16+4t.., a3 row g+8 k 16+4t.. (bytes in k order).
// The _init forms ignore the old accumulator (scale-d = 0, D = A * B) and declare the registers
// write-only, so the compiler may reuse them for other values until the instruction issues.

// Accumulator operand lists (32 or 64 registers of d under constraint C) and their PTX names.
#define INTFA_D8(C, i) \
  C(d[i]), C(d[i + 1]), C(d[i + 2]), C(d[i + 3]), C(d[i + 4]), C(d[i + 5]), C(d[i + 6]), C(d[i + 7])
#define INTFA_D32(C) INTFA_D8(C, 0), INTFA_D8(C, 8), INTFA_D8(C, 16), INTFA_D8(C, 24)
#define INTFA_D64(C) INTFA_D32(C), INTFA_D8(C, 32), INTFA_D8(C, 40), INTFA_D8(C, 48), INTFA_D8(C, 56)
#define INTFA_R32 \
  "%0, %1, %2, %3, %4, %5, %6, %7, " \
  "%8, %9, %10, %11, %12, %13, %14, %15, " \
  "%16, %17, %18, %19, %20, %21, %22, %23, " \
  "%24, %25, %26, %27, %28, %29, %30, %31"
#define INTFA_R64 INTFA_R32 ", " \
  "%32, %33, %34, %35, %36, %37, %38, %39, " \
  "%40, %41, %42, %43, %44, %45, %46, %47, " \
  "%48, %49, %50, %51, %52, %53, %54, %55, " \
  "%56, %57, %58, %59, %60, %61, %62, %63"

// One wrapper per (shape, A source, init or accumulate): `ops` names the A and B operands after
// the DN accumulators, C is "=r" with scale-d 0 (init) or "+r" with scale-d 1 (accumulate).
#define INTFA_WGMMA_SS(name, shape, DN, ops, C, scale_d)                                              \
  __device__ __forceinline__ void name(int (&d)[DN], uint64_t desc_a, uint64_t desc_b) {             \
    asm volatile("wgmma.mma_async.sync.aligned." shape ".s32.s8.s8 {" INTFA_R##DN "}, " ops ", " scale_d \
                 ";\n"                                                                                \
                 : INTFA_D##DN(C)                                                                     \
                 : "l"(desc_a), "l"(desc_b));                                                         \
  }
#define INTFA_WGMMA_RS(name, shape, DN, ops, C, scale_d)                                                 \
  __device__ __forceinline__ void name(int (&d)[DN], const uint32_t (&a)[4], uint64_t desc_b) {         \
    asm volatile("wgmma.mma_async.sync.aligned." shape ".s32.u8.s8 {" INTFA_R##DN "}, " ops ", " scale_d    \
                 ";\n"                                                                                   \
                 : INTFA_D##DN(C)                                                                        \
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b));                             \
  }

INTFA_WGMMA_SS(wgmma_m64n128k32_s8s8_ss_init, "m64n128k32", 64, "%64, %65", "=r", "0")
INTFA_WGMMA_SS(wgmma_m64n128k32_s8s8_ss, "m64n128k32", 64, "%64, %65", "+r", "1")
INTFA_WGMMA_RS(wgmma_m64n128k32_u8s8_rs_init, "m64n128k32", 64, "{%64, %65, %66, %67}, %68", "=r", "0")
INTFA_WGMMA_RS(wgmma_m64n128k32_u8s8_rs, "m64n128k32", 64, "{%64, %65, %66, %67}, %68", "+r", "1")
INTFA_WGMMA_RS(wgmma_m64n64k32_u8s8_rs_init, "m64n64k32", 32, "{%32, %33, %34, %35}, %36", "=r", "0")
INTFA_WGMMA_RS(wgmma_m64n64k32_u8s8_rs, "m64n64k32", 32, "{%32, %33, %34, %35}, %36", "+r", "1")

#undef INTFA_WGMMA_RS
#undef INTFA_WGMMA_SS
#undef INTFA_R64
#undef INTFA_R32
#undef INTFA_D64
#undef INTFA_D32
#undef INTFA_D8

}  // namespace intfa::ptx
