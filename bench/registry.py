"""The one source of benchmark shapes: every case the suite times, per op, in full (GPU) and quick
(CPU, correctness-only) form. Bench files ask this module for their shapes, dtypes and backends;
nothing else hard-codes a shape.

Quick mode is on when there is no CUDA device, or when DPKERN_BENCH_QUICK=1 (then the suite runs on
the CPU even on a GPU machine: what tests/bench and `compare.py --quick` use).

    python bench/registry.py            # list every case of this mode
    python bench/registry.py --full     # the GPU cases
"""
from __future__ import annotations

import argparse
import dataclasses
import os

import torch

QUICK = os.environ.get("DPKERN_BENCH_QUICK", "") not in ("", "0") or not torch.cuda.is_available()
DEVICE = "cpu" if QUICK else "cuda"


@dataclasses.dataclass(frozen=True)
class OpCases:
    """The cases of one op: shapes (tuples, named by `dims`), dtypes and backends, full and quick.

    backends=None means the bench file picks them (they depend on what is built); quick_backends
    are the ones that run on the CPU (the torch reference, plus Triton under TRITON_INTERPRET)."""
    op: str
    dims: tuple[str, ...]
    full: tuple
    quick: tuple
    dtypes: tuple[str, ...] = ("float32", "bfloat16")
    note: str = ""

    def shapes(self, quick: bool | None = None) -> list:
        return list(self.quick if (QUICK if quick is None else quick) else self.full)

    def shape_id(self, shape) -> str:
        return "x".join(f"{d}{v}" for d, v in zip(self.dims, shape))


def _llama_1b_tensors(d=2048, f=5632, vocab=32000, layers=17):
    """A 1.0B-parameter decoder (untied head): 156 parameter tensors."""
    shapes = [(vocab, d)]
    for _ in range(layers):
        shapes += [(d, d)] * 4 + [(f, d), (f, d), (d, f), (d,), (d,)]
    return tuple(shapes + [(d,), (vocab, d)])


OPS: dict[str, OpCases] = {c.op: c for c in [
    OpCases("rownorm_sq", ("B", "N"),
            full=((64, 1 << 20), (4096, 4096), (16384, 1024)), quick=((8, 512),),
            note="per-sample gradient-norm-like rows; GB/s vs copy bandwidth"),
    # the Llama-1B projections at the batch shapes, a long sequence, a wide MLP
    OpCases("linear_norm_sq", ("B", "T", "d", "p"),
            full=((8, 512, 2048, 2048), (16, 256, 2048, 2048), (8, 512, 2048, 5632),
                  (8, 512, 4096, 4096), (1, 4096, 2048, 2048), (1, 4096, 2048, 256)),
            quick=((2, 16, 24, 20),), note="ghost / instantiate; TFLOP/s of the method's FLOP model"),
    OpCases("bookkeeping_wgrad", ("B", "T", "d", "p"),
            full=((8, 512, 2048, 2048), (16, 256, 2048, 2048), (8, 512, 2048, 5632),
                  (8, 512, 4096, 4096), (1, 4096, 2048, 2048), (1, 4096, 2048, 256)),
            quick=((2, 16, 24, 20),), note="vs torch.matmul of the non-private wgrad"),
    OpCases("row_norm_dots", ("B", "T", "d", "p"),
            full=((8, 512, 2048, 2048), (16, 256, 2048, 5632), (1, 4096, 2048, 2048)),
            quick=((2, 16, 24, 20),), note="release-bound sums for q/k/v-like groups of 3; GB/s"),
    # L layers of one layout, as the engine's flush sees them (the 16 q/k/v groups of a Llama-1B)
    OpCases("grouped_layers", ("L", "B", "T", "d", "p"),
            full=((16, 8, 128, 2048, 2048), (16, 16, 256, 2048, 2048), (16, 8, 512, 2048, 2048)),
            quick=((3, 2, 16, 24, 20),), dtypes=("bfloat16",),
            note="norms + book-keeping of L layers: one grouped launch vs L launches"),
    OpCases("embedding_norm_sq", ("B", "T", "d", "V"),
            full=((8, 512, 2048, 32000), (1, 4096, 2048, 32000)), quick=((2, 16, 24, 50),)),
    OpCases("headline", ("B", "T", "d", "p"), full=((8, 512, 2048, 2048),),
            quick=((2, 16, 24, 20),), note="config sweep and fp32-mode cases"),
    OpCases("noise_step", ("tensors",), full=(_llama_1b_tensors(),),
            quick=(((300, 64), (64,), (1000, 7)),), dtypes=("fp32", "bf16"),
            note="fused noise + optimizer over a 1.0B-parameter tensor set"),
    OpCases("tensor_sumsq", ("tensors",), full=(_llama_1b_tensors(),),
            quick=(((300, 64), (64,), (1000, 7)),), dtypes=("float32",),
            note="B = 1 clip: fp64 norms of every gradient + in-place scale, one launch each, "
                 "vs the per-tensor torch ops; GB/s of the bytes read (+ written)"),
    OpCases("noise_add", ("n",), full=((1 << 28,),), quick=((1 << 12,),),
            note="LMO-DP and Gaussian noise add, GB/s of the buffer read + written"),
    # one projected weight of the Llama-1B (q/k/v/o, MLP up/gate, down, lm_head) at DP-SFT ranks
    OpCases("subspace_backproj", ("p", "d", "r"),
            full=((2048, 2048, 64), (5632, 2048, 64), (2048, 5632, 64), (32000, 2048, 64),
                  (5632, 2048, 128), (5632, 2048, 16)),
            quick=((70, 130, 4),),
            note="fused back-projection + AdamW vs W.grad = U S~ V^T + torch.optim.AdamW(fused)"),
    OpCases("rmt_denoise", ("hidden", "intermediate", "layers"),
            full=((2048, 5504, 22),), quick=((64, 172, 2),), dtypes=("float32",),
            note="every weight matrix of a Llama-style ~1B model"),
    # the same model over consecutive steps of a slowly drifting signal: cold vs warm-started calls
    OpCases("rmt_denoise_steps", ("hidden", "intermediate", "layers", "steps"),
            full=((2048, 5504, 22, 4),), quick=((64, 172, 2, 2),), dtypes=("float32",),
            note="ms per call and GEMM passes per matrix, cold vs warm start"),
]}


TENSOR_SETS = tuple(c.op for c in OPS.values() if c.dims == ("tensors",))


def op(name: str) -> OpCases:
    try:
        return OPS[name]
    except KeyError:
        raise KeyError(f"no op {name!r} in bench/registry.py (have: {', '.join(OPS)})") from None


def shapes(name: str, quick: bool | None = None) -> list:
    """The shapes of op `name` for this mode (quick on CPU)."""
    return op(name).shapes(quick)


def torch_dtypes(name: str) -> list:
    return [getattr(torch, d) for d in op(name).dtypes]


def cases(quick: bool | None = None) -> list[dict]:
    """Every (op, shape, dtype) of this mode, as flat dicts (for listing and tests)."""
    out = []
    for c in OPS.values():
        for s in c.shapes(quick):
            for dt in c.dtypes:
                out.append({"op": c.op, "shape": s, "dtype": dt,
                            "id": f"{c.op}[{c.shape_id(s) if c.dims != ('tensors',) else len(s)}-{dt}]"})
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description="list the benchmark cases")
    ap.add_argument("--full", action="store_true", help="the GPU cases even without a GPU")
    args = ap.parse_args(argv)
    quick = False if args.full else QUICK
    for c in cases(quick):
        shape = f"{len(c['shape'])} tensors" if c["op"] in TENSOR_SETS else c["shape"]
        print(f"{c['op']:<20} {str(shape):<28} {c['dtype']}")


if __name__ == "__main__":
    main()
