import torch


def rownorm_sq_ref(x: torch.Tensor) -> torch.Tensor:
    """out[b] = sum_n x[b, n]^2, computed in fp32 (fp64 input stays fp64). x: (B, N) -> (B,)."""
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    return x.to(acc).square().sum(dim=1)


def row_norm_dots_ref(a: torch.Tensor, gs: list) -> torch.Tensor:
    """out[k, b] = Σ_t ‖a_bt‖ ‖g_kbt‖ in fp64 (the exact value up to fp64 rounding).
    a (B, T, d), gs[k] (B, T, p_k) -> (len(gs), B) float64."""
    na = a.double().square().sum(dim=2).sqrt()
    return torch.stack([(na * g.double().square().sum(dim=2).sqrt()).sum(dim=1) for g in gs]) \
        if gs else torch.zeros(0, a.shape[0], dtype=torch.float64, device=a.device)
