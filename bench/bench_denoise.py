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
"""
import math

import pytest
import torch

from bench import registry
from bench.conftest import HAS_GPU, _median_ms
from dpkern.denoise import RMTDenoiser
from dpkern.denoise.rsvd import exact_svd
from dpkern.denoise.shrinkers import bulk_edge, shrink

MODELS = {name: dict(zip(("hidden", "intermediate", "layers"), registry.shapes("rmt_denoise", q)[0]))
          for name, q in (("llama-1b", False), ("tiny", True))}
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


@pytest.mark.parametrize("tf32", [False, True], ids=["fp32", "tf32"])
@pytest.mark.parametrize("orth", ["cholqr2", "qr"])
def test_denoise_all_matrices(timed, llama_grads, orth, tf32):
    if tf32 and not HAS_GPU:
        pytest.skip("TF32 is a GPU setting")
    shapes, signal0, noisy = llama_grads
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = tf32
    try:
        den = RMTDenoiser(orth=orth, seed=1)
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
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old


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
