"""Philox4x32-10: known answers, bit-identical words/uniforms across backends, z to float rounding,
counters never repeated across steps, tensors or streams."""
import pytest
import torch

import dpkern
from dpkern.noise import NoiseGenerator
from dpkern.noise.reference import philox4x32_10, step_words, uniforms
from dpkern.noise.stream import philox_stream
from tests.conftest import HAS_GPU, kernel_devices

# Random123 kat_vectors for philox4x32 with 10 rounds: (counter, key, expected output).
KAT = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
]


def _backends():
    return ["triton"] + (["cuda"] if dpkern.cuda_available() else [])


@pytest.mark.parametrize("case", range(len(KAT)))
def test_reference_philox_known_answers(case):
    ctr, key, want = KAT[case]
    out = philox4x32_10(*[torch.tensor([c]) for c in ctr], *key)
    assert [int(o) for o in out] == list(want)


@pytest.mark.parametrize("case", range(len(KAT)))
def test_triton_philox_known_answers(case):
    # Counter words (c0, c1) are the group index; (c2, c3) and the key come in as kernel words.
    ctr, key, want = KAT[case]
    as_i32 = lambda x: x - (1 << 32) if x >= 1 << 31 else x  # noqa: E731
    words = {"k0": as_i32(key[0]), "k1": as_i32(key[1]), "c2": as_i32(ctr[2]), "c3": as_i32(ctr[3])}
    x, _ = philox_stream(words, ctr[0] | (ctr[1] << 32), 1, device=kernel_devices()[0],
                         backend="triton")
    assert [int(v) for v in x[0].cpu()] == list(want)


# Group ranges that cross the 32-bit boundary of the group index (c1 changes) and start at 0.
RANGES = [(0, 70), (2**32 - 40, 80), (12345, 257)]


@pytest.mark.parametrize("rng", RANGES, ids=lambda r: f"g{r[0]}+{r[1]}")
@pytest.mark.parametrize("backend", _backends())
def test_words_and_uniforms_bit_identical_across_backends(backend, rng):
    device = "cuda" if backend == "cuda" else kernel_devices()[0]
    gen = NoiseGenerator(secure=False, seed=11)
    words = gen.kernel_words(2**40 + 3)  # exercises the high step word
    x_ref, z_ref = philox_stream(words, *rng, device="cpu", backend="torch")
    x, z = philox_stream(words, *rng, device=device, backend=backend)
    assert torch.equal(x.cpu(), x_ref)
    for a, b in zip(uniforms(x.cpu()), uniforms(x_ref)):
        assert torch.equal(a, b)
    # z: log/sqrt/sin/cos differ by a few ulp between libraries; |z| <= 6.8.
    torch.testing.assert_close(z.cpu(), z_ref, rtol=2e-6, atol=2e-6)


def test_uniforms_range_and_tail():
    x = torch.tensor([0, 1, 2**31, 2**32 - 1], dtype=torch.int64)
    u_r, u_a = uniforms(x)
    assert u_r[0].item() == 2.0**-33 and u_a[0].item() == 0.0  # smallest radius uniform: |z| <= 6.77
    assert (u_r > 0).all() and (u_r <= 1).all() and (u_a <= 1).all()
    assert u_r[1].item() == 2.0**-32 + 2.0**-33  # exact near 0, where the tail comes from


def test_counters_unique_across_steps_tensors_and_streams():
    gen = NoiseGenerator(secure=False, seed=5)
    seen = set()
    for step in (0, 1, 2, 2**32, 2**32 + 1):
        w = gen.kernel_words(step)
        for g in (0, 1, 2**32, 2**32 + 1):  # groups of different tensors / global offsets
            key = (g & 0xFFFFFFFF, g >> 32, w["c2"] & 0xFFFFFFFF, w["c3"] & 0xFFFFFFFF)
            assert key not in seen
            seen.add(key)
    # A different stream tag with the same step is a different counter too.
    assert step_words(5, 0) != step_words(5, 1)
    # Consecutive releases take consecutive steps.
    assert [gen.next_step() for _ in range(3)] == [0, 1, 2]


def test_different_steps_draw_unrelated_noise():
    gen = NoiseGenerator(secure=False, seed=5)
    _, z0 = philox_stream(gen.kernel_words(0), 0, 25_000, backend="torch")
    _, z1 = philox_stream(gen.kernel_words(1), 0, 25_000, backend="torch")
    corr = torch.corrcoef(torch.stack([z0, z1]))[0, 1].item()
    assert abs(corr) < 0.02  # 1e5 pairs: sd of the sample correlation is 0.003


@pytest.mark.gpu
def test_cuda_stream_matches_reference_at_scale():
    if not dpkern.cuda_available():
        pytest.skip("CUDA extension not built")
    gen = NoiseGenerator(secure=False, seed=2)
    words = gen.kernel_words(9)
    x_ref, z_ref = philox_stream(words, 2**31, 1 << 20, device="cuda", backend="torch")
    for be in ("cuda", "triton"):
        x, z = philox_stream(words, 2**31, 1 << 20, device="cuda", backend=be)
        assert torch.equal(x, x_ref), be
        torch.testing.assert_close(z, z_ref, rtol=2e-6, atol=2e-6)


@pytest.mark.skipif(HAS_GPU, reason="CPU-only check of the backend error")
def test_stream_cuda_backend_on_cpu_says_why():
    with pytest.raises((RuntimeError, ValueError), match="cuda"):
        philox_stream(NoiseGenerator(secure=False, seed=0).kernel_words(0), 0, 4, backend="cuda")


@pytest.mark.parametrize("off, n", [(0, 1), (3, 1), (1, 6), (5, 70_000), (2**40 + 3, 131_075),
                                    (7, 0), (4, 65_536)])
def test_range_normals_equal_elementwise_normals(off, n):
    """tensor_normals (one Philox run per counter group, four lanes taken, passes of RANGE_CHUNK)
    is bit for bit the elementwise reference, at offsets inside a group and across pass edges."""
    from dpkern.noise.reference import normals, tensor_normals
    words = NoiseGenerator(secure=False, seed=3).kernel_words(5)
    assert torch.equal(tensor_normals(n, off, words), normals(torch.arange(off, off + n), words))
