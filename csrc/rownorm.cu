// Per-row squared L2 norm. One block per row; 16-byte vector loads on the contiguous, aligned path.
#include "dpkern/dispatch.h"
#include "dpkern/rownorm.h"

namespace {

constexpr int kThreads = 256;

template <typename T>
__global__ void rownorm_fwd_kernel(const T* __restrict__ x, float* __restrict__ out, int64_t n_cols,
                                   int64_t stride_xb, int64_t stride_xn, bool vec_ok) {
  const int64_t row = blockIdx.x;
  const T* xr = x + row * stride_xb;
  float acc = 0.f;
  if (vec_ok) {
    constexpr int kVec = 16 / sizeof(T);
    const int64_t n_vec = n_cols / kVec;
    const uint4* xv = reinterpret_cast<const uint4*>(xr);
    for (int64_t i = threadIdx.x; i < n_vec; i += kThreads) {
      uint4 raw = __ldg(xv + i);
      const T* e = reinterpret_cast<const T*>(&raw);
#pragma unroll
      for (int k = 0; k < kVec; ++k) {
        const float f = dpk::to_float(e[k]);
        acc = fmaf(f, f, acc);
      }
    }
    for (int64_t i = n_vec * kVec + threadIdx.x; i < n_cols; i += kThreads) {
      const float f = dpk::to_float(xr[i]);
      acc = fmaf(f, f, acc);
    }
  } else {
    for (int64_t i = threadIdx.x; i < n_cols; i += kThreads) {
      const float f = dpk::to_float(xr[i * stride_xn]);
      acc = fmaf(f, f, acc);
    }
  }
  acc = dpk::block_sum(acc);
  if (threadIdx.x == 0) out[row] = acc;
}

}  // namespace

extern "C" cudaError_t dpk_rownorm_fwd(const DpkRowNormParams* p, cudaStream_t stream) {
  if (p == nullptr || p->n_rows < 0 || p->n_cols < 0 || p->n_rows > 0x7fffffffLL)
    return cudaErrorInvalidValue;
  if (p->n_rows == 0) return cudaSuccess;
  return dpk::dispatch_float(p->dtype, [&](auto tag) {
    using T = decltype(tag);
    const T* x = static_cast<const T*>(p->x);
    const bool vec_ok = p->stride_xn == 1 && reinterpret_cast<uintptr_t>(x) % 16 == 0 &&
                        (p->stride_xb * static_cast<int64_t>(sizeof(T))) % 16 == 0;
    rownorm_fwd_kernel<T><<<static_cast<unsigned>(p->n_rows), kThreads, 0, stream>>>(
        x, p->out, p->n_cols, p->stride_xb, p->stride_xn, vec_ok);
    return cudaGetLastError();
  });
}
