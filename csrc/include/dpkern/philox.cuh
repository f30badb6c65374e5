// Philox4x32-10 and Box–Muller on the device: the same counter layout, uniforms (bit for bit) and
// normals (to float rounding) as kernels/philox.py and dpkern/noise/reference.py.
//   counter = (lo32(g), hi32(g), c2, c3), g = global element index >> 2, c2/c3 = whitened step words
//   element e takes z[e & 3] of group e >> 2; z0,z1 from (x0, x1), z2,z3 from (x2, x3)
#pragma once
#include <cstdint>

namespace dpk {

struct Philox4 {
  uint32_t x[4];
};

__device__ __forceinline__ Philox4 philox4x32_10(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3,
                                                 uint32_t k0, uint32_t k1) {
#pragma unroll
  for (int r = 0; r < 10; ++r) {
    const uint32_t hi0 = __umulhi(0xD2511F53u, c0), lo0 = 0xD2511F53u * c0;
    const uint32_t hi1 = __umulhi(0xCD9E8D57u, c2), lo1 = 0xCD9E8D57u * c2;
    c0 = hi1 ^ c1 ^ k0;
    c1 = lo1;
    c2 = hi0 ^ c3 ^ k1;
    c3 = lo0;
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  return Philox4{{c0, c1, c2, c3}};
}

// u_r = float(x) * 2^-32 + 2^-33 in (0, 1]; the product is exact, so contraction into an FMA
// cannot change the result.
__device__ __forceinline__ float uniform_radius(uint32_t x) {
  return __fmul_rn(__uint2float_rn(x), 2.3283064365386963e-10f) + 1.1641532182693481e-10f;
}
__device__ __forceinline__ float uniform_angle(uint32_t x) {
  return __fmul_rn(__uint2float_rn(x), 2.3283064365386963e-10f);
}

// Four normals of group g at the whitened step words (c2, c3).
__device__ __forceinline__ void normals4(int64_t g, uint32_t k0, uint32_t k1, uint32_t c2,
                                         uint32_t c3, float z[4]) {
  const uint64_t gu = static_cast<uint64_t>(g);
  const Philox4 w = philox4x32_10(static_cast<uint32_t>(gu), static_cast<uint32_t>(gu >> 32), c2,
                                  c3, k0, k1);
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const float r = sqrtf(-2.f * logf(uniform_radius(w.x[2 * h])));
    float s, c;
    sincosf(uniform_angle(w.x[2 * h + 1]) * 6.2831854820251465f, &s, &c);
    z[2 * h] = r * c;
    z[2 * h + 1] = r * s;
  }
}

}  // namespace dpk
