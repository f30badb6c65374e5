"""subspace_backproj_step_ (W ← update(W, U S̃ Vᵀ) without a p × d gradient) vs torch.optim.SGD /
Adam / AdamW stepping on the materialised gradient.

Tolerance policy (per element, per step). Each step is compared with torch.optim run in float64 on
the kernel's own inputs of that step (W and states copied from the kernel, gradient U S̃ Vᵀ formed
in fp64), so errors do not compound and the bound below is the error of one step:

* gradient: |Δg| ≤ ρ·N, N = (|U||S̃|)|V|ᵀ (no-cancellation size), ρ = tests/tolerance.py's
  reduction_rtol(ru + rv) (two chained fp32 dots), + 4·2^-10 for TF32 dots;
* epilogue: 8 fp32 roundings (8·2^-23) of each term's magnitude, propagated through the update
  as first-order perturbations (Adam: Δm, Δv, then Δ(m/(√v̂ + ε)) = Δm/den + |m|·Δden/den²);
* storage: a bf16 W or state is the round-to-nearest of the fp32 value: + 2^-8 of its magnitude
  (half a bf16 ulp), fp32: + 2^-24.

Unwritten outputs fail: fresh states are allocated poisoned (NaN) and not read on their first
step; on a fresh Adam step every element of W moves by ≈ lr ≫ the bound (asserted); a guard
after W checks that nothing outside it is written.
"""
import copy
import math

import pytest
import torch

from dpkern.noise.step import SGDHyper
from dpkern.subspace import orthonormalize
from dpkern.subspace.backproj import AdamHyper, backproj_hyper, subspace_backproj_step_
from tests.conftest import HAS_GPU
from tests.tolerance import reduction_rtol

DEV = "cuda" if HAS_GPU else "cpu"
E32 = 2.0 ** -23
HALF_ULP = {torch.float32: 2.0 ** -24, torch.bfloat16: 2.0 ** -8}
# (p, d, ru, rv): not multiples of the 64 × 64 tile, r = 1, p = 1, d = 1, exact tiles, ranks > 64
SHAPES = [(70, 130, 5, 3), (1, 200, 1, 1), (130, 1, 1, 1), (64, 128, 16, 16), (200, 67, 1, 1),
          (70, 97, 66, 65)]
OPTS = {
    "adam": lambda ps: torch.optim.Adam(ps, lr=1e-2),
    "adam-l2": lambda ps: torch.optim.Adam(ps, lr=1e-2, weight_decay=0.1, betas=(0.8, 0.99)),
    "adamw": lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.1, eps=1e-6),
    "adam-decoupled": lambda ps: torch.optim.Adam(ps, lr=1e-2, weight_decay=0.05,
                                                  decoupled_weight_decay=True),
    "sgd": lambda ps: torch.optim.SGD(ps, lr=0.1, weight_decay=0.01),
    "sgd-momentum": lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, dampening=0.1,
                                               weight_decay=0.01),
    "sgd-nesterov": lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, nesterov=True),
}


def _bases(p, d, ru, rv, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (orthonormalize(torch.randn(p, ru, generator=g)).to(DEV),
            orthonormalize(torch.randn(d, rv, generator=g)).to(DEV))


def _released(ru, rv, p, d, seed):
    """S̃ scaled so that the entries of U S̃ Vᵀ are O(1)."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(ru, rv, generator=g) * math.sqrt(p * d / (ru * rv))).to(DEV)


def _torch_step(opt_fn, w, state, grad):
    """torch.optim on float64 copies of w and its state, one step on `grad`; returns
    (w_new, state_new) in float64 (states: {name: tensor})."""
    p = torch.nn.Parameter(w.detach().double().clone())
    opt = opt_fn([p])
    if state:
        opt.state[p] = {k: (x.double().clone() if k != "step" else x.clone())
                        for k, x in state.items()}
    p.grad = grad.double()
    opt.step()
    return p.detach(), {k: x for k, x in opt.state[p].items()}


def _bound(hyper, w, state, n, g, w_ref, st_ref, wd, state_dtypes, rho):
    """Per-element bound on |W − W_ref| and |state − state_ref| for one step (module docstring).
    w, state: inputs of the step (fp64); n: N; g: the exact fp64 gradient."""
    aw = w.abs()
    out = {}
    if isinstance(hyper, AdamHyper):
        b1, b2, eps = hyper.beta1, hyper.beta2, hyper.eps
        t = int(st_ref["step"])
        bc1, bc2 = 1 - b1 ** t, 1 - b2 ** t
        ge = g if hyper.decoupled else g + wd * w
        dg = rho * n + 8 * E32 * (g.abs() + wd * aw)
        m0 = state["exp_avg"].double().abs() if state else 0.0
        q0 = state["exp_avg_sq"].double() if state else 0.0
        dm = (1 - b1) * dg + 8 * E32 * (b1 * m0 + (1 - b1) * ge.abs())
        dq = (1 - b2) * (2 * ge.abs() * dg + dg * dg) + 8 * E32 * (b2 * q0 + (1 - b2) * ge * ge)
        m, q = st_ref["exp_avg"].abs(), st_ref["exp_avg_sq"]
        den = q.sqrt() / math.sqrt(bc2) + eps
        dden = torch.minimum((dq / bc2).sqrt(), dq / bc2 / (q / bc2).sqrt().clamp_min(1e-300))
        dden = dden + 8 * E32 * den
        step = hyper.lr / bc1
        dupd = dm / den + m * dden / den ** 2 + 8 * E32 * m / den
        out["w"] = step * dupd + 8 * E32 * (aw + step * m / den)
        out["exp_avg"] = dm + HALF_ULP[state_dtypes["exp_avg"]] * m
        out["exp_avg_sq"] = dq + HALF_ULP[state_dtypes["exp_avg_sq"]] * q
    else:
        dd = rho * n + 4 * E32 * (g.abs() + hyper.weight_decay * aw)
        upd = (g + hyper.weight_decay * w).abs()
        if hyper.momentum:
            buf = st_ref["momentum_buffer"].abs()
            b0 = state["momentum_buffer"].double().abs() if state else 0.0
            dbuf = (1 - hyper.dampening) * dd + 4 * E32 * (hyper.momentum * b0 + upd)
            if not state:
                dbuf = dd
            out["momentum_buffer"] = dbuf + HALF_ULP[state_dtypes["momentum_buffer"]] * buf
            if hyper.nesterov:
                dd, upd = dd + hyper.momentum * dbuf + 4 * E32 * (upd + hyper.momentum * buf), \
                    upd + hyper.momentum * buf
            else:
                dd, upd = dbuf, buf
        out["w"] = hyper.lr * dd + 4 * E32 * (aw + hyper.lr * upd)
    out["w"] = out["w"] + HALF_ULP[state_dtypes["w"]] * w_ref.abs()
    return out


def _run(opt_name, shape, dtype, backend, steps=3, state=None, seed=0, config=None):
    """`steps` steps of the op, each checked against torch.optim (fp64) from the op's own inputs."""
    p, d, ru, rv = shape
    u, v = _bases(p, d, ru, rv, seed)
    g0 = torch.Generator().manual_seed(seed + 1)
    w = (torch.randn(p, d, generator=g0) * 0.1).to(DEV, dtype)  # bf16 half-ulp ≪ lr
    w_orig = w.clone()
    opt_fn = OPTS[opt_name]
    dummy = opt_fn([torch.nn.Parameter(torch.zeros(1))])
    hyper = backproj_hyper(dummy, dummy.param_groups[0])
    wd = hyper.weight_decay
    state = {} if state is None else state
    rho = reduction_rtol(ru + rv)
    for k in range(steps):
        s = _released(ru, rv, p, d, seed + 10 + k)
        w_in = w.double().clone()
        st_in = {key: x.clone() for key, x in state.items()}
        dtypes = {key: x.dtype for key, x in state.items()} | {"w": dtype}
        grad = (u.double() @ s.double()) @ v.double().T
        n = (u.double().abs() @ s.double().abs()) @ v.double().abs().T
        subspace_backproj_step_(w, u, s, v, hyper, state, backend=backend, config=config)
        w_ref, st_ref = _torch_step(opt_fn, w_in, st_in, grad)
        dtypes |= {key: x.dtype for key, x in state.items() if key not in dtypes}
        bound = _bound(hyper, w_in, st_in, n, grad, w_ref, st_ref, wd, dtypes, rho)
        assert torch.isfinite(w).all()
        err = (w.double() - w_ref).abs()
        assert (err <= bound["w"]).all(), f"step {k}: W err/bound {float((err / bound['w']).max())}"
        for key in bound:
            if key == "w":
                continue
            assert torch.isfinite(state[key]).all(), key  # poisoned fresh state all written
            e = (state[key].double() - st_ref[key]).abs()
            assert (e <= bound[key]).all(), f"step {k} {key}: {float((e / bound[key]).max())}"
        if "step" in st_ref:
            assert int(state["step"]) == int(st_ref["step"])
        if k == 0 and isinstance(hyper, AdamHyper) and not st_in:
            # fresh Adam: |update| ≈ lr except where g + (L2) cancels; the bound has teeth
            assert ((w_ref - w_in).abs() > 2 * bound["w"]).double().mean() > 0.95
    assert not torch.equal(w, w_orig)
    return w, state


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("opt_name", list(OPTS))
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "p{}_d{}_r{}x{}".format(*s))
def test_matches_torch_optim(shape, opt_name, dtype, backend):
    if shape[2] > 64 and opt_name not in ("adamw", "sgd-nesterov"):
        pytest.skip("ranks > 64: one Adam and one SGD variant (interpreter time)")
    _run(opt_name, shape, dtype, backend)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("opt_name", ["adamw", "adam-l2", "sgd-momentum"])
def test_state_from_and_to_the_unfused_path(opt_name, dtype):
    """Two unfused torch steps (states in torch's own dtype: bf16 for a bf16 W), two fused steps
    on those states, one unfused step again on the state the fused steps left; a state_dict
    round trip in between. The fused steps keep the existing states' tensors and dtypes."""
    p, d, ru, rv = 70, 130, 4, 3
    u, v = _bases(p, d, ru, rv, 5)
    w = torch.nn.Parameter((torch.randn(p, d) * 0.5).to(DEV, dtype))
    opt = OPTS[opt_name]([w])
    hyper = backproj_hyper(opt, opt.param_groups[0])

    def unfused(seed):
        w.grad = (u @ _released(ru, rv, p, d, seed) @ v.T).to(dtype)
        opt.step()
        w.grad = None

    unfused(0)
    unfused(1)
    before = {k: x for k, x in opt.state[w].items()}
    sd = copy.deepcopy(opt.state_dict())
    opt2 = OPTS[opt_name]([w])
    opt2.load_state_dict(sd)
    st = opt2.state[w]
    dtypes = {k: x.dtype for k, x in st.items() if k != "step"}
    for seed in (2, 3):
        w_in, st_in = w.detach().double().clone(), {k: x.clone() for k, x in st.items()}
        s = _released(ru, rv, p, d, seed)
        subspace_backproj_step_(w.data, u, s, v, hyper, st, backend="triton")
        grad = (u.double() @ s.double()) @ v.double().T
        w_ref, st_ref = _torch_step(OPTS[opt_name], w_in, st_in, grad)
        n = (u.double().abs() @ s.double().abs()) @ v.double().abs().T
        bound = _bound(hyper, w_in, st_in, n, grad, w_ref, st_ref, hyper.weight_decay,
                       dtypes | {"w": dtype}, reduction_rtol(ru + rv))
        assert ((w.detach().double() - w_ref).abs() <= bound["w"]).all()
    assert {k: x.dtype for k, x in st.items() if k != "step"} == dtypes
    if "step" in st:
        assert int(st["step"]) == 4
    opt2.state_dict()  # serialisable
    w.grad = (u @ _released(ru, rv, p, d, 4) @ v.T).to(dtype)
    opt2.step()  # the unfused torch step accepts the state the fused steps wrote
    assert torch.isfinite(w).all()
    assert before.keys() == st.keys()


def test_every_element_written_and_nothing_else():
    """W inside a larger buffer: the guard after it is untouched; tile configs with splits > 1 and
    ragged edges. Adam (fresh states poisoned: W and states share one store mask) and plain SGD
    from W = 0 with lr = 1 (W becomes −U S̃ Vᵀ, nonzero everywhere)."""
    from dpkern.kernels.subspace_backproj import SubspaceBackprojConfig
    p, d, ru, rv = 37, 150, 3, 2
    u, v = _bases(p, d, ru, rv, 9)
    for cfg in (SubspaceBackprojConfig(16, 32, 16, 3, 4, "ieee"),
                SubspaceBackprojConfig(64, 64, 32, 1, 4, "ieee"),
                SubspaceBackprojConfig(32, 16, 16, 7, 4, "ieee")):
        for hyper in (AdamHyper(lr=0.1), SGDHyper(lr=1.0)):
            buf = torch.full((p * d + 100,), 7.0, device=DEV)
            w = buf[:p * d].view(p, d)
            w.copy_(torch.randn(p, d) if isinstance(hyper, AdamHyper) else torch.zeros(p, d))
            w0 = w.clone()
            st = {}
            subspace_backproj_step_(w, u, _released(ru, rv, p, d, 1), v, hyper, st,
                                    backend="triton", config=cfg)
            assert (buf[p * d:] == 7.0).all()
            assert (w != w0).all()
            for x in st.values():
                assert torch.isfinite(x).all()


@pytest.mark.parametrize("opt,match", [
    (lambda ps: torch.optim.Adam(ps, amsgrad=True), "amsgrad"),
    (lambda ps: torch.optim.AdamW(ps, amsgrad=True), "amsgrad"),
    (lambda ps: torch.optim.Adam(ps, maximize=True), "maximize"),
    (lambda ps: torch.optim.SGD(ps, lr=0.1, maximize=True), "maximize"),
    (lambda ps: torch.optim.RMSprop(ps), "RMSprop is not supported"),
])
def test_unsupported_optimizer_refused(opt, match):
    o = opt([torch.nn.Parameter(torch.zeros(2))])
    with pytest.raises(NotImplementedError, match=match):
        backproj_hyper(o, o.param_groups[0])


@pytest.mark.parametrize("bad,match", [
    (lambda w, u, s, v, st: (w.half(), u, s, v, st), "float32 or bfloat16"),
    (lambda w, u, s, v, st: (torch.zeros(6, 5), u, s, v, st), "shapes do not chain"),
    (lambda w, u, s, v, st: (w.repeat(1, 2)[:, ::2], u, s, v, st), "contiguous"),
    (lambda w, u, s, v, st: (w, u, s.T, v, st), "shapes do not chain"),
    (lambda w, u, s, v, st: (w, u[0], s, v, st), "2-D"),
    (lambda w, u, s, v, st: (w, u.long(), s, v, st), "float tensor"),
    (lambda w, u, s, v, st: (w, u, s, v, {"exp_avg": torch.zeros(3, 3)}), "shape"),
    (lambda w, u, s, v, st: (w, u, s, v, {"exp_avg": torch.zeros(5, 6, dtype=torch.float64),
                                          "exp_avg_sq": torch.zeros(5, 6),
                                          "step": torch.tensor(1.)}), "float32 or w's dtype"),
    (lambda w, u, s, v, st: (w, u, s, v, {"exp_avg": torch.zeros(5, 6)}), "only part"),
    (lambda w, u, s, v, st: (w, u, s, v, []), "per-parameter dict"),
])
def test_bad_input(bad, match):
    w, u, s, v = torch.zeros(5, 6), torch.eye(5)[:, :2], torch.ones(2, 3), torch.eye(6)[:, :3]
    *args, state = bad(w, u, s, v, {})
    with pytest.raises((TypeError, ValueError), match=match):
        subspace_backproj_step_(*args, AdamHyper(lr=0.1), state)


def test_bad_hyper():
    w, u, s, v = torch.zeros(5, 6), torch.eye(5)[:, :2], torch.ones(2, 3), torch.eye(6)[:, :3]
    for hyper, match in ((AdamHyper(lr=-1.0), "lr"), (AdamHyper(lr=0.1, beta1=1.0), "betas"),
                         (SGDHyper(lr=0.1, nesterov=True), "Nesterov"), ("adam", "hyper must")):
        with pytest.raises((TypeError, ValueError), match=match):
            subspace_backproj_step_(w, u, s, v, hyper, {})


@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["ieee", "tf32x3"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_gpu_llama_shape(dtype, precision):
    """The MLP up-projection of a Llama-1B (5632 × 2048, r = 64), AdamW, 3 steps, default tiles;
    tf32x3 (three TF32 products) is held to the fp32 policy."""
    from dpkern.kernels.subspace_backproj import subspace_backproj_config
    cfg = subspace_backproj_config(5632, 2048, 64, torch.device("cuda"), input_precision=precision)
    _run("adamw", (5632, 2048, 64, 64), dtype, "triton", config=cfg)
