// LMO-DP noise on the device, one coordinate at a time: the counter layout, uniform map and
// transform of dpkern/mechanisms/lmo_ref.py (the float64 ground truth), written as
// kernels/lmo_noise.py writes them in Triton.
//   coordinate e (global index) takes Philox calls X = e * n_blocks + j, counter
//   (lo32(X), hi32(X), c2, c3) with the stream-1 words; word x -> ((x >> 9) * 2 + 1) / 2^24.
//   call 0: U0 Exp, U1 Uniform, U2 Laplace, U3 Gamma (k = 1; the boost for k < 1)
//   call 1: U4 (k = 2, 0.5), or Marsaglia-Tsang's call 1 + r: normals from lanes 0, 1 and the
//           acceptance uniforms of candidates 2r, 2r + 1 from lanes 2, 3
#pragma once
#include <cstdint>

#include "dpkern/noise_step.h"
#include "dpkern/philox.cuh"

namespace dpk {

constexpr float kTwoPi = 6.2831854820251465f;  // float32(2 pi), as kernels/lmo_noise.py

// (2m + 1) / 2^24 with m = x >> 9: every step exact in fp32, in (0, 1) and symmetric about 1/2.
__device__ __forceinline__ float open_uniform(uint32_t x) {
  return (__uint2float_rn(x >> 9) * 2.f + 1.f) * 5.9604644775390625e-08f;
}

// The four uniforms of Philox call e * n_blocks + j (int64 wrap-around, as torch and Triton).
__device__ __forceinline__ void lmo_uniforms(int64_t e, int n_blocks, int j, uint32_t k0,
                                             uint32_t k1, uint32_t c2, uint32_t c3, float u[4]) {
  const uint64_t x = static_cast<uint64_t>(e) * static_cast<uint64_t>(n_blocks) +
                     static_cast<uint64_t>(j);
  const Philox4 w = philox4x32_10(static_cast<uint32_t>(x), static_cast<uint32_t>(x >> 32), c2, c3,
                                  k0, k1);
#pragma unroll
  for (int k = 0; k < 4; ++k) u[k] = open_uniform(w.x[k]);
}

// Laplace(0, 1) from one open uniform: sign(u - 1/2) * -log(1 - 2|u - 1/2|).
__device__ __forceinline__ float laplace_unit(float u) {
  const float v = u - 0.5f;
  const float mag = -logf(1.f - 2.f * fabsf(v));
  return v < 0.f ? -mag : mag;
}

// One branch-free Marsaglia-Tsang candidate: keep d * (1 + c z)^3 from the first accepted one.
__device__ __forceinline__ void mt_candidate(float z, float ua, float d, float c, bool& found,
                                             float& g) {
  const float t = 1.f + c * z;
  const float w = t * t * t;
  const bool ok = (t > 0.f) & (logf(ua) < 0.5f * z * z + d - d * w + d * logf(fmaxf(w, 1e-30f)));
  g = (ok && !found) ? d * w : g;
  found = found || ok;
}

// LMO-DP noise of clip norm 1 at global index e: Laplace(0, 1) / u.
__device__ __forceinline__ float lmo_noise_unit(int64_t e, const DpkLmoNoise& l, uint32_t k0,
                                                uint32_t k1, uint32_t c2, uint32_t c3) {
  float u0[4];
  lmo_uniforms(e, l.n_blocks, 0, k0, k1, c2, c3, u0);
  float gam;
  if (l.gamma_mode == DPK_GAMMA_K1) {
    gam = -logf(u0[3]);
  } else if (l.gamma_mode != DPK_GAMMA_MT) {
    float v[4];
    lmo_uniforms(e, l.n_blocks, 1, k0, k1, c2, c3, v);
    if (l.gamma_mode == DPK_GAMMA_K2) {
      gam = -logf(u0[3]) - logf(v[0]);
    } else {  // k = 0.5: Z^2 / 2 by Box-Muller
      const float cs = cosf(kTwoPi * v[0]);
      gam = -logf(u0[3]) * cs * cs;
    }
  } else {
    gam = l.mt_d;  // the fallback when every candidate is rejected (README: < 6e-10 at 8)
    bool found = false;
    for (int r = 0; r < l.rounds / 2; ++r) {
      float v[4];
      lmo_uniforms(e, l.n_blocks, 1 + r, k0, k1, c2, c3, v);
      const float rad = sqrtf(-2.f * logf(v[0]));
      float s, c;
      sincosf(kTwoPi * v[1], &s, &c);
      mt_candidate(rad * c, v[2], l.mt_d, l.mt_c, found, gam);
      mt_candidate(rad * s, v[3], l.mt_d, l.mt_c, found, gam);
    }
    if (l.boost) gam *= expf(logf(u0[3]) * l.inv_k);
  }
  const float u = l.a1_theta * gam + l.a3_over_lam * (-logf(u0[0])) +
                  l.a4 * (l.unif_a + l.unif_w * u0[1]);
  return laplace_unit(u0[2]) / u;
}

}  // namespace dpk
