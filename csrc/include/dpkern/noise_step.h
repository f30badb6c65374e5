// Fused noise + optimizer step over many tensors in one launch (multi-tensor apply).
// Per element: g_noisy = (g + noise_std * z) * inv_b, z drawn in registers from Philox4x32-10 (counter
// layout in philox.cuh), then SGD or AdamW; parameters and fp32 states are updated in place.
// g_noisy is rounded as __fmul_rn(fmaf(noise_std, z, g), inv_b) by every instantiation, so
// DPK_OPT_RELEASE followed by a step with noise_std = 0, inv_b = 1 on the released gradients gives
// the parameters and states of one step, bit for bit.
//   dpk_noisy_step:      z ~ N(0, 1) (the Gaussian mechanism, stream 0 words); noise_std == 0 draws
//                        no z (g_noisy = g * inv_b)
//   dpk_noisy_step_lmo:  z = LMO-DP noise of clip norm 1, Laplace(0, 1/u) (lmo.cuh; stream 1 words);
//                        noise_std is then the clip norm C
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
  DPK_OPT_RELEASE = 3,       // no update: g <- g_noisy written over the (fp32) gradient; param,
                             // exp_avg, exp_avg_sq are not touched (the noisy release pass)
} DpkOptimizer;

// Elements are processed in octets (8 consecutive *global* indices = 2 Philox groups); a chunk is
// DPK_NOISE_CHUNK_OCTETS octets and maps to one thread block.
#define DPK_NOISE_CHUNK_OCTETS 1024

// One tensor, as it lives in the device descriptor array. Every field is 8 bytes (ABI: 64 bytes).
typedef struct {
  void* param;            // [numel] element type param_dtype, updated in place
  const void* grad;       // [numel] element type grad_dtype: the clipped gradient sum (written
                          // by DPK_OPT_RELEASE, which needs fp32)
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
  DpkDType param_dtype;           // DPK_FLOAT32 or DPK_BFLOAT16 (DPK_FLOAT32 for DPK_OPT_RELEASE)
  DpkDType grad_dtype;            // DPK_FLOAT32 or DPK_BFLOAT16 (DPK_FLOAT32 for DPK_OPT_RELEASE)
  DpkOptimizer optimizer;
  uint32_t key[2];                // Philox key = secret words s0, s1
  uint32_t ctr_hi[2];             // counter words c2, c3 = lo32(step) ^ s2, (stream<<24 | hi24(step)) ^ s3
  float noise_std;                // sigma * C (0 still runs the update, drawing no z)
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

// LMO-DP's Gamma paths; values are part of the ABI (kernels/lmo_noise.py GAMMA_MODES).
typedef enum {
  DPK_GAMMA_K1 = 0,   // k = 1:   -log U3                              (1 Philox call / coordinate)
  DPK_GAMMA_K2 = 1,   // k = 2:   -log U3 - log U4                     (2)
  DPK_GAMMA_K05 = 2,  // k = 0.5: -log U3 cos^2(2 pi U4)                (2)
  DPK_GAMMA_MT = 3,   // other k: Marsaglia-Tsang, `rounds` candidates   (1 + rounds / 2)
} DpkGammaMode;

// The LMO-DP sampler's constants (dpkern/mechanisms/lmo_ref.py): per coordinate e,
//   u = a1_theta * Gamma(k) + a3_over_lam * Exp(1) + a4 * (unif_a + unif_w * U),  z = Laplace(0, 1/u),
// from Philox calls e * n_blocks + j (j < n_blocks), each word x -> ((x >> 9) * 2 + 1) / 2^24.
typedef struct {
  float a1_theta;     // a1 * theta
  float a3_over_lam;  // a3 / lam (lam is a rate)
  float a4;
  float unif_a;       // a
  float unif_w;       // b - a
  float mt_d;         // Marsaglia-Tsang d = k' - 1/3, k' = k (+1 if k < 1); the fallback value
  float mt_c;         // 1 / sqrt(9 d)
  float inv_k;        // 1 / k (the U^(1/k) boost for k < 1)
  int32_t gamma_mode;  // DpkGammaMode
  int32_t rounds;      // DPK_GAMMA_MT: candidates, even, >= 2
  int32_t boost;       // DPK_GAMMA_MT: 1 when k < 1
  int32_t n_blocks;    // Philox calls per coordinate: 1, 2, 2, 1 + rounds / 2 by gamma_mode
} DpkLmoNoise;

// dpk_noisy_step with z from LMO-DP (params->key / ctr_hi: the stream-1 words). Same tensors,
// chunks and optimizers; a separate instantiation, so the Gaussian kernel is unchanged.
cudaError_t dpk_noisy_step_lmo(const DpkNoisyStepParams* params, const DpkLmoNoise* lmo,
                               cudaStream_t stream);

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
