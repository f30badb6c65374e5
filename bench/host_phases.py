"""Where a host-bound step's time goes, non-private against dpkern, side by side in one process.

bench/e2e_step.py times each mode after the other, so on the small (host-bound) cases the ratio
follows whatever the host did while each mode ran. This script builds both modes once and runs
them in rounds (one step of each per round, the order alternating), and splits every step into
host phases: forward (loss included), backward (autograd, and within it dpkern's end-of-backward
clipper), optimizer step + zero_grad, and the GPU tail (from step() returning to the GPU going
idle). It also records the interpreter's garbage collections inside each step (count and time per
generation) and, for one step per mode, the aten ops each phase issues. --clipper-parts splits
the dpkern clipper's host time further (ClipperParts): per-width rows, norms, release bounds,
clip factors, book-keeping, and the Triton launch path summed over all of them.
--input-addresses records whether each backward's clipper inputs sit where the previous
backward's did (InputAddresses). --cuda-api lists each phase's CUDA runtime calls that can make
the host wait (allocations, copies, synchronisations), with the launches for scale.
--step-waits finds the calls of the optimizer step that wait for the GPU (step_waits).
--pipelined K also times K steps of each mode back to back, synchronised only around them
(pipelined): a loop that does not read the loss every step lets the host run ahead of the GPU.

    python -m bench.host_phases --cases 8x128,2x512 --precisions fp32-tf32 --out phases.json
"""
from __future__ import annotations

import argparse
import collections
import gc
import json
import statistics
import time

import torch

from bench.e2e_step import Runner, _parse_cases, case_inputs, free, llama_config
from dpkern.ops._persample import PlanCache

PHASES = ("forward", "backward", "clipper", "step", "tail", "gpu", "gc")


class _GcLog:
    """Garbage collections while `on` is set: [(generation, seconds)]."""

    def __init__(self):
        self.on, self.events, self._t = False, [], 0.0
        gc.callbacks.append(self)

    def __call__(self, phase, info):
        if not self.on:
            return
        if phase == "start":
            self._t = time.perf_counter()
        else:
            self.events.append((info["generation"], time.perf_counter() - self._t))

    def close(self):
        gc.callbacks.remove(self)


class ClipperClock:
    """Wraps dpkern's end-of-backward callback (the clipper) and adds up its wall time in
    `seconds`; `fn` is the wrapped callable (bench/host_cpu.py swaps in a profiled one)."""

    def __init__(self, fn):
        self.fn, self.seconds = fn, 0.0

    def __call__(self, *args, **kwargs):
        t = time.perf_counter()
        try:
            return self.fn(*args, **kwargs)
        finally:
            self.seconds += time.perf_counter() - t


class InputAddresses:
    """Wraps dpkern's end-of-backward callback and records, for every backward while `on`, the
    clipper's inputs as (data_ptr, shape, strides, dtype) of every tensor of every use, in the
    tape's order. `repeats()` counts the backwards whose inputs sat where the previous one's did:
    the condition for replaying a captured clipper (a CUDA graph reads its inputs at the captured
    addresses) without copying them into static buffers."""

    def __init__(self, fn):
        self.fn, self.on, self.sigs = fn, False, []

    def __call__(self, uses, *args, **kwargs):
        if self.on:
            sig = []
            for p, us in uses.items():
                for u in us:
                    for x in vars(u).values():
                        if isinstance(x, torch.Tensor):
                            sig.append((x.data_ptr(), tuple(x.shape), x.stride(), x.dtype))
            self.sigs.append(tuple(sig))
        return self.fn(uses, *args, **kwargs)

    def repeats(self) -> dict:
        """{"backwards", "same_as_previous", "tensors", "moved_tensors_median"}."""
        pairs = list(zip(self.sigs, self.sigs[1:]))
        moved = [sum(a != b for a, b in zip(x, y)) + abs(len(x) - len(y)) for x, y in pairs]
        return {"backwards": len(self.sigs), "same_as_previous": sum(m == 0 for m in moved),
                "tensors": len(self.sigs[-1]) if self.sigs else 0,
                "moved_tensors_median": statistics.median(moved) if moved else 0}


class ClipperParts:
    """Host time of the clipper's stages (the functions dpkern.engine calls, wrapped while
    installed) and of every Triton launch inside them (JITFunction.run: argument binding,
    specialisation, cache lookup, the driver call), in ms, added up while `on`. The Triton time
    is part of the stages'; "other" in a row is the clipper's time outside the stages."""

    STAGES = {"rows": "PerSampleRows", "norms": "norms_sq", "bounds": "release_bound_matrix",
              "clip": "clip_factors", "bookkeeping": "bookkeeping_wgrad_grouped"}

    def __init__(self):
        import dpkern.engine as eng
        import triton.runtime.jit as jit
        self.on, self.ms, self.launches = False, collections.Counter(), 0
        self._undo, self._depth = [], 0  # _depth: inside a stage (launches count only there)
        for part, name in self.STAGES.items():
            self._wrap(eng, name, part)
        self._wrap(eng._Clipper, "_bookkeep_rows", "rows")
        self._wrap(jit.JITFunction, "run", "triton", count=True)
        try:  # the CPU's launch path under TRITON_INTERPRET=1
            from triton.runtime.interpreter import InterpretedFunction
            self._wrap(InterpretedFunction, "run", "triton", count=True)
        except ImportError:  # pragma: no cover
            pass

    def _wrap(self, owner, name, part, count=False):
        fn = owner.__dict__[name]

        def timed(*args, **kwargs):
            if not self.on or (count and not self._depth):
                return fn(*args, **kwargs)
            t = time.perf_counter()
            self._depth += not count
            try:
                return fn(*args, **kwargs)
            finally:
                self._depth -= not count
                self.ms[part] += (time.perf_counter() - t) * 1e3
                self.launches += count
        setattr(owner, name, timed)
        self._undo.append((owner, name, fn))

    def take(self) -> dict:
        """The stages' ms since the last take (and "launches": Triton launches), then zero."""
        out = {k: self.ms[k] for k in (*self.STAGES, "triton")} | {"launches": self.launches}
        self.ms, self.launches = collections.Counter(), 0
        return out

    def close(self):
        for owner, name, fn in reversed(self._undo):
            setattr(owner, name, fn)
        self._undo = []


def clipper_clock(model) -> ClipperClock | None:
    """Times the clipper of a model made private by dpkern (None for a plain model)."""
    root = model.__dict__.get("_dpkern_root")
    if root is None:
        return None
    clock = root.tape.on_backward_end = ClipperClock(root.tape.on_backward_end)
    return clock


def profile_clipper(clock: ClipperClock, prof) -> None:
    """Has the cProfile.Profile `prof` record only while the clipper runs (wraps clock.fn)."""
    inner = clock.fn

    def profiled(*args, **kwargs):
        prof.enable()
        try:
            return inner(*args, **kwargs)
        finally:
            prof.disable()
    clock.fn = profiled


def _sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def forward_loss(runner, ids, pos, amp) -> torch.Tensor:
    """The forward of Runner.step (loss included, under `amp`): what every phase split times."""
    with amp:
        return runner.model(input_ids=ids, position_ids=pos, labels=ids).loss * runner.loss_scale


def one_step(runner, clock, ids, pos, amp, gclog=None) -> dict:
    """One synchronised step: phase times in ms (the clipper's from `clock`, when given) and,
    with `gclog`, the collections inside it. "gpu" is the step's time by CUDA events (start and
    end recorded around it); on the CPU, its wall time. forward + backward + step + tail is the
    wall time from the first synchronisation to the last."""
    device = ids.device.type
    if clock is not None:
        clock.seconds = 0.0
    _sync(device)
    events = []
    if gclog is not None:
        gclog.events, gclog.on = events, True
    if device == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
    t0 = time.perf_counter()
    loss = forward_loss(runner, ids, pos, amp)
    t1 = time.perf_counter()
    loss.backward()
    t2 = time.perf_counter()
    runner.opt.step()
    runner.opt.zero_grad(set_to_none=True)
    t3 = time.perf_counter()
    if device == "cuda":
        end.record()
    _sync(device)
    t4 = time.perf_counter()
    if gclog is not None:
        gclog.on = False
    clip = clock.seconds if clock is not None else 0.0
    row = {"forward": t1 - t0, "backward": t2 - t1, "clipper": clip, "step": t3 - t2,
           "tail": t4 - t3, "gc": sum(s for _, s in events)}
    row = {k: v * 1e3 for k, v in row.items()}
    row["gpu"] = start.elapsed_time(end) if device == "cuda" else (t4 - t0) * 1e3
    row["gc_by_gen"] = collections.Counter(g for g, _ in events)
    return row


def op_counts(runner, ids, pos, amp) -> dict:
    """{phase: number of aten ops} of one step (forward, backward with the clipper, optimizer
    step), counted by tests/opcount.count_launches (launching ops and views together)."""
    from tests.opcount import count_launches
    out = {}
    with count_launches() as c:
        loss = forward_loss(runner, ids, pos, amp)
    out["forward"] = c
    with count_launches() as c:
        loss.backward()
    out["backward"] = c
    with count_launches() as c:
        runner.opt.step()
        runner.opt.zero_grad(set_to_none=True)
    out["step"] = c
    _sync(ids.device.type)
    return {k: c.aten + c.views for k, c in out.items()}


# CUDA runtime calls that can make the host wait: allocation (cudaMalloc and cudaFree synchronise
# the device), copies and explicit synchronisation. Launches are listed for scale.
CUDA_API = ("cudaMalloc", "cudaFree", "cudaHostAlloc", "cudaFreeHost", "cudaMemcpyAsync",
            "cudaMemcpy", "cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize",
            "cudaLaunchKernel", "cuLaunchKernel", "cuLaunchKernelEx")
# the calls that wait for the GPU: where each comes from is recorded (cuda_api's "waits")
WAITS = ("cudaMalloc", "cudaFree", "cudaFreeHost", "cudaMemcpy", "cudaStreamSynchronize",
         "cudaDeviceSynchronize", "cudaEventSynchronize")


def cuda_api(runner, ids, pos, amp, steps: int = 3) -> dict:
    """{phase: {CUDA runtime call: [count, host ms]}} summed over `steps` synchronised steps,
    from torch.profiler (CPU and CUDA activities: CUPTI records the runtime API calls), phases
    marked by record_function, plus "waits": {"phase call": [the enclosing events' names,
    innermost first, Python frames included]} for each kind of call that waits for the GPU. On a
    host without CUDA the calls are absent (empty dicts)."""
    from torch.profiler import ProfilerActivity, profile, record_function
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if ids.device.type == "cuda" else [])
    marks = []
    # Python stacks only on CUDA: on the CPU the Triton interpreter would record every line it runs
    with profile(activities=acts, with_stack=ids.device.type == "cuda") as prof:
        for _ in range(steps):
            _sync(ids.device.type)
            with record_function("phase:forward"):
                loss = forward_loss(runner, ids, pos, amp)
            with record_function("phase:backward"):
                loss.backward()
            with record_function("phase:step"):
                runner.opt.step()
                runner.opt.zero_grad(set_to_none=True)
            _sync(ids.device.type)
    events = prof.events()
    for e in events:
        if e.name.startswith("phase:"):
            marks.append((e.time_range.start, e.time_range.end, e.name[6:]))
    out = {name: {} for _, _, name in marks}
    waits: dict = {}
    for e in events:
        if e.name not in CUDA_API:
            continue
        t = e.time_range.start
        for start, end, name in marks:
            if start <= t <= end:
                c = out[name].setdefault(e.name, [0, 0.0])
                c[0] += 1
                c[1] += (e.time_range.end - e.time_range.start) / 1e3
                if e.name in WAITS and f"{name} {e.name}" not in waits:
                    chain, up = [], e.cpu_parent
                    while up is not None and len(chain) < 16:
                        chain.append(up.name)
                        up = up.cpu_parent
                    waits[f"{name} {e.name}"] = chain + list(getattr(e, "stack", None) or [])
                break
    out["waits"] = waits
    return out


class StepCalls:
    """Host time of the calls inside a DP optimizer step (CALLS, wrapped while installed, and the
    optimizer's step hooks), in ms, added up while `on`; `take()` returns them and zeroes."""

    CALLS = (("dpkern.optim.dp_optimizer", "DPOptimizer", "_check_grads"),
             ("dpkern.optim.dp_optimizer", "DPOptimizer", "_fused_step"),
             ("dpkern.optim.dp_optimizer", None, "fused_noisy_step"),
             ("dpkern.noise.step", None, "_descriptors"),
             ("dpkern.noise.step", None, "_launch_cuda"),
             ("dpkern.optim.dp_optimizer", "DPOptimizer", "zero_grad"))

    def __init__(self, opt=None):
        import importlib
        self.on, self.ms, self._undo = False, collections.Counter(), []
        for mod, cls, name in self.CALLS:
            owner = importlib.import_module(mod)
            owner = getattr(owner, cls) if cls else owner
            fn = owner.__dict__[name]
            setattr(owner, name, self._timed(fn, name))
            self._undo.append((owner, name, fn))
        hooks = getattr(opt, "step_hooks", None)
        if hooks:
            self._hooks, self._hooks_before = hooks, list(hooks)
            hooks[:] = [self._timed(h, f"step_hook{i}") for i, h in enumerate(hooks)]

    def _timed(self, fn, label):
        def timed(*args, **kwargs):
            if not self.on:
                return fn(*args, **kwargs)
            t = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.ms[label] += (time.perf_counter() - t) * 1e3
        return timed

    def take(self) -> dict:
        out, self.ms = dict(self.ms), collections.Counter()
        return out

    def close(self):
        for owner, name, fn in reversed(self._undo):
            setattr(owner, name, fn)
        self._undo = []
        if getattr(self, "_hooks", None) is not None:
            self._hooks[:] = self._hooks_before
            self._hooks = None


def gpu_sleep(ms: float):
    """A callable that queues about `ms` of GPU work (torch.cuda._sleep, its clock rate measured
    once), and the measured ms it queues."""
    def timed(cycles):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        torch.cuda._sleep(cycles)
        b.record()
        torch.cuda.synchronize()
        return a.elapsed_time(b)
    timed(1000)
    per_ms = 4_000_000 / timed(4_000_000)
    cycles = int(ms * per_ms)
    return (lambda: torch.cuda._sleep(cycles)), timed(cycles)


def step_waits(runner, ids, pos, amp, *, queue=None, queued_ms: float = 0.0,
               repeats: int = 3) -> dict:
    """Which calls of the optimizer step (opt.step + zero_grad) make the host wait for the GPU.
    Each step runs twice `repeats` times after a synchronised forward + backward: with the GPU
    idle, and with `queue()` having queued `queued_ms` of GPU work just before. A call that
    waits for the GPU takes about queued_ms longer on the host the second way ("waits": more
    than half of it). On CUDA the default queue is gpu_sleep(30); elsewhere nothing is queued
    unless `queue` is given (tests). Returns {"queued_ms", "calls": {call: {"idle_ms",
    "queued_ms", "waits"}}} with the calls "step", "zero_grad" and StepCalls' that ran."""
    cuda = ids.device.type == "cuda"
    if queue is None:
        if not cuda:
            return {"queued_ms": 0.0, "calls": {}}
        queue, queued_ms = gpu_sleep(30.0)
    calls = StepCalls(runner.opt)
    rows = {False: [], True: []}
    try:
        for queued in (False, True) * repeats:
            forward_loss(runner, ids, pos, amp).backward()
            _sync(ids.device.type)
            if queued:
                queue()
            calls.on = True
            t0 = time.perf_counter()
            runner.opt.step()
            t1 = time.perf_counter()
            runner.opt.zero_grad(set_to_none=True)
            t2 = time.perf_counter()
            calls.on = False
            rows[queued].append({"step": (t1 - t0) * 1e3, "zero_grad": (t2 - t1) * 1e3}
                                | calls.take())
            _sync(ids.device.type)
    finally:
        calls.close()
    out = {}
    for name in rows[False][0]:
        idle = statistics.median(r.get(name, 0.0) for r in rows[False])
        busy = statistics.median(r.get(name, 0.0) for r in rows[True])
        out[name] = {"idle_ms": idle, "queued_ms": busy, "waits": busy - idle > 0.5 * queued_ms}
    return {"queued_ms": queued_ms, "calls": out}


def pipelined(runner, ids, pos, amp, steps: int) -> dict:
    """`steps` training steps back to back, synchronised only before the first and after the
    last (as a training loop that does not read the loss every step): ms per step by CUDA events
    ("gpu"; on the CPU, wall time) and the host's ms per step until the last step returned."""
    device = ids.device.type
    _sync(device)
    if device == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
    t0 = time.perf_counter()
    for _ in range(steps):
        runner.step(ids, pos, amp)
    t1 = time.perf_counter()
    if device == "cuda":
        end.record()
    _sync(device)
    t2 = time.perf_counter()
    gpu = start.elapsed_time(end) if device == "cuda" else (t2 - t0) * 1e3
    return {"gpu": gpu / steps, "host": (t1 - t0) * 1e3 / steps}


def summary(rows: list) -> dict:
    out = {k: statistics.median(r[k] for r in rows) for k in PHASES}
    out["min"] = {k: min(r[k] for r in rows) for k in PHASES}
    gens = collections.Counter()
    for r in rows:
        gens.update(r["gc_by_gen"])
    out["gc_per_step"] = {g: gens[g] / len(rows) for g in sorted(gens)}
    out["steps_with_gc"] = sum(1 for r in rows if r["gc_by_gen"])
    return out


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cases", default="8x128,2x512")
    ap.add_argument("--precisions", default="fp32-tf32,bf16")
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--gc", choices=["default", "freeze"], default="default")
    ap.add_argument("--out", default="host_phases.json")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tiny", action="store_true", help="2-layer model (tests)")
    ap.add_argument("--clipper-parts", action="store_true",
                    help="split the dpkern clipper's host time by stage (ClipperParts)")
    ap.add_argument("--input-addresses", action="store_true",
                    help="record whether each backward's clipper inputs sit at the previous "
                         "backward's addresses (InputAddresses)")
    ap.add_argument("--cuda-api", action="store_true",
                    help="per mode and phase, the CUDA runtime calls of 3 profiled steps "
                         "(allocations, copies, synchronisations, launches: cuda_api)")
    ap.add_argument("--step-waits", action="store_true",
                    help="which calls of the optimizer step wait for the GPU (step_waits)")
    ap.add_argument("--pipelined", type=int, default=0, metavar="K",
                    help="also, per round, K steps of each mode back to back, synchronised only "
                         "around them (pipelined): the ratio a loop that does not sync sees")
    ap.add_argument("--plan-cache-ab", action="store_true",
                    help="also time the dpkern step with the grouped ops' plan cache off "
                         "(mode dpkern-noplan: the same model, planning every backward)")
    args = ap.parse_args(argv)
    args.backend, args.sigma, args.clip = "triton", 1.0, 1.0
    cfg = llama_config(args.tiny)
    cases = _parse_cases(args.cases)
    gclog = _GcLog()
    parts = ClipperParts() if args.clipper_parts else None
    gpu = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    report = {"gpu": gpu, "torch": torch.__version__, "gc": args.gc, "rounds": args.rounds,
              "cases": []}
    modes = ("nonprivate", "dpkern") + (("dpkern-noplan",) if args.plan_cache_ab else ())
    runners = {m: Runner(cfg, args.device, m, args, expected_bsz=cases[0][0])
               for m in modes[:2]}
    clocks = {m: clipper_clock(r.model) for m, r in runners.items()}
    addrs = None
    if args.input_addresses:  # inside the clock: its time stays the clipper's alone
        addrs = clocks["dpkern"].fn = InputAddresses(clocks["dpkern"].fn)
    if args.plan_cache_ab:
        runners["dpkern-noplan"], clocks["dpkern-noplan"] = runners["dpkern"], clocks["dpkern"]
    cache_on = PlanCache.enabled  # as the environment set it (DPKERN_PLAN_CACHE)
    try:
        for prec in args.precisions.split(","):
            for bsz, seq in cases:
                ids, pos, amp = case_inputs(cfg, bsz, seq, prec, args.device)
                for m in modes:
                    for _ in range(args.warmup):
                        runners[m].step(ids, pos, amp)
                ops = {m: op_counts(runners[m], ids, pos, amp) for m in modes}
                api = ({m: cuda_api(runners[m], ids, pos, amp) for m in modes[:2]}
                       if args.cuda_api else None)
                waits = ({m: step_waits(runners[m], ids, pos, amp) for m in modes[:2]}
                         if args.step_waits else None)
                if args.gc == "freeze":
                    gc.collect()
                    gc.freeze()
                rows = {m: [] for m in modes}
                for i in range(args.rounds):
                    for m in (modes if i % 2 == 0 else modes[::-1]):
                        PlanCache.enabled = cache_on and m != "dpkern-noplan"
                        if parts is not None:
                            parts.on = m == "dpkern"
                        if addrs is not None:
                            addrs.on = m == "dpkern"
                        try:
                            rows[m].append(one_step(runners[m], clocks[m], ids, pos, amp, gclog))
                        finally:
                            PlanCache.enabled = cache_on
                        if parts is not None and m == "dpkern":
                            parts.on = False
                            rows[m][-1]["parts"] = parts.take()
                piped = {m: [] for m in modes[:2]}
                for i in range(args.rounds if args.pipelined else 0):
                    for m in (modes[:2] if i % 2 == 0 else modes[1::-1]):
                        piped[m].append(pipelined(runners[m], ids, pos, amp, args.pipelined))
                if args.gc == "freeze":
                    gc.unfreeze()
                s = {m: summary(rows[m]) for m in modes}
                paired = {m: statistics.median(d["gpu"] / n["gpu"] for n, d in
                                               zip(rows["nonprivate"], rows[m]))
                          for m in modes[1:]}
                entry = {"B": bsz, "T": seq, "precision": prec, "ops": ops, "summary": s,
                         "ratio_of_medians": s["dpkern"]["gpu"] / s["nonprivate"]["gpu"],
                         "paired_ratio_median": paired["dpkern"],
                         "rows": {m: [{k: v for k, v in r.items() if k != "gc_by_gen"}
                                      | {"gc_by_gen": dict(r["gc_by_gen"])} for r in rows[m]]
                                  for m in modes}}
                if args.plan_cache_ab:
                    entry["paired_ratio_median_noplan"] = paired["dpkern-noplan"]
                if args.pipelined:
                    entry["pipelined"] = {
                        "steps": args.pipelined, "rows": piped,
                        "ms_per_step": {m: statistics.median(r["gpu"] for r in piped[m])
                                        for m in piped},
                        "paired_ratio_median": statistics.median(
                            d["gpu"] / n["gpu"] for n, d in zip(piped["nonprivate"],
                                                                piped["dpkern"]))}
                    pl = entry["pipelined"]
                    print(f"  pipelined ({args.pipelined} steps a run): paired "
                          f"{pl['paired_ratio_median']:.3f}; ms per step " + ", ".join(
                              f"{m} {v:.1f}" for m, v in pl["ms_per_step"].items()), flush=True)
                if waits is not None:
                    entry["step_waits"] = waits
                    for m, w in waits.items():
                        print(f"  {m} step calls, host ms idle / with {w['queued_ms']:.0f} ms "
                              "queued: " + ", ".join(
                                  f"{k} {v['idle_ms']:.2f}/{v['queued_ms']:.2f}"
                                  + (" WAITS" if v["waits"] else "")
                                  for k, v in w["calls"].items()), flush=True)
                if api is not None:
                    entry["cuda_api"] = api
                    for m, phases in api.items():
                        print(f"  {m} CUDA calls (3 steps, count / host ms): " + "; ".join(
                            f"{ph}: " + ", ".join(f"{k} {n} / {ms:.1f}"
                                                  for k, (n, ms) in sorted(calls.items()))
                            for ph, calls in phases.items() if ph != "waits"), flush=True)
                        for call, chain in phases["waits"].items():
                            print(f"    {m} {call} from: " + " < ".join(chain), flush=True)
                if addrs is not None:
                    addrs.on = False
                    entry["input_addresses"] = addrs.repeats()
                    addrs.sigs = []
                    print(f"  clipper inputs at the previous backward's addresses: "
                          f"{entry['input_addresses']}", flush=True)
                if parts is not None:
                    pr = [r["parts"] for r in rows["dpkern"]]
                    entry["clipper_parts"] = {k: statistics.median(r[k] for r in pr) for k in pr[0]}
                    entry["clipper_parts"]["other"] = statistics.median(
                        r["clipper"] - sum(v for k, v in r["parts"].items()
                                           if k in ClipperParts.STAGES) for r in rows["dpkern"])
                report["cases"].append(entry)
                print(f"{prec} {bsz}x{seq}: dpkern/nonprivate {entry['ratio_of_medians']:.3f} "
                      f"(paired {entry['paired_ratio_median']:.3f}"
                      + (f"; plan cache off: paired {paired['dpkern-noplan']:.3f}"
                         if args.plan_cache_ab else "") + ")", flush=True)
                for m in modes:
                    x = s[m]
                    print(f"  {m:<13} step {x['gpu']:6.1f}  fwd {x['forward']:5.1f}  bwd "
                          f"{x['backward']:5.1f} (clipper {x['clipper']:5.1f})  opt {x['step']:4.1f}"
                          f"  tail {x['tail']:5.1f}  gc {x['gc']:4.1f} ms, {x['gc_per_step']} per "
                          f"step  ops {ops[m]}", flush=True)
                if parts is not None:
                    print("  clipper parts (median ms): " + ", ".join(
                        f"{k} {v:.2f}" if k != "launches" else f"{k} {v:.0f}"
                        for k, v in entry["clipper_parts"].items()), flush=True)
    finally:
        gclog.close()
        if parts is not None:
            parts.close()
        for r in {id(r): r for r in runners.values()}.values():
            r.close()
        free(args.device)
    with open(args.out, "w") as f:
        json.dump(report, f, indent=1)
    print(f"wrote {args.out}")
    return report


if __name__ == "__main__":
    main()
