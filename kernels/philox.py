"""Philox4x32-10 and Box–Muller as Triton device functions, shared by every dpkern sampler.

Counter layout (the contract with csrc/include/dpkern/philox.cuh and dpkern/noise/reference.py;
derivation and tail accuracy in dpkern/noise/README.md):

    secret (128 bits) = s0, s1, s2, s3 (little-endian uint32 words of the 16 key bytes)
    Philox key        = (s0, s1)
    counter           = (c0, c1, c2, c3) = (lo32(g), hi32(g), lo32(step) ^ s2, ((stream << 24) | hi24(step)) ^ s3)
    g = e >> 2        the group of 4 consecutive *global* element indices e = 4g .. 4g+3
    step              the generator's counter step (< 2**56), one per released noisy step
    stream            8-bit domain tag: 0 = Gaussian optimizer noise; other samplers take their own

One call gives 4 uint32 words x0..x3 and 4 normals (Box–Muller on the pairs (x0, x1) and (x2, x3)):

    u_r(x) = float32(x) * 2**-32 + 2**-33   in (0, 1]   (radius uniform; the product is exact)
    u_a(x) = float32(x) * 2**-32            in [0, 1]   (angle uniform)
    z0, z1 = r01 * cos(t01), r01 * sin(t01)  with r01 = sqrt(-2 ln u_r(x0)), t01 = 2pi * u_a(x1)
    z2, z3 = r23 * cos(t23), r23 * sin(t23)  with r23 = sqrt(-2 ln u_r(x2)), t23 = 2pi * u_a(x3)

Element e takes z_{e & 3} of group e >> 2. The uniforms are bit-identical in every backend; z agrees
to float rounding (log/sin/cos differ by a few ulp between libraries).
"""
import triton
import triton.language as tl

PHILOX_M0 = tl.constexpr(0xD2511F53)
PHILOX_M1 = tl.constexpr(0xCD9E8D57)
PHILOX_W0 = tl.constexpr(0x9E3779B9)
PHILOX_W1 = tl.constexpr(0xBB67AE85)
TWO_NEG32 = tl.constexpr(2.3283064365386963e-10)  # 2**-32
TWO_NEG33 = tl.constexpr(1.1641532182693481e-10)  # 2**-33
TWO_PI = tl.constexpr(6.2831854820251465)  # float32(2 pi)


@triton.jit
def philox4x32_10(c0, c1, c2, c3, k0, k1):
    """Philox4x32 with 10 rounds (Salmon et al. 2011). c*: uint32 blocks; k0, k1: uint32 scalars.

    Returns (x0, x1, x2, x3), uint32 blocks of c0's shape. Matches Random123's known answers.
    """
    c0 = c0.to(tl.uint32)
    c1 = c1.to(tl.uint32)
    c2 = c2.to(tl.uint32)
    c3 = c3.to(tl.uint32)
    k0 = k0.to(tl.uint32)
    k1 = k1.to(tl.uint32)
    for _ in tl.static_range(10):
        a0 = c0
        a2 = c2
        c0 = tl.umulhi(PHILOX_M1, a2) ^ c1 ^ k0
        c2 = tl.umulhi(PHILOX_M0, a0) ^ c3 ^ k1
        c1 = PHILOX_M1 * a2
        c3 = PHILOX_M0 * a0
        k0 = k0 + PHILOX_W0
        k1 = k1 + PHILOX_W1
    return c0, c1, c2, c3


@triton.jit
def counter_words(g, c2, c3):
    """Counter blocks for group indices g (int64 block) and the whitened step words c2, c3 (scalars:
    c2 = lo32(step) ^ s2, c3 = ((stream << 24) | hi24(step)) ^ s3, computed once on the host)."""
    c0 = (g & 0xFFFFFFFF).to(tl.uint32)
    c1 = ((g >> 32) & 0xFFFFFFFF).to(tl.uint32)
    zero = tl.zeros_like(c0)
    return c0, c1, c2.to(tl.uint32) + zero, c3.to(tl.uint32) + zero


@triton.jit
def uniforms(x):
    """uint32 block -> (u_r, u_a): radius uniform in (0, 1] and angle uniform in [0, 1], float32."""
    xf = x.to(tl.float32)
    return xf * TWO_NEG32 + TWO_NEG33, xf * TWO_NEG32


@triton.jit
def box_muller(x_r, x_a):
    """Two uint32 blocks -> two N(0, 1) float32 blocks (r cos t, r sin t)."""
    u_r, _ = uniforms(x_r)
    _, u_a = uniforms(x_a)
    r = tl.sqrt(-2.0 * tl.log(u_r))
    t = u_a * TWO_PI
    return r * tl.cos(t), r * tl.sin(t)


@triton.jit
def normals(e, k0, k1, c2, c3):
    """N(0, 1) for global element indices e (int64 block), one Philox call per element's group.

    k0, k1: Philox key (s0, s1); c2, c3: whitened step words (see `counter_words`). All four are
    scalars; pass them as int32 bit patterns (the host's dpkern.noise.keys.kernel_words does).

    Each element evaluates its own group (4x the arithmetic of `normals4`); use it where elements
    are not laid out in whole groups. Returns a float32 block of e's shape.
    """
    g = e >> 2
    lane = e & 3
    c0, c1, c2, c3 = counter_words(g, c2, c3)
    x0, x1, x2, x3 = philox4x32_10(c0, c1, c2, c3, k0, k1)
    xr = tl.where(lane < 2, x0, x2)
    xa = tl.where(lane < 2, x1, x3)
    zc, zs = box_muller(xr, xa)
    return tl.where((lane & 1) == 0, zc, zs)


@triton.jit
def normals4(g, k0, k1, c2, c3):
    """N(0, 1) for whole groups g (int64 block [BG]) -> float32 block [BG * 4], element 4g + l at 4i + l."""
    c0, c1, c2, c3 = counter_words(g, c2, c3)
    x0, x1, x2, x3 = philox4x32_10(c0, c1, c2, c3, k0, k1)
    z0, z1 = box_muller(x0, x1)
    z2, z3 = box_muller(x2, x3)
    # join(join(z0, z2), join(z1, z3))[i, a, b] = z_{2a + b}; flattening puts it at 4i + 2a + b.
    z = tl.join(tl.join(z0, z2), tl.join(z1, z3))  # [BG, 2, 2]
    return tl.reshape(z, [g.shape[0] * 4])


@triton.jit(do_not_specialize=["first_group", "n_groups", "k0", "k1", "c2", "c3"])
def _philox_stream_kernel(words_ptr, z_ptr, first_group, n_groups, k0, k1, c2, c3,
                          BLOCK_G: tl.constexpr):
    """Raw Philox words [n_groups, 4] (as int64) and normals [n_groups * 4] of consecutive groups."""
    pid = tl.program_id(0).to(tl.int64)
    o_i = pid * BLOCK_G + tl.arange(0, BLOCK_G).to(tl.int64)  # [BG]
    m_i = o_i < n_groups
    c0, c1, cc2, cc3 = counter_words(first_group + o_i, c2, c3)
    x0, x1, x2, x3 = philox4x32_10(c0, c1, cc2, cc3, k0, k1)
    tl.store(words_ptr + 4 * o_i, x0.to(tl.int64), mask=m_i)
    tl.store(words_ptr + 4 * o_i + 1, x1.to(tl.int64), mask=m_i)
    tl.store(words_ptr + 4 * o_i + 2, x2.to(tl.int64), mask=m_i)
    tl.store(words_ptr + 4 * o_i + 3, x3.to(tl.int64), mask=m_i)
    b_z = normals4(first_group + o_i, k0, k1, c2, c3)  # [4 BG]
    o_e = pid * (4 * BLOCK_G) + tl.arange(0, 4 * BLOCK_G).to(tl.int64)
    tl.store(z_ptr + o_e, b_z, mask=o_e < 4 * n_groups)


def philox_stream(words_out, z_out, first_group: int, n_groups: int, kw: dict, block_g: int = 256):
    """Launch `_philox_stream_kernel`; words_out int64 [n_groups, 4], z_out float32 [4 n_groups]."""
    if n_groups == 0:
        return
    _philox_stream_kernel[(triton.cdiv(n_groups, block_g),)](
        words_ptr=words_out, z_ptr=z_out, first_group=first_group, n_groups=n_groups,
        BLOCK_G=block_g, **kw)
