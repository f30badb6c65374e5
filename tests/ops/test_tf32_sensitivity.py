"""The sensitivity-exact TF32 mode ("tf32r") of the per-sample norms and the book-keeping.

* The kernels' rounding (`_round_tf32`, run in the interpreter) equals the torch twin `round_tf32`
  bit for bit, and both equal an independent nearest-neighbour reference (ties to even).
* In "tf32r" every norm kernel / backend equals the float64 norm of the *rounded* operands within
  fp32 accumulation, and visibly differs from the unrounded one on inputs TF32 moves.
* Sensitivity: with the kernel's norm N̂_i, the released contribution c_i G̃_i (float64, from the
  operands exactly as book-keeping rounds them) and the book-keeping kernel's own per-sample output
  have norm ≤ C (1 + norm_rounding_margin(..., cond=κ_i)) on adversarial inputs (values TF32 moves
  most, ±2^±20 dynamic range, cancelling token pairs), and the measured errors stay inside the
  written bounds η, β. A control shows that unrounded (IEEE) norms with rounded book-keeping break it.
* Mode resolution: env knobs, refusals, defaults.
GPU tests repeat the sensitivity checks with the real kernels at full size.
"""
import math

import pytest
import torch
import triton
import triton.language as tl

from dpkern.kernels.ghost_norm import _round_tf32
from dpkern.ops._persample import fp32_mode, operand, round_tf32
from dpkern.ops.bookkeeping import bookkeeping_wgrad
from dpkern.ops.embedding_norm import embedding_norm_sq, tied_cross_term
from dpkern.ops.linear_norm import (CLIP_SAFETY_MARGIN, abs_norm_bound_sq, bookkeeping_error_bound,
                                    linear_norm_sq, linear_norm_sq_shared, norm_error_bound,
                                    norm_rounding_margin, norm_upper_bound)
from dpkern.reference.persample import (embedding_norm_sq_ref, linear_norm_sq_ref,
                                        persample_linear_grad_ref, tied_cross_term_ref)
from tests.conftest import kernel_devices
from tests.tolerance import assert_close_reduction

DEV = kernel_devices()[0]


def _seen(x):
    """x in float64 as a "tf32r" kernel multiplies it."""
    return operand(x, "tf32r", torch.float64)


# ---- the rounding function ------------------------------------------------------------------------

def _edge_values():
    one = 1.0
    vals = [0.0, -0.0, one, one + 2**-12, one + 2**-11, one + 3 * 2**-11, one - 2**-24,
            -(one + 2**-11), 2**-126, 2**-149, 3 * 2**-149, 1e-40, 3.4028235e38, -3.4028235e38,
            float("inf"), float("-inf"), float("nan"), 65504.0, 1 + 2**-10 + 2**-11]
    return torch.tensor(vals, dtype=torch.float32)


def _random_bits(n, seed):
    gen = torch.Generator().manual_seed(seed)
    bits = torch.randint(-2**31, 2**31 - 1, (n,), generator=gen, dtype=torch.int64)
    # force many exact ties and near-ties in the 13 dropped bits
    low = torch.randint(0, 4, (n,), generator=gen) * 0x1000 + torch.randint(-1, 2, (n,), generator=gen)
    mixed = torch.where(torch.arange(n) % 2 == 0, (bits & ~0x1FFF) | (low & 0x1FFF), bits)
    return mixed.to(torch.int32).view(torch.float32)


def _nearest_tf32_ref(x: torch.Tensor) -> torch.Tensor:
    """Independent reference: the nearer of the two TF32 neighbours of x (float64 arithmetic, the
    upper one lo + ulp with an unbounded exponent, so past the largest TF32 value it is ±2^128 and
    casts to ±inf), ties to the even one; non-finite x unchanged."""
    bits = x.view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    lo_bits = bits & ~0x1FFF
    lo = torch.where(lo_bits >= 2**31, lo_bits - 2**32, lo_bits).to(torch.int32).view(torch.float32)
    expo = ((bits >> 23) & 0xFF).clamp_min(1).double()
    ulp = torch.exp2(expo - 127 - 10) * torch.where(x.view(torch.int32) < 0, -1.0, 1.0).double()
    lo = lo.double()
    hi = lo + ulp
    xd = x.double()
    d_lo, d_hi = (xd - lo).abs(), (hi - xd).abs()
    even_lo = ((lo_bits >> 13) & 1) == 0
    out = torch.where((d_lo < d_hi) | ((d_lo == d_hi) & even_lo), lo, hi).float()
    return torch.where(torch.isfinite(x), out, x)


@triton.jit
def _round_kernel(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
    o = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = o < n
    tl.store(y_ptr + o, _round_tf32(tl.load(x_ptr + o, mask=m, other=0.0)), mask=m)


def _run_round_kernel(x):
    x = x.to(DEV)
    y = torch.full_like(x, float("nan"))
    _round_kernel[(triton.cdiv(x.numel(), 1024),)](x, y, x.numel(), BLOCK=1024)
    return y.cpu()


def _same_bits(u, v):
    both_nan = torch.isnan(u) & torch.isnan(v)
    return bool(((u.view(torch.int32) == v.view(torch.int32)) | both_nan).all())


def test_round_tf32_kernel_equals_torch_twin_bit_for_bit():
    x = torch.cat([_edge_values(), _random_bits(4000, 0)])
    got, twin = _run_round_kernel(x), round_tf32(x)
    assert _same_bits(got, twin)
    finite = torch.isfinite(x) & torch.isfinite(twin)
    assert (twin[finite].view(torch.int32) & 0x1FFF == 0).all()  # 10-bit mantissa
    # nearest, ties to even (independent reference); NaN stays NaN
    assert _same_bits(twin, _nearest_tf32_ref(x))
    assert torch.isnan(twin[torch.isnan(x)]).all()
    assert round_tf32(torch.tensor([1 + 2**-11, 1 + 3 * 2**-11])).tolist() == [1.0, 1 + 2**-9]


def test_round_tf32_rejects_other_dtypes():
    with pytest.raises(TypeError, match="x must be float32"):
        round_tf32(torch.ones(3, dtype=torch.float64))


# ---- the kernels compute the rounded-operand quantities ---------------------------------------------

def _tf32_hard(shape, seed, device=DEV):
    """Values TF32 moves the most: 1 + k·2^-12 (k = 1..3: rounds down, to even, up) with signs."""
    gen = torch.Generator().manual_seed(seed)
    k = torch.randint(1, 4, shape, generator=gen).float()
    sign = torch.where(torch.rand(shape, generator=gen) < 0.8, 1.0, -1.0)
    return (sign * (1 + k * 2**-12)).to(device)


@pytest.mark.parametrize("method", ["ghost", "instantiate"])
@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_tf32r_norm_is_the_norm_of_the_rounded_operands(backend, method):
    b, t, d, p = 3, 63, 60, 33
    a, g = _tf32_hard((b, t, d), 1), _tf32_hard((b, t, p), 2)
    out = linear_norm_sq(a, g, method=method, backend=backend, fp32_mode="tf32r")
    ref_rounded = linear_norm_sq_ref(_seen(a), _seen(g))
    assert_close_reduction(out, ref_rounded, n_reduce=t * (d + p) + t * t)
    ref_plain = linear_norm_sq_ref(a.double(), g.double())
    assert ((out.double().cpu() - ref_plain.cpu()).abs() / ref_plain.cpu() > 1e-4).all()
    ieee = linear_norm_sq(a, g, method=method, backend=backend, fp32_mode="ieee")
    assert_close_reduction(ieee, ref_plain, n_reduce=t * (d + p) + t * t)


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_tf32r_shared_group_and_bf16_unchanged(backend):
    a = _tf32_hard((2, 40, 24), 3)
    gs = [_tf32_hard((2, 40, 16), 4), _tf32_hard((2, 40, 8), 5).bfloat16()]
    outs = linear_norm_sq_shared(a, gs, method="ghost", backend=backend, fp32_mode="tf32r")
    for out, g in zip(outs, gs):
        assert_close_reduction(out, linear_norm_sq_ref(_seen(a), _seen(g)), n_reduce=40 * 40 + 40 * 40)
    ab, gb = a.bfloat16(), gs[0].bfloat16()  # 16-bit inputs: every mode is the same function
    for mode in ("tf32r", "ieee"):
        out = linear_norm_sq(ab, gb, backend=backend, fp32_mode=mode)
        assert_close_reduction(out, linear_norm_sq_ref(ab.double(), gb.double()), n_reduce=3200)


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_tf32r_bookkeeping_sums_the_rounded_operands(backend):
    b, t, d, p = 3, 63, 60, 33
    a, g = _tf32_hard((b, t, d), 6), _tf32_hard((b, t, p), 7)
    scale = torch.tensor([1.0, 0.5, 0.25], device=DEV)
    out = bookkeeping_wgrad(a, g, scale, backend=backend, fp32_mode="tf32r").double().cpu()
    ref = torch.einsum("b,btp,btd->pd", scale.double(), _seen(g), _seen(a)).cpu()
    ref_abs = torch.einsum("b,btp,btd->pd", scale.double(), _seen(g).abs(), _seen(a).abs()).cpu()
    beta = bookkeeping_error_bound(b * t)
    assert ((out - ref).abs() <= beta * ref_abs + 1e-30).all()
    plain = torch.einsum("b,btp,btd->pd", scale.double(), g.double(), a.double()).cpu()
    assert (out - plain).abs().max() > 10 * (beta * ref_abs).max()  # the rounding is visible


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_tf32r_embedding_and_tied_cross_term(backend):
    """The embedding's g is book-kept unrounded (index_add), so its norm is unrounded in every mode;
    the lm_head side of the tied cross term is rounded as the linear book-keeping rounds it."""
    b, t, d, vocab = 2, 40, 24, 9
    gen = torch.Generator().manual_seed(8)
    ids = torch.randint(0, vocab, (b, t), generator=gen).to(DEV)
    g_emb, a_head = _tf32_hard((b, t, d), 9), _tf32_hard((b, t, d), 10)
    g_head = _tf32_hard((b, t, vocab), 11)
    emb = embedding_norm_sq(ids, g_emb, padding_idx=3, backend=backend)
    assert_close_reduction(emb, embedding_norm_sq_ref(ids, g_emb.double(), 3), n_reduce=t * d + t * t)
    cross = tied_cross_term(ids, g_emb, a_head, g_head, padding_idx=3, backend=backend,
                            fp32_mode="tf32r").double().cpu()
    ref = tied_cross_term_ref(ids, g_emb.double(), _seen(a_head), _seen(g_head), 3).cpu()
    ref_abs = tied_cross_term_ref(ids, g_emb.double().abs(), _seen(a_head).abs(),
                                  _seen(g_head).abs(), 3).cpu()
    assert ((cross - ref).abs() <= norm_error_bound(t, d, d, "ghost") * ref_abs).all()
    plain = tied_cross_term_ref(ids, g_emb.double(), a_head.double(), g_head.double(), 3).cpu()
    assert ((cross - plain).abs() > 1e-5 * ref_abs).all()


# ---- sensitivity ------------------------------------------------------------------------------------

def adversarial(kind, b, t, d, p, seed, device=DEV):
    """(a, g) of one adversarial kind; "cancellation" aims at κ ≈ 0.3 / sqrt(η), as ill-conditioned
    as the worst-case margin can still cover (κ ≈ sqrt(T) / δ for a pair mismatch δ)."""
    gen = torch.Generator().manual_seed(seed)
    if kind == "tf32_hard":
        return _tf32_hard((b, t, d), seed, device), _tf32_hard((b, t, p), seed + 1, device)
    if kind == "dynamic_range":
        def wide(*shape):
            e = torch.randint(-12, 13, shape, generator=gen).float()  # ±2^12: no fp32 overflow
            return torch.randn(*shape, generator=gen) * torch.exp2(e)
        return wide(b, t, d).to(device), wide(b, t, p).to(device)
    if kind == "cancellation":  # token pairs (a, g), (a', -g') with a' ≈ a, g' ≈ g: Σ_t nearly 0
        delta = min(4.0, math.sqrt(t * norm_error_bound(t, d, p)) / 0.3)
        a = 1 + torch.rand(b, (t + 1) // 2, d, generator=gen) * 2**-10
        g = 1 + torch.rand(b, (t + 1) // 2, p, generator=gen) * 2**-10
        a2 = a * (1 + torch.randn(a.shape, generator=gen) * delta)
        g2 = -g * (1 + torch.randn(g.shape, generator=gen) * delta)
        a = torch.stack([a, a2], dim=2).reshape(b, -1, d)[:, :t]
        g = torch.stack([g, g2], dim=2).reshape(b, -1, p)[:, :t]
        return a.contiguous().to(device), g.contiguous().to(device)
    raise ValueError(kind)


def check_sensitivity(a, g, norm_sq, method, mode="tf32r", check_bounds=True):
    """Clip with the kernel's norm N̂ and measure every released contribution: the float64 one from
    the rounded operands and the "tf32r" book-keeping kernel's own (one-hot scale). Returns the worst
    ratio ‖contribution‖ / (C (1 + m_i)) over samples (≤ 1 passes); with check_bounds also asserts
    the measured errors against η (norm) and β (book-keeping)."""
    b, t, d = a.shape
    p = g.shape[2]
    a64, g64 = _seen(a), _seen(g)
    exact = persample_linear_grad_ref(a64, g64)  # (B, p, d) G̃_i, float64 from the rounded operands
    g_abs = persample_linear_grad_ref(a64.abs(), g64.abs())
    n_exact = exact.flatten(1).norm(dim=1)
    kappa = (g_abs.flatten(1).norm(dim=1) / n_exact).clamp_min(1.0)
    n_hat = norm_sq.double().clamp_min(0).sqrt()
    clip = float(n_hat.median()) / 2  # about half the samples are clipped
    worst = 0.0
    for i in range(b):
        m = norm_rounding_margin(t, d, p, method=method, mode=mode, cond=float(kappa[i]))
        c = min(1.0, clip / float(n_hat[i]))
        bound = clip * (1 + m)
        worst = max(worst, float(c * n_exact[i]) / bound)  # float64 contribution of the rounded ops
        scale = torch.zeros(b, device=a.device)
        scale[i] = c
        released = bookkeeping_wgrad(a, g, scale, fp32_mode="tf32r", backend="triton")
        worst = max(worst, float(released.double().norm()) / bound)
        if check_bounds:  # the measured errors stay inside the written bounds η and β
            eta = norm_error_bound(t, d, p, method, mode)
            assert (abs(float(norm_sq[i]) - float(n_exact[i]) ** 2)
                    <= eta * float(g_abs[i].square().sum())), i
            err = float((released.double() - c * exact[i]).norm())
            assert err <= bookkeeping_error_bound(t) * c * float(g_abs[i].norm()), i
    return worst


KINDS = ["tf32_hard", "dynamic_range", "cancellation"]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("method", ["ghost", "instantiate"])
def test_released_contribution_within_margin(kind, method):
    a, g = adversarial(kind, 4, 63, 60, 33, seed=KINDS.index(kind))
    norm_sq = linear_norm_sq(a, g, method=method, backend="triton", fp32_mode="tf32r")
    assert check_sensitivity(a, g, norm_sq, method) <= 1.0


def test_cancellation_inputs_are_ill_conditioned():
    """The cancellation case really cancels (κ ≫ 1), so the cond argument is exercised."""
    a, g = adversarial("cancellation", 2, 63, 60, 33, seed=2)
    a64, g64 = _seen(a), _seen(g)
    kappa = (persample_linear_grad_ref(a64.abs(), g64.abs()).flatten(1).norm(dim=1)
             / persample_linear_grad_ref(a64, g64).flatten(1).norm(dim=1))
    assert (kappa > 10).all() and (kappa < 100).all(), kappa


def test_unrounded_norms_with_rounded_bookkeeping_break_the_bound():
    """Control: norms of the unrounded operands (ieee) against TF32-rounded book-keeping under-clip
    on inputs that TF32 rounds up (1 + 3·2^-12 -> 1 + 2^-10), beyond the margin."""
    a = torch.full((2, 63, 60), 1 + 3 * 2**-12, device=DEV)
    g = torch.full((2, 63, 33), 1 + 3 * 2**-12, device=DEV)
    norm_sq = linear_norm_sq(a, g, method="ghost", backend="triton", fp32_mode="ieee")
    assert check_sensitivity(a, g, norm_sq, "ghost", mode="ieee", check_bounds=False) > 1.0 + 1e-4


def test_norm_upper_bound_covers_cancellation_without_cond():
    """The worst-case form: U_i from the norm and a cheap bound on ‖|g̃|ᵀ|ã|‖, no κ needed."""
    b, t, d, p = 3, 63, 60, 33
    a, g = adversarial("cancellation", b, t, d, p, seed=5)
    norm_sq = linear_norm_sq(a, g, method="ghost", backend="triton", fp32_mode="tf32r")
    q = abs_norm_bound_sq(a, g, mode="tf32r")
    g_abs = persample_linear_grad_ref(_seen(a).abs(), _seen(g).abs())
    assert (q.cpu() >= g_abs.flatten(1).norm(dim=1).square().cpu()).all()
    upper = norm_upper_bound(norm_sq, q, t, d, p)
    clip = float(upper.median()) / 2
    for i in range(b):
        c = min(1.0, clip / float(upper[i]))
        scale = torch.zeros(b, device=DEV)
        scale[i] = c
        released = bookkeeping_wgrad(a, g, scale, backend="triton", fp32_mode="tf32r")
        assert float(released.double().norm()) <= clip


def test_margin_function():
    m = norm_rounding_margin(512, 2048, 2048)
    assert 0 < m < 1e-3
    assert norm_rounding_margin(4096, 2048, 5632) > m  # grows with T and widths
    assert norm_rounding_margin(512, 2048, 2048, cond=10.0) > 50 * m  # ~ κ² for the norm part
    assert norm_rounding_margin(512, 2048, 2048, cond=1e4) == math.inf
    assert norm_rounding_margin(512, 2048, 2048, n_norms=200) > m
    for shape in [(512, 2048, 5632), (4096, 2048, 5632), (16384, 16384, 16384)]:
        assert norm_rounding_margin(*shape, n_norms=1000, mode="ieee") <= CLIP_SAFETY_MARGIN
    assert CLIP_SAFETY_MARGIN < 5e-3
    with pytest.raises(ValueError, match="cond must be"):
        norm_rounding_margin(8, 8, 8, cond=0.5)


# ---- mode resolution --------------------------------------------------------------------------------

def test_fp32_mode_resolution(monkeypatch):
    monkeypatch.delenv("DPKERN_NORM_FP32_DOT", raising=False)
    monkeypatch.delenv("DPKERN_FP32_DOT", raising=False)
    assert fp32_mode("cuda") == "tf32r" and fp32_mode("cpu") == "ieee"
    assert fp32_mode("cpu", "tf32r") == "tf32r"
    monkeypatch.setenv("DPKERN_NORM_FP32_DOT", "tf32x3")
    assert fp32_mode("cuda") == "tf32x3"  # one knob sets both norms and book-keeping
    monkeypatch.setenv("DPKERN_FP32_DOT", "ieee")
    assert fp32_mode("cuda") == "tf32x3"
    monkeypatch.setenv("DPKERN_FP32_DOT", "tf32r")
    with pytest.raises(ValueError, match="both must be 'tf32r' or neither"):
        fp32_mode("cuda")
    monkeypatch.setenv("DPKERN_FP32_DOT", "tf32")
    with pytest.raises(ValueError, match="plain 'tf32' is refused"):
        fp32_mode("cuda")
    with pytest.raises(ValueError, match="fp32_mode must be one of"):
        linear_norm_sq(torch.ones(1, 2, 3), torch.ones(1, 2, 3), fp32_mode="tf32")
    with pytest.raises(ValueError, match="fp32_mode must be one of"):
        bookkeeping_wgrad(torch.ones(1, 2, 3), torch.ones(1, 2, 3), torch.ones(1), fp32_mode="x")


# ---- GPU: the real kernels at full size -------------------------------------------------------------

GPU_CASES = [(4, 512, 2048, 2048), (2, 2048, 2048, 5632), (1, 4096, 2048, 256), (3, 63, 60, 33)]


@pytest.mark.gpu
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("method", ["ghost", "instantiate"])
@pytest.mark.parametrize("shape", GPU_CASES, ids=lambda s: "B{}xT{}xd{}xp{}".format(*s))
def test_released_contribution_within_margin_gpu(shape, method, kind):
    b, t, d, p = shape
    a, g = adversarial(kind, b, t, d, p, seed=t + d, device="cuda")
    norm_sq = linear_norm_sq(a, g, method=method, backend="triton")  # GPU default: tf32r
    assert fp32_mode("cuda") == "tf32r"
    assert check_sensitivity(a, g, norm_sq, method) <= 1.0


@pytest.mark.gpu
def test_unrounded_norms_break_the_bound_gpu():
    # rounding moves the norm by ≈ 4.9e-4 relative; the margin at this shape is ≈ 1.4e-4
    a = torch.full((2, 512, 512), 1 + 3 * 2**-12, device="cuda")
    g = torch.full((2, 512, 512), 1 + 3 * 2**-12, device="cuda")
    norm_sq = linear_norm_sq(a, g, method="ghost", backend="triton", fp32_mode="ieee")
    assert check_sensitivity(a, g, norm_sq, "ghost", mode="ieee", check_bounds=False) > 1.0 + 1e-4
