// Per-row squared L2 norm: out[b] = sum_n float(x[b, n])^2, accumulated in fp32.
#pragma once
#include "dpkern/common.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct {
  const void* x;      // [n_rows, n_cols] device pointer, element type `dtype`
  float* out;         // [n_rows] device pointer, fp32; every element is written
  int64_t n_rows;     // B >= 0 (0: nothing is launched)
  int64_t n_cols;     // N >= 0 (0: out is all zeros)
  int64_t stride_xb;  // elements between rows
  int64_t stride_xn;  // elements between columns (1 takes the 16-byte vector path when aligned)
  DpkDType dtype;
} DpkRowNormParams;

// Enqueues the kernel on `stream`. Returns cudaSuccess or the launch error; never synchronizes.
cudaError_t dpk_rownorm_fwd(const DpkRowNormParams* params, cudaStream_t stream);

#ifdef __cplusplus
}  // extern "C"
#endif
