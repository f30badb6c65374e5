"""embedding_norm_sq / tied_cross_term: every backend against explicit per-sample (V × d) gradients in
float64, with repeated tokens, padding rows, awkward shapes, fp32 and bf16.

Tolerance: the norm is a non-negative sum (tests/tolerance.py's relative policy). The cross term is a
signed sum: its error is bounded by the reduction rtol times ‖E_i‖‖H_i‖ (Cauchy–Schwarz bounds it).
"""
import pytest
import torch

from dpkern.ops._persample import fp32_mode, operand
from dpkern.ops.embedding_norm import embedding_norm_sq, tied_cross_term
from dpkern.reference.persample import (embedding_norm_sq_ref, linear_norm_sq_ref,
                                        persample_embedding_grad_ref, persample_linear_grad_ref,
                                        tied_cross_term_ref)
from tests.conftest import HAS_GPU, kernel_devices
from tests.tolerance import assert_close_reduction, reduction_rtol

DTYPES = [torch.float32, torch.bfloat16]
# (B, T, d, V): small V forces repeated tokens; T=63 / 130 cover partial and several tiles
SHAPES = [(0, 5, 8, 11), (1, 1, 60, 7), (2, 63, 60, 9), (3, 17, 8, 500), (1, 130, 33, 40)]
GPU_SHAPES = SHAPES + [(8, 512, 2048, 32000), (1, 4096, 2048, 32000), (4, 1000, 256, 50)]


def seen(x):
    """An lm_head operand in float64 as the kernels multiply it in its device's default mode (TF32-
    rounded fp32 on a GPU); the embedding's own g is never rounded."""
    return operand(x, fp32_mode(x.device), torch.float64)


def _ids(b, t, vocab, device, dtype=torch.int64):
    return torch.randint(0, vocab, (b, t), device=device, dtype=dtype)


@pytest.mark.parametrize("padding_idx", [None, 0, 3])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", GPU_SHAPES if HAS_GPU else SHAPES,
                         ids=lambda s: "B{}xT{}xd{}xV{}".format(*s))
@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("device", kernel_devices())
def test_embedding_norm_matches_reference(device, backend, shape, dtype, padding_idx):
    torch.manual_seed(hash((shape, str(dtype), padding_idx)) % 2**31)
    b, t, d, vocab = shape
    ids = _ids(b, t, vocab, device)
    if b:
        ids[0, 0] = 3 % vocab  # the padding token occurs at least once
    g = torch.randn(b, t + 1, d, device=device).to(dtype)[:, :t]  # strided token dim
    out = embedding_norm_sq(ids, g, padding_idx=padding_idx, backend=backend)
    assert out.shape == (b,) and out.dtype == torch.float32
    ref = embedding_norm_sq_ref(ids, g.double(), padding_idx)
    assert_close_reduction(out, ref, n_reduce=t * d + t * t)


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_embedding_norm_int32_ids_and_all_padding(backend):
    device = kernel_devices()[0]
    torch.manual_seed(4)
    ids = _ids(2, 40, 6, device, torch.int32)
    ids[1] = 2  # sample 1 is all padding: zero gradient
    g = torch.randn(2, 40, 16, device=device)
    out = embedding_norm_sq(ids, g, padding_idx=2, backend=backend)
    ref = embedding_norm_sq_ref(ids.long(), g.double(), 2)
    assert out[1].item() == 0.0
    assert_close_reduction(out[:1], ref[:1], n_reduce=40 * 16 + 1600)


def _assert_cross_close(out, ids, g_emb, a_head, g_head, padding_idx, n_reduce):
    vocab = g_head.shape[-1]
    e = persample_embedding_grad_ref(ids, g_emb.double(), vocab, padding_idx)
    h = persample_linear_grad_ref(seen(a_head), seen(g_head))
    ref = (e * h).sum(dim=(1, 2))
    bound = e.flatten(1).norm(dim=1) * h.flatten(1).norm(dim=1)
    err = (out.double() - ref).abs()
    assert not torch.isnan(out).any()
    assert (err <= reduction_rtol(n_reduce) * bound + 1e-30).all(), (err, bound)


@pytest.mark.parametrize("padding_idx", [None, 3])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", GPU_SHAPES[:4] if HAS_GPU else SHAPES,
                         ids=lambda s: "B{}xT{}xd{}xV{}".format(*s))
@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("device", kernel_devices())
def test_tied_cross_term_matches_reference(device, backend, shape, dtype, padding_idx):
    torch.manual_seed(hash((shape, str(dtype), padding_idx, "tied")) % 2**31)
    b, t, d, vocab = shape
    s_len = t + 3  # the head may see a different number of positions than the embedding
    ids = _ids(b, t, vocab, device)
    g_emb = torch.randn(b, t, d, device=device).to(dtype)
    a_head = torch.randn(b, d, s_len, device=device).to(dtype).transpose(1, 2)  # strided
    g_head = torch.randn(b, s_len, vocab, device=device).to(dtype)
    out = tied_cross_term(ids, g_emb, a_head, g_head, padding_idx=padding_idx, backend=backend)
    assert out.shape == (b,) and out.dtype == torch.float32
    _assert_cross_close(out, ids, g_emb, a_head, g_head, padding_idx,
                        n_reduce=t * d + t * s_len)


def test_tied_total_norm_identity():
    """‖E + H‖² from the three ops equals the norm of the explicit tied per-sample gradient."""
    device = kernel_devices()[0]
    torch.manual_seed(5)
    b, t, d, vocab = 2, 30, 12, 10
    ids = _ids(b, t, vocab, device)
    g_emb, a_head = torch.randn(b, t, d, device=device), torch.randn(b, t, d, device=device)
    g_head = torch.randn(b, t, vocab, device=device)
    from dpkern.ops.linear_norm import linear_norm_sq
    total = (embedding_norm_sq(ids, g_emb, backend="triton")
             + linear_norm_sq(a_head, g_head, backend="triton")
             + 2 * tied_cross_term(ids, g_emb, a_head, g_head, backend="triton"))
    explicit = (persample_embedding_grad_ref(ids, g_emb.double(), vocab)
                + persample_linear_grad_ref(seen(a_head), seen(g_head)))
    assert_close_reduction(total, explicit.square().sum(dim=(1, 2)), n_reduce=4 * t * (d + t))
    assert torch.allclose(tied_cross_term_ref(ids, g_emb.double(), seen(a_head), seen(g_head)),
                          0.5 * (explicit.square().sum(dim=(1, 2))
                                 - embedding_norm_sq_ref(ids, g_emb.double())
                                 - linear_norm_sq_ref(seen(a_head), seen(g_head))))


@pytest.mark.parametrize("call,err,match", [
    (lambda: embedding_norm_sq(torch.ones(2, 3), torch.ones(2, 3, 4)), TypeError, "ids must be one of"),
    (lambda: embedding_norm_sq(torch.ones(2, 3, dtype=torch.long), torch.ones(2, 4, 4)), ValueError,
     "batch and sequence sizes"),
    (lambda: embedding_norm_sq(torch.ones(2, 3, dtype=torch.long), torch.ones(2, 3, 4), padding_idx=-1),
     ValueError, "padding_idx"),
    (lambda: tied_cross_term(torch.ones(2, 3, dtype=torch.long), torch.ones(2, 3, 4),
                             torch.ones(2, 5, 6), torch.ones(2, 5, 9)), ValueError, "hidden sizes"),
    (lambda: tied_cross_term(torch.ones(2, 3, dtype=torch.long), torch.ones(2, 3, 4),
                             torch.ones(2, 5, 4), torch.ones(2, 6, 9)), ValueError, "a_head and g_head"),
])
def test_embedding_ops_reject_bad_input(call, err, match):
    with pytest.raises(err, match=match):
        call()
