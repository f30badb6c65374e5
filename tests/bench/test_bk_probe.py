"""bench/bk_probe.py's diagnostic twins of the book-keeping kernel compute what they claim, so the
rates the probe reports for them are rates of the right sums: the plain twins the unscaled GEMM
over B·T, the scaled / nested ones (every boundary form of --boundary) Σ_i scale_i g_iᵀ a_i. In the interpreter on fp32 operands
(exact dots there), against torch in float64."""
import pytest
import torch

from tests.conftest import HAS_GPU


@pytest.mark.skipif(HAS_GPU, reason="interpreter check (exact fp32 dots); the GPU dots are TF32")
def test_bk_probe_twins_compute_their_sums():
    device = "cpu"
    from triton.tools.tensor_descriptor import TensorDescriptor

    from bench import bk_probe as bp
    torch.manual_seed(0)
    b, t, d, p = 3, 64, 256, 136
    a = torch.randn(b, t, d, device=device)
    g = torch.randn(b, t, p, device=device)
    s = torch.rand(b, device=device)
    ref = {scaled: sum((s[i].double() if scaled else 1.0) * g[i].double().t() @ a[i].double()
                       for i in range(b)) for scaled in (False, True)}
    grid = ((p + 127) // 128 * ((d + 127) // 128),)
    a2, g2 = a.reshape(-1, d), g.reshape(-1, p)
    # the plain GEMM (also asked to be warp-specialised), then every boundary form of --boundary
    # (epi 0-3, the scale loaded ahead)
    for scaled, epi, prefetch, ws in ((False, 0, False, False), (False, 0, False, True),
                                      (True, 0, False, False), (True, 1, False, False),
                                      (True, 2, False, False), (True, 3, False, False),
                                      (True, 2, True, False)):
        w = torch.full((p, d), float("nan"), device=device)
        bp._tma_kernel[grid](TensorDescriptor(a2, [b * t, d], [d, 1], [32, 128]),
                             TensorDescriptor(g2, [b * t, p], [p, 1], [32, 128]), s, w, b, t, d, p,
                             SCALE=scaled, BLOCK_P=128, BLOCK_D=128, BLOCK_T=32, GROUP_P=8,
                             WS=ws, PREFETCH=prefetch, EPI=epi)
        torch.testing.assert_close(w.double(), ref[scaled], rtol=1e-5, atol=1e-4)
    # the pointer twins read whole tiles (no masks): p a multiple of 128
    g = g[:, :, :128].contiguous()
    ref_nested = {nested: sum((s[i].double() if nested else 1.0) * g[i].double().t() @ a[i].double()
                              for i in range(b)) for nested in (False, True)}
    for nested in (False, True):
        w = torch.full((128, d), float("nan"), device=device)
        bp._variant_kernel[(2,)](a, g, s, w, b, t, d, 128, a.stride(0), a.stride(1), g.stride(0),
                                 g.stride(1), NESTED=nested, BLOCK_P=128, BLOCK_D=128,
                                 BLOCK_T=32, GROUP_P=8)
        torch.testing.assert_close(w.double(), ref_nested[nested], rtol=1e-5, atol=1e-4)
