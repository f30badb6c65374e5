// The one pybind11 binding file: checks arguments, releases the GIL, calls the torch-free C API.
// Tensors arrive as integers (device pointers) with sizes, strides, a dtype code and a stream handle.
#include <pybind11/pybind11.h>

#include <cmath>
#include <cstdint>
#include <stdexcept>
#include <string>

#include "dpkern/noise_step.h"
#include "dpkern/rownorm.h"

namespace py = pybind11;

namespace {

void check_cuda(cudaError_t err, const char* what) {
  if (err != cudaSuccess)
    throw std::runtime_error(std::string("dpkern: ") + what + " failed: " + cudaGetErrorString(err));
}

// A pointer must be device memory (or managed) that the current context can reach.
void check_device_ptr(uintptr_t ptr, const char* name) {
  if (ptr == 0) throw std::invalid_argument(std::string("dpkern: ") + name + " is a null pointer");
  cudaPointerAttributes attr{};
  cudaError_t err = cudaPointerGetAttributes(&attr, reinterpret_cast<const void*>(ptr));
  if (err != cudaSuccess || (attr.type != cudaMemoryTypeDevice && attr.type != cudaMemoryTypeManaged)) {
    cudaGetLastError();  // clear the sticky-free error state
    throw std::invalid_argument(std::string("dpkern: ") + name + " is not CUDA device memory");
  }
}

DpkDType to_dtype(int code) {
  if (code < DPK_FLOAT32 || code > DPK_BFLOAT16)
    throw std::invalid_argument("dpkern: unsupported dtype code " + std::to_string(code));
  return static_cast<DpkDType>(code);
}

// Returns the number of visible CUDA devices, or raises with the runtime's reason.
int device_count() {
  int n = 0;
  cudaError_t err = cudaGetDeviceCount(&n);
  if (err != cudaSuccess) {
    cudaGetLastError();
    throw std::runtime_error(std::string("CUDA runtime reports: ") + cudaGetErrorString(err));
  }
  return n;
}

void rownorm_fwd(uintptr_t x, uintptr_t out, int64_t n_rows, int64_t n_cols, int64_t stride_xb,
                 int64_t stride_xn, int dtype, uintptr_t stream) {
  if (n_rows < 0 || n_cols < 0) throw std::invalid_argument("dpkern: negative size");
  if (n_rows == 0) return;
  check_device_ptr(out, "out");
  if (n_cols > 0) check_device_ptr(x, "x");
  DpkRowNormParams p{reinterpret_cast<const void*>(x), reinterpret_cast<float*>(out), n_rows,
                     n_cols, stride_xb, stride_xn, to_dtype(dtype)};
  cudaError_t err;
  {
    py::gil_scoped_release release;
    err = dpk_rownorm_fwd(&p, reinterpret_cast<cudaStream_t>(stream));
  }
  check_cuda(err, "rownorm_fwd launch");
}

void check_finite(double x, const char* name) {
  if (!std::isfinite(x))
    throw std::invalid_argument(std::string("dpkern: noisy_step: ") + name + " must be finite");
}

// The descriptor array and chunk table are built (and cached) by dpkern/noise/step.py, which has
// already checked every tensor's device, dtype, shape and contiguity.
DpkNoisyStepParams step_params(uintptr_t tensors, uintptr_t chunk_tensor, int64_t n_tensors,
                               int64_t n_chunks, int param_dtype, int grad_dtype, int optimizer,
                               int64_t k0, int64_t k1, int64_t c2, int64_t c3, double noise_std,
                               double inv_b, double lr, double weight_decay, double decay,
                               double momentum, double one_minus_dampening, bool nesterov,
                               bool first_step, double beta1, double beta2, double eps,
                               double step_size, double inv_sqrt_bc2) {
  if (n_tensors <= 0) throw std::invalid_argument("dpkern: noisy_step: n_tensors must be > 0");
  if (n_chunks <= 0 || n_chunks > 0x7fffffffLL)
    throw std::invalid_argument("dpkern: noisy_step: n_chunks out of range");
  if (optimizer < DPK_OPT_SGD || optimizer > DPK_OPT_RELEASE)
    throw std::invalid_argument("dpkern: noisy_step: unknown optimizer code " + std::to_string(optimizer));
  const DpkDType pd = to_dtype(param_dtype), gd = to_dtype(grad_dtype);
  if (pd == DPK_FLOAT16 || gd == DPK_FLOAT16)
    throw std::invalid_argument("dpkern: noisy_step: params and grads must be float32 or bfloat16");
  if (optimizer == DPK_OPT_RELEASE && (pd != DPK_FLOAT32 || gd != DPK_FLOAT32))
    throw std::invalid_argument("dpkern: noisy_step: the release writes fp32 gradients only");
  const double scalars[] = {noise_std, inv_b, lr, weight_decay, decay, momentum,
                            one_minus_dampening, beta1, beta2, eps, step_size, inv_sqrt_bc2};
  const char* names[] = {"noise_std", "inv_b", "lr", "weight_decay", "decay", "momentum",
                         "one_minus_dampening", "beta1", "beta2", "eps", "step_size", "inv_sqrt_bc2"};
  for (int i = 0; i < 12; ++i) check_finite(scalars[i], names[i]);
  if (noise_std < 0) throw std::invalid_argument("dpkern: noisy_step: noise_std must be >= 0");
  check_device_ptr(tensors, "tensors");
  check_device_ptr(chunk_tensor, "chunk_tensor");
  const auto u32 = [](int64_t x) { return static_cast<uint32_t>(x & 0xffffffffLL); };
  DpkNoisyStepParams p{};
  p.tensors = reinterpret_cast<const DpkNoiseTensor*>(tensors);
  p.chunk_tensor = reinterpret_cast<const int32_t*>(chunk_tensor);
  p.n_tensors = n_tensors;
  p.n_chunks = n_chunks;
  p.param_dtype = pd;
  p.grad_dtype = gd;
  p.optimizer = static_cast<DpkOptimizer>(optimizer);
  p.key[0] = u32(k0);
  p.key[1] = u32(k1);
  p.ctr_hi[0] = u32(c2);
  p.ctr_hi[1] = u32(c3);
  p.noise_std = static_cast<float>(noise_std);
  p.inv_b = static_cast<float>(inv_b);
  p.lr = static_cast<float>(lr);
  p.weight_decay = static_cast<float>(weight_decay);
  p.decay = static_cast<float>(decay);
  p.momentum = static_cast<float>(momentum);
  p.one_minus_dampening = static_cast<float>(one_minus_dampening);
  p.nesterov = nesterov ? 1 : 0;
  p.first_step = first_step ? 1 : 0;
  p.beta1 = static_cast<float>(beta1);
  p.beta2 = static_cast<float>(beta2);
  // 1 - beta in double: in fp32, 1 - float(0.999) is 1.3e-5 away (relative) from 0.001.
  p.one_minus_beta1 = static_cast<float>(1.0 - beta1);
  p.one_minus_beta2 = static_cast<float>(1.0 - beta2);
  p.eps = static_cast<float>(eps);
  p.step_size = static_cast<float>(step_size);
  p.inv_sqrt_bc2 = static_cast<float>(inv_sqrt_bc2);
  return p;
}

#define DPK_STEP_ARGS                                                                          \
  uintptr_t tensors, uintptr_t chunk_tensor, int64_t n_tensors, int64_t n_chunks,              \
      int param_dtype, int grad_dtype, int optimizer, int64_t k0, int64_t k1, int64_t c2,      \
      int64_t c3, double noise_std, double inv_b, double lr, double weight_decay, double decay, \
      double momentum, double one_minus_dampening, bool nesterov, bool first_step,             \
      double beta1, double beta2, double eps, double step_size, double inv_sqrt_bc2
#define DPK_STEP_PASS                                                                          \
  tensors, chunk_tensor, n_tensors, n_chunks, param_dtype, grad_dtype, optimizer, k0, k1, c2,  \
      c3, noise_std, inv_b, lr, weight_decay, decay, momentum, one_minus_dampening, nesterov,  \
      first_step, beta1, beta2, eps, step_size, inv_sqrt_bc2

void noisy_step(DPK_STEP_ARGS, uintptr_t stream) {
  const DpkNoisyStepParams p = step_params(DPK_STEP_PASS);
  cudaError_t err;
  {
    py::gil_scoped_release release;
    err = dpk_noisy_step(&p, reinterpret_cast<cudaStream_t>(stream));
  }
  check_cuda(err, "noisy_step launch");
}

// LMO-DP noise (dpkern/mechanisms/lmo_ref.py): noise_std is the clip norm C, k0..c3 the stream-1
// words; the constants are checked here against the layout lmo_ref.lmo_blocks defines.
void noisy_step_lmo(DPK_STEP_ARGS, int gamma_mode, int rounds, int n_blocks, bool boost,
                    double a1_theta, double a3_over_lam, double a4, double unif_a, double unif_w,
                    double mt_d, double mt_c, double inv_k, uintptr_t stream) {
  const DpkNoisyStepParams p = step_params(DPK_STEP_PASS);
  const double lmo_scalars[] = {a1_theta, a3_over_lam, a4, unif_a, unif_w, mt_d, mt_c, inv_k};
  const char* names[] = {"a1_theta", "a3_over_lam", "a4", "unif_a", "unif_w", "mt_d", "mt_c",
                         "inv_k"};
  for (int i = 0; i < 8; ++i) check_finite(lmo_scalars[i], names[i]);
  if (gamma_mode < DPK_GAMMA_K1 || gamma_mode > DPK_GAMMA_MT)
    throw std::invalid_argument("dpkern: noisy_step_lmo: unknown gamma_mode " + std::to_string(gamma_mode));
  const int want = gamma_mode == DPK_GAMMA_K1 ? 1 : gamma_mode == DPK_GAMMA_MT ? 1 + rounds / 2 : 2;
  if ((gamma_mode == DPK_GAMMA_MT && (rounds < 2 || rounds % 2 != 0)) || n_blocks != want)
    throw std::invalid_argument("dpkern: noisy_step_lmo: rounds / n_blocks do not match gamma_mode");
  if (a1_theta < 0 || a3_over_lam < 0 || a4 < 0 || unif_a < 0 || !(unif_w > 0))
    throw std::invalid_argument("dpkern: noisy_step_lmo: LMO constants out of range");
  DpkLmoNoise l{};
  l.a1_theta = static_cast<float>(a1_theta);
  l.a3_over_lam = static_cast<float>(a3_over_lam);
  l.a4 = static_cast<float>(a4);
  l.unif_a = static_cast<float>(unif_a);
  l.unif_w = static_cast<float>(unif_w);
  l.mt_d = static_cast<float>(mt_d);
  l.mt_c = static_cast<float>(mt_c);
  l.inv_k = static_cast<float>(inv_k);
  l.gamma_mode = gamma_mode;
  l.rounds = rounds;
  l.boost = gamma_mode == DPK_GAMMA_MT && boost ? 1 : 0;  // k < 1: Gamma(k + 1) * U^(1/k)
  l.n_blocks = n_blocks;
  cudaError_t err;
  {
    py::gil_scoped_release release;
    err = dpk_noisy_step_lmo(&p, &l, reinterpret_cast<cudaStream_t>(stream));
  }
  check_cuda(err, "noisy_step_lmo launch");
}

void philox_normals(uintptr_t words, uintptr_t z, int64_t first_group, int64_t n_groups,
                    int64_t k0, int64_t k1, int64_t c2, int64_t c3, uintptr_t stream) {
  if (first_group < 0 || n_groups < 0)
    throw std::invalid_argument("dpkern: philox_normals: first_group and n_groups must be >= 0");
  if (n_groups == 0) return;
  if (words != 0) check_device_ptr(words, "words");
  if (z != 0) check_device_ptr(z, "z");
  const auto u32 = [](int64_t x) { return static_cast<uint32_t>(x & 0xffffffffLL); };
  DpkPhiloxParams p{reinterpret_cast<uint32_t*>(words), reinterpret_cast<float*>(z), first_group,
                    n_groups, {u32(k0), u32(k1)}, {u32(c2), u32(c3)}};
  cudaError_t err;
  {
    py::gil_scoped_release release;
    err = dpk_philox_normals(&p, reinterpret_cast<cudaStream_t>(stream));
  }
  check_cuda(err, "philox_normals launch");
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "dpkern CUDA kernels (torch-free; tensors cross as device pointers)";
  m.def("device_count", &device_count);
  m.def("rownorm_fwd", &rownorm_fwd, py::arg("x"), py::arg("out"), py::arg("n_rows"),
        py::arg("n_cols"), py::arg("stride_xb"), py::arg("stride_xn"), py::arg("dtype"),
        py::arg("stream"));
  m.def("philox_normals", &philox_normals, py::arg("words"), py::arg("z"), py::arg("first_group"),
        py::arg("n_groups"), py::arg("k0"), py::arg("k1"), py::arg("c2"), py::arg("c3"),
        py::arg("stream"));
  m.attr("NOISE_CHUNK_OCTETS") = DPK_NOISE_CHUNK_OCTETS;
  m.def("noisy_step", &noisy_step, py::arg("tensors"), py::arg("chunk_tensor"),
        py::arg("n_tensors"), py::arg("n_chunks"), py::arg("param_dtype"), py::arg("grad_dtype"),
        py::arg("optimizer"), py::arg("k0"), py::arg("k1"), py::arg("c2"), py::arg("c3"),
        py::arg("noise_std"), py::arg("inv_b"), py::arg("lr"), py::arg("weight_decay"),
        py::arg("decay"), py::arg("momentum"), py::arg("one_minus_dampening"),
        py::arg("nesterov"), py::arg("first_step"), py::arg("beta1"), py::arg("beta2"),
        py::arg("eps"), py::arg("step_size"), py::arg("inv_sqrt_bc2"), py::arg("stream"));
  m.def("noisy_step_lmo", &noisy_step_lmo, py::arg("tensors"), py::arg("chunk_tensor"),
        py::arg("n_tensors"), py::arg("n_chunks"), py::arg("param_dtype"), py::arg("grad_dtype"),
        py::arg("optimizer"), py::arg("k0"), py::arg("k1"), py::arg("c2"), py::arg("c3"),
        py::arg("noise_std"), py::arg("inv_b"), py::arg("lr"), py::arg("weight_decay"),
        py::arg("decay"), py::arg("momentum"), py::arg("one_minus_dampening"),
        py::arg("nesterov"), py::arg("first_step"), py::arg("beta1"), py::arg("beta2"),
        py::arg("eps"), py::arg("step_size"), py::arg("inv_sqrt_bc2"), py::arg("gamma_mode"),
        py::arg("rounds"), py::arg("n_blocks"), py::arg("boost"), py::arg("a1_theta"),
        py::arg("a3_over_lam"), py::arg("a4"), py::arg("unif_a"), py::arg("unif_w"),
        py::arg("mt_d"), py::arg("mt_c"), py::arg("inv_k"), py::arg("stream"));
}
