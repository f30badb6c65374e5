// Fused Gaussian noise + optimizer step over many tensors in one launch (multi-tensor apply).
// Per element: g_noisy = (g + noise_std * z) * inv_b, z ~ N(0,1) from Philox4x32-10 in registers
// (counter layout in philox.cuh), then SGD or AdamW; parameters and fp32 states are updated in place.
#pragma once
#include "dpkern/common.h"

#ifdef __cplusplus
extern "C" {
#endif

// Values are part of the ABI with dpkern/noise/step.py.
typedef enum {
  DPK_OPT_SGD = 0,           // p -= lr * (g + wd * p)
  DPK_OPT_SGD_MOMENTUM = 1,  // torch.optim.SGD with momentum, dampening, Nesterov
  DPK_OPT_ADAMW = 2,         // torch.optim.AdamW (decoupled decay, bias correction)
} DpkOptimizer;

// Elements are processed in octets (8 consecutive *global* indices = 2 Philox groups); a chunk is
// DPK_NOISE_CHUNK_OCTETS octets and maps to one thread block.
#define DPK_NOISE_CHUNK_OCTETS 1024

// One tensor, as it lives in the device descriptor array. Every field is 8 bytes (ABI: 64 bytes).
typedef struct {
  void* param;            // [numel] element type param_dtype, updated in place
  const void* grad;       // [numel] element type grad_dtype: the clipped gradient sum
  float* exp_avg;         // [numel] fp32: momentum buffer (SGD momentum) or m (AdamW); else unused
  float* exp_avg_sq;      // [numel] fp32: v (AdamW); else unused
  int64_t numel;          // > 0
  int64_t global_offset;  // global index of element 0 (the counter uses global indices)
  int64_t chunk_begin;    // index of this tensor's first chunk in the launch
  int64_t vec_ok;         // 1: global_offset % 8 == 0 and every pointer 16-byte aligned
} DpkNoiseTensor;

typedef struct {
  const DpkNoiseTensor* tensors;  // device array [n_tensors]
  const int32_t* chunk_tensor;    // device array [n_chunks]: tensor index of each chunk
  int64_t n_tensors;
  int64_t n_chunks;               // sum over tensors of ceil(octets / DPK_NOISE_CHUNK_OCTETS)
  DpkDType param_dtype;           // DPK_FLOAT32 or DPK_BFLOAT16
  DpkDType grad_dtype;            // DPK_FLOAT32 or DPK_BFLOAT16
  DpkOptimizer optimizer;
  uint32_t key[2];                // Philox key = secret words s0, s1
  uint32_t ctr_hi[2];             // counter words c2, c3 = lo32(step) ^ s2, (stream<<24 | hi24(step)) ^ s3
  float noise_std;                // sigma * C (0 still runs the update)
  float inv_b;                    // 1 / expected batch size
  float lr;
  float weight_decay;             // SGD: coupled (added to the gradient)
  float decay;                    // AdamW: 1 - lr * weight_decay (decoupled)
  float momentum;
  float one_minus_dampening;
  int nesterov;
  int first_step;                 // SGD momentum: buffer = gradient (torch's first step)
  float beta1, beta2, eps;
  float one_minus_beta1, one_minus_beta2;  // 1 - beta in double, then rounded (as torch.optim)
  float step_size;                // AdamW: lr / (1 - beta1^t)
  float inv_sqrt_bc2;             // AdamW: 1 / sqrt(1 - beta2^t)
} DpkNoisyStepParams;

// Enqueues one launch on `stream`. Returns cudaSuccess or the launch error; never synchronizes.
cudaError_t dpk_noisy_step(const DpkNoisyStepParams* params, cudaStream_t stream);

// The raw stream, for tests and other samplers: Philox words and normals of groups
// first_group .. first_group + n_groups - 1 (element 4g + l of the global index space at l).
typedef struct {
  uint32_t* words;      // [n_groups * 4] device, or null
  float* z;             // [n_groups * 4] device, or null
  int64_t first_group;  // >= 0
  int64_t n_groups;     // >= 0
  uint32_t key[2];
  uint32_t ctr_hi[2];
} DpkPhiloxParams;

cudaError_t dpk_philox_normals(const DpkPhiloxParams* params, cudaStream_t stream);

#ifdef __cplusplus
}  // extern "C"
#endif
