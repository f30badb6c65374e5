"""fused_noisy_step: mechanism noise (Gaussian, or LMO-DP) + SGD/AdamW update for a list of tensors,
in one pass per backend. fused_noisy_release_: the same noise written into the gradients instead
(for post-processing between release and update; a noise-free fused_noisy_step then updates).

Validation happens before anything is reserved or written: a refused call leaves every tensor and
the noise counter as they were.
"""
from __future__ import annotations

import functools
import math
from collections import OrderedDict
from dataclasses import dataclass

import torch

from dpkern._ext import require_cuda_ext
from dpkern.backend import resolve_backend
from dpkern.noise.keys import NoiseGenerator
from dpkern.noise.reference import (RANGE_CHUNK, noisy_grad_ref, noisy_update_ref,
                                    tensor_normals)

_PARAM_DTYPES = (torch.float32, torch.bfloat16)
_DTYPE_CODE = {torch.float32: 0, torch.bfloat16: 2}  # DpkDType
_OPT_SGD, _OPT_SGD_MOMENTUM, _OPT_ADAMW, _OPT_RELEASE = 0, 1, 2, 3  # DpkOptimizer
_MAX_COUNTER = 1 << 63  # LMO-DP's Philox call index e * n_blocks + j must not wrap (int64)


@dataclass(frozen=True)
class SGDHyper:
    """torch.optim.SGD's hyperparameters (weight decay coupled: added to the noisy gradient)."""
    lr: float
    momentum: float = 0.0
    dampening: float = 0.0
    nesterov: bool = False
    weight_decay: float = 0.0


@dataclass(frozen=True)
class AdamWHyper:
    """torch.optim.AdamW's hyperparameters (decoupled weight decay, bias correction)."""
    lr: float
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    weight_decay: float = 0.01


def _check_hyper(hyper) -> None:
    if isinstance(hyper, SGDHyper):
        if hyper.nesterov and (hyper.momentum <= 0 or hyper.dampening != 0):
            raise ValueError("hyper: Nesterov momentum needs momentum > 0 and dampening = 0")
        vals = {"lr": hyper.lr, "momentum": hyper.momentum, "dampening": hyper.dampening,
                "weight_decay": hyper.weight_decay}
    elif isinstance(hyper, AdamWHyper):
        if not (0 <= hyper.beta1 < 1 and 0 <= hyper.beta2 < 1):
            raise ValueError(f"hyper: betas must be in [0, 1), got ({hyper.beta1}, {hyper.beta2})")
        vals = {"lr": hyper.lr, "eps": hyper.eps, "weight_decay": hyper.weight_decay}
    else:
        raise TypeError(f"hyper must be SGDHyper or AdamWHyper, got {type(hyper).__name__}")
    for k, v in vals.items():
        if not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
            raise ValueError(f"hyper.{k} must be a finite number >= 0, got {v!r}")


def _dtype_names(dtypes) -> str:
    return " or ".join(str(d).removeprefix("torch.") for d in dtypes)


def _check_list(name, xs, params, dtypes):
    if not isinstance(xs, (list, tuple)) or len(xs) != len(params):
        n = len(xs) if isinstance(xs, (list, tuple)) else type(xs).__name__
        raise ValueError(f"{name} must be a list of {len(params)} tensors (one per param), got {n}")
    for i, (x, p) in enumerate(zip(xs, params)):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name}[{i}] must be a torch.Tensor, got {type(x).__name__}")
        if x.shape != p.shape:
            raise ValueError(f"{name}[{i}] has shape {tuple(x.shape)}, params[{i}] has {tuple(p.shape)}")
        if x.dtype not in dtypes:
            raise TypeError(f"{name}[{i}] must be {_dtype_names(dtypes)}, got {x.dtype}")
        if x.device != p.device:
            raise ValueError(f"{name}[{i}] is on {x.device}, params[{i}] on {p.device}")
        if not x.is_contiguous():
            raise ValueError(f"{name}[{i}] must be contiguous")


def _check_tensors(name, xs, dtypes) -> None:
    """xs: a non-empty list of contiguous tensors of `dtypes`, all on one device."""
    if not isinstance(xs, (list, tuple)) or len(xs) == 0:
        raise ValueError(f"{name} must be a non-empty list of tensors")
    dev = None
    for i, x in enumerate(xs):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name}[{i}] must be a torch.Tensor, got {type(x).__name__}")
        if x.dtype not in dtypes:
            raise TypeError(f"{name}[{i}] must be {_dtype_names(dtypes)}, got {x.dtype}")
        if not x.is_contiguous():
            raise ValueError(f"{name}[{i}] must be contiguous")
        dev = dev or x.device
        if x.device != dev:
            raise ValueError(f"{name}[{i}] is on {x.device}, {name}[0] on {dev}: one device per call")


def _global_offsets(tensors, global_offsets) -> list:
    """The global index of each tensor's element 0 (default: laid end to end), checked."""
    if global_offsets is None:
        offs, o = [], 0
        for p in tensors:
            offs.append(o)
            o += p.numel()
        return offs
    if len(global_offsets) != len(tensors):
        raise ValueError(f"global_offsets must have {len(tensors)} entries, got {len(global_offsets)}")
    spans = []
    for i, (o, p) in enumerate(zip(global_offsets, tensors)):
        if not isinstance(o, int) or isinstance(o, bool) or o < 0 or o + p.numel() > 1 << 62:
            raise ValueError(f"global_offsets[{i}] must be an int in [0, 2**62 - numel), got {o!r}")
        spans.append((o, o + p.numel(), i))
    spans.sort()
    for (a0, a1, i), (b0, b1, j) in zip(spans, spans[1:]):
        if b0 < a1 and b1 > b0 and a1 > a0:
            raise ValueError(f"global_offsets: params[{i}] and params[{j}] overlap in the global index "
                             "space; they would draw the same noise")
    return list(global_offsets)


def validate(params, grads, exp_avgs, exp_avg_sqs, hyper, global_offsets):
    """Checks every argument; returns the global offsets (default: params laid end to end)."""
    _check_tensors("params", params, _PARAM_DTYPES)
    _check_hyper(hyper)
    _check_list("grads", grads, params, _PARAM_DTYPES)
    if isinstance(hyper, AdamWHyper) or (isinstance(hyper, SGDHyper) and hyper.momentum != 0):
        _check_list("exp_avgs", exp_avgs, params, (torch.float32,))
    if isinstance(hyper, AdamWHyper):
        _check_list("exp_avg_sqs", exp_avg_sqs, params, (torch.float32,))
    return _global_offsets(params, global_offsets)


def update_scalars(hyper, t: int) -> dict:
    """The optimizer rule's float arguments of the fused kernels (this noise step and the subspace
    back-projection): SGDHyper, or an Adam rule (AdamWHyper, dpkern.subspace's AdamHyper) at step t."""
    s = dict(lr=float(hyper.lr), weight_decay=float(hyper.weight_decay), decay=1.0, momentum=0.0,
             one_minus_damp=1.0, beta1=0.0, beta2=0.0, one_minus_beta1=1.0, one_minus_beta2=1.0,
             eps=1.0, step_size=0.0, inv_sqrt_bc2=1.0)
    if isinstance(hyper, SGDHyper):
        if hyper.momentum != 0:
            s.update(momentum=hyper.momentum, one_minus_damp=1.0 - hyper.dampening)
        return s
    # 1 - beta here, in double (as torch.optim): in fp32 on the device, 1 - float(0.999) would be
    # 1.3e-5 (relative) away from 0.001.
    s.update(decay=1.0 - hyper.lr * hyper.weight_decay, beta1=hyper.beta1, beta2=hyper.beta2,
             one_minus_beta1=1.0 - hyper.beta1, one_minus_beta2=1.0 - hyper.beta2,
             eps=hyper.eps, step_size=hyper.lr / (1.0 - hyper.beta1**t),
             inv_sqrt_bc2=1.0 / math.sqrt(1.0 - hyper.beta2**t))
    return s


def new_step_tensors(t: int, olds: list) -> list:
    """New 0-dim "step" states of value t, one per entry of `olds` (the previous step tensors,
    whose dtype and device each new one keeps; anything else gives a float32 CPU one, as
    torch.optim keeps them). Made with one op per (dtype, device): they are elements of one
    buffer, and still one tensor per parameter (torch's optimizers increment them in place)."""
    out: list = [None] * len(olds)
    groups: dict = {}
    cpu32 = (torch.float32, torch.device("cpu"))
    for i, old in enumerate(olds):
        groups.setdefault((old.dtype, old.device) if isinstance(old, torch.Tensor) else cpu32,
                          []).append(i)
    for (dtype, device), idx in groups.items():
        for i, x in zip(idx, torch.full((len(idx),), float(t), dtype=dtype,
                                        device=device).unbind(0)):
            out[i] = x
    return out


def kernel_scalars(hyper, *, noise_std: float, inv_b: float, t: int) -> tuple[dict, int, bool]:
    """The float arguments shared by the Triton and CUDA kernels, the optimizer code, Nesterov flag."""
    s = dict(noise_std=float(noise_std), inv_b=float(inv_b), **update_scalars(hyper, t))
    if isinstance(hyper, AdamWHyper):
        return s, _OPT_ADAMW, False
    if hyper.momentum != 0:
        return s, _OPT_SGD_MOMENTUM, bool(hyper.nesterov)
    return s, _OPT_SGD, False


def check_mechanism(mechanism, noise_std, params, offsets):
    """None (Gaussian noise of std noise_std) or the LMO-DP sampler's kernel constants
    (lmo_ref.kernel_constants) of an LMOMechanism, whose clip_norm scales its noise."""
    if mechanism is None:
        if not (isinstance(noise_std, (int, float)) and math.isfinite(noise_std) and noise_std >= 0):
            raise ValueError(f"noise_std must be a finite number >= 0, got {noise_std!r}")
        return None
    from dpkern.mechanisms import lmo_ref
    from dpkern.mechanisms.lmo import LMOMechanism
    if not isinstance(mechanism, LMOMechanism):
        raise TypeError("mechanism must be None (Gaussian noise of std noise_std) or a "
                        f"dpkern.mechanisms.LMOMechanism, got {type(mechanism).__name__}")
    if noise_std is not None:
        raise ValueError("noise_std must be None with an LMO-DP mechanism: its noise is "
                         f"Laplace(0, C / u) with C = mechanism.clip_norm, got noise_std={noise_std!r}")
    consts = lmo_ref.kernel_constants(mechanism.params, mechanism.rounds)
    end = max(o + p.numel() for o, p in zip(offsets, params))
    if end * consts["n_blocks"] > _MAX_COUNTER:
        raise ValueError(f"global_offsets: element {end - 1} times {consts['n_blocks']} Philox calls "
                         "per coordinate passes 2**63; LMO-DP counters would wrap and repeat")
    return consts


def fused_noisy_step(params, grads, exp_avgs=None, exp_avg_sqs=None, *, hyper,
                     noise_std: float | None = None, expected_batch_size: float,
                     noise: NoiseGenerator, t: int = 1, counter_step: int | None = None,
                     global_offsets=None, mechanism=None, backend: str | None = None) -> int:
    """In place, for every i: p_i <- update(p_i, (g_i + noise_std * z_i) / expected_batch_size).

    Args:
        params: list of contiguous float32 / bfloat16 tensors on one device (updated in place).
        grads: clipped gradient sums, same shapes, float32 / bfloat16 (any mix with params).
        exp_avgs: fp32 states (SGD momentum buffer, AdamW m), same shapes; unused for plain SGD.
        exp_avg_sqs: fp32 AdamW v, same shapes.
        hyper: SGDHyper | AdamWHyper.
        noise_std: sigma * C (>= 0; 0 runs the fused update, drawing no z); None with an LMO
            mechanism.
        expected_batch_size: B_expected (public), > 0; the update divides by it.
        noise: the NoiseGenerator (key + counter).
        t: optimizer step, 1-based (AdamW bias correction; SGD: t == 1 initialises momentum).
        counter_step: the noise counter step to use (default: noise.next_step()); a caller
            releasing several groups in one logical step reserves one step and passes it to each.
        global_offsets: global index of each tensor's element 0 (default: laid end to end);
            a shard passes its own offsets so z matches the unsharded model.
        mechanism: None (z ~ N(0, 1), Philox stream 0) or a dpkern.mechanisms.LMOMechanism:
            z = its noise of clip norm 1, Laplace(0, 1/u) per coordinate (stream 1, the counter
            layout of lmo_ref; the same values its add_noise_ adds), scaled by mechanism.clip_norm
            in place of noise_std.
        backend: "auto" | "cuda" | "triton" | "torch".
    Returns: the counter step used.

    Example (LMO-DP noise, AdamW)::

        mech = LMOMechanism(PAPER_DEFAULT, clip_norm=1.0, accounting="certified")
        fused_noisy_step(params, grad_sums, ms, vs, hyper=AdamWHyper(lr=1e-4),
                         expected_batch_size=1024, noise=gen, t=t, mechanism=mech)
    """
    offs = validate(params, grads, exp_avgs, exp_avg_sqs, hyper, global_offsets)
    lmo, noise_std = _check_noise(noise, noise_std, mechanism, expected_batch_size, params, offs)
    if not isinstance(t, int) or t < 1:
        raise ValueError(f"t (optimizer step) must be an int >= 1, got {t!r}")
    be = resolve_backend(backend, params[0].device, op="fused_noisy_step",
                         auto_order=("cuda", "triton"))
    scalars, opt, nesterov = kernel_scalars(hyper, noise_std=noise_std,
                                            inv_b=1.0 / expected_batch_size, t=t)
    first = opt == _OPT_SGD_MOMENTUM and t == 1
    step = noise.next_step() if counter_step is None else counter_step
    words = noise.kernel_words(step, stream=0 if lmo is None else mechanism.stream)
    ms = exp_avgs if opt != _OPT_SGD else [None] * len(params)
    vs = exp_avg_sqs if opt == _OPT_ADAMW else [None] * len(params)
    if be == "torch":
        _run_torch(params, grads, ms, vs, offs, hyper, scalars, opt, first, t, words,
                   _torch_draw(mechanism))
    else:
        _launch_kernels(be, params, grads, ms, vs, offs, scalars, opt, nesterov, first, words, lmo)
    return step


def fused_noisy_release_(grads, *, noise_std: float | None = None, expected_batch_size: float,
                         noise: NoiseGenerator, counter_step: int | None = None,
                         global_offsets=None, mechanism=None, backend: str | None = None) -> int:
    """In place, for every i: g_i <- (g_i + noise_std * z_i) / expected_batch_size: the noisy
    release of fused_noisy_step written into the gradients, for post-processing (e.g. RMT
    denoising) between release and update. One launch per call on CUDA (all tensors).

    z_i are the values fused_noisy_step draws for the same counter step, global offsets and
    mechanism, and the noisy gradient is rounded as its kernels round it (per backend), so

        fused_noisy_release_(gs, noise_std=s, expected_batch_size=B, counter_step=k, ...)
        fused_noisy_step(ps, gs, ..., noise_std=0.0, expected_batch_size=1, counter_step=k)

    leaves ps and the states bit-identical to fused_noisy_step(ps, gs, ..., noise_std=s,
    expected_batch_size=B, counter_step=k) on the original gs (noise_std = 0 draws no z).

    Args:
        grads: list of contiguous float32 tensors on one device (the clipped gradient sums),
            overwritten with the noisy averaged gradients.
        noise_std, expected_batch_size, noise, counter_step, global_offsets, mechanism, backend:
            as fused_noisy_step (global offsets are those of the parameters the grads belong to).
    Returns: the counter step used.

    Example (one counter step for release and update; `denoise` edits gs in place)::

        k = gen.next_step()
        fused_noisy_release_(gs, noise_std=sigma * C, expected_batch_size=B, noise=gen,
                             counter_step=k)
        denoise(gs)
        fused_noisy_step(ps, gs, ms, vs, hyper=AdamWHyper(lr=1e-4), noise_std=0.0,
                         expected_batch_size=1, noise=gen, t=t, counter_step=k)
    """
    _check_tensors("grads", grads, (torch.float32,))
    offs = _global_offsets(grads, global_offsets)
    lmo, noise_std = _check_noise(noise, noise_std, mechanism, expected_batch_size, grads, offs)
    be = resolve_backend(backend, grads[0].device, op="fused_noisy_release_",
                         auto_order=("cuda", "triton"))
    # The update's scalars ride along unused (one argument set for every optimizer code).
    scalars, _, _ = kernel_scalars(SGDHyper(lr=0.0), noise_std=noise_std,
                                   inv_b=1.0 / expected_batch_size, t=1)
    step = noise.next_step() if counter_step is None else counter_step
    words = noise.kernel_words(step, stream=0 if lmo is None else mechanism.stream)
    if be == "torch":
        draw = _torch_draw(mechanism)
        for g, o in zip(grads, offs):
            z = draw(g.numel(), o, words, device=g.device).view(g.shape) if noise_std else None
            g.copy_(noisy_grad_ref(g, z, noise_std=scalars["noise_std"], inv_b=scalars["inv_b"]))
    else:
        none = [None] * len(grads)
        _launch_kernels(be, none, grads, none, none, offs, scalars, _OPT_RELEASE, False, False,
                        words, lmo)
    return step


def _check_noise(noise, noise_std, mechanism, expected_batch_size, tensors, offs):
    """The noise arguments of fused_noisy_step / fused_noisy_release_: returns the LMO-DP kernel
    constants (None: Gaussian) and the scale of z (noise_std, or the mechanism's clip norm)."""
    if not isinstance(noise, NoiseGenerator):
        raise TypeError(f"noise must be a NoiseGenerator, got {type(noise).__name__}")
    lmo = check_mechanism(mechanism, noise_std, tensors, offs)
    if lmo is not None:
        noise_std = mechanism.clip_norm
    if not (isinstance(expected_batch_size, (int, float)) and math.isfinite(expected_batch_size)
            and expected_batch_size > 0):
        raise ValueError(f"expected_batch_size must be > 0, got {expected_batch_size!r}")
    return lmo, noise_std


def _launch_kernels(be, params, grads, ms, vs, offs, scalars, opt, nesterov, first, words, lmo):
    """The CUDA kernel (one launch per dtype group) or its Triton twin (one per tensor); params,
    ms, vs hold None where the optimizer code does not touch them (the release: all of them)."""
    if be == "cuda":
        _launch_cuda(params, grads, ms, vs, offs, scalars, opt, nesterov, first, words, lmo)
        return
    from dpkern.kernels.noise_step import noise_step_launch
    scal = dict(scalars, **words)
    for p, g, m, v, o in zip(params, grads, ms, vs, offs):
        noise_step_launch(p, g, m, v, global_offset=o, scalars=scal, opt=opt, nesterov=nesterov,
                          first=first, lmo=lmo)


def _torch_draw(mechanism):
    """z(numel, global_offset, words, device) of the torch backend for this mechanism."""
    return tensor_normals if mechanism is None else _lmo_draw(mechanism)


def _lmo_draw(mechanism):
    """z for the torch backend: the float64 reference sampler (lmo_ref) in passes of RANGE_CHUNK
    elements (its uniforms are (n, 4 * n_blocks) float64), rounded once to fp32."""
    from dpkern.mechanisms import lmo_ref

    def draw(numel, global_offset, words, device="cpu"):
        out = torch.empty(numel, dtype=torch.float32, device=device)
        for s in range(0, numel, RANGE_CHUNK):
            n = min(RANGE_CHUNK, numel - s)
            out[s:s + n] = lmo_ref.lmo_noise_ref(n, mechanism.params, words=words,
                                                 offset=global_offset + s,
                                                 rounds=mechanism.rounds, device=device)
        return out
    return draw


def _run_torch(params, grads, ms, vs, offs, hyper, scalars, opt, first, t, words, draw):
    name = "adamw" if opt == _OPT_ADAMW else "sgd"
    hd = {"lr": hyper.lr, "weight_decay": hyper.weight_decay, "first": first, "step": t}
    if opt == _OPT_ADAMW:
        hd.update(beta1=hyper.beta1, beta2=hyper.beta2, eps=hyper.eps)
    elif opt == _OPT_SGD_MOMENTUM:
        hd.update(momentum=hyper.momentum, dampening=hyper.dampening, nesterov=hyper.nesterov)
    for p, g, m, v, o in zip(params, grads, ms, vs, offs):
        if p.numel() == 0:
            continue
        z = draw(p.numel(), o, words, device=p.device).view(p.shape) \
            if scalars["noise_std"] else None  # noise_std 0: no z, as the kernels
        p_new, m_new, v_new = noisy_update_ref(p, g, z, m, v, optimizer=name, hyper=hd,
                                               noise_std=scalars["noise_std"],
                                               inv_b=scalars["inv_b"])
        p.copy_(p_new)
        if m_new is not None:
            m.copy_(m_new)
        if v_new is not None:
            v.copy_(v_new)


# Descriptor tables: one row per tensor, [param, grad, m, v, numel, offset, first chunk, vec_ok]
# (DpkNoiseTensor). Everything but the gradient pointers stays fixed across steps; the clipped
# gradient sums are new tensors each step, so their column is refreshed in place.
_DESC_CACHE: OrderedDict = OrderedDict()
_DESC_CACHE_SIZE = 16


def _vec_ok(pp: int, gp: int, mp: int, vp: int, o: int) -> int:
    return int(o % 8 == 0 and all(x % 16 == 0 for x in (pp, gp, mp, vp)))


class _Desc:
    """One tensor list's tables on the device, and two pinned host copies of the descriptor used
    in turn: a host copy is rewritten only once the copy that last read it has run (its event),
    so a refresh never waits for the GPU's queue and never races a copy in flight."""

    def __init__(self, ext, static: tuple, grad_ptrs: tuple, device):
        octets = ext.NOISE_CHUNK_OCTETS
        rows, chunks, begin = [], [], 0
        for (pp, mp, vp, n, o), gp in zip(static, grad_ptrs):
            n_chunk = -(-((o + n + 7) // 8 - o // 8) // octets)
            rows.append([pp, gp, mp, vp, n, o, begin, _vec_ok(pp, gp, mp, vp, o)])
            chunks.append(n_chunk)
            begin += n_chunk
        host = torch.tensor(rows, dtype=torch.int64).reshape(len(rows), 8)
        # Pinned host copies + non_blocking: a pageable host-to-device copy would block the host
        # until the GPU drained its queue (a hidden sync per step).
        self.hosts = [host.pin_memory(), host.pin_memory()]
        table_h = torch.repeat_interleave(torch.arange(len(rows), dtype=torch.int32),
                                          torch.tensor(chunks, dtype=torch.int64)).pin_memory()
        self.desc = self.hosts[0].to(device, non_blocking=True)
        self.table = table_h.to(device, non_blocking=True)
        self.events = [torch.cuda.Event(), None]
        self.events[0].record()
        self.turn, self.n_tensors, self.n_chunks = 0, len(rows), begin
        self.static, self.grad_ptrs = static, grad_ptrs

    def refresh(self, grad_ptrs: tuple) -> None:
        turn = 1 - self.turn
        ev = self.events[turn]
        if ev is not None and not ev.query():  # that host copy's last upload (a step ago) runs
            ev.synchronize()
        host = self.hosts[turn]
        host[:, 1] = torch.tensor(grad_ptrs, dtype=torch.int64)
        host[:, 7] = torch.tensor([_vec_ok(pp, gp, mp, vp, o) for (pp, mp, vp, _, o), gp
                                   in zip(self.static, grad_ptrs)], dtype=torch.int64)
        self.desc.copy_(host, non_blocking=True)
        ev = self.events[turn] = torch.cuda.Event()
        ev.record()
        self.turn, self.grad_ptrs = turn, grad_ptrs


def _descriptors(ext, params, grads, ms, vs, offs, stream: int = 0):
    """(desc, table, n_tensors, n_chunks) for the kernel, on grads[0]'s device. Tables are per
    stream: a refresh is ordered after the previous step's kernel by running on its stream. A
    None in params, ms, vs is a null pointer (the release's tables: only the gradient column,
    refreshed each step, so they stay cached)."""
    ptr = lambda x: 0 if x is None else x.data_ptr()  # noqa: E731
    live = [i for i, g in enumerate(grads) if g.numel() > 0]
    static = tuple((ptr(params[i]), ptr(ms[i]), ptr(vs[i]), grads[i].numel(), offs[i])
                   for i in live)
    grad_ptrs = tuple(grads[i].data_ptr() for i in live)
    key = (grads[0].device, stream, static)
    entry = _DESC_CACHE.get(key)
    if entry is None:
        entry = _DESC_CACHE[key] = _Desc(ext, static, grad_ptrs, grads[0].device)
        while len(_DESC_CACHE) > _DESC_CACHE_SIZE:
            _DESC_CACHE.popitem(last=False)
    else:
        _DESC_CACHE.move_to_end(key)
        if entry.grad_ptrs != grad_ptrs:
            entry.refresh(grad_ptrs)
    return entry.desc, entry.table, entry.n_tensors, entry.n_chunks


def _launch_cuda(params, grads, ms, vs, offs, scalars, opt, nesterov, first, words, lmo=None):
    ext = require_cuda_ext()
    # Gaussian: ext.noisy_step, unchanged. LMO-DP: ext.noisy_step_lmo, the same arguments and the
    # sampler's constants (DpkLmoNoise).
    launch = ext.noisy_step if lmo is None else functools.partial(ext.noisy_step_lmo, **lmo)
    groups: dict = {}
    for i, (p, g) in enumerate(zip(params, grads)):  # the release (p None): fp32 codes
        groups.setdefault((g.dtype if p is None else p.dtype, g.dtype), []).append(i)
    dev = grads[0].device
    with torch.cuda.device(dev):
        stream = torch.cuda.current_stream(dev).cuda_stream
        for (pd, gd), idx in groups.items():
            sel = lambda xs: [xs[i] for i in idx]  # noqa: E731
            desc, table, n_t, n_c = _descriptors(ext, sel(params), sel(grads), sel(ms), sel(vs),
                                                 sel(offs), stream)
            if n_c == 0:
                continue
            launch(tensors=desc.data_ptr(), chunk_tensor=table.data_ptr(), n_tensors=n_t,
                           n_chunks=n_c, param_dtype=_DTYPE_CODE[pd], grad_dtype=_DTYPE_CODE[gd],
                           optimizer=opt, k0=words["k0"], k1=words["k1"], c2=words["c2"],
                           c3=words["c3"], noise_std=scalars["noise_std"], inv_b=scalars["inv_b"],
                           lr=scalars["lr"], weight_decay=scalars["weight_decay"],
                           decay=scalars["decay"], momentum=scalars["momentum"],
                           one_minus_dampening=scalars["one_minus_damp"], nesterov=nesterov,
                           first_step=first, beta1=scalars["beta1"], beta2=scalars["beta2"],
                           eps=scalars["eps"], step_size=scalars["step_size"],
                           inv_sqrt_bc2=scalars["inv_sqrt_bc2"], stream=stream)
