"""Launchers: counter-based mechanism noise added in place to a flat gradient buffer.

Every backend computes the same function of (words, global element index), where
words = dpkern.noise.NoiseGenerator.kernel_words(step, stream=...) carries the secret key and the
step (LMO: stream lmo_ref.STREAM_LMO = 1; Gaussian: stream 0). The Triton kernel draws Philox
uniforms in registers; the torch backend evaluates the float64 reference
(dpkern/mechanisms/lmo_ref.py) on the same counters in chunks and adds it in fp32.
"""
from __future__ import annotations

import torch

from dpkern import _alloc
from dpkern.backend import resolve_backend
from dpkern.mechanisms import lmo_ref
from dpkern.mechanisms.lmo_params import LMOParams

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_TORCH_CHUNK = 1 << 20


def _check_buffer(grad, op: str) -> None:
    if not isinstance(grad, torch.Tensor):
        raise TypeError(f"{op}: grad must be a torch.Tensor, got {type(grad).__name__}")
    if grad.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{op}: grad must be float32, float16 or bfloat16, got {grad.dtype}")
    if not grad.is_contiguous():
        raise ValueError(f"{op}: grad must be contiguous (it is treated as a flat buffer)")


def _check_common(words, offset, rounds=None, p=None):
    lmo_ref.check_words(words)
    if isinstance(offset, bool) or not isinstance(offset, int) or offset < 0:
        raise ValueError(f"offset must be an int >= 0, got {offset!r}")
    if p is not None:
        if not isinstance(p, LMOParams):
            raise TypeError(f"params must be LMOParams, got {type(p).__name__}")
        lmo_ref.lmo_blocks(p, rounds)  # validates rounds


def _torch_add_(grad, offset, scale, draw):
    flat = grad.view(-1)
    for s in range(0, flat.numel(), _TORCH_CHUNK):
        part = flat[s:s + _TORCH_CHUNK]
        z = draw(part.numel(), offset + s, part.device)
        part.copy_((part.float() + (scale * z).float()).to(grad.dtype))
    return grad


def lmo_noise_add_(grad: torch.Tensor, params: LMOParams, *, words: dict,
                   clip_norm: float = 1.0, offset: int = 0, rounds: int = lmo_ref.DEFAULT_ROUNDS,
                   backend: str | None = None) -> torch.Tensor:
    """grad[i] += clip_norm * LMO-noise(words, offset + i), in place; returns grad.

    Args:
        grad: contiguous float32/float16/bfloat16 tensor of any shape (a flat buffer of n
            coordinates), e.g. the sum of clipped per-sample gradients. Accumulation in fp32.
        params: the LMO-DP configuration; noise has Laplace scale clip_norm / u per coordinate.
        words: NoiseGenerator.kernel_words(step, stream=STREAM_LMO) (secret key + step); offset:
            the global index of grad's first element, so shards or a multi-tensor walk draw the
            same noise as one buffer.
        rounds: Marsaglia-Tsang candidates (even) when params.k is not 0.5, 1 or 2.
    Example::

        gen = NoiseGenerator()                      # dpkern.noise: secret key + step counter
        words = gen.kernel_words(gen.next_step(), stream=STREAM_LMO)
        lmo_noise_add_(flat_grad_sum, PAPER_DEFAULT, words=words, clip_norm=1.0)
    """
    _check_buffer(grad, "lmo_noise_add_")
    _check_common(words, offset, rounds, params)
    be = resolve_backend(backend, grad.device, op="lmo_noise_add_", implemented=("triton", "torch"),
                         auto_order=("triton",))
    if be == "torch":
        return _torch_add_(grad, offset, float(clip_norm), lambda n, off, dev: lmo_ref.lmo_noise_ref(
            n, params, words=words, offset=off, rounds=rounds, device=dev))
    from dpkern.kernels.lmo_noise import lmo_noise_fwd
    flat = grad.view(-1)
    lmo_noise_fwd(flat, flat, words=words, offset=offset, scale=float(clip_norm),
                  consts=lmo_ref.kernel_constants(params, rounds))
    return grad


def lmo_noise_sample(n: int, params: LMOParams, *, words: dict, offset: int = 0,
                     rounds: int = lmo_ref.DEFAULT_ROUNDS, device="cpu",
                     backend: str | None = None) -> torch.Tensor:
    """(n,) float32 LMO-DP noise (clip norm 1), the same values lmo_noise_add_ adds. For audits
    and tests; training should use lmo_noise_add_ (no noise tensor)."""
    _check_common(words, offset, rounds, params)
    device = torch.device(device)
    be = resolve_backend(backend, device, op="lmo_noise_sample", implemented=("triton", "torch"),
                         auto_order=("triton",))
    if be == "torch":
        return lmo_ref.lmo_noise_ref(n, params, words=words, offset=offset, rounds=rounds,
                                     device=device).float()
    from dpkern.kernels.lmo_noise import lmo_noise_fwd
    out = _alloc.empty(n, dtype=torch.float32, device=device)
    lmo_noise_fwd(out, None, words=words, offset=offset, scale=1.0,
                  consts=lmo_ref.kernel_constants(params, rounds))
    return out


def lmo_noise_from_uniforms(U: torch.Tensor, params: LMOParams, *,
                            rounds: int = lmo_ref.DEFAULT_ROUNDS,
                            backend: str | None = None) -> torch.Tensor:
    """The transform alone: (n, 4 * blocks) uniforms in (0, 1) -> (n,) noise (clip norm 1).

    The triton backend runs the kernel's own device code on the given (fp32) uniforms; the torch
    backend is lmo_ref.lmo_noise_from_uniforms in U's dtype.
    """
    if not isinstance(U, torch.Tensor) or U.dim() != 2:
        raise ValueError("U must be a 2-D tensor (n, 4 * blocks)")
    need = 4 * lmo_ref.lmo_blocks(params, rounds)
    if U.shape[1] != need:
        raise ValueError(f"U must have {need} columns for these params, got {U.shape[1]}")
    be = resolve_backend(backend, U.device, op="lmo_noise_from_uniforms",
                         implemented=("triton", "torch"), auto_order=("triton",))
    if be == "torch":
        return lmo_ref.lmo_noise_from_uniforms(U, params, rounds)
    from dpkern.kernels.lmo_noise import lmo_noise_fwd
    Uc = U.to(torch.float32).contiguous()
    out = _alloc.empty(U.shape[0], dtype=torch.float32, device=U.device)
    lmo_noise_fwd(out, None, words={"k0": 0, "k1": 0, "c2": 0, "c3": 0}, offset=0, scale=1.0,
                  consts=lmo_ref.kernel_constants(params, rounds), uniforms=Uc)
    return out


def gaussian_noise_add_(grad: torch.Tensor, *, std: float, words: dict, offset: int = 0,
                        backend: str | None = None) -> torch.Tensor:
    """grad[i] += std * z(words, offset + i), in place: dpkern.noise's normals (pass stream 0 words),
    without the optimizer update (the baseline the LMO sampler is measured against)."""
    _check_buffer(grad, "gaussian_noise_add_")
    _check_common(words, offset)
    be = resolve_backend(backend, grad.device, op="gaussian_noise_add_",
                         implemented=("triton", "torch"), auto_order=("triton",))
    if be == "torch":
        return _torch_add_(grad, offset, float(std), lambda n, off, dev: lmo_ref.gaussian_noise_ref(
            n, words=words, offset=off, device=dev))
    from dpkern.kernels.lmo_noise import gaussian_noise_fwd
    flat = grad.view(-1)
    gaussian_noise_fwd(flat, flat, words=words, offset=offset, scale=float(std))
    return grad


def gaussian_noise_segments(n: int, offsets, *, std: float, words: dict, device="cpu",
                            backend: str | None = None) -> torch.Tensor:
    """(L, n) float32: row k is std * z(words, offsets[k] + j), j < n, the values
    gaussian_noise_add_ adds to a zero buffer of n elements at global offset offsets[k]; all rows
    in one launch (the projected layers' noise in dpkern.subspace, one segment per layer).

    Example::

        z = gaussian_noise_segments(16, [0, 4096], std=1.0, words=gen.kernel_words(step))
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"n must be an int >= 0, got {n!r}")
    offsets = tuple(offsets)
    for off in offsets:
        _check_common(words, off)
        if off + n >= 2**62:
            raise ValueError(f"offset {off} + n {n} is past the counter space")
    device = torch.device(device)
    be = resolve_backend(backend, device, op="gaussian_noise_segments",
                         implemented=("triton", "torch"), auto_order=("triton",))
    if be == "torch":
        if not offsets or n == 0:
            return torch.zeros(len(offsets), n, dtype=torch.float32, device=device)
        e = (torch.tensor(offsets, dtype=torch.int64)[:, None] + torch.arange(n)).reshape(-1)
        z = lmo_ref.normals(e.to(device), words).double()
        return (float(std) * z).float().view(len(offsets), n)
    from dpkern.kernels.lmo_noise import gaussian_segments_fwd
    out = _alloc.empty(len(offsets), n, dtype=torch.float32, device=device)
    if offsets and n:
        # offsets uploaded once per bases set (cached, pinned): no host-GPU sync per step
        offs = _alloc.device_constants(offsets, device, torch.int64)
        gaussian_segments_fwd(out, offs, words=words, scale=float(std))
    return out
