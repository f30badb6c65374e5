"""Command line: `dpkern <command>` or `python -m dpkern <command>`."""
from __future__ import annotations

import argparse
import sys


def _demo(args) -> int:
    """Per-sample squared norms through every backend that runs here, checked against the reference."""
    import os
    import time

    import torch
    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")
    import dpkern
    from dpkern.reference.rownorm import rownorm_sq_ref

    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    x = torch.randn(args.batch, args.n, device=device, dtype=torch.bfloat16)
    ref = rownorm_sq_ref(x.double())
    print(f"dpkern {dpkern.__version__}: per-sample squared L2 norms of a ({args.batch}, {args.n}) "
          f"bf16 tensor on {device}")
    print(f"CUDA extension: {'usable' if dpkern.cuda_available() else dpkern.cuda_unavailable_reason()}")
    for backend in ("torch", "triton", "cuda"):
        try:
            t0 = time.perf_counter()
            out = dpkern.rownorm_sq(x, backend=backend)
            if device == "cuda":
                torch.cuda.synchronize()
            ms = (time.perf_counter() - t0) * 1e3
        except (RuntimeError, ValueError) as e:
            print(f"  {backend:>6}: not run here ({e})")
            continue
        err = ((out.double() - ref).abs() / ref.clamp_min(1e-30)).max().item()
        print(f"  {backend:>6}: max rel. error vs fp64 reference {err:.2e}  ({ms:.1f} ms, first call)")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="dpkern", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="run the per-sample norm op through every backend")
    demo.add_argument("--batch", type=int, default=8)
    demo.add_argument("--n", type=int, default=4097)
    demo.set_defaults(func=_demo)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
