"""The written tolerance policy.

A kernel's output is compared with the plain-PyTorch reference evaluated in float64 on the same
(already rounded) inputs. The error allowed grows with the length of the reduction feeding each
output element, as for a summation in the accumulation dtype: rtol = C * eps(acc) * sqrt(n_reduce),
with C = 8 and a floor of 4 * eps(acc). All dpkern reductions accumulate in fp32 whatever the input
dtype, so eps(acc) is fp32's for bf16/fp16/fp32 inputs; what the input dtype changes is whether the
*inputs* were rounded, and the reference sees the same rounded inputs. Ops that round their *output*
to a low-precision dtype use eps of that dtype instead (OUTPUT_EPS). TF32 matmuls use 2**-10.
NaN never passes (torch.testing.assert_close treats NaN as unequal unless equal_nan).
"""
import math

import torch

ACC_EPS = {torch.float32: 2.0**-23, torch.float64: 2.0**-52}
OUTPUT_EPS = {torch.float32: 2.0**-23, torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7,
              "tf32": 2.0**-10}


def reduction_rtol(n_reduce: int, eps: float = ACC_EPS[torch.float32], c: float = 8.0) -> float:
    return max(4.0 * eps, c * eps * math.sqrt(max(n_reduce, 1)))


def assert_close_reduction(out: torch.Tensor, ref: torch.Tensor, n_reduce: int,
                           eps: float = ACC_EPS[torch.float32]) -> None:
    """out vs a float64 reference of non-negative sums (e.g. squared norms): relative per element."""
    rtol = reduction_rtol(n_reduce, eps)
    torch.testing.assert_close(out.double().cpu(), ref.double().cpu(), rtol=rtol,
                               atol=1e-30, equal_nan=False)
