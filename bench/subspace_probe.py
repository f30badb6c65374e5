"""Where the DP-SFT projected step's time goes on the GPU, and what the projection could cost.

    python bench/subspace_probe.py --out /tmp/probe            # GPU (1B Llama, bf16 8x512)
    python bench/subspace_probe.py --out /tmp/probe --parts steps \
        --modes full,subspace-16,subspace-16:per-layer,subspace-64,subspace-64:per-layer
    TRITON_INTERPRET=1 python bench/subspace_probe.py --out /tmp/probe --parts launches  # CPU

Writes probe.json and probe.txt under --out:

* proj: subspace_project at the 1B model's layer shapes (B, T) = (8, 512), r = 16 and 64: the
  Triton kernel at its heuristic config and at other token tiles / splits, and a cuBLAS form
  ((g U), (a V) as two GEMMs with fp32 output, then a batched r×r product), each in ms and in GB/s
  of the a and g bytes it must read (the floor is one read of each);
* steps: full DP step vs subspace-16 / subspace-64 (--modes; a ":per-layer" suffix runs the
  projected step with DPKERN_SUBSPACE_GROUPED=0, one projection and back-projection launch per
  layer, against the default grouped launches), median ms over --steps, host time to issue a
  step (perf_counter until the last launch returns), kernel launches of one profiled step and
  its top CUDA kernels;
* ab: the same modes built side by side and timed in interleaved rounds (--steps rounds, order
  rotated), so that the ratio to the full step does not depend on when each mode ran;
* host: cProfile of --steps steps per mode (host_<mode>.txt: top functions by own and by
  cumulative time), to find the host time a mode adds;
* launches: kernel launches (Triton + aten ops that launch) of the DP part of a projected step
  (end-of-backward clipper + optimizer step) of a small Llama of the same layer structure at
  --layers layers (tests/subspace/launches.py; counter: tests/opcount.py), grouped and per
  layer; by_name keys "triton:<kernel>" and "aten.<op>.<overload>"; runs on the CPU under
  TRITON_INTERPRET=1 too.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

SHAPES = {"qkvo": (2048, 2048), "gate_up": (2048, 5632), "down": (5632, 2048),
          "lm_head": (2048, 32000)}  # (d, p)


def cuda_kernels(prof) -> list:
    """The CUDA-side events (kernels, copies) of a torch.profiler run, most device time first."""
    return sorted((e for e in prof.key_averages()
                   if e.device_type.name == "CUDA" and e.device_time_total > 0),
                  key=lambda e: -e.self_device_time_total)


def event_ms(fn, reps=20) -> float:
    """Mean ms per call of `reps` back-to-back calls after one warm-up (CUDA events)."""
    fn()
    torch.cuda.synchronize()
    ev = [torch.cuda.Event(enable_timing=True) for _ in range(2)]
    ev[0].record()
    for _ in range(reps):
        fn()
    ev[1].record()
    torch.cuda.synchronize()
    return ev[0].elapsed_time(ev[1]) / reps


def _cublas_project(a, g, u, v):
    bsz, seq, d = a.shape
    p = g.shape[2]
    g2, a2 = g.reshape(-1, p), a.reshape(-1, d)
    try:
        gu = torch.mm(g2, u.to(g.dtype), out_dtype=torch.float32)
        av = torch.mm(a2, v.to(a.dtype), out_dtype=torch.float32)
    except (TypeError, RuntimeError):
        gu = torch.mm(g2, u.to(g.dtype)).float()
        av = torch.mm(a2, v.to(a.dtype)).float()
    s = torch.bmm(gu.view(bsz, seq, -1).transpose(1, 2), av.view(bsz, seq, -1))
    return s, s.square().sum(dim=(1, 2))


def probe_proj(bsz, seq, ranks):
    from dpkern.kernels.subspace_proj import SubspaceProjConfig, subspace_proj_config
    from dpkern.subspace import orthonormalize, subspace_project
    rows = []
    for name, (d, p) in SHAPES.items():
        a = torch.randn(bsz, seq, d, device="cuda", dtype=torch.bfloat16)
        g = torch.randn(bsz, seq, p, device="cuda", dtype=torch.bfloat16)
        nbytes = (a.numel() + g.numel()) * 2
        for r in ranks:
            u = orthonormalize(torch.randn(p, r, device="cuda"))
            v = orthonormalize(torch.randn(d, r, device="cuda"))
            s_ref, _ = subspace_project(a.double(), g.double(), u.double(), v.double())
            heur = subspace_proj_config(bsz, seq, a.device, rank=r)
            cands = {"heuristic": heur}
            for bt in (16, 32, 64):
                for bk in (64, 128):
                    split = max(1, seq // bt)
                    cands[f"bt{bt}_bk{bk}_s{split}_w4"] = SubspaceProjConfig(bt, bk, split, 4,
                                                                              "tf32")
            for cname, cfg in cands.items():
                try:
                    ms = event_ms(lambda: subspace_project(a, g, u, v, config=cfg))
                    s, _ = subspace_project(a, g, u, v, config=cfg)
                    err = float((s.double() - s_ref).norm() / s_ref.norm())
                except Exception as e:  # a config the compiler refuses
                    rows.append(dict(shape=name, r=r, impl=cname, error=repr(e)[:200]))
                    continue
                rows.append(dict(shape=name, r=r, impl=cname, ms=ms, gbps=nbytes / ms / 1e6,
                                 rel_err=err))
            ms = event_ms(lambda: _cublas_project(a, g, u, v))
            s, _ = _cublas_project(a, g, u, v)
            rows.append(dict(shape=name, r=r, impl="cublas", ms=ms, gbps=nbytes / ms / 1e6,
                             rel_err=float((s.double() - s_ref).norm() / s_ref.norm())))
    return rows


@contextlib.contextmanager
def _per_layer(mode: str):
    """mode "<m>:per-layer": DPKERN_SUBSPACE_GROUPED=0 inside (per-layer launches)."""
    old = os.environ.get("DPKERN_SUBSPACE_GROUPED")
    if mode.endswith(":per-layer"):
        os.environ["DPKERN_SUBSPACE_GROUPED"] = "0"
    try:
        yield mode.split(":")[0]
    finally:
        if old is None:
            os.environ.pop("DPKERN_SUBSPACE_GROUPED", None)
        else:
            os.environ["DPKERN_SUBSPACE_GROUPED"] = old


_LAUNCH_CALLS = ("cudaLaunchKernel", "cuLaunchKernelEx", "cudaLaunchKernelExC", "cuLaunchKernel")


@contextlib.contextmanager
def _warm_step(mode: str, bsz: int, seq: int):
    """One mode's DP training step (bench_subspace.llama_dp_step) after 3 warm-up steps, inside
    the mode's launch setting. The previous mode's model and optimizer states are freed and the
    peak memory reset first (the caller drops its `step`, whose closure holds the model), so this
    mode's numbers do not include them."""
    import gc

    from bench.bench_subspace import llama_dp_step
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    with _per_layer(mode) as base:
        model, opt, _, step = llama_dp_step(base, bsz, seq)
        for _ in range(3):
            step()
        torch.cuda.synchronize()
        yield step


def probe_steps(bsz, seq, steps, modes=("full", "subspace-16", "subspace-64")):
    out = {}
    for mode in modes:
        with _warm_step(mode, bsz, seq) as step:
            wall, host = [], []
            for _ in range(steps):
                t0 = time.perf_counter()
                step()
                host.append(time.perf_counter() - t0)
                torch.cuda.synchronize()
                wall.append(time.perf_counter() - t0)
            from torch.profiler import ProfilerActivity, profile
            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                step()
                torch.cuda.synchronize()
            peak_gib = torch.cuda.max_memory_allocated() / 2**30
        ka = prof.key_averages()
        kern = cuda_kernels(prof)
        out[mode] = dict(
            wall_ms=1e3 * statistics.median(wall), host_ms=1e3 * statistics.median(host),
            wall_ms_all=[1e3 * x for x in wall],
            gpu_kernel_ms=sum(e.self_device_time_total for e in kern) / 1e3,
            launches=sum(e.count for e in ka if e.key in _LAUNCH_CALLS),
            peak_gib=peak_gib,
            top=[dict(name=e.key[:90], ms=e.self_device_time_total / 1e3, calls=e.count)
                 for e in kern[:25]],
            top_cpu=[dict(name=e.key[:90], self_cpu_ms=e.self_cpu_time_total / 1e3, calls=e.count)
                     for e in sorted(ka, key=lambda e: -e.self_cpu_time_total)[:25]])
        del step  # frees the model before the next mode is built
    return out


def probe_ab(bsz, seq, rounds, modes=("full", "subspace-16", "subspace-64")):
    """All modes' steps built side by side (one process, one host), then `rounds` rounds of one
    step of each, the order rotated every round: a slow spell of the host falls on every mode
    alike, where probe_steps times the modes one after another. Per mode: median / min wall and
    median host ms; per projected mode: the median over rounds of its wall over the full step's
    in the same round, and the share of rounds in which it was faster."""
    with contextlib.ExitStack() as stack:
        steps = {m: stack.enter_context(_warm_step(m, bsz, seq)) for m in modes}
        wall = {m: [] for m in modes}
        host = {m: [] for m in modes}
        for r in range(rounds):
            for m in modes[r % len(modes):] + modes[:r % len(modes)]:
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                steps[m]()
                host[m].append(time.perf_counter() - t0)
                torch.cuda.synchronize()
                wall[m].append(time.perf_counter() - t0)
        del steps
    out = {}
    for m in modes:
        ratios = [w / f for w, f in zip(wall[m], wall[modes[0]])]
        out[m] = dict(wall_ms=1e3 * statistics.median(wall[m]), min_ms=1e3 * min(wall[m]),
                      host_ms=1e3 * statistics.median(host[m]),
                      wall_ms_all=[1e3 * x for x in wall[m]],
                      ratio_median=statistics.median(ratios),
                      faster_share=sum(x < 1 for x in ratios) / len(ratios))
    return out


def probe_host(bsz, seq, steps, modes=("full", "subspace-16"), top=40):
    """cProfile of `steps` steps per mode after 3 warm-up steps: the functions with the most host
    time (tottime and cumtime), to find what the projected step's host time adds."""
    import cProfile
    import io
    import pstats

    out = {}
    for mode in modes:
        with _warm_step(mode, bsz, seq) as step:
            prof = cProfile.Profile()
            prof.enable()
            for _ in range(steps):
                step()
            prof.disable()
            torch.cuda.synchronize()
        text = {}
        for key in ("tottime", "cumulative"):
            buf = io.StringIO()
            pstats.Stats(prof, stream=buf).sort_stats(key).print_stats(top)
            text[key] = buf.getvalue()
        out[mode] = text
        del step  # frees the model before the next mode is built
    return out


def probe_launches(layers_list=(2, 16), rank=4):
    """Launches of the DP part (clipper + step, 3rd step) of a projected step of a small Llama
    with the 1B model's layer structure, grouped and per layer, on this machine's device."""
    from dpkern.subspace import SubspacePrivacyEngine
    from tests.subspace.launches import dp_part_launches, llama_bases, tiny_llama
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    out = []
    for layers in layers_list:
        for mode in ("grouped", "grouped:per-layer"):
            with _per_layer(mode):
                model, cfg = tiny_llama(layers, device=dev)
                opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
                model, dp, _ = SubspacePrivacyEngine(accountant="rdp", backend="triton").make_private(
                    module=model, optimizer=opt, data_loader=None, noise_multiplier=1.0,
                    max_grad_norm=1.0, expected_batch_size=2, sample_rate=0.01,
                    loss_reduction="sum", subspace=llama_bases(model, rank, dev), seed=0)
                dp.backproj_backend = dp.noise_backend = "triton"
                ids = torch.randint(0, cfg.vocab_size, (2, 9), device=dev)
                b, st = dp_part_launches(dp, lambda: torch.nn.functional.cross_entropy(
                    model(input_ids=ids).logits[:, :-1].float().reshape(-1, cfg.vocab_size),
                    ids[:, 1:].reshape(-1), reduction="none").view(2, -1).mean(1).sum(), 3)
            out.append(dict(layers=layers, projected=len(dp.bases), mode=mode.replace("grouped:", ""),
                            backward=b.total, step=st.total, triton=b.triton + st.triton,
                            by_name=dict(sorted((b.by_name + st.by_name).items(),
                                                key=lambda kv: -kv[1]))))
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--parts", default="proj,steps")
    ap.add_argument("--modes", default="full,subspace-16,subspace-64")
    ap.add_argument("--layers", default="2,16", help="launches: model depths to count")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    gpu = torch.cuda.is_available()
    res = dict(device=torch.cuda.get_device_name() if gpu else "cpu", batch=args.batch,
               seq=args.seq)
    parts = args.parts.split(",")
    if "launches" in parts:
        res["launches"] = probe_launches(tuple(int(x) for x in args.layers.split(",")))
        (out / "probe.json").write_text(json.dumps(res, indent=1))
    if "proj" in parts:
        res["proj"] = probe_proj(args.batch, args.seq, (16, 64))
        (out / "probe.json").write_text(json.dumps(res, indent=1))
    if "steps" in parts:
        res["steps"] = probe_steps(args.batch, args.seq, args.steps, args.modes.split(","))
    if "ab" in parts:
        res["ab"] = probe_ab(args.batch, args.seq, args.steps, tuple(args.modes.split(",")))
        (out / "probe.json").write_text(json.dumps(res, indent=1))
    if "host" in parts:
        host = probe_host(args.batch, args.seq, args.steps, args.modes.split(","))
        for mode, text in host.items():
            (out / f"host_{mode}.txt").write_text(text["tottime"] + "\n" + text["cumulative"])
    (out / "probe.json").write_text(json.dumps(res, indent=1))
    lines = [f"{res['device']}  B={args.batch} T={args.seq}"]
    for row in res.get("launches", []):
        lines.append(f"launches, {row['layers']} layers ({row['projected']} projected), "
                     f"{row['mode']}: backward {row['backward']}, step {row['step']} "
                     f"(Triton {row['triton']})")
    for row in res.get("proj", []):
        lines.append(json.dumps(row))
    for mode, st in res.get("ab", {}).items():
        lines.append(f"ab {mode}: wall median {st['wall_ms']:.1f} ms (min {st['min_ms']:.1f}), "
                     f"host {st['host_ms']:.1f} ms, / full in the same round: median "
                     f"{st['ratio_median']:.3f}, faster in {st['faster_share']:.0%} of rounds")
    for mode, st in res.get("steps", {}).items():
        lines.append(f"\n{mode}: wall {st['wall_ms']:.1f} ms, host {st['host_ms']:.1f} ms, "
                     f"kernels {st['gpu_kernel_ms']:.1f} ms, launches {st['launches']}, "
                     f"peak {st['peak_gib']:.1f} GiB")
        lines += [f"  {t['ms']:8.2f} ms {t['calls']:5d}x {t['name']}" for t in st["top"]]
        lines.append("  -- self CPU --")
        lines += [f"  {t['self_cpu_ms']:8.2f} ms {t['calls']:5d}x {t['name']}" for t in st["top_cpu"]]
    (out / "probe.txt").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
