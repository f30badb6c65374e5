"""bookkeeping_wgrad / bookkeeping_bias: every backend against the float64 reference, written into
outputs of several dtypes and layouts, with and without accumulation; dropped samples stay dropped.

Tolerance: each output element is a signed sum, so its error is bounded relative to the sum of
absolute terms, Σ_i |s_i| Σ_t |g_it||a_it| (the reference on absolute values), times the reduction
rtol of tests/tolerance.py; an output rounded to a 16-bit dtype adds that dtype's half-ulp of |ref|.
"""
import pytest
import torch

from dpkern.ops._persample import fp32_mode, operand
from dpkern.ops.bookkeeping import bookkeeping_bias, bookkeeping_wgrad
from dpkern.reference.persample import bookkeeping_bias_ref, bookkeeping_wgrad_ref
from tests.conftest import HAS_GPU, kernel_devices
from tests.tolerance import OUTPUT_EPS, reduction_rtol

DTYPES = [torch.float32, torch.bfloat16]
SHAPES = [(0, 5, 8, 8), (1, 1, 60, 17), (2, 63, 60, 33), (3, 17, 8, 130), (1, 130, 33, 70)]
GPU_SHAPES = SHAPES + [(8, 512, 2048, 2048), (16, 256, 2048, 5632), (1, 4096, 2048, 256)]


def assert_close_signed(out, ref, ref_abs, n_reduce, out_dtype=torch.float32):
    out, ref, ref_abs = out.double().cpu(), ref.double().cpu(), ref_abs.double().cpu()
    tol = reduction_rtol(n_reduce) * ref_abs + OUTPUT_EPS[out_dtype] * ref.abs() + 1e-30
    err = (out - ref).abs()
    assert not torch.isnan(out).any(), "NaN in output"
    bad = err > tol
    assert not bad.any(), f"{int(bad.sum())} elements off; worst err {float(err.max()):.3e}, " \
                          f"tol there {float(tol.flatten()[err.argmax()]):.3e}"


def seen(x):
    """x in float64 as the kernels multiply it in its device's default mode (TF32-rounded fp32 on a
    GPU; tests/ops/test_tf32_sensitivity.py covers that mode on the CPU)."""
    return operand(x, fp32_mode(x.device), torch.float64)


def _inputs(shape, dtype, device):
    b, t, d, p = shape
    a = torch.randn(b, t, d, device=device).to(dtype)
    g = torch.randn(b, t, p, device=device).to(dtype)
    scale = torch.rand(b, device=device)
    return a, g, scale


@pytest.mark.parametrize("out_kind", ["none", "fp32", "bf16-accumulate", "fp32-transposed-accumulate"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", GPU_SHAPES if HAS_GPU else SHAPES,
                         ids=lambda s: "B{}xT{}xd{}xp{}".format(*s))
@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("device", kernel_devices())
def test_bookkeeping_matches_reference(device, backend, shape, dtype, out_kind):
    torch.manual_seed(hash((shape, str(dtype), out_kind)) % 2**31)
    a, g, scale = _inputs(shape, dtype, device)
    b, t, d, p = shape
    ref = bookkeeping_wgrad_ref(seen(a), seen(g), scale.double())
    ref_abs = bookkeeping_wgrad_ref(seen(a).abs(), seen(g).abs(), scale.double())
    out_dtype = torch.float32
    if out_kind == "none":
        out = bookkeeping_wgrad(a, g, scale, backend=backend)
        assert out.dtype == torch.float32 and out.shape == (p, d)
    else:
        accumulate = out_kind.endswith("accumulate")
        if out_kind == "fp32":
            buf = torch.full((p, d), float("nan"), device=device)  # overwritten, never read
        elif out_kind == "bf16-accumulate":
            out_dtype = torch.bfloat16
            buf = torch.randn(p, d, device=device).to(out_dtype)
        else:  # a (d, p) buffer seen as (p, d): strides (1, p)
            buf = torch.randn(d, p, device=device).t()
        if accumulate:
            ref = ref + buf.double()
            ref_abs = ref_abs + buf.double().abs()
        out = bookkeeping_wgrad(a, g, scale, out=buf, accumulate=accumulate, backend=backend)
        assert out is buf
    assert_close_signed(out, ref, ref_abs, n_reduce=b * t, out_dtype=out_dtype)


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_dropped_sample_contributes_nothing_even_if_non_finite(backend):
    device = kernel_devices()[0]
    torch.manual_seed(1)
    a, g, scale = _inputs((3, 20, 12, 9), torch.float32, device)
    g[1, 3, 2] = float("inf")
    a[1, 5, 0] = float("nan")
    scale[1] = 0.0
    keep = torch.tensor([0, 2], device=device)
    ref = bookkeeping_wgrad_ref(seen(a[keep]), seen(g[keep]), scale[keep].double())
    ref_abs = bookkeeping_wgrad_ref(seen(a[keep]).abs(), seen(g[keep]).abs(), scale[keep].double())
    out = bookkeeping_wgrad(a, g, scale, backend=backend)
    assert_close_signed(out, ref, ref_abs, n_reduce=60)
    bias = bookkeeping_bias(g, scale, backend=backend if backend == "torch" else None)
    assert torch.isfinite(bias).all()


@pytest.mark.parametrize("out_dtype", [None, torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_bookkeeping_bias(dtype, out_dtype):
    torch.manual_seed(2)
    g = torch.randn(3, 63, 60).to(dtype)
    scale = torch.rand(3)
    ref = bookkeeping_bias_ref(g.double(), scale.double())
    ref_abs = bookkeeping_bias_ref(g.double().abs(), scale.double())
    if out_dtype is None:
        out = bookkeeping_bias(g, scale)
    else:
        buf = torch.ones(60, dtype=out_dtype)
        out = bookkeeping_bias(g, scale, out=buf, accumulate=True)
        ref, ref_abs = ref + 1, ref_abs + 1
    assert_close_signed(out, ref, ref_abs, n_reduce=3 * 63, out_dtype=out_dtype or torch.float32)


def test_empty_batch_gives_zeros_or_leaves_out_unchanged():
    dev = kernel_devices()[0]
    for backend in ("torch", "triton"):
        a, g = torch.randn(0, 4, 5, device=dev), torch.randn(0, 4, 6, device=dev)
        scale = torch.rand(0, device=dev)
        got = bookkeeping_wgrad(a, g, scale, backend=backend)
        assert torch.equal(got, torch.zeros(6, 5, device=dev))
        buf = torch.ones(6, 5, dtype=torch.bfloat16, device=dev)
        bookkeeping_wgrad(a, g, scale, out=buf, accumulate=True, backend=backend)
        assert torch.equal(buf, torch.ones(6, 5, dtype=torch.bfloat16, device=dev))


@pytest.mark.parametrize("kw,err,match", [
    ({"scale": torch.ones(2, dtype=torch.float64)}, TypeError, "scale must be one of"),
    ({"scale": torch.ones(3)}, ValueError, "batch sizes"),
    ({"out": torch.ones(4, 5)}, ValueError, r"out must have shape \(6, 5\)"),
    ({"out": torch.ones(6, 5, dtype=torch.int32)}, TypeError, "out must be a float tensor"),
    ({"g": torch.ones(2, 3, 6)}, ValueError, "batch and sequence sizes"),
])
def test_bookkeeping_rejects_bad_input(kw, err, match):
    args = dict(a=torch.ones(2, 4, 5), g=torch.ones(2, 4, 6), scale=torch.ones(2))
    args.update(kw)
    out = args.pop("out", None)
    with pytest.raises(err, match=match):
        bookkeeping_wgrad(args["a"], args["g"], args["scale"], out=out, backend="torch")


def test_bias_ops_validate_backend_name():
    from dpkern.ops.linear_norm import bias_norm_sq
    with pytest.raises(ValueError, match="backend must be one of"):
        bookkeeping_bias(torch.ones(2, 3, 4), torch.ones(2), backend="cudnn")
    with pytest.raises(ValueError, match="backend must be one of"):
        bias_norm_sq(torch.ones(2, 3, 4), backend="cudnn")


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(8, 63, 96, 200), (3, 512, 256, 384), (1, 1, 64, 64)],
                         ids=lambda s: "B{}xT{}xd{}xp{}".format(*s))
def test_fp32_k_major_copies_are_bit_identical(monkeypatch, shape):
    """fp32 on CUDA hands the kernel T-contiguous copies (K-major TF32 tiles), rounded to TF32 in
    the copy (the kernel then skips its own rounding): the sum is bit for bit the one the plain
    copies and the T-strided operands give, and the copies are really what the kernel gets."""
    if not HAS_GPU:
        pytest.skip("needs a CUDA device")
    import dpkern.kernels.bookkeeping as kb
    import dpkern.ops.bookkeeping as ob
    torch.manual_seed(5)
    a, g, scale = _inputs(shape, torch.float32, "cuda")
    seen = []
    real = kb.bookkeeping_fwd

    def spy(a_, g_, *args, **kwargs):
        seen.append((a_.stride(1), g_.stride(1), kwargs.get("pre_rounded", False)))
        return real(a_, g_, *args, **kwargs)
    monkeypatch.setattr(kb, "bookkeeping_fwd", spy)
    rounded = bookkeeping_wgrad(a, g, scale, backend="triton", fp32_mode="tf32r")
    monkeypatch.setattr(ob, "PREROUND", False)
    k_major = bookkeeping_wgrad(a, g, scale, backend="triton", fp32_mode="tf32r")
    monkeypatch.setattr(ob, "KMAJOR_BYTES", 0)
    strided = bookkeeping_wgrad(a, g, scale, backend="triton", fp32_mode="tf32r")
    assert seen[0] == (1, 1, True)
    if shape[1] > 1:
        assert seen[1] == (1, 1, False)
    assert seen[2] == (a.stride(1), g.stride(1), False)
    assert torch.equal(k_major, strided) and torch.equal(rounded, strided)


@pytest.mark.parametrize("shape", [(3, 63, 60), (1, 1, 5), (0, 4, 8), (2, 130, 70)],
                         ids=lambda s: "B{}xT{}xn{}".format(*s))
def test_kmajor_tf32_copy_matches_round_tf32(shape):
    """The K-major rounding copy against the torch twin, bit for bit, into poisoned storage;
    ties, NaN and a strided input included."""
    from dpkern.kernels.bookkeeping import kmajor_tf32_copy
    from dpkern.ops._persample import round_tf32
    dev = "cuda" if HAS_GPU else "cpu"
    torch.manual_seed(1)
    x = torch.randn(shape[0], shape[2], shape[1], device=dev).transpose(1, 2)  # T-strided input
    if x.numel():
        x[0, 0, 0] = 1 + 2.0 ** -11  # a tie: to even (1.0)
        x[-1, -1, -1] = float("nan")
    out = torch.full((shape[0], shape[2], shape[1]), float("inf"), device=dev)
    y = kmajor_tf32_copy(x, out=out)
    assert y.shape == x.shape and y.stride(1) == 1 and y.data_ptr() == out.data_ptr()
    ref = round_tf32(x.contiguous())
    assert torch.equal(y.view(torch.int32), ref.view(torch.int32))


def test_shared_copy_reuses_only_the_same_input():
    """The one-slot cache of the fp32 K-major copies: a layer reading the same input as the layer
    before (q/k/v, gate/up) gets the copy made for it; any other tensor, a view of the same storage
    with another shape or offset included, gets its own, and only one copy is held at a time."""
    from dpkern.ops.bookkeeping import _shared_copy
    made = []

    def copy(x):
        made.append(x)
        return x.clone() * 2
    base = torch.randn(2, 6, 4)
    shared: dict = {}
    first = _shared_copy(base, shared, copy)
    assert _shared_copy(base, shared, copy) is first
    assert _shared_copy(base.view(2, 6, 4), shared, copy) is first  # same data, another object
    other = torch.randn(2, 6, 4)
    assert torch.equal(_shared_copy(other, shared, copy), other * 2)
    assert torch.equal(_shared_copy(base[:1], shared, copy), base[:1] * 2)  # same start, fewer rows
    assert torch.equal(_shared_copy(base[1:], shared, copy), base[1:] * 2)  # same storage, offset
    assert len(made) == 4 and set(shared) == {"key", "src", "copy"}
    assert torch.equal(_shared_copy(base, None, copy), base * 2) and len(made) == 5


@pytest.mark.parametrize("shape", [(3, 63, 60), (1, 1, 5), (0, 4, 8), (2, 130, 70)],
                         ids=lambda s: "B{}xT{}xn{}".format(*s))
def test_kmajor_tf32_copies_of_many_tensors_in_one_buffer(shape):
    """L tensors of one layout copied in one launch: each copy bit for bit round_tf32 of its
    tensor, starting 128 bytes aligned; the padding between copies keeps its poison (no write
    outside a copy)."""
    from dpkern.kernels.bookkeeping import kmajor_slot, kmajor_tf32_copies
    from dpkern.ops._persample import round_tf32
    dev = "cuda" if HAS_GPU else "cpu"
    torch.manual_seed(2)
    xs = [torch.randn(shape[0], shape[2], shape[1], device=dev).transpose(1, 2) for _ in range(3)]
    if xs[1].numel():
        xs[1][-1, -1, -1] = float("nan")
    slot = kmajor_slot(xs[0])
    assert slot % 32 == 0 and slot >= xs[0].numel()
    out = torch.full((3 * slot,), float("inf"), device=dev)
    ys = kmajor_tf32_copies(xs, out=out)
    for i, (x, y) in enumerate(zip(xs, ys)):
        assert y.shape == x.shape and (y.numel() == 0 or y.stride(1) == 1)
        assert y.numel() == 0 or (y.data_ptr() - out.data_ptr()) == 4 * i * slot
        assert torch.equal(y.contiguous().view(torch.int32), round_tf32(x.contiguous()).view(torch.int32))
        assert torch.isinf(out[i * slot + x.numel():(i + 1) * slot]).all()


def _kmajor_here(monkeypatch, device):
    """Run the fp32 K-major path on `device` (the CPU: in the interpreter)."""
    import dpkern.ops.bookkeeping as ob
    monkeypatch.setattr(ob, "KMAJOR_DEVICES", ("cuda", torch.device(device).type))
    return ob


@pytest.mark.parametrize("device", kernel_devices())
def test_fp32_grouped_kmajor_copies_once_per_input(device, monkeypatch):
    """Grouped fp32 "tf32r" book-keeping: layers of one layout share one launch over rounded
    K-major copies, one copy launch for their distinct inputs (q/k/v read one) and one for their
    gradients; over KMAJOR_BYTES a group splits into several such launches. Each layer's sum is
    bit for bit the one bookkeeping_wgrad gives alone (and alone without copies), into poisoned
    outputs, with a dropped sample whose gradient is NaN; a consumed list gives up its inputs."""
    import dpkern.kernels.bookkeeping as kb
    from dpkern.ops.bookkeeping import bookkeeping_wgrad_grouped
    ob = _kmajor_here(monkeypatch, device)
    torch.manual_seed(7)
    b, t, d = 3, 63, 60
    x, y = torch.randn(b, t, d, device=device), torch.randn(b, t, d, device=device)
    ps = (96, 40, 40, 200, 96, 40)
    gs = [torch.randn(b, t, p, device=device) for p in ps]
    gs[0][1] = float("nan")
    scale = torch.rand(b, device=device)
    scale[1] = 0.0
    inputs = [x, x, x, y, x, y]
    alone = [bookkeeping_wgrad(a, g, scale, backend="triton", fp32_mode="tf32r")
             for a, g in zip(inputs, gs)]
    monkeypatch.setattr(ob, "KMAJOR_BYTES", 0)
    strided = [bookkeeping_wgrad(a, g, scale, backend="triton", fp32_mode="tf32r")
               for a, g in zip(inputs, gs)]
    assert all(torch.equal(u, v) for u, v in zip(alone, strided))
    xr, gr = operand(x, "tf32r", torch.float64), operand(gs[1], "tf32r", torch.float64)
    ref = bookkeeping_wgrad_ref(xr, gr, scale.double())
    ref_abs = bookkeeping_wgrad_ref(xr.abs(), gr.abs(), scale.double())
    assert_close_signed(alone[1], ref, ref_abs, t * b)
    calls = []
    real = kb.kmajor_tf32_copies

    def spy(xs, out=None):
        calls.append(len(xs))
        return real(xs, out=out)
    monkeypatch.setattr(kb, "kmajor_tf32_copies", spy)
    for budget, launches in (((1 << 30), [1, 2, 2, 3, 1, 1]),
                             (4 * (b * t * (d + 96 + 96)) - 4, [1, 1, 1, 1, 2, 3])):
        monkeypatch.setattr(ob, "KMAJOR_BYTES", budget)
        calls.clear()
        outs = [torch.full((p, d), float("nan"), device=device) for p in ps]
        items = [(a, g, scale, o, False) for a, g, o in zip(inputs, gs, outs)]
        got = bookkeeping_wgrad_grouped(items, backend="triton", fp32_mode="tf32r", consume=True)
        assert all(u is o for u, o in zip(got, outs)) and items == [None] * len(ps)
        assert all(torch.equal(u, v) for u, v in zip(got, alone))
        # p = 96: inputs [x], g x2 (over the small budget: x, g, then x, g again); p = 40:
        # inputs [x, y], g x3; p = 200: inputs [y], g x1 (over the small budget it runs alone,
        # by column blocks)
        assert calls == launches, calls


@pytest.mark.parametrize("device", kernel_devices())
def test_fp32_copies_g_by_column_blocks_over_the_budget(device, monkeypatch):
    """A layer whose K-major copies would pass KMAJOR_BYTES copies g 128 columns at a time (the
    last block shorter), each block's rows of the result written by its own launch: bit for bit
    the sum of one copy and of no copy, into a poisoned output and accumulating into one; below
    128 columns it reads the tensors as they are."""
    import dpkern.kernels.bookkeeping as kb
    ob = _kmajor_here(monkeypatch, device)
    torch.manual_seed(8)
    b, t, d, p = 3, 63, 60, 300
    a, g = torch.randn(b, t, d, device=device), torch.randn(b, t, p, device=device)
    scale = torch.rand(b, device=device)
    whole = bookkeeping_wgrad(a, g, scale, backend="triton", fp32_mode="tf32r")
    monkeypatch.setattr(ob, "KMAJOR_BYTES", 4 * (a.numel() + 200 * b * t))
    assert ob._g_columns(a, g) == 128
    blocks = []
    real = kb.bookkeeping_fwd

    def spy(a_, g_, s_, w_, **kw):
        blocks.append((g_.shape[2], a_.stride(1), g_.stride(1), kw.get("pre_rounded")))
        return real(a_, g_, s_, w_, **kw)
    monkeypatch.setattr(kb, "bookkeeping_fwd", spy)
    out = torch.full((p, d), float("nan"), device=device)
    got = bookkeeping_wgrad(a, g, scale, out=out, backend="triton", fp32_mode="tf32r")
    assert blocks == [(128, 1, 1, True), (128, 1, 1, True), (44, 1, 1, True)]
    assert got is out and torch.equal(got, whole)
    base = torch.randn(p, d, device=device)
    acc = bookkeeping_wgrad(a, g, scale, out=base.clone(), accumulate=True, backend="triton",
                            fp32_mode="tf32r")
    assert torch.equal(acc, whole + base)
    monkeypatch.setattr(ob, "KMAJOR_BYTES", 4 * (a.numel() + 100 * b * t))
    assert ob._g_columns(a, g) == 0
    blocks.clear()
    assert torch.equal(bookkeeping_wgrad(a, g, scale, backend="triton", fp32_mode="tf32r"), whole)
    assert blocks == [(p, a.stride(1), g.stride(1), None)]


@pytest.mark.parametrize("device", kernel_devices())
def test_16bit_wide_layers_take_a_token_step_of_128(device, monkeypatch):
    """bf16 layers of width ≥ 512 run with a token step of 128 from T = 128 (fp32 and shorter
    sequences keep 64): here T = 130 leaves a masked tail tile of 2 tokens, and a dropped sample
    with a NaN gradient sits between two kept ones. Against the float64 reference."""
    import dpkern.kernels.bookkeeping as kb
    assert kb.bookkeeping_config(512, 2048, 2048, bits16=True).BLOCK_T == 128
    assert kb.bookkeeping_config(512, 2048, 2048).BLOCK_T == 64
    assert kb.bookkeeping_config(100, 2048, 2048, bits16=True).BLOCK_T == 64
    assert kb.bookkeeping_config(512, 256, 2048, bits16=True).BLOCK_T == 64
    tma = kb.bookkeeping_config(512, 2048, 2048, bits16=True, tma=True)
    assert (tma.BLOCK_P, tma.BLOCK_D, tma.BLOCK_T) == (128, 256, 64)
    assert kb.bookkeeping_config(512, 2048, 2048, tma=True).BLOCK_T == 64  # fp32: no TMA tiles
    used = []
    real = kb.bookkeeping_config

    def spy(*args, **kwargs):
        used.append(real(*args, **kwargs))
        return used[-1]
    monkeypatch.setattr(kb, "bookkeeping_config", spy)
    torch.manual_seed(11)
    a, g, scale = _inputs((3, 130, 512, 512), torch.bfloat16, device)
    scale[1] = 0.0
    g[1, 7, 3] = float("nan")
    out = torch.full((512, 512), float("nan"), device=device)
    bookkeeping_wgrad(a, g, scale, out=out, backend="triton")
    # the launch's config (T = 130: no TMA)
    assert (used[-1].BLOCK_D, used[-1].BLOCK_T) == (128, 128)
    keep = torch.tensor([True, False, True], device=device)
    ref = bookkeeping_wgrad_ref(seen(a[keep]), seen(g[keep]), scale[keep].double())
    ref_abs = bookkeeping_wgrad_ref(seen(a[keep]).abs(), seen(g[keep]).abs(), scale[keep].double())
    assert_close_signed(out, ref, ref_abs, n_reduce=3 * 130)


# (B, T, d, p), tile config: tiles past d / p (TMA zero fill), several token tiles a sample
TMA_CASES = [
    ((3, 64, 72, 40), (64, 64, 32)),
    ((1, 32, 64, 136), (64, 64, 32)),
    ((2, 256, 520, 512), (128, 128, 128)),
]


@pytest.mark.parametrize("case", TMA_CASES, ids=lambda c: "B{}xT{}xd{}xp{}".format(*c[0]))
@pytest.mark.parametrize("device", kernel_devices())
def test_tma_tiles_match_pointer_tiles(device, case, monkeypatch):
    """bf16 tiles by TMA descriptors (forced with tma=True, so the CPU interpreter runs them too),
    one layer and two layers in one tabled launch, into NaN-poisoned outputs, with a dropped
    sample holding a NaN gradient: bit for bit the sums of the same tiles read by pointers, and
    within the written tolerance of the float64 reference."""
    import dpkern.kernels.bookkeeping as kb
    (b, t, d, p), (bp, bd, bt) = case
    used = []
    real = kb.tma_ok
    monkeypatch.setattr(kb, "tma_ok", lambda *a: used.append(real(*a)) or used[-1])
    torch.manual_seed(sum(case[0]))
    layers = [_inputs((b, t, d, p), torch.bfloat16, device) for _ in range(2)]
    if b > 1:  # sample 0 dropped: a later sample that read its rows would be wrong
        for _, g, scale in layers:
            scale[0] = 0.0
            g[0, t // 2, p // 3] = float("nan")

    def run(tma, grouped):
        cfg = kb.BookkeepingConfig(bp, bd, bt, 8, 8 if bp == 128 else 4, 3, tma=tma)
        outs = [torch.full((p, d), float("nan"), device=device) for _ in layers]
        if grouped:
            kb.bookkeeping_grouped_fwd([x[0] for x in layers], [x[1] for x in layers],
                                       [x[2] for x in layers], outs, False, cfg)
        else:
            kb.bookkeeping_fwd(*layers[0], outs[0], False, cfg)
            outs = outs[:1]
        return outs
    for grouped in (False, True):
        used.clear()
        by_tma, by_ptr = run(True, grouped), run(False, grouped)
        assert used == [True, False]
        for (a, g, scale), w_tma, w_ptr in zip(layers, by_tma, by_ptr):
            assert torch.equal(w_tma, w_ptr)
            keep = scale != 0
            ref = bookkeeping_wgrad_ref(seen(a[keep]), seen(g[keep]), scale[keep].double())
            ref_abs = bookkeeping_wgrad_ref(seen(a[keep]).abs(), seen(g[keep]).abs(),
                                            scale[keep].double())
            assert_close_signed(w_tma, ref, ref_abs, n_reduce=b * t)


def test_tma_ok_refuses_what_descriptors_cannot_read():
    """TMA only where a tile is a box of a row-major (B·T, n) matrix inside one sample, with
    16-byte aligned start and rows, 16-bit operands, and not switched off."""
    from dpkern.kernels.bookkeeping import BookkeepingConfig, tma_ok
    cfg = BookkeepingConfig(64, 64, 32, 8, 4, 3, tma=True)
    a, g = torch.ones(2, 64, 72, dtype=torch.bfloat16), torch.ones(2, 64, 40, dtype=torch.bfloat16)
    assert tma_ok([a], [g], cfg)
    assert not tma_ok([a], [g], BookkeepingConfig(64, 64, 32, 8, 4, 3, tma=False))
    assert not tma_ok([a], [g], BookkeepingConfig(64, 64, 32, 8, 4, 3))  # auto: no CUDA here
    assert not tma_ok([a[:, :63]], [g[:, :63]], cfg)                   # T not a multiple of 32
    assert not tma_ok([a[:, :, :60].contiguous()], [g], cfg)           # 120-byte rows
    assert not tma_ok([a.transpose(0, 1).contiguous().transpose(0, 1)], [g], cfg)  # samples apart
    assert not tma_ok([a.float()], [g.float()], cfg)
    assert not tma_ok([a], [g.half()], cfg)
    shifted = torch.ones(a.numel() + 1, dtype=torch.bfloat16)[1:].view(a.shape)  # 2-byte offset
    assert not tma_ok([a, shifted], [g, g], cfg)
    assert tma_ok([a[:1]], [g[:1]], cfg)                               # B = 1


@pytest.mark.gpu
def test_hopper_runs_the_1b_shapes_by_tma(monkeypatch):
    """On sm_90+ the engine's bf16 book-keeping of the 1B model's layers takes the TMA form with
    its 128 × 256 tiles (the auto config), and its sum is the pointer form's."""
    if not HAS_GPU or torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("needs a Hopper (sm_90+) GPU")
    import dpkern.kernels.bookkeeping as kb
    seen_cfg = []
    real = kb.tma_ok
    monkeypatch.setattr(kb, "tma_ok", lambda a, g, c: seen_cfg.append((c, real(a, g, c))) or
                        seen_cfg[-1][1])
    torch.manual_seed(3)
    a, g, scale = _inputs((8, 512, 2048, 5632), torch.bfloat16, "cuda")
    by_tma = bookkeeping_wgrad(a, g, scale, backend="triton")
    cfg, ok = seen_cfg[-1]
    assert ok and (cfg.BLOCK_P, cfg.BLOCK_D, cfg.BLOCK_T) == (128, 256, 64)
    by_ptr = torch.empty_like(by_tma)
    kb.bookkeeping_fwd(a, g, scale, by_ptr, False, kb.BookkeepingConfig(128, 256, 64, 8, 8, 3,
                                                                         tma=False))
    assert torch.equal(by_tma, by_ptr)


def test_tma_scratch_allocator_is_set_only_around_the_launch():
    """The descriptors' scratch allocator is set for the launch when none is set, restored after
    (also when the launch raises), and a caller's own allocator is left in place."""
    from triton.runtime import _allocation

    import dpkern.kernels.bookkeeping as kb
    var = _allocation._allocator
    assert isinstance(var.get(), _allocation.NullAllocator)
    with kb._tma_scratch(True):
        assert var.get() is kb._scratch
    assert isinstance(var.get(), _allocation.NullAllocator)
    with pytest.raises(RuntimeError, match="boom"):
        with kb._tma_scratch(True):
            raise RuntimeError("boom")
    assert isinstance(var.get(), _allocation.NullAllocator)
    with kb._tma_scratch(False):
        assert isinstance(var.get(), _allocation.NullAllocator)

    def mine(size, alignment, stream):
        return None
    token = var.set(mine)
    try:
        with kb._tma_scratch(True):
            assert var.get() is mine
    finally:
        var.reset(token)
