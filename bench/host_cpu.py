"""CPU proxy of the host (Python + dispatcher) time that dpkern adds to a training step.

On the H100 several DP steps are host-bound: issuing the step's work takes longer than the GPU takes
to run it (docs/STATUS.md rows 5 and 7). This script measures the issuing cost on the CPU: a tiny
16-layer Llama (the 1B model's layer structure, so the same number of layers, launches and Python
loops), tiny tensors (B = 8, T = 16 by default), and Triton kernels under TRITON_INTERPRET=1 with
the interpreter's kernel body replaced by a no-op, so that a launch costs only its Python launch
path (argument binding, grid, specialisation). Every mode runs the same model, batch and AdamW.

Modes: ``nonprivate`` (plain step), ``full`` (PrivacyEngine, Triton backend), ``subspace``
(SubspacePrivacyEngine, rank-4 bases on every decoder Linear and the lm_head). Columns: median host
ms of forward, backward, of which the end-of-backward clipper (norms, bounds, clip factors,
book-keeping), and optimizer step + zero_grad.

Limits: this is a proxy, not GPU time. CPU aten ops on tiny tensors stand in for the dispatcher cost
of CUDA launches (they cost a little more than a CUDA launch's host side); the fused noise step
runs its Triton twin (one launch per tensor) because the CUDA extension's multi-tensor kernel needs
a GPU, so the ``step`` column over-counts what the H100 step issues. Use it to compare commits on
one machine, not as an absolute number.

    python bench/host_cpu.py                       # all modes, table of medians
    python bench/host_cpu.py --modes full --profile dp   # cProfile of clipper + optimizer step
"""
from __future__ import annotations

import os
import sys

os.environ["TRITON_INTERPRET"] = "1"  # before anything imports triton

import argparse
import cProfile
import io
import pstats
import statistics
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `dpkern`, `bench`, `tests` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from bench.host_phases import clipper_clock, profile_clipper

MODES = ("nonprivate", "full", "subspace")
COLUMNS = ("forward", "backward", "clipper", "step", "total")


def _no_kernel_bodies() -> None:
    """Triton launches keep their Python launch path and skip the interpreted kernel body."""
    from triton.runtime.interpreter import InterpretedFunction
    InterpretedFunction.run = lambda self, *args, **kwargs: None


def build(mode: str, *, layers: int, batch: int, seq: int, rank: int):
    """(model, optimizer, ids, clipper holder) for one mode, seeded identically."""
    from transformers import LlamaConfig, LlamaForCausalLM
    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=176,
                      num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=4,
                      max_position_embeddings=256, tie_word_embeddings=False)
    cfg._attn_implementation = "eager"
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    common = dict(module=model, optimizer=opt, data_loader=None, noise_multiplier=1.0,
                  max_grad_norm=1.0, expected_batch_size=batch, sample_rate=1e-3,
                  loss_reduction="sum", seed=0)
    if mode == "full":
        from dpkern.engine import PrivacyEngine
        model, opt, _ = PrivacyEngine(accountant="rdp", backend="triton").make_private(**common)
    elif mode == "subspace":
        from dpkern.subspace import SubspacePrivacyEngine
        from tests.subspace.launches import llama_bases
        model, opt, _ = SubspacePrivacyEngine(accountant="rdp", backend="triton").make_private(
            subspace=llama_bases(model, rank), **common)
        opt.backproj_backend = "triton"
    elif mode != "nonprivate":
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if mode != "nonprivate":
        opt.noise_backend = "triton"
    ids = torch.randint(0, cfg.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(0))
    return model, opt, ids, cfg.vocab_size


def run_mode(mode: str, *, steps: int, warmup: int, layers: int, batch: int, seq: int, rank: int,
             profile: str | None = None, top: int = 40) -> dict:
    """{column: median ms} over `steps` timed steps after `warmup` ones; with `profile` ("all":
    whole steps, "dp": only the clipper and the optimizer step) prints cProfile's top functions."""
    model, opt, ids, vocab = build(mode, layers=layers, batch=batch, seq=seq, rank=rank)
    timer = clipper_clock(model)
    prof = cProfile.Profile() if profile else None

    def one_step(profiling: bool) -> tuple:
        if timer is not None:
            timer.seconds = 0.0
        if profiling and profile == "all":
            prof.enable()
        t0 = time.perf_counter()
        logits = model(input_ids=ids).logits
        loss = torch.nn.functional.cross_entropy(
            logits[:, :-1].float().reshape(-1, vocab), ids[:, 1:].reshape(-1),
            reduction="none").view(ids.shape[0], -1).mean(1).sum()
        t1 = time.perf_counter()
        loss.backward()
        t2 = time.perf_counter()
        if profiling and profile == "dp":
            prof.enable()
        opt.step()
        opt.zero_grad()
        t3 = time.perf_counter()
        if profiling:
            prof.disable()
        clip = timer.seconds if timer is not None else 0.0
        return t1 - t0, t2 - t1, clip, t3 - t2, t3 - t0

    for _ in range(warmup):
        one_step(False)
    times = [one_step(False) for _ in range(steps)]
    row = {c: statistics.median(t[i] for t in times) * 1e3 for i, c in enumerate(COLUMNS)}
    if profile:
        if timer is not None and profile == "dp":
            profile_clipper(timer, prof)
        for _ in range(max(3, steps // 2)):
            one_step(True)
        for key in ("cumulative", "tottime"):
            s = io.StringIO()
            pstats.Stats(prof, stream=s).sort_stats(key).print_stats(top)
            print(f"--- {mode}: cProfile ({profile}), sorted by {key}\n{s.getvalue()}")
    return row


def table(rows: dict) -> str:
    head = f"{'mode':<11}" + "".join(f"{c:>10}" for c in COLUMNS)
    lines = [head + "   (median host ms)"]
    for mode, row in rows.items():
        lines.append(f"{mode:<11}" + "".join(f"{row[c]:>10.2f}" for c in COLUMNS))
    return "\n".join(lines)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--modes", default=",".join(MODES), help=f"comma list of {MODES}")
    ap.add_argument("--steps", type=int, default=10, help="timed steps per mode")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=1,
                    help="run every mode this many times; each repeat's median is printed")
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=16)
    ap.add_argument("--rank", type=int, default=4, help="subspace rank (mode subspace)")
    ap.add_argument("--profile", choices=("all", "dp"), default=None,
                    help="cProfile after timing: whole steps, or only clipper + optimizer step")
    ap.add_argument("--top", type=int, default=40, help="functions listed per profile")
    ap.add_argument("--fp32-gpu-path", action="store_true",
                    help="issue what an fp32 step issues on CUDA: \"tf32r\" operands and the "
                         "book-keeping's K-major copies (the CPU default is \"ieee\", no copies)")
    args = ap.parse_args(argv)
    modes = [m for m in args.modes.split(",") if m]
    for m in modes:
        if m not in MODES:
            ap.error(f"unknown mode {m!r} (choose from {MODES})")
    _no_kernel_bodies()
    if args.fp32_gpu_path:
        os.environ["DPKERN_FP32_DOT"] = "tf32r"
        import dpkern.ops.bookkeeping as ob
        ob.KMAJOR_DEVICES = ("cuda", "cpu")
    torch.set_num_threads(1)  # tiny tensors: the numbers measure issuing, not arithmetic
    rows = {}
    for r in range(args.repeats):
        for m in modes:
            key = m if args.repeats == 1 else f"{m}#{r + 1}"
            rows[key] = run_mode(m, steps=args.steps, warmup=args.warmup, layers=args.layers,
                                 batch=args.batch, seq=args.seq, rank=args.rank,
                                 profile=args.profile, top=args.top)
    print(table(rows))
    return rows


if __name__ == "__main__":
    main()
