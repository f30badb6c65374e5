"""SubspacePrivacyEngine: full rank = plain DP-SGD, sensitivity ≤ C on the released coordinates,
fp64 reference of the projected clipped sum, noise on r×r coordinates only, stages charged."""
import contextlib
import copy

import pytest
import torch

from dpkern.engine import PrivacyEngine
from dpkern.noise.reference import normals
from dpkern.subspace import SubspacePrivacyEngine, orthonormalize
from dpkern.subspace.reference import dpsft_clipped_sum_ref
from tests.conftest import sync_is_an_error

T, D_IN, HID, D_OUT = 7, 6, 5, 3


def make_model(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(D_IN, HID), torch.nn.Tanh(),
                               torch.nn.Linear(HID, D_OUT))


def loss_one(out):
    return out.square().mean()


def batch_loss(model, x):
    return model(x).square().mean(dim=(1, 2))


def orth(n, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))[0].float()


def private(engine_cls, model, opt_fn, sigma, clip, subspace=None, seed=11, bsz=4, fused=True,
            backproj=True):
    opt = opt_fn(model.parameters())
    kw = dict(module=model, optimizer=opt, data_loader=None, noise_multiplier=sigma,
              max_grad_norm=clip, expected_batch_size=bsz, sample_rate=0.01, seed=seed)
    eng = engine_cls(accountant="rdp")
    if subspace is not None:
        kw["subspace"] = subspace
    model, dp, _ = eng.make_private(**kw)
    dp.fused = fused
    if hasattr(dp, "fused_backprojection"):
        dp.fused_backprojection = backproj
    return eng, model, dp


def train(model, dp, xs):
    for x in xs:
        if x.shape[0] == 0:
            dp.signal_empty_batch()
        else:
            batch_loss(model, x).mean().backward()
        dp.step()
        dp.zero_grad()


OPTS = {
    "sgd-backproj": (lambda ps: torch.optim.SGD(ps, lr=0.3, weight_decay=0.01), True, True),
    "sgd-momentum-fused": (lambda ps: torch.optim.SGD(ps, lr=0.3, momentum=0.9), True, True),
    "adam-materialised": (lambda ps: torch.optim.Adam(ps, lr=0.05), False, False),
    "adam-backproj": (lambda ps: torch.optim.Adam(ps, lr=0.05), False, True),
    "adam-l2-backproj": (lambda ps: torch.optim.Adam(ps, lr=0.05, weight_decay=0.1), True, True),
    "adamw-fused": (lambda ps: torch.optim.AdamW(ps, lr=0.05), True, True),
    "adamw-materialised": (lambda ps: torch.optim.AdamW(ps, lr=0.05), True, False),
    "sgd-materialised": (lambda ps: torch.optim.SGD(ps, lr=0.3), False, False),
}


def _xs(seed=1, sizes=(4, 3, 0, 5)):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, T, D_IN, generator=g) * 2 for b in sizes]


@pytest.mark.parametrize("opt_name", list(OPTS))
@pytest.mark.parametrize("sigma,identity,clip,tol", [
    (0.0, False, 100.0, 1e-6), (0.0, False, 0.3, 1e-3), (0.8, True, 0.3, 1e-3)],
    ids=["noise-off-unclipped", "noise-off-clipped", "same-noise-identity-clipped"])
def test_full_rank_equals_plain(opt_name, sigma, identity, clip, tol):
    """r = full rank: with any orthogonal U, V and noise off, or U = V = I and the same noise
    key (z at the weight's global offset), the subspace engine trains like the plain one. Exact
    (fp32) when nothing is clipped; when clipping, the plain engine's bound on the projected
    layer is looser by its proven fp32 kernel-error term (~1e-4 here), so the factors differ by
    that much (tol 1e-3 of the update)."""
    opt_fn, fused, backproj = OPTS[opt_name]
    xs = _xs()
    m_plain, m_sub = make_model(), make_model()
    init = [p.detach().clone() for p in m_plain.parameters()]
    _, m_plain, dp_plain = private(PrivacyEngine, m_plain, opt_fn, sigma, clip, fused=fused)
    u = torch.eye(HID) if identity else orth(HID, 1)
    v = torch.eye(D_IN) if identity else orth(D_IN, 2)
    _, m_sub, dp_sub = private(SubspacePrivacyEngine, m_sub, opt_fn, sigma, clip,
                               subspace={"0": (u, v)}, fused=fused, backproj=backproj)
    train(m_plain, dp_plain, xs)
    train(m_sub, dp_sub, xs)
    for (n, a), b, a0 in zip(m_plain.named_parameters(), m_sub.parameters(), init):
        d_plain, d_sub = (a - a0).detach(), (b - a0).detach()
        assert float(d_plain.abs().max()) > 1e-3, n  # the layer moved
        torch.testing.assert_close(d_sub, d_plain, rtol=0, atol=tol * float(d_plain.abs().max())
                                   + 1e-6, msg=n)
    assert dp_sub.noise_steps == dp_plain.noise_steps == len(xs)
    assert dp_sub.noise_generator.step == dp_plain.noise_generator.step


def _released(model, dp, x, bsz):
    """Released noiseless sum ×B_expected: {name: projected coords (r, r) or full grad}, and the
    engine's (flat) clip bound per sample and the factor it applied."""
    batch_loss(model, x).mean().backward()
    bound = sum(u.square() for _, u in dp.last_clip.values()).sqrt()
    factor = next(iter(dp.last_scales.values())).double() / x.shape[0]
    dp.step()
    out = {n: s.double() * bsz for n, s in dp.last_released.items()}
    for p, n in dp.params.items():
        out[n] = p.grad.double() * bsz
    dp.zero_grad()
    return out, bound, factor


@pytest.mark.parametrize("trial", range(4))
def test_sensitivity_and_fp64_reference(trial):
    """Neighbouring batches D, D ∪ {x*} (x* large or cancelling): the released coordinates
    (projected r×r of layer 0, full layer 2 and biases) move by ≤ C jointly; the released sum
    matches the fp64 reference that forms every G_i."""
    g = torch.Generator().manual_seed(100 + trial)
    r = 2 + trial % 3
    u = orthonormalize(torch.randn(HID, r, generator=g))
    v = orthonormalize(torch.randn(D_IN, r + 1, generator=g))
    clip, bsz = 0.7, 4
    x = torch.randn(4, T, D_IN, generator=g)
    star = torch.randn(1, T, D_IN, generator=g) * 10.0 ** (trial + 1)
    if trial % 2:
        star[:, 1::2] = -star[:, 0:-1:2]  # tokens that cancel in part
    x2 = torch.cat([x, star])
    outs = []
    for xx in (x, x2):
        model = make_model(3)
        plain = copy.deepcopy(model)
        _, model, dp = private(SubspacePrivacyEngine, model, lambda ps: torch.optim.SGD(ps, lr=0.0),
                               0.0, clip, subspace={"0.weight": (u, v)}, bsz=bsz, fused=False,
                               backproj=False)
        rel, bound, factor = _released(model, dp, xx, bsz)
        _, norms = dpsft_clipped_sum_ref(plain, xx, loss_one, {"0.weight": (u, v)}, clip)
        # the engine clips with a proven upper bound: ≥ the fp64 norm, and tight here
        assert (bound >= norms).all() and (bound <= norms * (1 + 1e-3)).all()
        assert (factor * bound <= clip).all()
        ref, _ = dpsft_clipped_sum_ref(plain, xx, loss_one, {"0.weight": (u, v)}, clip, factor)
        for n, t in ref.items():
            assert rel[n].shape == t.shape, n
            torch.testing.assert_close(rel[n], t, rtol=1e-5, atol=1e-6 * clip, msg=n)
        outs.append(rel)
    diff = sum((outs[0][n] - outs[1][n]).square().sum() for n in outs[0]).sqrt()
    assert float(diff) <= clip * (1 + 1e-6)
    assert float(diff) > 0.5 * clip  # x* is clipped to ≈ C: the check has teeth


def test_noise_on_subspace_coordinates_only():
    """Empty batch: the projected weight's release is σC z / B on ru×rv coordinates, z the
    counter-based normals at its global offset; its gradient is U S̃ Vᵀ (rank ≤ r)."""
    u = orthonormalize(torch.randn(HID, 2))
    v = orthonormalize(torch.randn(D_IN, 3))
    sigma, clip, bsz = 1.3, 0.5, 4
    _, model, dp = private(SubspacePrivacyEngine, make_model(), lambda ps: torch.optim.SGD(ps, lr=0.1),
                           sigma, clip, subspace={"0": (u, v)}, bsz=bsz, fused=False, backproj=False)
    w = model[0].weight
    dp.signal_empty_batch()
    step = dp.noise_generator.step
    dp.step()
    s_t = dp.last_released["0.weight"]
    assert s_t.shape == (2, 3)
    off = dp.global_offsets[w]
    z = normals(torch.arange(off, off + 6), dp.noise_generator.kernel_words(step)).view(2, 3)
    torch.testing.assert_close(s_t, (sigma * clip * z / bsz).float(), rtol=1e-6, atol=1e-7)
    assert torch.linalg.matrix_rank(w.grad.double(), atol=1e-5) <= 2
    torch.testing.assert_close(w.grad, u @ s_t @ v.T)


def test_nonfinite_sample_dropped():
    u, v = orthonormalize(torch.randn(HID, 2)), orthonormalize(torch.randn(D_IN, 2))
    x = torch.randn(3, T, D_IN)
    bad = torch.cat([x, torch.full((1, T, D_IN), float("nan"))])
    rel = []
    for xx in (x, bad):
        _, model, dp = private(SubspacePrivacyEngine, make_model(), lambda ps: torch.optim.SGD(ps, lr=0.0),
                               0.0, 0.5, subspace={"0": (u, v)}, fused=False, backproj=False)
        rel.append(_released(model, dp, xx, 4)[0])
    assert dp.nonfinite_samples == 1
    for n in rel[0]:
        assert torch.isfinite(rel[1][n]).all()
        torch.testing.assert_close(rel[1][n], rel[0][n], rtol=1e-5, atol=1e-7)


def test_accountant_charges_both_stages():
    """Stage 1 (plain DP-SGD on the private data) and stage 2 (projected) on one engine: ε(total)
    > ε(stage 2 alone), and equals a fresh accountant holding both stages' steps."""
    from dpkern.accounting import create_accountant
    from dpkern.subspace import TrajectoryTracker
    eng = SubspacePrivacyEngine(accountant="rdp")
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.2)
    model, dp, _ = eng.make_private(module=model, optimizer=opt, data_loader=None,
                                    noise_multiplier=1.0, max_grad_norm=1.0, expected_batch_size=4,
                                    sample_rate=0.05, seed=1)
    tracker = TrajectoryTracker(model, ["0"], rank=2)
    for x in _xs(sizes=(4, 4, 4)):
        batch_loss(model, x).mean().backward()
        dp.step()
        dp.zero_grad()
        tracker.update()
    eng.finish_stage(model)
    bases = tracker.bases()
    opt2 = torch.optim.SGD(model.parameters(), lr=0.2)
    model, dp2, _ = eng.make_private(module=model, optimizer=opt2, data_loader=None,
                                     noise_multiplier=0.9, max_grad_norm=1.0, expected_batch_size=4,
                                     sample_rate=0.04, seed=2, subspace=bases)
    for x in _xs(sizes=(4, 5)):
        batch_loss(model, x).mean().backward()
        dp2.step()
        dp2.zero_grad()
    total = eng.get_epsilon(1e-5)
    alone, both = create_accountant("rdp"), create_accountant("rdp")
    alone.step(noise_multiplier=0.9, sample_rate=0.04, num_steps=2)
    both.step(noise_multiplier=1.0, sample_rate=0.05, num_steps=3)
    both.step(noise_multiplier=0.9, sample_rate=0.04, num_steps=2)
    assert total > alone.get_epsilon(1e-5) * 1.05
    assert total == pytest.approx(both.get_epsilon(1e-5), rel=1e-9)


def test_refresher_rebases_between_steps():
    from dpkern.subspace import SubspaceRefresher
    u, v = orthonormalize(torch.randn(HID, 3)), orthonormalize(torch.randn(D_IN, 3))
    eng, model, dp = private(SubspacePrivacyEngine, make_model(), lambda ps: torch.optim.SGD(ps, lr=0.3),
                             0.5, 1.0, subspace={"0": (u, v)})
    ref = SubspaceRefresher(eng, model, ["0"], rank=2, every=2)
    train(model, dp, _xs(sizes=(4, 4, 4, 4)))
    assert ref.refreshes == 2
    u2, v2 = dp.bases[model[0].weight]
    assert u2.shape == (HID, 2) and v2.shape == (D_IN, 2)
    # the new bases lie in the old subspace (released updates cannot leave it)
    torch.testing.assert_close(u @ (u.T @ u2), u2, rtol=0, atol=1e-4)


@pytest.mark.parametrize("kw,match", [
    (dict(subspace={"0": (torch.randn(HID, 2), orthonormalize(torch.randn(D_IN, 2)))}),
     "orthonormal"),
    (dict(subspace={"0": (orthonormalize(torch.randn(HID + 1, 2)), torch.eye(D_IN))}), r"U must be"),
    (dict(subspace={"nope": (torch.eye(HID), torch.eye(D_IN))}), "not a layer"),
    (dict(subspace={"0.bias": (torch.eye(HID), torch.eye(D_IN))}), "2-D weights"),
    (dict(subspace={"0": torch.eye(HID)}), "pair"),
    (dict(subspace=[1]), "must be a dict"),
    (dict(subspace={"0": (torch.eye(HID) * float("nan"), torch.eye(D_IN))}), "non-finite"),
])
def test_bad_input(kw, match):
    model = make_model()
    with pytest.raises((ValueError, TypeError), match=match):
        SubspacePrivacyEngine().make_private(
            module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1), data_loader=None,
            noise_multiplier=1.0, max_grad_norm=1.0, expected_batch_size=4, sample_rate=0.1, **kw)
    assert "_dpkern_site" not in model[0].__dict__  # refused before anything was wrapped


def test_frozen_layer_and_midstep_refused():
    model = make_model()
    model[0].weight.requires_grad_(False)
    with pytest.raises(ValueError, match="frozen"):
        SubspacePrivacyEngine().make_private(
            module=model, optimizer=torch.optim.SGD([model[2].weight], lr=0.1), data_loader=None,
            noise_multiplier=1.0, max_grad_norm=1.0, expected_batch_size=4, sample_rate=0.1,
            subspace={"0": (torch.eye(HID), torch.eye(D_IN))})
    eng, model, dp = private(SubspacePrivacyEngine, make_model(), lambda ps: torch.optim.SGD(ps, lr=0.1),
                             1.0, 1.0, subspace={"0": (torch.eye(HID), torch.eye(D_IN))})
    batch_loss(model, torch.randn(2, T, D_IN)).mean().backward()
    with pytest.raises(RuntimeError, match="between steps"):
        eng.set_subspace({"0": (torch.eye(HID)[:, :2], torch.eye(D_IN)[:, :2])})


def test_outside_gradient_refused():
    eng, model, dp = private(SubspacePrivacyEngine, make_model(), lambda ps: torch.optim.SGD(ps, lr=0.1),
                             1.0, 1.0, subspace={"0": (torch.eye(HID), torch.eye(D_IN))})
    batch_loss(model, torch.randn(2, T, D_IN)).mean().backward()
    model[0].weight.grad = torch.ones_like(model[0].weight)
    with pytest.raises(RuntimeError, match="outside the engine"):
        dp.step()


@pytest.mark.parametrize("average_sum", [False, True])
def test_sum_reduction_scales_like_the_engine(average_sum):
    """loss_reduction="sum" (what bf16 / TF32 training must use): released = Σ c_i S_i (+ noise),
    divided by B_expected only with average_sum, exactly as the plain optimizer does."""
    x = torch.randn(4, T, D_IN)
    u, v = orth(HID, 3), orth(D_IN, 4)
    res = []
    for cls, kw in ((PrivacyEngine, {}), (SubspacePrivacyEngine, {"subspace": {"0": (u, v)}})):
        model = make_model()
        eng = cls(accountant="rdp")
        model, dp, _ = eng.make_private(
            module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.0), data_loader=None,
            noise_multiplier=0.0, max_grad_norm=100.0, expected_batch_size=4, sample_rate=0.1,
            loss_reduction="sum", **kw)
        dp.average_sum = average_sum
        dp.fused = False
        if hasattr(dp, "fused_backprojection"):
            dp.fused_backprojection = False
        batch_loss(model, x).sum().backward()
        dp.step()
        res.append(model[0].weight.grad.clone())
    torch.testing.assert_close(res[1], res[0], rtol=1e-5, atol=1e-7)


BACKPROJ_OPTS = {
    "adam": lambda ps: torch.optim.Adam(ps, lr=0.05),
    "adam-l2": lambda ps: torch.optim.Adam(ps, lr=0.05, weight_decay=0.1),
    "adamw": lambda ps: torch.optim.AdamW(ps, lr=0.05, weight_decay=0.1),
    "sgd-nesterov": lambda ps: torch.optim.SGD(ps, lr=0.3, momentum=0.9, nesterov=True,
                                               weight_decay=0.01),
}


def _backproj_run(opt_fn, backproj, dtype, xs, switch_at=None, device=None):
    """Subspace engine (layers 0 and 2 projected), sum reduction averaged by B_expected (what bf16
    weights need), noise on; `switch_at`: fused_backprojection turned off from that step on.
    device: the GPU where there is one (compiled Triton takes no CPU tensors), else the CPU
    (the interpreter)."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = make_model().to(device, dtype)
    orth_ = lambda n, r, seed: orthonormalize(  # noqa: E731
        torch.randn(n, r, generator=torch.Generator().manual_seed(seed))).to(device)
    bases = {"0": (orth_(HID, 2, 1), orth_(D_IN, 3, 2)), "2": (orth_(D_OUT, 2, 3), orth_(HID, 2, 4))}
    eng = SubspacePrivacyEngine(accountant="rdp")
    model, dp, _ = eng.make_private(module=model, optimizer=opt_fn(model.parameters()),
                                    data_loader=None, noise_multiplier=0.5, max_grad_norm=1.0,
                                    expected_batch_size=4, sample_rate=0.01, seed=5,
                                    subspace=bases, loss_reduction="sum", average_sum=True)
    dp.fused_backprojection = backproj
    dp.backproj_backend = "triton"
    taken = []
    for k, x in enumerate(xs):
        if switch_at is not None and k == switch_at:
            dp.fused_backprojection = False
        if x.shape[0] == 0:
            dp.signal_empty_batch()
        else:
            batch_loss(model, x.to(device, dtype)).float().sum().backward()
        dp.step()
        taken.append(dp.last_backproj)
        if dp.last_backproj:  # no p × d gradient was formed or kept
            assert model[0].weight.grad is None and model[2].weight.grad is None
        dp.zero_grad()
    return model, dp, taken


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("opt_name", list(BACKPROJ_OPTS))
def test_fused_backprojection_taken_and_equals_unfused(opt_name, dtype, monkeypatch):
    """Adam / Adam-L2 / AdamW / Nesterov SGD: the engine updates projected weights with the Triton
    back-projection kernel (spied: every projected weight updated once per step, empty batch
    included), p.grad stays None, and the weights equal those of the unfused path (W.grad = U S̃
    Vᵀ, torch's step) — fp32: to 1e-5 of the update (measured ~2e-7; Adam's normalisation
    amplifies fp32 gradient differences where |g| is small); bf16: the unfused path rounds the
    gradient and torch's states to bf16, so 2 bf16 ulps of max|W| per step (measured ≤ 2 in
    all). States live in the inner optimizer's state dict (checkpoints carry them)."""
    import dpkern.kernels.subspace_backproj as kb
    calls = []
    orig = kb.subspace_backproj_launch_grouped
    monkeypatch.setattr(kb, "subspace_backproj_launch_grouped",
                        lambda ws, **k: (calls.extend(x[0].shape for x in ws), orig(ws, **k)))
    xs = _xs(sizes=(4, 3, 0, 5))
    m_f, dp_f, taken_f = _backproj_run(BACKPROJ_OPTS[opt_name], True, dtype, xs)
    m_u, dp_u, taken_u = _backproj_run(BACKPROJ_OPTS[opt_name], False, dtype, xs)
    assert taken_f == [True] * 4 and taken_u == [False] * 4
    assert sorted(calls) == sorted([(HID, D_IN), (D_OUT, HID)] * 4)
    init = make_model().to(m_u[0].weight.device, dtype)
    for (n, a), b, a0 in zip(m_f.named_parameters(), m_u.parameters(), init.parameters()):
        moved = float((b - a0).detach().abs().max())
        assert moved > 1e-3, n
        tol = (1e-5 * moved if dtype == torch.float32
               else 2 * len(xs) * 2.0 ** -7 * float(a0.detach().abs().max()))
        torch.testing.assert_close(a.float(), b.float(), rtol=0, atol=tol, msg=n)
    w = m_f[0].weight
    st = dp_f.state_dict()["state"]
    assert any(set(v) >= ({"exp_avg", "exp_avg_sq"} if "adam" in opt_name else {"momentum_buffer"})
               for v in st.values())
    assert dp_f.state[w] and all(torch.isfinite(x).all() for x in dp_f.state[w].values())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_switch_to_unfused_mid_run(dtype):
    """Two fused AdamW steps, then fused_backprojection = False: torch's own step continues from
    the states the kernel wrote (fp32 states of a bf16 weight are handed to torch in bf16)."""
    xs = _xs(sizes=(4, 3, 4, 5))
    m_s, _, taken = _backproj_run(BACKPROJ_OPTS["adamw"], True, dtype, xs, switch_at=2)
    m_u, _, _ = _backproj_run(BACKPROJ_OPTS["adamw"], False, dtype, xs)
    assert taken == [True, True, False, False]
    init = make_model().to(m_u[0].weight.device, dtype)
    for a, b, a0 in zip(m_s.parameters(), m_u.parameters(), init.parameters()):
        moved = float((b - a0).detach().abs().max())
        tol = (1e-5 * moved if dtype == torch.float32
               else 2 * len(xs) * 2.0 ** -7 * float(a0.detach().abs().max()))
        torch.testing.assert_close(a.float(), b.float(), rtol=0, atol=tol)


def test_amsgrad_falls_back_to_the_unfused_step():
    """amsgrad is not fused (the op refuses it): the engine materialises W.grad and steps torch."""
    opt_fn = lambda ps: torch.optim.Adam(ps, lr=0.05, amsgrad=True)  # noqa: E731
    m_a, dp, taken = _backproj_run(opt_fn, True, torch.float32, _xs(sizes=(4, 3)))
    assert taken == [False, False]
    assert "max_exp_avg_sq" in dp.state[m_a[0].weight]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_gpu_fused_torch_adamw_after_backprojection(dtype):
    """On the GPU with torch.optim.AdamW(fused=True): two fused back-projection steps (the Triton
    kernel), then torch's fused step continues from the states (step tensor on the device)."""
    opt_fn = lambda ps: torch.optim.AdamW(ps, lr=0.05, fused=True)  # noqa: E731
    xs = _xs(sizes=(4, 3, 4, 5))
    m_s, dp, taken = _backproj_run(opt_fn, True, dtype, xs, switch_at=2, device="cuda")
    m_u, _, _ = _backproj_run(opt_fn, False, dtype, xs, device="cuda")
    assert taken == [True, True, False, False]
    assert dp.state[m_s[0].weight]["step"].device.type == "cuda"
    for a, b in zip(m_s.parameters(), m_u.parameters()):
        torch.testing.assert_close(a.float(), b.float(), rtol=0,
                                   atol=2e-5 if dtype == torch.float32 else 2 * 4 * 2.0 ** -7)


@pytest.mark.parametrize("ranks", [((2, 2), (2, 2)), ((2, 3), (1, 2))], ids=["one-group", "two-groups"])
def test_several_projected_layers_and_accumulation(ranks):
    """Both Linear weights projected (one buffer for equal ranks, two groups otherwise), the batch
    split over two backward passes: the release equals the fp64 reference that forms every G_i,
    with the engine's own factors; accumulating the second pass adds into the first pass's sums."""
    g = torch.Generator().manual_seed(7)
    (r0, s0), (r2, s2) = ranks
    bases = {"0.weight": (orthonormalize(torch.randn(HID, r0, generator=g)),
                          orthonormalize(torch.randn(D_IN, s0, generator=g))),
             "2.weight": (orthonormalize(torch.randn(D_OUT, r2, generator=g)),
                          orthonormalize(torch.randn(HID, s2, generator=g)))}
    x = torch.randn(5, T, D_IN, generator=g) * 3
    model = make_model(4)
    plain = copy.deepcopy(model)
    _, model, dp = private(SubspacePrivacyEngine, model, lambda ps: torch.optim.SGD(ps, lr=0.0),
                           0.0, 0.4, subspace=bases, bsz=5, fused=False, backproj=False)
    factors = []
    for part in (x[:2], x[2:]):
        batch_loss(model, part).mean().backward()
        factors.append(next(iter(dp.last_scales.values())).double() / part.shape[0])
    dp.step()
    rel = {n: s.double() * 5 for n, s in dp.last_released.items()}
    assert set(rel) == {"0.weight", "2.weight"}
    ref, _ = dpsft_clipped_sum_ref(plain, x, loss_one, bases, 0.4, torch.cat(factors))
    for n in rel:
        assert rel[n].shape == ref[n].shape, n
        torch.testing.assert_close(rel[n], ref[n], rtol=1e-5, atol=1e-6, msg=n)
    assert all(float(f.min()) < 1 for f in factors)  # clipping active in both passes


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_gpu_projected_step_does_not_synchronise(dtype):
    """The projected backward (projection, bounds, clip factors, sums) and step (noise on the
    r×r coordinates, fused back-projection) issue their GPU work without a host-GPU sync; the
    guard raises on any. The third step runs under it (the first ones fill caches)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 96), torch.nn.Tanh(),
                                torch.nn.Linear(96, 32)).cuda()
    bases = {"0": (orthonormalize(torch.randn(96, 8, device="cuda")),
                   orthonormalize(torch.randn(64, 8, device="cuda"))),
             "2": (orthonormalize(torch.randn(32, 4, device="cuda")),
                   orthonormalize(torch.randn(96, 4, device="cuda")))}
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model, dp, _ = SubspacePrivacyEngine(accountant="rdp").make_private(
        module=model, optimizer=opt, data_loader=None, noise_multiplier=1.0, max_grad_norm=1.0,
        expected_batch_size=4, sample_rate=0.01, loss_reduction="sum", subspace=bases, seed=0)
    x = torch.randn(4, 63, 64, device="cuda")
    x[1] = float("nan")  # a dropped sample takes the same path
    amp = torch.autocast("cuda", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16)
    for step in range(3):
        with amp:
            loss = model(x).float().square().mean(dim=(1, 2)).nan_to_num().sum()
        with sync_is_an_error() if step == 2 else contextlib.nullcontext():
            loss.backward()
            dp.step()
            dp.zero_grad()
    assert dp.last_backproj and dp.nonfinite_samples == 3
    assert all(torch.isfinite(p).all() for p in model.parameters())
