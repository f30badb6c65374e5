"""RMT denoising: cost of denoising every weight matrix of a Llama-style ~1B model, randomized
(adaptive, batched) vs exact torch.linalg.svd, and the randomized path's accuracy.

Shapes (registry below): hidden 2048, intermediate 5504, 22 layers, MHA (q, k, v, o: 2048 x 2048;
gate, up: 5504 x 2048; down: 2048 x 5504) = 154 matrices, 1.11 B weights; embeddings and norms are
not denoised (RMTDenoiser's rule). Each gradient is a planted rank-16 signal with a decaying
spectrum (x_j = 3 / j in noise units, so ~4 components are detectable) plus Gaussian noise of the
realistic std sigma_e = sigma C / B = 1.0 * 1.0 / 1024. On the CPU the same code runs on a tiny model.

Recorded per case (extra_info): median ms of the whole denoising call (restoring the noisy gradients
first is timed separately and subtracted: denoise_ms), ranks kept, and on layer 0 the randomized
path's accuracy against the exact path: max relative difference of the denoised matrices, max
relative error of the retained singular values, and the ratio of their errors to the planted signal.
That case is one cold call (warm_start=False): each timed call sees the same gradients.

Consecutive steps (test_denoise_steps, registry op rmt_denoise_steps): STEPS releases of the same
model whose planted signal drifts by ~DRIFT radians per step (fresh noise each step), denoised in
order, cycling 0, 1, .., STEPS-1, .., 1, 0, 1, .. so that every call follows a neighbouring step.
Modes: cold (warm_start=False), warm (RMTDenoiser's default: last step's vectors, a fixed 4
GEMM passes, no host sync), warm6 (6 passes), adaptive (warm_passes=None: the former warm path,
convergence test with a small SVD and a host sync per pass). Every 16th call is a synchronous
resync (resync_every), as in training. Recorded: denoise_ms (call minus the restore of the
step's gradients), syncs (host-GPU syncs of one warm call, counted on the GPU by
set_sync_debug_mode("warn"), on the CPU by the host reads of tensor values), GEMM passes per matrix and
sweeps (bytes the GEMMs read / 4.4 GB) averaged over the timed calls, the effective GB/s of those
reads, reruns and unconverged matrices, the ops of one call (ops_per_call: aten ops that launch a
kernel, counted by tests/opcount.py on any device; on the GPU also kernels_per_call from
torch.profiler), on the GPU host_ms (the host time to issue one call: near denoise_ms when the
call is host-bound), and, checked before timing, the error to the planted signal of layer 0
against the exact SVD's at every step. The expected time from the pass counts
is in dpkern/denoise/README.md; this case is what measures it.
"""
import contextlib
import math
import os
import time
import warnings

import pytest
import torch

from bench import registry
from bench.conftest import HAS_GPU, _median_ms
from dpkern.denoise import RMTDenoiser
from dpkern.denoise.rsvd import exact_svd
from dpkern.denoise.shrinkers import bulk_edge, shrink
from dpkern._matmul import fp32_matmul
from tests import opcount

MODELS = {name: dict(zip(("hidden", "intermediate", "layers"), registry.shapes("rmt_denoise", q)[0]))
          for name, q in (("llama-1b", False), ("tiny", True))}
STEPS = registry.shapes("rmt_denoise_steps")[0][3]
DRIFT = 0.05                        # radians per step, each singular vector of the signal
SIGMA_E = 1.0 * 1.0 / 1024          # noise multiplier * C / B_expected
SIGNAL_X = [3.0 / j for j in range(1, 17)]
DEVICE = "cuda" if HAS_GPU else "cpu"
MODEL = "llama-1b" if HAS_GPU else "tiny"


def model_shapes(hidden, intermediate, layers):
    """{name: (out, in)} of every 2-D weight of the decoder layers (nn.Linear layout)."""
    per_layer = {"self_attn.q_proj": (hidden, hidden), "self_attn.k_proj": (hidden, hidden),
                 "self_attn.v_proj": (hidden, hidden), "self_attn.o_proj": (hidden, hidden),
                 "mlp.gate_proj": (intermediate, hidden), "mlp.up_proj": (intermediate, hidden),
                 "mlp.down_proj": (hidden, intermediate)}
    return {f"model.layers.{i}.{k}.weight": s for i in range(layers) for k, s in per_layer.items()}


def planted_grads(shapes, seed=0):
    """(signal, noisy) dicts of fp32 tensors on DEVICE."""
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    signal, noisy = {}, {}
    for name, (m, n) in shapes.items():
        r = len(SIGNAL_X)
        u = torch.linalg.qr(torch.randn(m, r, device=DEVICE, generator=g))[0]
        v = torch.linalg.qr(torch.randn(n, r, device=DEVICE, generator=g))[0]
        vals = torch.tensor(SIGNAL_X, device=DEVICE) * SIGMA_E * math.sqrt(max(m, n))
        signal[name] = (u * vals) @ v.T
        noisy[name] = signal[name] + SIGMA_E * torch.randn(m, n, device=DEVICE, generator=g)
    return signal, noisy


@pytest.fixture(scope="module")
def llama_grads():
    shapes = model_shapes(**MODELS[MODEL])
    signal, noisy = planted_grads(shapes)
    layer0 = [k for k in shapes if k.startswith("model.layers.0.")]
    return shapes, {k: signal[k] for k in layer0}, noisy


def _accuracy(denoiser, signal0, noisy):
    """Randomized vs exact on layer 0's matrices."""
    rnd = {k: noisy[k].clone() for k in signal0}
    ex = {k: noisy[k].clone() for k in signal0}
    denoiser(rnd, SIGMA_E)
    RMTDenoiser(method="exact")(ex, SIGMA_E)
    rel_diff, err_ratio, sv_err = 0.0, 0.0, 0.0
    for k, s in signal0.items():
        rel_diff = max(rel_diff, float((rnd[k] - ex[k]).norm() / ex[k].norm().clamp_min(1e-30)))
        err_ratio = max(err_ratio, float((rnd[k] - s).norm() / (ex[k] - s).norm()))
        keep = denoiser.last_ranks[k]
        if keep:  # retained singular values of the noisy matrix: randomized vs exact
            m, n = noisy[k].shape
            a = noisy[k] if m <= n else noisy[k].T
            se = exact_svd(a[None].double(), keep)[1][0]
            sr = torch.linalg.svdvals(rnd[k].double())[:keep]      # shrunk values of the output
            target = shrink(se, SIGMA_E, m, n, denoiser.kwargs["shrinker"], denoiser.kwargs["kappa"])
            sv_err = max(sv_err, float(((sr - target).abs() / target.clamp_min(1e-30)).max()))
    return dict(rand_vs_exact_rel_diff=rel_diff, err_to_signal_ratio=err_ratio,
                shrunk_sv_rel_err=sv_err)


@contextlib.contextmanager
def matmul_tf32(on: bool):
    """TF32 matmuls on or off inside (a GPU setting: skipped on CPU when on); restored after."""
    if on and not HAS_GPU:
        pytest.skip("TF32 is a GPU setting")
    with fp32_matmul("cuda" if HAS_GPU else "cpu", "tf32" if on else "ieee"):
        yield


@pytest.mark.parametrize("tf32", [False, True], ids=["fp32", "tf32"])
@pytest.mark.parametrize("orth", ["cholqr2", "qr"])
def test_denoise_all_matrices(timed, llama_grads, orth, tf32):
    shapes, signal0, noisy = llama_grads
    with matmul_tf32(tf32):
        den = RMTDenoiser(orth=orth, seed=1, warm_start=False, tf32=None)
        acc = _accuracy(den, signal0, noisy)                 # checked before timing
        assert acc["err_to_signal_ratio"] < 1.05, acc
        grads = {k: v.clone() for k, v in noisy.items()}

        def restore():
            for k in grads:
                grads[k].copy_(noisy[k])

        def run():
            restore()
            den(grads, SIGMA_E)
        n_weights = sum(m * n for m, n in shapes.values())
        info = timed(run)
        info.update(op="rmt_denoise", model=MODEL, matrices=len(shapes), weights=n_weights,
                    orth=orth, tf32=tf32, sigma_e=SIGMA_E, **acc,
                    ranks_kept=sorted(set(den.last_ranks.values())),
                    config={k: v for k, v in den.kwargs.items()})
        if HAS_GPU:
            info["restore_ms"] = _median_ms(restore)
            info["denoise_ms"] = info["median_ms"] - info["restore_ms"]
            info["peak_mem_bytes_extra"] = info["peak_mem_bytes"] - 2 * 4 * n_weights


def test_exact_svd_one_layer(timed, llama_grads):
    """Baseline: torch.linalg.svd of one layer's 7 matrices (batched by shape); x layers = all."""
    shapes, signal0, noisy = llama_grads
    groups = {}
    for k in signal0:
        a = noisy[k] if noisy[k].shape[0] <= noisy[k].shape[1] else noisy[k].T
        groups.setdefault(tuple(a.shape), []).append(a)
    stacks = [torch.stack(v) for v in groups.values()]

    def run():
        for s in stacks:
            torch.linalg.svd(s, full_matrices=False)
    s0 = exact_svd(stacks[0][:1])[1][0]
    m, n = stacks[0].shape[1:]
    assert float(s0[0]) > bulk_edge(m, n, SIGMA_E)          # the planted signal is there
    info = timed(run, baseline=True)
    layers = MODELS[MODEL]["layers"]
    info.update(op="exact_svd_one_layer", model=MODEL, layers=layers)
    if HAS_GPU:
        info["est_all_layers_ms"] = info["median_ms"] * layers


def drifting_grads(shapes, steps, seed=0):
    """STEPS (signal of layer 0, noisy) dict pairs: the planted signal's singular vectors drift by
    ~DRIFT radians a step, the noise is fresh each step."""
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    r = len(SIGNAL_X)
    orth = lambda x: torch.linalg.qr(x)[0]                  # noqa: E731
    uv = {k: (orth(torch.randn(m, r, device=DEVICE, generator=g)),
              orth(torch.randn(n, r, device=DEVICE, generator=g))) for k, (m, n) in shapes.items()}
    out = []
    for t in range(steps):
        signal0, noisy = {}, {}
        for k, (m, n) in shapes.items():
            u, v = uv[k]
            if t:
                u, v = (orth(x + DRIFT * torch.randn(x.shape, device=DEVICE, generator=g)
                             / math.sqrt(x.shape[0])) for x in (u, v))
                uv[k] = (u, v)
            vals = torch.tensor(SIGNAL_X, device=DEVICE) * SIGMA_E * math.sqrt(max(m, n))
            sig = (u * vals) @ v.T
            noisy[k] = sig + SIGMA_E * torch.randn(m, n, device=DEVICE, generator=g)
            if k.startswith("model.layers.0."):
                signal0[k] = sig
        out.append((signal0, noisy))
    return out


@pytest.fixture(scope="module")
def drift_steps():
    """(shapes, steps, exact denoise of layer 0 at each step)."""
    shapes = model_shapes(**MODELS[MODEL])
    steps = drifting_grads(shapes, STEPS, seed=2)
    exact = []
    for signal0, noisy in steps:
        ex = {k: noisy[k].clone() for k in signal0}
        RMTDenoiser(method="exact")(ex, SIGMA_E)
        exact.append(ex)
    return shapes, steps, exact


HOST_READS = ("item", "tolist", "__bool__", "__int__", "__float__", "nonzero", "cpu")


@contextlib.contextmanager
def count_syncs():
    """Yields a list whose length, after the block, is the host syncs inside it: on the GPU the
    warnings of set_sync_debug_mode("warn"); on the CPU the host reads of tensor values."""
    seen: list = []
    if HAS_GPU:
        torch.cuda.synchronize()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                yield seen
            finally:
                torch.cuda.set_sync_debug_mode("default")
        seen.extend(w for w in caught if "synchroniz" in str(w.message))
        return
    saved = {k: getattr(torch.Tensor, k) for k in HOST_READS}

    def counting(name):
        def f(self, *a, **kw):
            seen.append(name)
            return saved[name](self, *a, **kw)
        return f
    for k in HOST_READS:
        setattr(torch.Tensor, k, counting(k))
    try:
        yield seen
    finally:
        for k, f in saved.items():
            setattr(torch.Tensor, k, f)


def count_launches(den, grads, src):
    """Ops of one call that is not a resync, on src's gradients: aten ops that launch a kernel
    (ops_per_call; views_per_call apart) and, on the GPU, the CUDA kernels the profiler sees
    (kernels_per_call; copies_per_call: memcpy / memset). Extra calls, not timed."""
    def restore():
        for k in grads:
            grads[k].copy_(src[k])
    out = {}
    while den.calls % den.resync_every == 0:
        restore()
        den(grads, SIGMA_E)
    restore()
    with opcount.count_launches() as ops:
        den(grads, SIGMA_E)
    out.update(ops_per_call=ops.total, views_per_call=ops.views, ops_top=ops.top(12))
    if HAS_GPU:
        while den.calls % den.resync_every == 0:
            restore()
            den(grads, SIGMA_E)
        restore()
        try:
            with opcount.count_kernels() as kern:
                den(grads, SIGMA_E)
            out.update(kernels_per_call=kern["kernels"], copies_per_call=kern["copies"])
        except Exception as exc:          # a profiler problem must not lose the timing
            out["kernels_error"] = f"{type(exc).__name__}: {str(exc)[:200]}"
    return out


def host_ms(run, calls=7):
    """Median host time to issue one call (GPU idle at its start, not waited for at its end):
    close to denoise_ms when the call is host-bound (launch and Python overhead)."""
    times = []
    for _ in range(calls):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        run()
        times.append((time.perf_counter() - t0) * 1e3)
        torch.cuda.synchronize()
    return sorted(times)[len(times) // 2]


MODES = {"cold": dict(warm_start=False), "warm": {}, "warm6": dict(warm_passes=6),
         "adaptive": dict(warm_passes=None)}


@pytest.mark.parametrize("tf32", [False, True], ids=["fp32", "tf32"])
@pytest.mark.parametrize("mode", list(MODES))
def test_denoise_steps(timed, drift_steps, mode, tf32):
    shapes, steps, exact = drift_steps
    with matmul_tf32(tf32):
        den = RMTDenoiser(seed=1, tf32=None, **MODES[mode])   # the case sets TF32
        ratio = 0.0                                          # checked before timing
        for (signal0, noisy), ex in zip(steps, exact):
            grads = {k: v.clone() for k, v in noisy.items()}
            den(grads, SIGMA_E)
            for k, s in signal0.items():
                ratio = max(ratio, float((grads[k] - s).norm() / (ex[k] - s).norm()))
            del grads
        assert ratio < 1.05, ratio
        order = list(range(STEPS)) + list(range(STEPS - 2, 0, -1))     # 0 1 2 3 2 1 | 0 1 ...
        # the last step's state is the start: continue from STEPS - 2 (a neighbour)
        order = order[STEPS - 2:] + order[:STEPS - 2] if STEPS > 1 else order
        grads = {k: v.clone() for k, v in steps[0][1].items()}
        while den.calls % den.resync_every in (0, den.resync_every - 1):
            den(grads, SIGMA_E)                # syncs counted on a plain (not resync) call
        for k in grads:
            grads[k].copy_(steps[order[0]][1][k])
        with count_syncs() as syncs:
            den(grads, SIGMA_E)
        launches = count_launches(den, grads, steps[order[0]][1])
        order = order[1:] + order[:1]
        calls, stats = [0], []

        def restore():
            src = steps[order[calls[0] % len(order)]][1]
            for k in grads:
                grads[k].copy_(src[k])

        def run():
            restore()
            den(grads, SIGMA_E)
            calls[0] += 1
            stats.append(den.last_stats)
        info = timed(run)
        mean = lambda key: sum(st[key] for st in stats) / len(stats)  # noqa: E731
        n_weights = sum(m * n for m, n in shapes.values())
        info.update(op="rmt_denoise_steps", model=MODEL, mode=mode, matrices=len(shapes),
                    weights=n_weights, tf32=tf32, sigma_e=SIGMA_E, steps=STEPS, drift=DRIFT,
                    err_to_signal_ratio=ratio, timed_calls=len(stats), syncs=len(syncs),
                    syncless_calls=mean("syncless"), saturated=float(sum(
                        st.get("saturated", 0) for st in stats)) / len(stats),
                    passes_per_matrix=mean("passes_per_matrix"), sweeps=mean("sweeps"),
                    pass_gb=mean("pass_bytes") / 1e9, reruns=mean("reruns"),
                    unconverged=mean("unconverged"), warm_matrices=mean("warm"),
                    config={k: v for k, v in den.kwargs.items()}, **launches)
        if HAS_GPU:
            info["restore_ms"] = _median_ms(restore)
            info["denoise_ms"] = info["median_ms"] - info["restore_ms"]
            info["gemm_read_gbps"] = info["pass_gb"] / (info["denoise_ms"] * 1e-3)
            info["host_ms"] = host_ms(run)


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_cholqr_stack(timed, backend, monkeypatch):
    """One CholeskyQR2 of the warm path's padded y_n buffer: all 154 blocks of the 1B model at
    max n = 5504 rows, l = 24 (88 blocks of 2048 real rows), kernels/cholqr.py against the torch
    form (rsvd._cholqr twice). Tiny model on the CPU (interpreter for the kernel)."""
    from dpkern.denoise.rsvd import _cholqr_kernel, orthonormalize, shift_coef
    if backend == "triton" and not HAS_GPU and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("the Triton kernel runs on CUDA or under TRITON_INTERPRET=1")
    monkeypatch.setenv("DPKERN_BACKEND", backend)
    cfg = MODELS[MODEL]
    b, rows, l = 7 * cfg["layers"], cfg["intermediate"], 24
    short = 4 * cfg["layers"]
    real = torch.tensor([cfg["hidden"]] * short + [rows] * (b - short), dtype=torch.int32,
                        device=DEVICE)
    y = torch.randn(b, rows, l, device=DEVICE)
    y[:short, cfg["hidden"]:] = 0
    coef = torch.tensor([shift_coef(int(n), l) for n in real.tolist()], dtype=torch.float64,
                        device=DEVICE)
    assert _cholqr_kernel(y) == (backend == "triton")

    def run():
        return orthonormalize(y, "cholqr2", coef=coef, rows=real)

    def check():
        q, r = run()
        eye = torch.eye(l, device=DEVICE).expand(b, l, l)
        torch.testing.assert_close(q.mT @ q, eye, atol=1e-4, rtol=0)

    info = timed(run, bytes_moved=3 * y.numel() * 4, check=check)
    info.update(op="cholqr_stack", model=MODEL, blocks=b, rows=rows, l=l, backend=backend)
