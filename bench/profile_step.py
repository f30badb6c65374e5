"""Where one DP training step's time goes: trace, memory snapshot and a breakdown with the FLOP model.

    python bench/profile_step.py --out bench/results/profile_1b --preset 1b          # GPU
    python bench/profile_step.py --out /tmp/prof --preset tiny --device cpu          # CPU smoke

One dpkern DP step (PrivacyEngine, flat clipping, book-keeping, fused noise + AdamW) of a
Llama-style model from transformers' LlamaConfig (random init, eager attention). Writes under --out:

* trace.json            torch.profiler Chrome/Perfetto trace of one step (CPU + CUDA activities);
                        the step's parts are `dp:*` record_function ranges (trace.json.gz when
                        over 20 MiB)
* memory_snapshot.pickle  CUDA memory snapshot of the profiled step (GPU only; view it at
                        https://pytorch.org/memory_viz)
* breakdown.json / breakdown.txt  the table printed: exclusive time per part and layer type, median
                        over --steps un-profiled steps (CUDA events; perf_counter on the CPU),
                        with the FLOP model's prediction (FLOPs / matmul rate measured at start,
                        bytes / copy bandwidth for the optimizer) beside each row

The engine has no named ranges of its own, so this script adds them from outside: module forward
hooks (forward per layer type), the layers' autograd Functions' backward (backward per layer type),
and the engine's module-level helpers norms_sq / release_bound_matrix / clip_factors / bookkeep (at
B = 1 also sumsq_many / scale_many_) and the per-sample ops they call (norms and book-keeping per
layer type). Nothing is changed for good: the
patches are undone when the script ends.
"""
from __future__ import annotations

import argparse
import contextlib
import gzip
import json
import shutil
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

PRESETS = {  # Llama-style (hidden, intermediate, layers, heads, vocab), default (B, T) per device
    "tiny": dict(hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
                 vocab_size=128),
    "125m": dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=12,
                 num_attention_heads=12, vocab_size=32000),
    "1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=16,
               num_attention_heads=32, vocab_size=32000),
    "3b": dict(hidden_size=3200, intermediate_size=8640, num_hidden_layers=26,
               num_attention_heads=32, vocab_size=32000),
}
PARTS = ["forward", "backward", "per-sample norms", "clip factors + bounds", "book-keeping GEMMs",
         "noise + optimizer", "other"]


class Ranges:
    """Nested named ranges: a record_function for the trace, and a start/end marker (CUDA events
    or perf_counter) for the breakdown. Paths are tuples of names (the stack at entry)."""

    def __init__(self, device: str):
        self.cuda = device == "cuda"
        self.stack: list = []
        self.spans: list = []
        self.enabled = True

    def _mark(self):
        if self.cuda:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            return ev
        return time.perf_counter()

    def begin(self, name: str):
        rf = torch.profiler.record_function("dp:" + name)
        rf.__enter__()
        self.stack.append((name, self._mark(), rf))

    def end(self):
        name, start, rf = self.stack.pop()
        path = tuple(n for n, _, _ in self.stack) + (name,)
        self.spans.append((path, start, self._mark()))
        rf.__exit__(None, None, None)

    @contextlib.contextmanager
    def __call__(self, name: str):
        self.begin(name)
        try:
            yield
        finally:
            self.end()

    def exclusive_ms(self) -> dict:
        """{path: exclusive ms} summed over spans; resets the spans."""
        if self.cuda:
            torch.cuda.synchronize()
        incl: dict = {}
        for path, s, e in self.spans:
            ms = s.elapsed_time(e) if self.cuda else (e - s) * 1e3
            incl[path] = incl.get(path, 0.0) + ms
        self.spans = []
        excl = dict(incl)
        for path, ms in incl.items():
            if len(path) > 1 and path[:-1] in excl:
                excl[path[:-1]] -= ms
        return excl


def _wrap_fn(ranges: Ranges, name: str, fn):
    def wrapped(*args, **kwargs):
        with ranges(name):
            return fn(*args, **kwargs)
    wrapped.__wrapped__ = fn
    return wrapped


@contextlib.contextmanager
def instrument(model, ranges: Ranges):
    """Named ranges at the call sites reachable from outside the engine (see module docstring)."""
    import dpkern.engine as eng
    import dpkern.layers.uses as uses
    from dpkern.layers.embedding import _EmbeddingFn
    from dpkern.layers.linear import _Conv1DFn, _LinearFn
    from dpkern.layers.norm import _AffineFn
    saved = []

    def patch(obj, attr, new):
        saved.append((obj, attr, obj.__dict__[attr]))
        setattr(obj, attr, new)

    # B = 1 (engine._Clipper._single_sample): the gradients' norms, then their scaling
    for attr, name in [("norms_sq", "norms"), ("bookkeep", "bookkeeping"),
                       ("release_bound_matrix", "clip"), ("clip_factors", "clip"),
                       ("sumsq_many", "norms"), ("scale_many_", "clip")]:
        patch(eng, attr, _wrap_fn(ranges, name, getattr(eng, attr)))
    # Linear weights are book-kept in grouped launches outside `bookkeep`
    patch(eng, "bookkeeping_wgrad_grouped", _wrap_fn(ranges, "bookkeeping", _wrap_fn(
        ranges, "bookkeeping:Linear", eng.bookkeeping_wgrad_grouped)))
    for attr, name in [("linear_norm_sq", "norms:Linear"), ("linear_norm_sq_grouped", "norms:Linear"),
                       ("embedding_norm_sq", "norms:Embedding"), ("tied_cross_term", "norms:tied"),
                       ("rownorm_sq", "norms:RMSNorm/LayerNorm"),
                       ("bookkeeping_wgrad", "bookkeeping:Linear")]:
        patch(uses, attr, _wrap_fn(ranges, name, getattr(uses, attr)))
    for cls, name in [(_LinearFn, "Linear"), (_Conv1DFn, "Linear"), (_EmbeddingFn, "Embedding"),
                      (_AffineFn, "RMSNorm/LayerNorm")]:
        patch(cls, "backward", staticmethod(_wrap_fn(ranges, "backward:" + name, cls.backward)))
    handles = []
    kinds = {"Linear": "Linear", "Conv1D": "Linear", "Embedding": "Embedding",
             "LlamaRMSNorm": "RMSNorm/LayerNorm", "RMSNorm": "RMSNorm/LayerNorm",
             "LayerNorm": "RMSNorm/LayerNorm"}
    for m in model.modules():
        kind = kinds.get(type(m).__name__)
        if kind:
            handles.append(m.register_forward_pre_hook(
                lambda mod, inp, k=kind: ranges.begin("forward:" + k)))
            handles.append(m.register_forward_hook(lambda mod, inp, out: ranges.end()))
    try:
        yield
    finally:
        for h in handles:
            h.remove()
        for obj, attr, old in reversed(saved):
            setattr(obj, attr, old)


def flop_model(cfg, bsz: int, seq: int, backend: str) -> dict:
    """FLOPs (or bytes for the optimizer) per row of the breakdown, for one step."""
    from dpkern.ops.linear_norm import choose_method, linear_norm_flops
    h, inter, vocab, n_layers = (cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size,
                                 cfg.num_hidden_layers)
    kv = cfg.num_key_value_heads * (h // cfg.num_attention_heads)
    t, tok = seq, bsz * seq
    linear_dp = n_layers * (h * h + 2 * h * kv + h * h + 3 * h * inter) + h * vocab
    groups = [(h, [h, kv, kv]), (h, [h]), (h, [inter, inter]), (inter, [h])]
    norm = 0
    for d, ps in groups:
        m = choose_method(t, d, ps, backend)
        if m == "ghost":
            norm += linear_norm_flops(t, d, 0, m, backend) + sum(linear_norm_flops(t, 0, p, m, backend)
                                                                   for p in ps)
        else:
            norm += sum(linear_norm_flops(t, d, p, m, backend) for p in ps)
    norm *= n_layers
    m = choose_method(t, h, [vocab], backend)
    norm += linear_norm_flops(t, h, vocab, m, backend)
    return {
        "forward:Linear": 2 * tok * linear_dp,
        "forward": 4 * bsz * t * t * h * n_layers,                  # attention scores + values
        "backward:Linear": 2 * tok * linear_dp,                      # input grads only (wgrad deferred)
        "backward": 8 * bsz * t * t * h * n_layers,
        "norms:Linear": bsz * norm,
        "norms:Embedding": bsz * t * t * h,                          # upper triangle of the T x T Gram
        "bookkeeping:Linear": 2 * tok * linear_dp,
    }


def measure_rates(device: str, dtype, quick: bool) -> dict:
    """Matmul TFLOP/s in the step's compute dtype and copy GB/s, measured now."""
    from bench.history import time_ms
    m = 256 if quick else 8192
    n = (1 << 22) if quick else (1 << 28)
    a = torch.randn(m, m, device=device, dtype=dtype)
    src = torch.randn(n, device=device)
    dst = torch.empty_like(src)
    mm = time_ms(lambda: a @ a, device, quick)["median_ms"]
    cp = time_ms(lambda: dst.copy_(src), device, quick)["median_ms"]
    return {"matmul_tflops": 2 * m**3 / (mm * 1e-3) / 1e12, "copy_gbps": 2 * n * 4 / (cp * 1e-3) / 1e9,
            "matmul_dtype": str(dtype).replace("torch.", "")}


def build(args):
    from transformers import LlamaConfig, LlamaForCausalLM
    import dpkern
    kw = dict(PRESETS[args.preset])
    kw.setdefault("num_key_value_heads", kw["num_attention_heads"])
    cfg = LlamaConfig(max_position_embeddings=max(4096, args.seq), tie_word_embeddings=False, **kw)
    cfg._attn_implementation = "eager"
    torch.manual_seed(0)
    with torch.device(args.device):
        model = LlamaForCausalLM(cfg)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    engine = dpkern.PrivacyEngine(accountant="rdp", backend=args.backend)
    # loss_reduction='sum' (the engine refuses 'mean' under bf16): token mean x B = sum of the
    # per-sample losses for equal-length sequences
    model, opt, _ = engine.make_private(module=model, optimizer=opt, data_loader=None,
                                        noise_multiplier=1.0, max_grad_norm=1.0,
                                        expected_batch_size=args.batch, sample_rate=1e-3, seed=0,
                                        loss_reduction="sum")
    return cfg, model, opt


def one_step(model, opt, ids, amp, ranges: Ranges, bsz: int):
    with ranges("step"):
        with ranges("forward"), amp:
            loss = model(input_ids=ids, labels=ids).loss * bsz
        with ranges("backward"):
            loss.backward()
        with ranges("noise+optimizer"):
            opt.step()
        opt.zero_grad(set_to_none=True)


def breakdown(excl: dict, flops: dict, rates: dict, n_params: int, steps: int) -> list[dict]:
    """Rows (part, layer type, measured ms, % of step, predicted ms) from exclusive path times."""
    by_leaf: dict = {}
    for path, ms in excl.items():
        by_leaf[path[-1]] = by_leaf.get(path[-1], 0.0) + ms / steps
    total = by_leaf.get("step", 0.0) + sum(v for k, v in by_leaf.items() if k != "step")
    part_of = {"forward": "forward", "backward": "backward", "norms": "per-sample norms",
               "clip": "clip factors + bounds", "bookkeeping": "book-keeping GEMMs",
               "noise+optimizer": "noise + optimizer", "step": "other"}
    bytes_opt = n_params * (4 + 4 + 4 + 4 * 4)  # p r/w, grad read, fp32 m and v r/w (AdamW)
    rows = []
    for leaf, ms in sorted(by_leaf.items(), key=lambda kv: PARTS.index(part_of[kv[0].split(":")[0]])):
        head, _, kind = leaf.partition(":")
        pred = None
        if leaf in flops:
            pred = flops[leaf] / (rates["matmul_tflops"] * 1e12) * 1e3
        elif leaf == "noise+optimizer":
            pred = bytes_opt / (rates["copy_gbps"] * 1e9) * 1e3
        rows.append({"part": part_of[head], "layer_type": kind or ("(rest)" if head != "step" else "-"),
                     "ms": ms, "pct": 100 * ms / total if total else 0.0, "predicted_ms": pred})
    return rows + [{"part": "total step", "layer_type": "", "ms": total, "pct": 100.0,
                    "predicted_ms": None}]


def format_rows(rows: list, header: str) -> str:
    lines = [header, f"{'part':<22} {'layer type':<20} {'ms':>10} {'%':>6} {'FLOP model ms':>14}",
             "-" * 76]
    for r in rows:
        pred = "" if r["predicted_ms"] is None else f"{r['predicted_ms']:.3f}"
        lines.append(f"{r['part']:<22} {r['layer_type']:<20} {r['ms']:>10.3f} {r['pct']:>6.1f} "
                     f"{pred:>14}")
    return "\n".join(lines)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--preset", choices=list(PRESETS), default=None,
                    help="model size (default: 1b on a GPU, tiny on the CPU)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--batch", type=int, default=None)
    ap.add_argument("--seq", type=int, default=None)
    ap.add_argument("--precision", choices=["bf16", "fp32"], default=None,
                    help="bf16 autocast (GPU default) or fp32 (CPU default; TF32 matmuls on a GPU)")
    ap.add_argument("--backend", default=None, help="per-sample ops backend (default: auto)")
    ap.add_argument("--steps", type=int, default=None, help="timed steps (median of per-part sums)")
    ap.add_argument("--no-memory-snapshot", dest="memory_snapshot", action="store_false",
                    help="skip the CUDA memory snapshot")
    args = ap.parse_args(argv)
    cpu = args.device == "cpu"
    args.preset = args.preset or ("tiny" if cpu else "1b")
    args.batch = args.batch or (2 if cpu else 8)
    args.seq = args.seq or (16 if cpu else 512)
    args.precision = args.precision or ("fp32" if cpu else "bf16")
    args.steps = args.steps or (2 if cpu else 5)
    if args.device == "cuda" and args.precision == "fp32":
        torch.backends.cuda.matmul.allow_tf32 = True
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    from bench.history import run_env
    quick = cpu or args.preset == "tiny"
    dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32
    rates = measure_rates(args.device, dtype, quick)
    cfg, model, opt = build(args)
    n_params = sum(p.numel() for p in model.parameters())
    ids = torch.randint(0, cfg.vocab_size, (args.batch, args.seq),
                        generator=torch.Generator().manual_seed(1)).to(args.device)
    amp = (torch.autocast(device_type=args.device, dtype=torch.bfloat16) if args.precision == "bf16"
           else contextlib.nullcontext())
    ranges = Ranges(args.device)
    with instrument(model, ranges):
        one_step(model, opt, ids, amp, ranges, args.batch)                   # warm-up
        ranges.exclusive_ms()
        totals = []
        excl: dict = {}
        for _ in range(args.steps):
            one_step(model, opt, ids, amp, ranges, args.batch)
            e = ranges.exclusive_ms()
            totals.append(sum(e.values()))
            for k, v in e.items():
                excl[k] = excl.get(k, 0.0) + v
        # one profiled step: trace (+ memory snapshot on a GPU)
        acts = [torch.profiler.ProfilerActivity.CPU]
        if args.device == "cuda":
            acts.append(torch.profiler.ProfilerActivity.CUDA)
            if args.memory_snapshot:
                torch.cuda.memory._record_memory_history(max_entries=100_000, stacks="python")
        with torch.profiler.profile(activities=acts, record_shapes=True) as prof:
            one_step(model, opt, ids, amp, ranges, args.batch)
        ranges.exclusive_ms()
        prof.export_chrome_trace(str(out / "trace.json"))
        if (out / "trace.json").stat().st_size > 20 * 2**20:   # Perfetto reads .json.gz too
            with open(out / "trace.json", "rb") as f, gzip.open(out / "trace.json.gz", "wb") as g:
                shutil.copyfileobj(f, g)
            (out / "trace.json").unlink()
        if args.device == "cuda" and args.memory_snapshot:
            torch.cuda.memory._dump_snapshot(str(out / "memory_snapshot.pickle"))
            torch.cuda.memory._record_memory_history(enabled=None)
    backend = "triton" if args.device == "cuda" else "torch"
    rows = breakdown(excl, flop_model(cfg, args.batch, args.seq, backend), rates, n_params, args.steps)
    peak = torch.cuda.max_memory_allocated() if args.device == "cuda" else None
    header = (f"DP step, Llama-style {args.preset} ({n_params / 1e6:.1f}M params), B={args.batch} "
              f"T={args.seq}, {args.precision}, {args.device}"
              f"{' (' + torch.cuda.get_device_name() + ')' if args.device == 'cuda' else ''}; "
              f"median step {statistics.median(totals):.3f} ms over {args.steps}; rows: mean "
              f"exclusive ms; FLOP model at {rates['matmul_tflops']:.1f} TFLOP/s "
              f"({rates['matmul_dtype']} mm), {rates['copy_gbps']:.0f} GB/s copy")
    text = format_rows(rows, header)
    print(text)
    report = {"env": run_env(quick=quick), "args": vars(args), "n_params": n_params, "rates": rates,
              "median_step_ms": statistics.median(totals), "step_ms": totals, "rows": rows,
              "peak_mem_bytes": peak}
    (out / "breakdown.json").write_text(json.dumps(report, indent=1, default=str))
    (out / "breakdown.txt").write_text(text + "\n")
    return report


if __name__ == "__main__":
    main()
