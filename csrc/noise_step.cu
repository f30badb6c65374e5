// Fused noise + optimizer step, one launch over all tensors (multi-tensor apply, as apex chunks it).
// Block b takes chunk b of tensor chunk_tensor[b]; a thread takes one octet (8 global indices =
// 2 Philox groups) per iteration: 16-byte vector loads/stores where the tensor allows, else scalar.
// z lives only in registers; nothing full-size is allocated. The noise source is a template
// parameter (GaussianNoise, LmoNoise; NoNoise when noise_std == 0: no z is drawn). The optimizer
// DPK_OPT_RELEASE writes the noisy gradient back over the fp32 gradient and updates nothing.
#include <cuda_bf16.h>

#include <type_traits>

#include "dpkern/lmo.cuh"
#include "dpkern/noise_step.h"
#include "dpkern/philox.cuh"

namespace {

constexpr int kThreads = 256;
constexpr int kOctet = 8;

__device__ __forceinline__ float load1(const float* p, int64_t i) { return p[i]; }
__device__ __forceinline__ float load1(const __nv_bfloat16* p, int64_t i) {
  return __bfloat162float(p[i]);
}
__device__ __forceinline__ void store1(float* p, int64_t i, float v) { p[i] = v; }
__device__ __forceinline__ void store1(__nv_bfloat16* p, int64_t i, float v) {
  p[i] = __float2bfloat16_rn(v);
}

// 8 elements through 16-byte vectors: two for fp32, one for bf16. `p` is 16-byte aligned.
__device__ __forceinline__ void load8(const float* p, float out[8]) {
  const float4 a = __ldcs(reinterpret_cast<const float4*>(p));
  const float4 b = __ldcs(reinterpret_cast<const float4*>(p) + 1);
  out[0] = a.x; out[1] = a.y; out[2] = a.z; out[3] = a.w;
  out[4] = b.x; out[5] = b.y; out[6] = b.z; out[7] = b.w;
}
__device__ __forceinline__ void load8(const __nv_bfloat16* p, float out[8]) {
  const uint4 raw = __ldcs(reinterpret_cast<const uint4*>(p));
  const __nv_bfloat162* h = reinterpret_cast<const __nv_bfloat162*>(&raw);
#pragma unroll
  for (int k = 0; k < 4; ++k) {
    const float2 f = __bfloat1622float2(h[k]);
    out[2 * k] = f.x;
    out[2 * k + 1] = f.y;
  }
}
__device__ __forceinline__ void store8(float* p, const float v[8]) {
  __stcs(reinterpret_cast<float4*>(p), make_float4(v[0], v[1], v[2], v[3]));
  __stcs(reinterpret_cast<float4*>(p) + 1, make_float4(v[4], v[5], v[6], v[7]));
}
__device__ __forceinline__ void store8(__nv_bfloat16* p, const float v[8]) {
  uint4 raw;
  __nv_bfloat162* h = reinterpret_cast<__nv_bfloat162*>(&raw);
#pragma unroll
  for (int k = 0; k < 4; ++k) h[k] = __floats2bfloat162_rn(v[2 * k], v[2 * k + 1]);
  __stcs(reinterpret_cast<uint4*>(p), raw);
}

// The noisy, scaled gradient (g + noise_std * z) * inv_b: one fma, then a multiply the compiler
// may not fuse into the update's adds (__fmul_rn). Every kernel here rounds it the same way, so a
// gradient released by DPK_OPT_RELEASE and read back by a noise-free step (noise_std 0, inv_b 1:
// __fmul_rn(g, 1) = g) is the very value a one-pass step forms in registers.
template <typename Noise>
__device__ __forceinline__ float noisy_grad(const DpkNoisyStepParams& a, float g, float z) {
  if (!Noise::kDraws) return __fmul_rn(g, a.inv_b);
  return __fmul_rn(__fmaf_rn(a.noise_std, z, g), a.inv_b);
}

// The optimizer on one element; `gn` is the noisy, scaled gradient. Matches torch.optim's formulas.
template <int OPT>
__device__ __forceinline__ void update(const DpkNoisyStepParams& a, float gn, float& p, float& m,
                                       float& v) {
  if (OPT == DPK_OPT_ADAMW) {
    p *= a.decay;
    m = a.beta1 * m + a.one_minus_beta1 * gn;
    v = a.beta2 * v + a.one_minus_beta2 * gn * gn;
    const float den = sqrtf(v) * a.inv_sqrt_bc2 + a.eps;
    p -= a.step_size * (m / den);
  } else {
    float d = gn + a.weight_decay * p;
    if (OPT == DPK_OPT_SGD_MOMENTUM) {
      m = a.first_step ? d : a.momentum * m + a.one_minus_dampening * d;
      d = a.nesterov ? d + a.momentum * m : m;
    }
    p -= a.lr * d;
  }
}

// z of the octet's 8 global indices 8o .. 8o + 7. Gaussian: two Philox groups of 4 normals.
struct GaussianNoise {
  static constexpr bool kDraws = true;
  __device__ __forceinline__ void octet(const DpkNoisyStepParams& a, int64_t o, float z[8]) const {
    dpk::normals4(2 * o, a.key[0], a.key[1], a.ctr_hi[0], a.ctr_hi[1], z);
    dpk::normals4(2 * o + 1, a.key[0], a.key[1], a.ctr_hi[0], a.ctr_hi[1], z + 4);
  }
};

// LMO-DP: each element draws its own n_blocks Philox calls (lmo.cuh), so the octet is only the
// unit of the loads; z = Laplace(0, 1) / u and noise_std carries the clip norm C.
struct LmoNoise {
  static constexpr bool kDraws = true;
  DpkLmoNoise l;
  __device__ __forceinline__ void octet(const DpkNoisyStepParams& a, int64_t o, float z[8]) const {
#pragma unroll
    for (int k = 0; k < kOctet; ++k)
      z[k] = dpk::lmo_noise_unit(o * kOctet + k, l, a.key[0], a.key[1], a.ctr_hi[0], a.ctr_hi[1]);
  }
};

// noise_std == 0 (Gaussian): nothing to draw; gn = g * inv_b.
struct NoNoise {
  static constexpr bool kDraws = false;
  __device__ __forceinline__ void octet(const DpkNoisyStepParams&, int64_t, float z[8]) const {
#pragma unroll
    for (int k = 0; k < kOctet; ++k) z[k] = 0.f;
  }
};

template <typename TP, typename TG, int OPT, typename Noise>
__global__ void __launch_bounds__(kThreads) noisy_step_kernel(const DpkNoisyStepParams a,
                                                              const Noise noise) {
  constexpr bool kRelease = OPT == DPK_OPT_RELEASE;  // gn written over g; p, m, v untouched
  constexpr bool kM = OPT == DPK_OPT_SGD_MOMENTUM || OPT == DPK_OPT_ADAMW;
  constexpr bool kV = OPT == DPK_OPT_ADAMW;
  const DpkNoiseTensor t = a.tensors[a.chunk_tensor[blockIdx.x]];
  TP* __restrict__ pp = static_cast<TP*>(t.param);
  // Read-only for an update; the release writes the noisy gradient back.
  using GradPtr = std::conditional_t<kRelease, TG*, const TG*>;
  const GradPtr __restrict__ gp = static_cast<GradPtr>(const_cast<void*>(t.grad));
  float* __restrict__ mp = t.exp_avg;
  float* __restrict__ vp = t.exp_avg_sq;
  // Octets are numbered in the global frame, so counters depend on global indices only.
  const int64_t first_oct = t.global_offset / kOctet;
  const int64_t end_oct = (t.global_offset + t.numel + kOctet - 1) / kOctet;
  const int64_t oct0 = first_oct + (blockIdx.x - t.chunk_begin) * int64_t{DPK_NOISE_CHUNK_OCTETS};
  const int64_t oct1 = min(oct0 + int64_t{DPK_NOISE_CHUNK_OCTETS}, end_oct);
  for (int64_t o = oct0 + threadIdx.x; o < oct1; o += kThreads) {
    float z[kOctet];
    noise.octet(a, o, z);
    const int64_t l0 = o * kOctet - t.global_offset;  // local index of the octet's first element
    float p[kOctet], g[kOctet], m[kOctet], v[kOctet];
    if (t.vec_ok && l0 >= 0 && l0 + kOctet <= t.numel) {
      load8(gp + l0, g);
#pragma unroll
      for (int k = 0; k < kOctet; ++k) g[k] = noisy_grad<Noise>(a, g[k], z[k]);
      if constexpr (kRelease) {
        store8(gp + l0, g);
      } else {
        load8(pp + l0, p);
        if (kM && !(OPT == DPK_OPT_SGD_MOMENTUM && a.first_step)) load8(mp + l0, m);
        if (kV) load8(vp + l0, v);
#pragma unroll
        for (int k = 0; k < kOctet; ++k) update<OPT>(a, g[k], p[k], m[k], v[k]);
        store8(pp + l0, p);
        if (kM) store8(mp + l0, m);
        if (kV) store8(vp + l0, v);
      }
    } else {
#pragma unroll
      for (int k = 0; k < kOctet; ++k) {
        const int64_t i = l0 + k;
        if (i < 0 || i >= t.numel) continue;
        const float gn = noisy_grad<Noise>(a, load1(gp, i), z[k]);
        if constexpr (kRelease) {
          store1(gp, i, gn);
        } else {
          float pk = load1(pp, i), mk = 0.f, vk = 0.f;
          if (kM && !(OPT == DPK_OPT_SGD_MOMENTUM && a.first_step)) mk = mp[i];
          if (kV) vk = vp[i];
          update<OPT>(a, gn, pk, mk, vk);
          store1(pp, i, pk);
          if (kM) mp[i] = mk;
          if (kV) vp[i] = vk;
        }
      }
    }
  }
}

template <typename TP, typename TG, typename Noise>
cudaError_t launch_opt(const DpkNoisyStepParams& a, const Noise& noise, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(a.n_chunks)), block(kThreads);
  switch (a.optimizer) {
    case DPK_OPT_SGD:
      noisy_step_kernel<TP, TG, DPK_OPT_SGD, Noise><<<grid, block, 0, stream>>>(a, noise);
      break;
    case DPK_OPT_SGD_MOMENTUM:
      noisy_step_kernel<TP, TG, DPK_OPT_SGD_MOMENTUM, Noise><<<grid, block, 0, stream>>>(a, noise);
      break;
    case DPK_OPT_ADAMW:
      noisy_step_kernel<TP, TG, DPK_OPT_ADAMW, Noise><<<grid, block, 0, stream>>>(a, noise);
      break;
    case DPK_OPT_RELEASE:  // writes fp32 gradients; no parameter is read (its code: fp32)
      if constexpr (std::is_same<TP, float>::value && std::is_same<TG, float>::value) {
        noisy_step_kernel<float, float, DPK_OPT_RELEASE, Noise>
            <<<grid, block, 0, stream>>>(a, noise);
        break;
      } else {
        return cudaErrorInvalidValue;
      }
    default: return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}

// fp32 / bf16 only: the two element types dpkern trains in.
template <typename F>
cudaError_t dispatch_fp32_bf16(DpkDType dtype, F&& f) {
  switch (dtype) {
    case DPK_FLOAT32: return f(float{});
    case DPK_BFLOAT16: return f(__nv_bfloat16{});
    default: return cudaErrorInvalidValue;
  }
}

__global__ void philox_normals_kernel(const DpkPhiloxParams a) {
  const int64_t i = blockIdx.x * int64_t{kThreads} + threadIdx.x;
  if (i >= a.n_groups) return;
  const int64_t g = a.first_group + i;
  if (a.words != nullptr) {
    const uint64_t gu = static_cast<uint64_t>(g);
    const dpk::Philox4 w = dpk::philox4x32_10(static_cast<uint32_t>(gu),
                                              static_cast<uint32_t>(gu >> 32), a.ctr_hi[0],
                                              a.ctr_hi[1], a.key[0], a.key[1]);
    for (int k = 0; k < 4; ++k) a.words[4 * i + k] = w.x[k];
  }
  if (a.z != nullptr) {
    float z[4];
    dpk::normals4(g, a.key[0], a.key[1], a.ctr_hi[0], a.ctr_hi[1], z);
    for (int k = 0; k < 4; ++k) a.z[4 * i + k] = z[k];
  }
}

}  // namespace

extern "C" cudaError_t dpk_philox_normals(const DpkPhiloxParams* p, cudaStream_t stream) {
  if (p == nullptr || p->n_groups < 0 || p->first_group < 0) return cudaErrorInvalidValue;
  if (p->n_groups == 0) return cudaSuccess;
  const int64_t blocks = (p->n_groups + kThreads - 1) / kThreads;
  if (blocks > 0x7fffffffLL) return cudaErrorInvalidValue;
  philox_normals_kernel<<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(*p);
  return cudaGetLastError();
}

namespace {

bool valid_step_params(const DpkNoisyStepParams* p) {
  return p != nullptr && p->tensors != nullptr && p->chunk_tensor != nullptr && p->n_tensors > 0 &&
         p->n_chunks > 0 && p->n_chunks <= 0x7fffffffLL;
}

template <typename Noise>
cudaError_t dispatch_step(const DpkNoisyStepParams* p, const Noise& noise, cudaStream_t stream) {
  return dispatch_fp32_bf16(p->param_dtype, [&](auto ptag) {
    return dispatch_fp32_bf16(p->grad_dtype, [&](auto gtag) {
      return launch_opt<decltype(ptag), decltype(gtag)>(*p, noise, stream);
    });
  });
}

// The layout lmo_ref.lmo_blocks defines: a mismatch would read other coordinates' counters.
bool valid_lmo(const DpkLmoNoise* l) {
  if (l == nullptr) return false;
  switch (l->gamma_mode) {
    case DPK_GAMMA_K1: return l->n_blocks == 1;
    case DPK_GAMMA_K2:
    case DPK_GAMMA_K05: return l->n_blocks == 2;
    case DPK_GAMMA_MT:
      return l->rounds >= 2 && l->rounds % 2 == 0 && l->n_blocks == 1 + l->rounds / 2;
    default: return false;
  }
}

}  // namespace

extern "C" cudaError_t dpk_noisy_step(const DpkNoisyStepParams* p, cudaStream_t stream) {
  static_assert(sizeof(DpkNoiseTensor) == 64, "DpkNoiseTensor is part of the Python ABI");
  if (!valid_step_params(p)) return cudaErrorInvalidValue;
  if (p->noise_std == 0.f) return dispatch_step(p, NoNoise{}, stream);
  return dispatch_step(p, GaussianNoise{}, stream);
}

extern "C" cudaError_t dpk_noisy_step_lmo(const DpkNoisyStepParams* p, const DpkLmoNoise* lmo,
                                          cudaStream_t stream) {
  if (!valid_step_params(p) || !valid_lmo(lmo)) return cudaErrorInvalidValue;
  return dispatch_step(p, LmoNoise{*lmo}, stream);
}
