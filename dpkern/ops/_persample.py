"""Shared helpers of the per-sample ops: input checks, exact-fp32 matmuls, sample chunking, and the
fp32 precision mode (with the torch twin of the kernels' TF32 rounding)."""
from __future__ import annotations

import contextlib
import functools
import os

import torch

from dpkern._matmul import fp32_matmul
from dpkern.backend import resolve_backend

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# The torch backend keeps its per-chunk intermediates below this many bytes.
CHUNK_BYTES = 256 << 20


def layout_key(x: torch.Tensor) -> tuple:
    """What layers launched together (kernels/_tables.py) must agree on: shape, strides, dtype,
    device."""
    return tuple(x.shape), x.stride(), x.dtype, x.device


# Largest B·T whose layers are launched together (kernels/_tables.py; DPKERN_GROUP_MAX_TOKENS, 0:
# never group). No limit by default: once the tabled pointers carried their 16-byte alignment
# (kernels/_tables.layer_ptr), a tabled book-keeping ran at the rate of its own launch (H100, 16
# layers of 2048 x 2048 in bf16: 222 against 114 TFLOP/s at 8 x 128 tokens, 295 against 300 at
# 16 x 256, 291 against 353 at 8 x 512), and grouping every layer made the 1B Llama's DP step
# faster in all six cases tried (bf16 and fp32-TF32 at 8x512, 16x256, 32x128; fewer launches, less
# host time; bench/results/grouping_h100_7a22981).
GROUP_MAX_TOKENS = int(os.environ.get("DPKERN_GROUP_MAX_TOKENS", str(1 << 62)))


def groupable(a: torch.Tensor, *xs: torch.Tensor) -> bool:
    """Whether a layer with input a (B, T, d) and tensors xs may share a grouped launch: at most
    GROUP_MAX_TOKENS rows, and every tensor 16-byte aligned (kernels/_tables.ALIGN)."""
    return (a.shape[0] * a.shape[1] <= GROUP_MAX_TOKENS
            and all(x.data_ptr() % 16 == 0 for x in (a,) + xs))


def layout_sig(x) -> tuple:
    """What a grouped op's launch plan reads of one tensor: its type, its layout_key and whether
    it is 16-byte aligned (groupable)."""
    return (type(x), x.shape, x.stride(), x.dtype, x.device, x.data_ptr() % 16 == 0)


class PlanCache:
    """Launch plans of a grouped op, by the structure of its items.

    A grouped op's plan (which items share a launch, which run alone, in which fp32 mode) is a
    function of its items' layout_sig, of the backend and fp32 mode resolved for their devices,
    and of the module settings it reads; the op's input checks depend on the same. A training
    loop hands the ops one structure every backward, so planning (and checking) once per
    structure takes the per-layer Python out of every later step (the host-bound small steps of
    a 1B model group ~110 layers in three ops per backward). A key holds all of the above; an
    item the key cannot describe (not a tensor) gives no key and is planned, and refused, from
    scratch."""

    # False: every call plans from scratch (DPKERN_PLAN_CACHE=0; bench/host_phases.py
    # --plan-cache-ab times a step both ways in one process)
    enabled = os.environ.get("DPKERN_PLAN_CACHE", "1") != "0"

    def __init__(self, size: int = 32):
        self.size = size
        self._plans: dict = {}
        self.misses = 0  # plans built (tests check that a repeated structure builds none)

    def get(self, key, build):
        """The plan stored under `key`, else build() (stored unless key is None)."""
        if not PlanCache.enabled:
            key = None
        plan = self._plans.get(key) if key is not None else None
        if plan is None:
            plan = build()
            self.misses += 1
            if key is not None:
                if len(self._plans) >= self.size:
                    self._plans.pop(next(iter(self._plans)))
                self._plans[key] = plan
        return plan


def plan_key(sig, resolve, devices, *settings) -> tuple | None:
    """The PlanCache key of items whose layout_sig tuple is `sig` (None: no key), on `devices`
    (resolved by `resolve`), under the module `settings` the plan reads."""
    if sig is None:
        return None
    return (sig, frozenset((d, resolve(d)) for d in devices)) + settings


class SharedItems(tuple):
    """Items ((a, gs), ...) of the shared-input grouped ops (linear_norm_sq_grouped,
    row_norm_dots_grouped), frozen as tuples so that their shared_items_sig is read once and kept:
    the engine hands one backward's Linear layers to the norms and to the release bounds' sums,
    and each op would otherwise read every tensor's layout again (~200 tensors per backward)."""

    def __new__(cls, items):
        return super().__new__(cls, ((a, tuple(gs)) for a, gs in items))

    @functools.cached_property
    def sig(self):
        return _items_sig(self)


def shared_items_sig(items):
    """(sig, devices) of items [(a, gs), ...] (a layer input and its gradients), or (None, None)
    when an item is not a tensor with a list of tensors."""
    if type(items) is SharedItems:
        return items.sig
    return _items_sig(items)


def _items_sig(items):
    try:
        sig = tuple((layout_sig(a), tuple(map(layout_sig, gs))) for a, gs in items
                    if type(gs) in (list, tuple))
        if len(sig) != len(items):
            return None, None
        return sig, {s[0][4] for s in sig}
    except Exception:  # not a tensor (the plan's checks name it)
        return None, None


def call_resolver(op: str, backend: str | None, explicit_mode: str | None = None,
                  implemented: tuple = ("triton", "torch"), auto_order: tuple = ("triton",),
                  with_mode: bool = True):
    """device -> (backend, fp32 mode or None) for one call of a grouped op: resolved (environment
    read, names checked) once per device and call, not once per layer."""
    seen: dict = {}

    def resolve(device) -> tuple[str, str | None]:
        hit = seen.get(device)
        if hit is None:
            hit = seen[device] = (resolve_backend(backend, device, op=op, implemented=implemented,
                                                  auto_order=auto_order),
                                  fp32_mode(device, explicit_mode) if with_mode else None)
        return hit
    return resolve


def check_tensor(op: str, name: str, x, rank: int, dtypes=FLOAT_DTYPES) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != rank:
        raise ValueError(f"{op}: {name} must have rank {rank}, got shape {tuple(x.shape)}")
    if x.dtype not in dtypes:
        names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"{op}: {name} must be one of ({names}), got {x.dtype}")


def check_same(op: str, what: str, pairs: dict) -> None:
    """pairs: {"a.shape[0]": 3, "g.shape[0]": 4} -> raise naming both when they differ."""
    vals = list(pairs.values())
    if any(v != vals[0] for v in vals[1:]):
        desc = ", ".join(f"{k}={v}" for k, v in pairs.items())
        raise ValueError(f"{op}: {what} must match ({desc})")


def check_device(op: str, tensors: dict) -> None:
    devs = {k: v.device for k, v in tensors.items()}
    first = next(iter(devs.values()))
    if any(d != first for d in devs.values()):
        desc = ", ".join(f"{k} on {d}" for k, d in devs.items())
        raise ValueError(f"{op}: all inputs must be on one device ({desc})")


def check_shared_input(op: str, a, gs) -> None:
    """a (B, T, d) and a non-empty list gs of (B, T, p_k) float tensors on a's device (layers that
    read one input: q/k/v, gate/up)."""
    if not isinstance(gs, (list, tuple)) or not gs:
        raise TypeError(f"{op}: gs must be a non-empty list of tensors")
    check_tensor(op, "a", a, 3)
    # Every backward validates a few hundred of these: test the valid case in one pass and build
    # the error messages only for a tensor that fails it.
    bt, dev = a.shape[:2], a.device
    for k, g in enumerate(gs):
        if (isinstance(g, torch.Tensor) and g.dim() == 3 and g.dtype in FLOAT_DTYPES
                and g.shape[:2] == bt and g.device == dev):
            continue
        name = "g" if len(gs) == 1 else f"gs[{k}]"
        check_tensor(op, name, g, 3)
        check_same(op, "batch and sequence sizes", {"a.shape[:2]": tuple(a.shape[:2]),
                                                    f"{name}.shape[:2]": tuple(g.shape[:2])})
        check_device(op, {"a": a, name: g})


def exact_fp32_matmul(device: torch.device):
    """fp32 matmuls in IEEE fp32 (no TF32) inside the block: norms must not be under-estimated."""
    return fp32_matmul(device, "ieee")


def sample_chunks(batch: int, bytes_per_sample: int):
    """Yield slices over the batch so that each chunk's intermediates stay under CHUNK_BYTES."""
    step = max(1, CHUNK_BYTES // max(bytes_per_sample, 1))
    for start in range(0, batch, step):
        yield slice(start, min(batch, start + step))


# ---- fp32 precision mode of the norms and the book-keeping (kernels/README_persample.md) ----------
# "tf32r": operands rounded to TF32 by round_tf32 (exact products), "ieee": exact fp32, "tf32x3": three
# TF32 products. Norms and book-keeping always run in one mode, so they see the same operands.
FP32_MODES = ("tf32r", "ieee", "tf32x3")


def _env_mode(name: str):
    val = os.environ.get(name)
    if val is not None and val not in FP32_MODES:
        raise ValueError(f"{name} must be one of {FP32_MODES}, got {val!r} (plain 'tf32' is "
                         "refused: the hardware would round the operands, not us)")
    return val


def fp32_mode(device, explicit: str | None = None) -> str:
    """The mode for fp32 inputs of the per-sample ops on `device`.

    explicit (an op's fp32_mode= argument) wins; else the env knobs DPKERN_NORM_FP32_DOT /
    DPKERN_FP32_DOT (either one sets both; both set must agree on rounding or not); else "tf32r"
    on CUDA and "ieee" elsewhere. Every backend of an op computes the same function in one mode.
    """
    if explicit is not None:
        if explicit not in FP32_MODES:
            raise ValueError(f"fp32_mode must be one of {FP32_MODES}, got {explicit!r}")
        return explicit
    norm, bk = _env_mode("DPKERN_NORM_FP32_DOT"), _env_mode("DPKERN_FP32_DOT")
    if norm and bk and (norm == "tf32r") != (bk == "tf32r"):
        raise ValueError(f"DPKERN_NORM_FP32_DOT={norm} and DPKERN_FP32_DOT={bk}: both must be "
                         "'tf32r' or neither (norms and book-keeping must see the same operands)")
    dev_type = device.type if isinstance(device, torch.device) else torch.device(device).type
    return norm or bk or ("tf32r" if dev_type == "cuda" else "ieee")


def round_tf32(x: torch.Tensor) -> torch.Tensor:
    """Torch twin of kernels/ghost_norm._round_tf32, bit for bit: fp32 -> nearest TF32 value (ties to
    even; 10-bit mantissa, the low 13 bits zeroed), as fp32. NaN stays NaN, overflow gives ±inf.

    Example:
        >>> round_tf32(torch.tensor([1 + 2**-11, 1 + 3 * 2**-11])).tolist()   # ties to even
        [1.0, 1.001953125]
    """
    if x.dtype != torch.float32:
        raise TypeError(f"round_tf32: x must be float32, got {x.dtype}")
    bits = x.view(torch.int32).to(torch.int64) & 0xFFFFFFFF  # the uint32 pattern
    bits = (((bits + 0xFFF + ((bits >> 13) & 1)) >> 13) << 13) & 0xFFFFFFFF
    bits = torch.where(bits >= 2**31, bits - 2**32, bits).to(torch.int32)
    return torch.where(torch.isnan(x), x, bits.view(torch.float32))


def operand(x: torch.Tensor, mode: str, dtype=torch.float32) -> torch.Tensor:
    """x as a kernel multiplies it, upcast to `dtype`: fp32 inputs rounded to TF32 in "tf32r"
    (16-bit inputs are TF32 values already)."""
    if mode == "tf32r" and x.dtype == torch.float32:
        x = round_tf32(x)
    return x.to(dtype)
