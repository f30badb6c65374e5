// The one pybind11 binding file: checks arguments, releases the GIL, calls the torch-free C API.
// Tensors arrive as integers (device pointers) with sizes, strides, a dtype code and a stream handle.
#include <pybind11/pybind11.h>

#include <cstdint>
#include <stdexcept>
#include <string>

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

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "dpkern CUDA kernels (torch-free; tensors cross as device pointers)";
  m.def("device_count", &device_count);
  m.def("rownorm_fwd", &rownorm_fwd, py::arg("x"), py::arg("out"), py::arg("n_rows"),
        py::arg("n_cols"), py::arg("stride_xb"), py::arg("stride_xn"), py::arg("dtype"),
        py::arg("stream"));
}
