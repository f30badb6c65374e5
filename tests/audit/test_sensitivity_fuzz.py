"""Sensitivity fuzzing through the engine: >= 10^4 add/remove-one pairs per clipping mode and dtype.

For every pair: ||S(D + x*) - S(D)||_2 <= C (1 + 1e-6) in fp64, where S is the engine's pre-noise
summed gradient (the accumulator the noise is added to). A non-finite x* contributes nothing, and
both neighbours take the same path (one backward, no error, finite sums). See
dpkern/audit/sensitivity.py for how K pairs share one batched pass.
"""
import zlib

import pytest
import torch

from dpkern.audit.sensitivity import block_sums, make_round, per_sample_loss
from dpkern.engine import PrivacyEngine
from tests.conftest import HAS_GPU

C = 0.75
RTOL = 1e-6
# The two sums are fp32 accumulations that may add the base examples in a different order; their
# rounding (<= n * 2^-24 relative to the base mass, base mass <= n C) is allowed on top of C(1+1e-6).
ROUND = 2.0 ** -22



def _released(model, dp, x, w, pair, dtype, loss_reduction, K, d, device="cpu"):
    dp.zero_grad()
    before = dp.nonfinite_samples
    if x.shape[0] == 0:
        return torch.zeros(K, d + 1, dtype=torch.float64), 0
    out = model(x.to(device=device, dtype=dtype))
    losses = per_sample_loss(out, pair.to(device), w.to(device))
    (losses.mean() if loss_reduction == "mean" else losses.sum()).backward()
    assert dp.backwards == 1
    s = block_sums(dp.summed[model.weight], dp.summed.get(model.bias))
    return s.cpu(), dp.nonfinite_samples - before


def fuzz(clipping, loss_reduction, dtype, backend, n_pairs, seed, K=500, d=8, T=3, max_base=3,
         device="cpu"):
    """Fuzz n_pairs pairs (rounded up to whole rounds of K); returns (pairs, worst dist / C, stats)."""
    gen = torch.Generator().manual_seed(seed)
    K = min(K, n_pairs)
    model = torch.nn.Linear(d, K).to(device=device, dtype=dtype)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    model, dp, _ = PrivacyEngine(backend=backend).make_private(
        module=model, optimizer=opt, data_loader=None, noise_multiplier=0.0, max_grad_norm=C,
        clipping=clipping, loss_reduction=loss_reduction, expected_batch_size=64, sample_rate=0.01)
    worst, done, stats = 0.0, 0, {"bad_extra": 0, "large": 0}
    while done < n_pairs:
        k = K
        rd = make_round(k, d, T, max_base, gen)
        s0, bad0 = _released(model, dp, rd.x, rd.w, rd.pair, dtype, loss_reduction, k, d, device)
        n0 = rd.x.shape[0]
        x1 = torch.cat([rd.x, rd.x_extra])
        w1 = torch.cat([rd.w, rd.w_extra])
        p1 = torch.cat([rd.pair, torch.arange(k)])
        perm = torch.randperm(n0 + k, generator=gen)  # the extra examples sit anywhere in the batch
        s1, bad1 = _released(model, dp, x1[perm], w1[perm], p1[perm], dtype, loss_reduction, k, d,
                             device)
        assert torch.isfinite(s0).all() and torch.isfinite(s1).all(), "non-finite released sum"
        assert bad1 - bad0 >= int(rd.bad_extra.sum()), "a non-finite extra example was not zeroed"
        dist = (s1 - s0).norm(dim=1)
        n_base = torch.bincount(rd.pair, minlength=k).double()
        tol = C * (1 + RTOL) + ROUND * (n_base + 1) * C
        over = dist > tol
        assert not over.any(), [(rd.kinds[i], float(dist[i]), float(tol[i]))
                                for i in over.nonzero().flatten()[:5].tolist()]
        # a non-finite extra adds nothing beyond rounding of the base sums
        zero_tol = ROUND * (n_base + 1) * C
        leak = rd.bad_extra & (dist > zero_tol)
        assert not leak.any(), [(rd.kinds[i], float(dist[i]), float(zero_tol[i]))
                                for i in leak.nonzero().flatten()[:5].tolist()]
        worst = max(worst, float((dist / C).max()))
        stats["bad_extra"] += int(rd.bad_extra.sum())
        stats["large"] += int((dist > 0.5 * C).sum())
        done += k
    return done, worst, stats


# bf16 + loss_reduction='mean' is refused by the engine (test_bf16_mean_refused): the 1/B_realized
# rounded into every output gradient differs between neighbours, so other samples' directions move.
CONFIGS = [pytest.param(c, r, dt, id=f"{c}-{r}-{str(dt)[6:]}")
           for c in ("flat", "per_layer", "automatic")
           for r, dt in (("mean", torch.float32), ("sum", torch.float32), ("sum", torch.bfloat16))]


def _check(clipping, loss_reduction, dtype, backend, n, device="cpu", K=500):
    seed = zlib.crc32(f"{clipping}-{loss_reduction}-{dtype}-{backend}".encode())
    done, worst, stats = fuzz(clipping, loss_reduction, dtype, backend, n, seed=seed, K=K,
                              device=device)
    assert done >= n
    assert worst <= 1 + RTOL + ROUND * 4
    # the fuzzing is not vacuous: many extras move the sum by > C/2 and many are non-finite
    assert stats["large"] > n // 20 and stats["bad_extra"] > n // 20, stats
    print(f"fuzzed {done} pairs, worst distance {worst:.9f} C")


@pytest.mark.parametrize("clipping, loss_reduction, dtype", CONFIGS)
def test_sensitivity_fuzz(clipping, loss_reduction, dtype):
    """torch backend on CPU: 10^4 pairs for (flat, mean, fp32), 2500 for each other combination."""
    n = 10_000 if (clipping, loss_reduction, dtype) == ("flat", "mean", torch.float32) else 2_500
    _check(clipping, loss_reduction, dtype, "torch", n)


@pytest.mark.skipif(HAS_GPU, reason="interpreter run (CPU tensors); the GPU runs the kernels")
def test_sensitivity_fuzz_triton_interpreter():
    """The Triton kernels under the CPU interpreter are slow: 50 pairs here, 10^4 on the GPU."""
    _check("flat", "mean", torch.float32, "triton", 50, K=50)


@pytest.mark.gpu
@pytest.mark.parametrize("clipping, loss_reduction, dtype", CONFIGS)
@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_sensitivity_fuzz_gpu(clipping, loss_reduction, dtype, backend, monkeypatch):
    """fp32 + 'mean' on the GPU is fuzzed with IEEE fp32 dots: under the default "tf32r" mode the
    engine refuses it (test_tf32r_mean_refused_on_gpu)."""
    if (loss_reduction, dtype) == ("mean", torch.float32):
        monkeypatch.setenv("DPKERN_NORM_FP32_DOT", "ieee")
        monkeypatch.delenv("DPKERN_FP32_DOT", raising=False)
    _check(clipping, loss_reduction, dtype, backend, 10_000, device="cuda", K=1000)


@pytest.mark.gpu
def test_tf32r_mean_refused_on_gpu(monkeypatch):
    """Measured before the refusal: a zeroed non-finite extra moved the sum by 1.1e-4 C (fp32 mean,
    tf32r): the TF32 rounding of g_i / B_realized differs between neighbours."""
    monkeypatch.delenv("DPKERN_NORM_FP32_DOT", raising=False)
    monkeypatch.delenv("DPKERN_FP32_DOT", raising=False)
    with pytest.raises(RuntimeError, match=r"tf32r.*") as e:
        fuzz("flat", "mean", torch.float32, "triton", 10, seed=0, device="cuda")
    assert "loss_reduction='sum'" in str(e.value)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_mean_refused(dtype):
    """bf16/fp16 output gradients with loss_reduction='mean': a clear error naming the layer and
    the fix, before anything is book-kept (the sensitivity would grow with the batch)."""
    with pytest.raises(RuntimeError, match=r"loss_reduction='sum'.*") as e:
        fuzz("flat", "mean", dtype, "torch", 10, seed=0)
    assert "sensitivity" in str(e.value)


def test_fuzz_catches_clipping_disabled(monkeypatch):
    """Mutation: clip factors forced to 1 (clipping disabled). The fuzzer must see distances > C."""
    import dpkern.engine as engine_mod

    def no_clip(bounds, clipping, max_grad_norm, per_param=None, gamma=0.01):
        # bounds: the engine's (P, B) matrix (clip_factors also takes a list of (B,) rows)
        total = (bounds if isinstance(bounds, torch.Tensor) else torch.stack(bounds)).sum(0)
        finite = torch.isfinite(total)
        return [finite.to(total.dtype)] * len(bounds), finite

    monkeypatch.setattr(engine_mod, "clip_factors", no_clip)
    with pytest.raises(AssertionError):
        fuzz("flat", "mean", torch.float32, "torch", 200, seed=0)


def test_fuzz_catches_missing_nonfinite_zeroing(monkeypatch):
    """Mutation: non-finite samples kept (the finite mask says all true). NaN reaches the sum."""
    import dpkern.engine as engine_mod
    real = engine_mod.clip_factors

    def keep_all(bounds, clipping, max_grad_norm, per_param=None, gamma=0.01):
        factors, finite = real(bounds, clipping, max_grad_norm, per_param, gamma)
        return [torch.where(finite, f, torch.ones_like(f)) for f in factors], torch.ones_like(finite)

    monkeypatch.setattr(engine_mod, "clip_factors", keep_all)
    with pytest.raises(AssertionError):
        fuzz("flat", "mean", torch.float32, "torch", 200, seed=1)


def test_round_layout():
    """The packing itself: pair ids, non-finite flags and kinds agree with the drawn examples."""
    gen = torch.Generator().manual_seed(0)
    rd = make_round(50, 4, 2, 3, gen)
    assert rd.x.shape == (rd.pair.numel(), 2, 4) and rd.x_extra.shape == (50, 2, 4)
    assert torch.equal(rd.pair, rd.pair.sort().values) and int(rd.pair.max()) < 50
    flagged = [i for i, k in enumerate(rd.kinds) if "nan" in k or "inf" in k]
    assert rd.bad_extra.nonzero().flatten().tolist() == flagged
    s = block_sums(torch.arange(8.0).view(2, 4), torch.tensor([1.0, 2.0]))
    assert s.dtype == torch.float64 and s[1].tolist() == [4.0, 5.0, 6.0, 7.0, 2.0]
