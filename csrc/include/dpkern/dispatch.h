// One composable dtype switch: call `f` with a value of the C++ element type for `dtype`.
//   dpk::dispatch_float(p.dtype, [&](auto tag) { using T = decltype(tag); launch<T>(...); });
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include "dpkern/common.h"

namespace dpk {

template <typename F>
inline cudaError_t dispatch_float(DpkDType dtype, F&& f) {
  switch (dtype) {
    case DPK_FLOAT32: return f(float{});
    case DPK_FLOAT16: return f(__half{});
    case DPK_BFLOAT16: return f(__nv_bfloat16{});
  }
  return cudaErrorInvalidValue;
}

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

// Sum over a thread block; result valid in thread 0. Block size is a multiple of 32, <= 1024.
__device__ __forceinline__ float block_sum(float v) {
  __shared__ float warp_sums[32];
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (lane == 0) warp_sums[warp] = v;
  __syncthreads();
  if (warp == 0) {
    const int n_warps = blockDim.x >> 5;
    v = lane < n_warps ? warp_sums[lane] : 0.f;
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  }
  return v;
}

}  // namespace dpk
