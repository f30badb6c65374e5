"""Does a (B,) @ (B, n) fp32 matmul run in TF32 when TF32 matmuls are allowed? The per-sample sums of
norm weights used to be that product (dpkern.layers.uses.bookkeep); they are now elementwise fp32
(scaled_row_sums). Prints the worst error of each form against float64, relative to Σ|s_i g_i|
(fp32 accumulation: ~1e-7; TF32 operands: ~1e-3).

    python -m bench.tf32_rowsum_probe
"""
import torch

from dpkern.layers.uses import scaled_row_sums


def main():
    torch.backends.cuda.matmul.allow_tf32 = True
    gen = torch.Generator(device="cuda").manual_seed(0)
    for bsz, n in ((8, 2048), (16, 2048), (64, 4096)):
        g = torch.randn(bsz, n, device="cuda", generator=gen)
        s = torch.rand(bsz, device="cuda", generator=gen) + 0.5
        ref = (s.double() @ g.double())
        scale = (s.double().unsqueeze(1) * g.double()).abs().sum(0)
        for name, got in (("matmul", s @ g), ("bmm", torch.bmm(s.view(1, 1, -1), g.unsqueeze(0))[0, 0]),
                          ("scaled_row_sums", scaled_row_sums(g.unsqueeze(0), s.unsqueeze(0))[0])):
            err = ((got.double() - ref).abs() / scale).max().item()
            print(f"B={bsz} n={n} {name:>16}: max |error| / sum|s g| = {err:.2e}")


if __name__ == "__main__":
    main()
