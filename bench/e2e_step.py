"""End-to-end training step: non-private vs dpkern vs Opacus, same model, batch and precision, one run.

Model: Llama-style, 953M parameters (hidden 2048, MLP 5632, 16 layers, 32 heads, vocab 32000,
untied lm_head, eager attention), random init from transformers' LlamaConfig; AdamW.
Modes: "nonprivate"; "dpkern" (PrivacyEngine, book-keeping); "opacus-hooks" (Opacus
GradSampleModule + DPOptimizer: per-sample gradients); "opacus-ghost" (Opacus
GradSampleModuleFastGradientClipping with ghost clipping: two backward passes). Precisions:
"fp32-tf32" (fp32 weights, TF32 matmuls) and "bf16" (bf16 autocast over fp32 weights).

Each mode builds its model once (same seed, same weights) and runs every case on it; a case times
`--steps` steps after `--warmup` (CUDA events, median) and records the peak memory of the timed
steps; memory is freed between cases. A failure (out of memory, an Opacus error) is recorded as
"failed: reason". Opacus runs on the table cases only (`--opacus-cases`). A global `--budget-s`
skips what is left once spent (recorded as "skipped").

FLOP floor (`flop_floor`): training costs 6·T·d·p per Linear layer and sample (+ attention 12·T²·h);
exact flat clipping with book-keeping adds, per layer, min(2T²(d+p), 2Tdp) for the norm (q/k/v and
gate/up share their input's Gram: min(2T²(d+Σp), 2TdΣp)); the embedding by unique tokens 2Td; with
B = 1 the per-sample gradient is the batch gradient and the norm is one pass over it. The floor of
the DP / non-private time ratio is 1 + norm FLOPs / training FLOPs.

Each run records its step times and, per step, the host time until step() returned (a step
whose host time is close to its step time is launch-bound).

`--paired` builds the non-private and dpkern models together and interleaves their steps case by
case (run_paired_case): both modes then see the same host and GPU state, which one mode after
the other does not give on the small, host-bound cases; dpkern's rows add "paired_ratio", and a
mode's peak memory is its resident bytes plus what its steps allocated on top of both models.

Outputs: JSON (every run, GPU, versions, commit, date), CSV (one row per case, precision and mode:
ms, peak GiB, ratios, floor, status), PNG (measured ratio vs floor over the sweep), and a table.

    python bench/e2e_step.py --out bench/results/e2e_step.json     # GPU: table + sweep, ~5 min
    python bench/e2e_step.py --tiny --device cpu                   # smoke test, no GPU
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import datetime
import gc
import json
import os
import platform
import statistics
import subprocess
import time

import torch

TABLE_CASES = [(8, 512), (16, 256), (1, 4096)]
SWEEP_CASES = [(8, 128), (32, 128), (2, 512), (8, 512), (1, 2048), (2, 2048), (1, 4096)]
TINY_CASES = [(2, 16), (4, 8), (1, 32)]
PRECISIONS = ["fp32-tf32", "bf16"]
MODES = ["nonprivate", "dpkern", "opacus-hooks", "opacus-ghost"]
# on request only (--modes): dpkern with RMT denoising of every released weight-gradient matrix
# (dpkern.denoise, the issue-8 overhead: noise materialised, denoised, then the optimizer step)
EXTRA_MODES = ["dpkern-rmt"]


def llama_config(tiny: bool):
    from transformers import LlamaConfig
    if tiny:
        kw = dict(vocab_size=128, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=4)
    else:
        kw = dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=16,
                  num_attention_heads=32, num_key_value_heads=32)
    cfg = LlamaConfig(max_position_embeddings=4096, tie_word_embeddings=False, **kw)
    cfg._attn_implementation = "eager"
    return cfg


def flop_floor(cfg, bsz: int, seq: int, ghost: float = 2.0) -> dict:
    """FLOP model of one step (module docstring): training and the extra norm FLOPs, and the floor
    of the DP / non-private time ratio. ghost = 2: the dense 2T²(d+p) Gram product of the issue's
    model; with ghost = 1 the upper-triangle T²(d+p) the Triton kernel runs ("floor_triangle")."""
    h, inter, vocab = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
    kv = cfg.num_key_value_heads * (h // cfg.num_attention_heads)
    t = seq

    def norm(d, ps):  # a group of layers reading one input of width d
        return min(ghost * t * t * (d + sum(ps)), 2 * t * d * sum(ps))

    linears = [(h, h), (h, kv), (h, kv), (h, h), (h, inter), (h, inter), (inter, h)]
    train = cfg.num_hidden_layers * (sum(6 * t * d * p for d, p in linears) + 12 * t * t * h)
    train += 6 * t * h * vocab  # lm_head
    if bsz == 1:  # the per-sample gradient is the gradient: its norm is one pass over it
        n_params = cfg.num_hidden_layers * sum(d * p for d, p in linears) + 2 * h * vocab
        extra = 2 * n_params
    else:
        per_layer = norm(h, [h, kv, kv]) + norm(h, [h]) + norm(h, [inter, inter]) + norm(inter, [h])
        extra = bsz * (cfg.num_hidden_layers * per_layer + norm(h, [vocab]) + 2 * t * h)
    train *= bsz
    out = {"train_flops": train, "norm_flops": extra, "floor": 1.0 + extra / train}
    if ghost == 2.0:
        out["floor_triangle"] = flop_floor(cfg, bsz, seq, ghost=1.0)["floor"]
    return out


def set_tf32(enabled: bool) -> None:
    mm = torch.backends.cuda.matmul
    if hasattr(mm, "fp32_precision"):
        mm.fp32_precision = "tf32" if enabled else "ieee"
        torch.backends.cudnn.conv.fp32_precision = "tf32" if enabled else "ieee"
    else:
        mm.allow_tf32 = enabled
        torch.backends.cudnn.allow_tf32 = enabled


class Runner:
    """One mode's model + optimizer, built once and reused for every case."""

    def __init__(self, cfg, device, mode, args, expected_bsz):
        from transformers import LlamaForCausalLM
        torch.manual_seed(0)
        with torch.device(device):
            model = LlamaForCausalLM(cfg)
        model.train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
        self.mode, self.vocab, self.dp_loss, self.loss_scale = mode, cfg.vocab_size, None, 1.0
        self.n_params = sum(p.numel() for p in model.parameters())
        if mode in ("dpkern", "dpkern-rmt"):
            import dpkern
            post = None
            if mode == "dpkern-rmt":
                from dpkern.denoise import RMTDenoiser
                post = [RMTDenoiser.for_model(model)]
            engine = dpkern.PrivacyEngine(accountant="rdp", backend=args.backend)
            # fixed-size batches for timing: no data loader, the public sampling rate given directly.
            # loss_reduction='sum' (the engine refuses 'mean' under bf16 autocast): the loss is the
            # token mean times B, i.e. the sum of per-sample losses for equal-length sequences.
            model, opt, _ = engine.make_private(module=model, optimizer=opt, data_loader=None,
                                                noise_multiplier=args.sigma, max_grad_norm=args.clip,
                                                expected_batch_size=expected_bsz, sample_rate=1e-3,
                                                seed=0, loss_reduction="sum",
                                                grad_postprocessors=post)
            self.loss_scale = float(expected_bsz)
        elif mode == "opacus-hooks":
            from opacus import GradSampleModule
            from opacus.optimizers import DPOptimizer
            model = GradSampleModule(model, batch_first=True, loss_reduction="mean")
            opt = DPOptimizer(opt, noise_multiplier=args.sigma, max_grad_norm=args.clip,
                              expected_batch_size=expected_bsz, loss_reduction="mean")
        elif mode == "opacus-ghost":
            from opacus.grad_sample import GradSampleModuleFastGradientClipping
            from opacus.optimizers import DPOptimizerFastGradientClipping
            from opacus.utils.fast_gradient_clipping_utils import DPLossFastGradientClipping
            model = GradSampleModuleFastGradientClipping(
                model, batch_first=True, loss_reduction="mean", max_grad_norm=args.clip,
                use_ghost_clipping=True)
            opt = DPOptimizerFastGradientClipping(
                opt, noise_multiplier=args.sigma, max_grad_norm=args.clip,
                expected_batch_size=expected_bsz, loss_reduction="mean")
            self.dp_loss = DPLossFastGradientClipping(model, opt, torch.nn.CrossEntropyLoss(),
                                                      loss_reduction="mean")
        self.model, self.opt = model, opt

    def step(self, ids, pos, amp):
        with amp:
            if self.dp_loss is None:
                # equal-length sequences, no padding: the token mean is the mean of per-sample losses
                loss = self.model(input_ids=ids, position_ids=pos, labels=ids).loss
                if self.loss_scale != 1.0:
                    loss = loss * self.loss_scale
            else:  # Opacus ghost clipping: per-sample losses through its loss wrapper (2 backwards)
                logits = self.model(input_ids=ids, position_ids=pos).logits
                loss = self.dp_loss(logits.reshape(-1, self.vocab), ids.reshape(-1),
                                    shape=logits.shape)
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return loss

    def close(self):
        with contextlib.suppress(Exception):
            self.opt.zero_grad(set_to_none=True)
        if self.mode.startswith("opacus"):
            with contextlib.suppress(Exception):
                self.model._close()
        self.model = self.opt = self.dp_loss = None


def free(device):
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()


def case_inputs(cfg, bsz, seq, precision, device="cuda"):
    """(ids, pos, amp) of one timed case: the fixed token batch (CPU generator, seed 1), per-sample
    position ids (Opacus needs them), and the autocast context of `precision`; sets TF32 for
    "fp32-tf32" (off otherwise). Every script timing Runner steps uses these."""
    set_tf32(precision == "fp32-tf32")
    gen = torch.Generator(device="cpu").manual_seed(1)
    ids = torch.randint(0, cfg.vocab_size, (bsz, seq), generator=gen).to(device)
    pos = torch.arange(seq, device=device).expand(bsz, seq).contiguous()
    amp = (torch.autocast(device_type=device, dtype=torch.bfloat16) if precision == "bf16"
           else contextlib.nullcontext())
    return ids, pos, amp


def timed_step(runner, ids, pos, amp, cuda: bool) -> tuple:
    """One synchronised step: (loss, step ms by CUDA events (on the CPU: wall time), host ms until
    step() returned (launch time: close to the step time = launch-bound))."""
    if cuda:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
    t0 = time.perf_counter()
    loss = runner.step(ids, pos, amp)
    host = (time.perf_counter() - t0) * 1e3
    if not cuda:
        return loss, host, host
    end.record()
    torch.cuda.synchronize()
    return loss, start.elapsed_time(end), host


def step_stats(times: list, host: list, loss, runner, args) -> dict:
    """A case's result from its timed steps (ms) and its last loss."""
    return {"median_ms": statistics.median(times), "mean_ms": statistics.fmean(times),
            "min_ms": min(times), "max_ms": max(times), "times_ms": times, "host_ms": host,
            "gc": args.gc, "loss": float(loss.detach()), "n_params": runner.n_params,
            "status": "ok"}


def run_case(runner, cfg, device, precision, bsz, seq, args) -> dict:
    ids, pos, amp = case_inputs(cfg, bsz, seq, precision, device)
    cuda = device == "cuda"
    for _ in range(args.warmup):
        runner.step(ids, pos, amp)
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times, host = [], []
    for _ in range(args.steps):
        loss, ms, h = timed_step(runner, ids, pos, amp, cuda)
        times.append(ms)
        host.append(h)
    res = step_stats(times, host, loss, runner, args)
    if cuda:
        res["peak_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return res


PAIRED = ("nonprivate", "dpkern")


def resident_bytes(runner, host_too: bool = False) -> int:
    """Bytes a runner holds between steps on its device (with host_too, on the host as well):
    its parameters and optimizer state, each storage once."""
    seen = {}
    tensors = list(runner.model.parameters())
    for st in runner.opt.state.values():
        tensors += [v for v in st.values() if isinstance(v, torch.Tensor)]
    for t in tensors:
        if host_too or t.device.type != "cpu":
            s = t.untyped_storage()
            seen[s.data_ptr()] = s.nbytes()
    return sum(seen.values())


def run_paired_case(runners: dict, cfg, device, precision, bsz, seq, args) -> dict:
    """run_case for the non-private and dpkern runners together, their steps interleaved (one of
    each per round, the order alternating), so that both see the same host and GPU state: {mode:
    run_case's result} plus, for dpkern, "paired_ratio" (median over rounds of the DP step's time
    over the round's non-private one). Both models stay resident, so a mode's peak memory is its
    own resident bytes (parameters + optimizer state) plus the most its steps allocated above
    the two models at rest."""
    ids, pos, amp = case_inputs(cfg, bsz, seq, precision, device)
    cuda = device == "cuda"
    for m in PAIRED:
        for _ in range(args.warmup):
            runners[m].step(ids, pos, amp)
    times, host, extra, loss = ({m: [] for m in PAIRED}, {m: [] for m in PAIRED},
                                dict.fromkeys(PAIRED, 0), {})
    for i in range(args.steps):
        for m in (PAIRED if i % 2 == 0 else PAIRED[::-1]):
            if cuda:
                torch.cuda.synchronize()
                base = torch.cuda.memory_allocated()
                torch.cuda.reset_peak_memory_stats()
            loss[m], ms, h = timed_step(runners[m], ids, pos, amp, cuda)
            times[m].append(ms)
            host[m].append(h)
            if cuda:
                extra[m] = max(extra[m], torch.cuda.max_memory_allocated() - base)
    out = {}
    for m in PAIRED:
        out[m] = step_stats(times[m], host[m], loss[m], runners[m], args) | {"paired": True}
        if cuda:
            out[m]["peak_mem_gib"] = (resident_bytes(runners[m]) + extra[m]) / 2**30
    out["dpkern"]["paired_ratio"] = statistics.median(
        d / n for n, d in zip(times["nonprivate"], times["dpkern"]))
    return out


def _failure(exc) -> str:
    if isinstance(exc, torch.cuda.OutOfMemoryError):
        return "failed: out of memory"
    msg = " ".join(str(exc).split())[:200]
    return f"failed: {type(exc).__name__}: {msg}"


def _git_commit() -> str:
    """DPKERN_COMMIT if set (the GPU machine's copy of the tree may carry stale git metadata),
    else git rev-parse HEAD."""
    if os.environ.get("DPKERN_COMMIT"):
        return os.environ["DPKERN_COMMIT"]
    try:
        return subprocess.check_output(["git", "rev-parse", "HEAD"], text=True).strip()
    except Exception:  # noqa: BLE001
        return "unknown"


def _parse_cases(text):
    return [tuple(int(x) for x in c.split("x")) for c in text.split(",") if c]


def summarize(report: dict, cfg) -> list:
    """One row per (case, precision, mode) with ratios to the non-private run and the floor."""
    runs = {(r["B"], r["T"], r["precision"], r["mode"]): r for r in report["runs"]}
    rows = []
    for (bsz, seq, prec, mode), r in sorted(runs.items(), key=lambda kv: (kv[0][1], kv[0][0],
                                                                          kv[0][2])):
        base = runs.get((bsz, seq, prec, "nonprivate"), {})
        row = {"B": bsz, "T": seq, "precision": prec, "mode": mode, "status": r["status"],
               "median_ms": r.get("median_ms"), "peak_mem_gib": r.get("peak_mem_gib"),
               "floor": flop_floor(cfg, bsz, seq)["floor"],
               "floor_triangle": flop_floor(cfg, bsz, seq)["floor_triangle"],
               "time_ratio": None, "mem_ratio": None, "paired_ratio": r.get("paired_ratio")}
        if r.get("median_ms") and base.get("median_ms"):
            row["time_ratio"] = r["median_ms"] / base["median_ms"]
            if r.get("peak_mem_gib") and base.get("peak_mem_gib"):
                row["mem_ratio"] = r["peak_mem_gib"] / base["peak_mem_gib"]
        rows.append(row)
    return rows


def write_csv(rows, path):
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else ["B"])
        w.writeheader()
        w.writerows(rows)


def print_table(rows):
    """Compact: one line per case and precision, the time (memory) ratio of every private mode."""
    present = {r["mode"] for r in rows}
    private = [m for m in MODES + EXTRA_MODES if m != "nonprivate" and (m in MODES or m in present)]
    keys = sorted({(r["T"], r["B"], r["precision"]) for r in rows})
    head = f"{'case':>9} {'prec':>9} {'base ms':>8} {'floor':>6} " + " ".join(
        f"{m:>17}" for m in private)
    print(head)
    print("-" * len(head))
    for seq, bsz, prec in keys:
        by = {r["mode"]: r for r in rows if (r["T"], r["B"], r["precision"]) == (seq, bsz, prec)}
        base = by.get("nonprivate", {})
        cells = []
        for m in private:
            r = by.get(m)
            if r is None:
                cells.append(f"{'-':>17}")
            elif r["time_ratio"] is not None:
                mem = f"({r['mem_ratio']:.2f})" if r["mem_ratio"] else ""
                cells.append(f"{r['time_ratio']:>10.3f}x{mem:>6}")
            else:
                cells.append(f"{r['status'][:17]:>17}")
        ms = f"{base['median_ms']:.1f}" if base.get("median_ms") else base.get("status", "-")[:8]
        floor = next(iter(by.values()))["floor"]
        print(f"{bsz:>4}x{seq:<4} {prec:>9} {ms:>8} {floor:>6.3f} " + " ".join(cells))
    print("ratios: DP time / non-private time (peak memory ratio); floor: the FLOP model's")


def plot(rows, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    precs = sorted({r["precision"] for r in rows})
    fig, axes = plt.subplots(1, len(precs), figsize=(6 * len(precs), 4), squeeze=False)
    for ax, prec in zip(axes[0], precs):
        pts = sorted({(r["T"], r["B"]) for r in rows if r["precision"] == prec})
        xs = range(len(pts))
        floor = [flop_floor_row(rows, prec, c) for c in pts]
        ax.plot(xs, floor, "k--", label="FLOP floor (dense ghost)")
        ax.plot(xs, [next(r["floor_triangle"] for r in rows if (r["T"], r["B"]) == c
                          and r["precision"] == prec) for c in pts], "k:",
                label="FLOP floor (triangle ghost)")
        for mode, style in (("dpkern", "o-"), ("opacus-ghost", "s"), ("opacus-hooks", "^")):
            ys = [_ratio(rows, prec, c, mode) for c in pts]
            if any(y is not None for y in ys):
                ax.plot([x for x, y in zip(xs, ys) if y is not None],
                        [y for y in ys if y is not None], style, label=mode)
        ax.set_xticks(list(xs), [f"B{b}\nT{t}" for t, b in pts], fontsize=8)
        ax.set_ylabel("DP / non-private step time")
        ax.set_title(prec)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def flop_floor_row(rows, prec, case):
    return next(r["floor"] for r in rows if (r["T"], r["B"]) == case and r["precision"] == prec)


def _ratio(rows, prec, case, mode):
    return next((r["time_ratio"] for r in rows if (r["T"], r["B"]) == case
                 and r["precision"] == prec and r["mode"] == mode), None)


def run_paired(cfg, args, cases, report, t_start) -> None:
    """The non-private and dpkern modes built together and run case by case with
    run_paired_case; one entry per case, precision and mode in report["runs"], as main's loop."""
    def build():
        runners = {}
        try:
            for m in PAIRED:
                runners[m] = Runner(cfg, args.device, m, args, expected_bsz=cases[0][0])
            return runners, None
        except Exception as exc:  # noqa: BLE001 - recorded for every case
            return runners, _failure(exc)

    def close(runners):
        for r in runners.values():
            r.close()
        runners.clear()
        free(args.device)

    runners, error = build()
    for precision in args.precisions.split(","):
        for bsz, seq in cases:
            entries = {m: {"B": bsz, "T": seq, "precision": precision, "mode": m}
                       | flop_floor(cfg, bsz, seq) for m in PAIRED}
            if time.perf_counter() - t_start > args.budget_s:
                status = "skipped: time budget"
            elif error is not None:
                status = error
            else:
                try:
                    for m, res in run_paired_case(runners, cfg, args.device, precision, bsz, seq,
                                                  args).items():
                        entries[m].update(res)
                    status = None
                except Exception as exc:  # noqa: BLE001 - OOM: both modes of this case
                    status = _failure(exc)
                    close(runners)  # a step that failed half-way leaves state behind: rebuild
                    runners, error = build()
            for m in PAIRED:
                if status is not None:
                    entries[m]["status"] = status
                report["runs"].append(entries[m])
                print(json.dumps(entries[m]), flush=True)
            free(args.device)
    close(runners)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--cases", default=None, help="comma-separated BxT list (default: table + sweep)")
    ap.add_argument("--opacus-cases", default=None, help="cases Opacus runs on (default: the table)")
    ap.add_argument("--precisions", default=",".join(PRECISIONS))
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--budget-s", type=float, default=330.0, help="skip what is left after this")
    ap.add_argument("--backend", default=None, help="dpkern backend (default: triton on CUDA)")
    ap.add_argument("--sigma", type=float, default=1.0)
    ap.add_argument("--clip", type=float, default=1.0)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--tiny", action="store_true", help="a 2-layer toy model (smoke test)")
    ap.add_argument("--out", default="e2e_step.json", help="JSON path; .csv and .png beside it")
    ap.add_argument("--paired", action="store_true",
                    help="run the non-private and dpkern steps of each case interleaved "
                         "(run_paired_case): ratios that a drifting host does not skew")
    ap.add_argument("--gc", choices=["default", "freeze"], default="default",
                    help="freeze: gc.freeze() once the models are built (the interpreter's cyclic "
                         "collector then skips the long-lived objects; times collector pauses)")
    args = ap.parse_args(argv)
    if args.backend is None:
        args.backend = "triton" if args.device == "cuda" else "auto"

    cfg = llama_config(args.tiny)
    table = TINY_CASES if args.tiny else TABLE_CASES
    cases = _parse_cases(args.cases) if args.cases else list(dict.fromkeys(
        table + ([] if args.tiny else SWEEP_CASES)))
    opacus_cases = set(_parse_cases(args.opacus_cases) if args.opacus_cases else table)
    report = {"gpu": torch.cuda.get_device_name() if args.device == "cuda" else platform.processor(),
              "torch": torch.__version__, "commit": _git_commit(),
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
              "model": {k: getattr(cfg, k) for k in ("vocab_size", "hidden_size",
                                                     "intermediate_size", "num_hidden_layers",
                                                     "num_attention_heads", "num_key_value_heads")},
              "steps": args.steps, "warmup": args.warmup, "backend": args.backend,
              "dpkern_fp32_mode": os.environ.get("DPKERN_NORM_FP32_DOT", "default"), "runs": []}
    for mod in ("triton", "opacus", "transformers"):
        with contextlib.suppress(ImportError):
            report[mod] = __import__(mod).__version__
    t_start = time.perf_counter()
    modes = args.modes.split(",")
    if args.paired and all(m in modes for m in PAIRED):
        report["paired"] = True
        run_paired(cfg, args, cases, report, t_start)
        modes = [m for m in modes if m not in PAIRED]
    for mode in modes:
        mode_cases = [c for c in cases if not mode.startswith("opacus") or c in opacus_cases]
        if not mode_cases:
            continue
        def build():
            try:
                r = Runner(cfg, args.device, mode, args, expected_bsz=mode_cases[0][0])
                if args.gc == "freeze":
                    gc.collect()
                    gc.freeze()
                return r, None
            except Exception as exc:  # noqa: BLE001 - recorded, the other modes still run
                return None, _failure(exc)

        runner, build_error = None, None
        if time.perf_counter() - t_start < args.budget_s:
            runner, build_error = build()
        for precision in args.precisions.split(","):
            for bsz, seq in mode_cases:
                entry = {"B": bsz, "T": seq, "precision": precision, "mode": mode}
                entry.update(flop_floor(cfg, bsz, seq))
                if time.perf_counter() - t_start > args.budget_s:
                    entry["status"] = "skipped: time budget"
                elif runner is None:
                    entry["status"] = build_error or "skipped: time budget"
                else:
                    try:
                        entry.update(run_case(runner, cfg, args.device, precision, bsz, seq, args))
                    except Exception as exc:  # noqa: BLE001 - OOM, Opacus bf16 error, ...
                        entry["status"] = _failure(exc)
                        # A step that failed half-way leaves hooks' state behind (Opacus: per-sample
                        # gradients of some layers only, which fails every later case): rebuild.
                        runner.close()
                        gc.unfreeze()
                        runner = None
                        free(args.device)
                        runner, build_error = build()
                free(args.device)
                report["runs"].append(entry)
                print(json.dumps(entry), flush=True)
        if runner is not None:
            runner.close()
        gc.unfreeze()
        del runner
        free(args.device)
    report["wall_s"] = time.perf_counter() - t_start
    rows = summarize(report, cfg)
    report["summary"] = rows
    stem = args.out[:-5] if args.out.endswith(".json") else args.out
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(report, f, indent=1)
    write_csv(rows, stem + ".csv")
    try:
        plot(rows, stem + ".png")
    except Exception as exc:  # noqa: BLE001 - the numbers matter more than the picture
        print(f"plot failed: {exc}")
    print_table(rows)
    print(f"wrote {args.out}, {stem}.csv, {stem}.png in {report['wall_s']:.0f} s")
    return report


if __name__ == "__main__":
    main()
