import torch


def rownorm_sq_ref(x: torch.Tensor) -> torch.Tensor:
    """out[b] = sum_n x[b, n]^2, computed in fp32 (fp64 input stays fp64). x: (B, N) -> (B,)."""
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    return x.to(acc).square().sum(dim=1)
