// Thin wrappers over the sm_80 PTX instructions the portable kernels use: one function per
// instruction, named as PTX names it. Section numbers refer to the PTX ISA 8.x manual.
#pragma once

#include <cstdint>

namespace intfa::ptx {

// ---------------------------------------------------------------------------------------------
// mma.sync.aligned.m16n8k32.row.col.s32.u8.s8.s32  (§9.7.13.5.x, "Matrix Fragments for
// mma.m16n8k32"). g = lane / 4 (groupID), t = lane % 4 (thread in group). Each register holds
// four 8-bit elements, element i in byte i.
//
//   A (16 x 32, row-major)          B (32 x 8, "col": k contiguous per column n)
//   a0: row g,   k 4t..4t+3         b0: col g, k 4t..4t+3
//   a1: row g+8, k 4t..4t+3         b1: col g, k 16+4t..16+4t+3
//   a2: row g,   k 16+4t..+3
//   a3: row g+8, k 16+4t..+3        C/D (16 x 8, s32): c0,c1: row g, cols 2t,2t+1
//                                                      c2,c3: row g+8, cols 2t,2t+1
// ---------------------------------------------------------------------------------------------
__device__ __forceinline__ void mma_m16n8k32_u8s8(int (&d)[4], const uint32_t (&a)[4],
                                                  const uint32_t (&b)[2]) {
  asm volatile(
      "mma.sync.aligned.m16n8k32.row.col.s32.u8.s8.s32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+r"(d[0]), "+r"(d[1]), "+r"(d[2]), "+r"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

__device__ __forceinline__ void mma_m16n8k32_s8s8(int (&d)[4], const uint32_t (&a)[4],
                                                  const uint32_t (&b)[2]) {
  asm volatile(
      "mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+r"(d[0]), "+r"(d[1]), "+r"(d[2]), "+r"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

// ldmatrix.sync.aligned.m8n8.x4.shared.b16 (§9.7.13.4.15): lanes 8i..8i+7 give the row addresses
// (16 bytes each) of matrix i; lane l receives, of each matrix, row l/4 bytes 4(l%4)..4(l%4)+3.
// For 8-bit data that is exactly an A or B fragment register of m16n8k32.
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], uint32_t smem_addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr));
}

__device__ __forceinline__ uint32_t smem_u32(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// A warp-uniform copy of v that ptxas keeps in a register: values derived from threadIdx are
// otherwise rebuilt from an S2R (~20 cycles of latency) wherever registers are short, e.g.
// right before a named barrier in a kernel's critical section (a plain mov is seen through).
__device__ __forceinline__ uint32_t opaque_uniform(uint32_t v) {
  return __shfl_sync(0xffffffffu, v, 0);
}

// ld.shared.v4.f32 from a shared-window address: a generic pointer into dynamic shared memory
// costs an S2R of the CTA id and an address conversion wherever the compiler rebuilds it.
// Volatile, so it stays after the barrier wait that publishes the data.
__device__ __forceinline__ float4 ld_shared_f32x4(uint32_t addr) {
  float4 v;
  asm volatile("ld.shared.v4.f32 {%0, %1, %2, %3}, [%4];\n"
               : "=f"(v.x), "=f"(v.y), "=f"(v.z), "=f"(v.w)
               : "r"(addr));
  return v;
}

// cp.async.cg.shared.global 16 bytes (§9.7.9.25); src_bytes < 16 zero-fills the rest, so
// out-of-range rows are loaded as zeros without a branch around the instruction.
__device__ __forceinline__ void cp_async_16B(uint32_t smem_addr, const void* gmem, bool valid) {
  const int src_bytes = valid ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr), "l"(gmem),
               "r"(src_bytes));
}

// cp.async.ca 16 bytes (allocates in L1): for copies whose two halves of a 32-byte sector land
// in different 32-byte pieces of shared memory, so the second half may hit L1 instead of L2.
__device__ __forceinline__ void cp_async_16B_ca(uint32_t smem_addr, const void* gmem, bool valid) {
  const int src_bytes = valid ? 16 : 0;
  asm volatile("cp.async.ca.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr), "l"(gmem),
               "r"(src_bytes));
}

// cp.async.ca 4 bytes, for per-token scale rows whose start is only 4-byte aligned (varlen).
__device__ __forceinline__ void cp_async_4B(uint32_t smem_addr, const void* gmem, bool valid) {
  const int src_bytes = valid ? 4 : 0;
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(smem_addr), "l"(gmem),
               "r"(src_bytes));
}

__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n"); }

// griddepcontrol (programmatic dependent launch, PTX 7.8, sm_90; no-ops where the kernels are
// built for earlier cards, whose launches then serialize as usual): launch_dependents lets the
// next kernel of the stream, launched with cudaLaunchAttributeProgrammaticStreamSerialization,
// start its CTAs once every CTA of this grid has issued it or exited; wait, in that kernel,
// returns once the grid before it has completed and its memory writes are visible.
__device__ __forceinline__ void griddepcontrol_launch_dependents() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;\n" ::: "memory");
#endif
}
__device__ __forceinline__ void griddepcontrol_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;\n" ::: "memory");
#endif
}

template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

// ex2.approx.ftz.f32 (§9.7.3.x): 2^x on the MUFU unit; ex2(-inf) = +0.
__device__ __forceinline__ float ex2_approx(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
  return y;
}

// Exact int32 -> fp32 for |x| < 2^22 without the I2F unit: 0x4B400000 is 1.5 * 2^23, whose ulp
// is 1, so adding x to its bit pattern and subtracting 12582912.0f yields x exactly.
constexpr float kMagic = 12582912.0f;
__device__ __forceinline__ float int_to_float_magic(int x) {
  return __int_as_float(x + 0x4B400000) - kMagic;
}

// round(levels * p) for p in [0, 1], produced as the low byte of the fp32 sum levels*p + 1.5*2^23
// (one FFMA; the add rounds to an integer with round-half-to-even).
__device__ __forceinline__ uint32_t quantize_p_magic(float p, float levels) {
  return __float_as_uint(__fmaf_rn(p, levels, kMagic));
}

// Packs the low bytes of four words into one register (byte i from word i): three PRMTs.
__device__ __forceinline__ uint32_t pack_low_bytes(uint32_t w0, uint32_t w1, uint32_t w2,
                                                   uint32_t w3) {
  const uint32_t lo = __byte_perm(w0, w1, 0x0040);
  const uint32_t hi = __byte_perm(w2, w3, 0x0040);
  return __byte_perm(lo, hi, 0x5410);
}

}  // namespace intfa::ptx
