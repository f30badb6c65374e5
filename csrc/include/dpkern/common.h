// dpkern C API: shared types. Torch-free; tensors cross as raw device pointers plus sizes/strides.
#pragma once
#include <cstdint>
#include <cuda_runtime.h>

#ifdef __cplusplus
extern "C" {
#endif

// Element types understood by every op. Values are part of the ABI with the Python layer.
typedef enum {
  DPK_FLOAT32 = 0,
  DPK_FLOAT16 = 1,
  DPK_BFLOAT16 = 2,
} DpkDType;

#ifdef __cplusplus
}  // extern "C"
#endif
