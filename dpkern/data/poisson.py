"""Poisson sampling: every record joins each logical batch independently with probability q.

This is the sampling the accountants assume (Poisson-subsampled Gaussian). Batches vary in size and
may be empty; an empty batch is still a step: the optimizer releases noise only and the accountant
advances (DESIGN.md, contracts).
"""
from __future__ import annotations

import math
from typing import Callable, Iterator

import torch
from torch.utils.data import DataLoader, Dataset, Sampler


STREAM_SAMPLING = 2  # Philox stream tag of Poisson sampling (noise: 0, LMO-DP: 1)


class SecretSampling:
    """The randomness of Poisson sampling under a 128-bit secret key from os.urandom.

    Draw d keeps record j iff the 64-bit word Philox4x32-10(key, counter = (d, j)) is below
    floor(q · 2^64): the noise's counter RNG (dpkern.noise) on its own key and stream. Used in
    place of a torch.Generator, whose seed is 64 bits, whenever no seed is given.
    get_state() / set_state() carry the draw counter only, never the key, so a checkpoint cannot
    disclose which records later batches hold; a resumed run continues the counter under its own
    fresh key. The key is never logged (repr hides it) and cannot be pickled.

    Args:
        key: 16 bytes shared by data-parallel ranks (sent by rank 0); default os.urandom(16).
    """

    def __init__(self, key: bytes | None = None):
        from dpkern.noise import NoiseGenerator
        self._gen = NoiseGenerator()
        if key is not None:
            self._gen.adopt_key(key)
        self._draw = 0

    def mask(self, n: int, q: float) -> torch.Tensor:
        """Boolean (n,): each record kept independently with probability floor(q·2^64)/2^64 ≤ q."""
        from dpkern.noise.reference import philox_words
        words = self._gen.kernel_words(self._draw, stream=STREAM_SAMPLING)
        self._draw += 1
        if q >= 1.0:
            return torch.ones(n, dtype=torch.bool)
        g = torch.arange((n + 1) // 2, dtype=torch.int64)
        x0, x1, x2, x3 = philox_words(g, words)
        hi = torch.stack((x0, x2), dim=1).reshape(-1)[:n]  # record 2g: (x0, x1); 2g + 1: (x2, x3)
        lo = torch.stack((x1, x3), dim=1).reshape(-1)[:n]
        t = int(q * 2.0 ** 64)  # exact: q is a binary fraction; int() floors
        th, tl = t >> 32, t & 0xFFFFFFFF
        return (hi < th) | ((hi == th) & (lo < tl))

    def get_state(self) -> torch.Tensor:
        return torch.tensor(list(self._draw.to_bytes(8, "little")), dtype=torch.uint8)

    def set_state(self, state: torch.Tensor) -> None:
        if not isinstance(state, torch.Tensor) or state.dtype != torch.uint8 or state.numel() != 8:
            raise ValueError("SecretSampling.set_state: expected the 8-byte draw counter of "
                             "get_state()")
        self._draw = int.from_bytes(bytes(state.tolist()), "little")

    def __repr__(self) -> str:
        return f"SecretSampling(draw={self._draw}, key=<hidden>)"

    def __getstate__(self):
        raise TypeError("SecretSampling cannot be pickled (it would write the key); checkpoint "
                        "get_state()")


def secret_generator(seed: int | None = None, *, secure_mode: bool = False,
                     device: str | torch.device = "cpu"):
    """Sampling randomness: a SecretSampling (128-bit key from os.urandom) when seed is None, else
    a torch.Generator seeded with `seed` (tests and reproducible experiments; refused in secure
    mode)."""
    if seed is not None and secure_mode:
        raise ValueError("seed: an explicit seed is not allowed in secure_mode (the seed must be "
                         "secret); pass seed=None")
    if seed is None:
        return SecretSampling()
    gen = torch.Generator(device=device)
    gen.manual_seed(int(seed))
    return gen


def inclusion_mask(generator, n: int, q: float) -> torch.Tensor:
    """Boolean (n,): record j kept with probability at most q, never more (the accountant's q is
    then an upper bound). A torch.Generator draws 53-bit uniforms u and keeps u < floor(q·2^53)/2^53
    (a float32 `torch.rand(n) < q` keeps with probability ceil(q·2^24)/2^24, up to 6e-8 above q)."""
    if isinstance(generator, SecretSampling):
        return generator.mask(n, q)
    u = torch.rand(n, generator=generator, dtype=torch.float64)
    return u < math.floor(q * 2.0 ** 53) * 2.0 ** -53


class PoissonSampler(Sampler[list]):
    """Batch sampler: yields `steps` lists of indices, each index kept with probability q.

    Args:
        num_samples: dataset size N (> 0).
        sample_rate: q in (0, 1].
        steps: batches per epoch (default round(1 / q), so one epoch sees each record once on
            average).
        generator: a SecretSampling (the default: 128-bit key from os.urandom) or a seeded
            torch.Generator (tests, reproducible experiments).
    Example:
        >>> s = PoissonSampler(100, 0.1, generator=torch.Generator().manual_seed(0))
        >>> len(s), sum(len(b) for b in s) > 0
        (10, True)
    """

    def __init__(self, num_samples: int, sample_rate: float, steps: int | None = None,
                 generator=None):
        if int(num_samples) <= 0:
            raise ValueError(f"num_samples must be > 0, got {num_samples}")
        if not 0.0 < float(sample_rate) <= 1.0:
            raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate}")
        self.num_samples = int(num_samples)
        self.sample_rate = float(sample_rate)
        self.steps = max(1, round(1.0 / self.sample_rate)) if steps is None else int(steps)
        if self.steps <= 0:
            raise ValueError(f"steps must be > 0, got {steps}")
        self.generator = generator if generator is not None else secret_generator()

    def __len__(self) -> int:
        return self.steps

    def __iter__(self) -> Iterator[list]:
        for _ in range(self.steps):
            keep = inclusion_mask(self.generator, self.num_samples, self.sample_rate)
            yield keep.nonzero().flatten().tolist()


def _empty_like(batch):
    """The same nested structure with every tensor cut to 0 rows (dim 0)."""
    if isinstance(batch, torch.Tensor):
        return batch[:0] if batch.dim() > 0 else batch
    if isinstance(batch, dict):
        return type(batch)({k: _empty_like(v) for k, v in batch.items()})
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):  # namedtuple
        return type(batch)(*(_empty_like(v) for v in batch))
    if isinstance(batch, (list, tuple)):
        return type(batch)(_empty_like(v) for v in batch)
    return batch


class _CollateWithEmpty:
    """collate_fn that turns an empty index list into a 0-row batch of the dataset's structure.

    The 0-row shapes come from collating record 0 and cutting every tensor to 0 rows: what comes out
    depends on no record's values (as Opacus does with the first record's shapes).
    """

    def __init__(self, collate_fn: Callable, dataset: Dataset):
        self.collate_fn = collate_fn
        self.dataset = dataset

    def __call__(self, items):
        if len(items) > 0:
            return self.collate_fn(items)
        return _empty_like(self.collate_fn([self.dataset[0]]))


def batch_rows(batch) -> int | None:
    """Rows (dim 0) of the first tensor found in a (nested) batch; None when there is none."""
    if isinstance(batch, torch.Tensor):
        return batch.shape[0] if batch.dim() > 0 else None
    values = batch.values() if isinstance(batch, dict) else (
        batch if isinstance(batch, (list, tuple)) else ())
    for v in values:
        rows = batch_rows(v)
        if rows is not None:
            return rows
    return None


class DPDataLoader(DataLoader):
    """A DataLoader over a PoissonSampler: logical batches of expected size q·N, possibly empty.

    Every batch it hands out is reported to the listeners (the DP optimizer), so an empty batch
    lets `optimizer.step()` run without a backward: it releases noise and the accountant advances.

    Example:
        >>> loader = DPDataLoader.from_data_loader(DataLoader(ds, batch_size=32))
    """

    def __init__(self, dataset: Dataset, *, sample_rate: float, steps: int | None = None,
                 collate_fn: Callable | None = None, generator=None,
                 **kwargs):
        from torch.utils.data._utils.collate import default_collate
        sampler = PoissonSampler(len(dataset), sample_rate, steps, generator)
        super().__init__(dataset, batch_sampler=sampler,
                         collate_fn=_CollateWithEmpty(collate_fn or default_collate, dataset),
                         **kwargs)
        self.sample_rate = sampler.sample_rate
        self._batch_listeners: list[Callable[[int], None]] = []

    @classmethod
    def from_data_loader(cls, data_loader: DataLoader, *, sample_rate: float | None = None,
                         generator=None) -> "DPDataLoader":
        """Same dataset, collate_fn and workers; q = batch_size / len(dataset) unless given."""
        dataset = data_loader.dataset
        if sample_rate is None:
            bsz = data_loader.batch_size
            if bsz is None:
                raise ValueError("data_loader: its batch_size is None (a custom batch_sampler?); "
                                 "pass sample_rate explicitly")
            sample_rate = min(1.0, bsz / len(dataset))
        return cls(dataset, sample_rate=sample_rate, collate_fn=data_loader.collate_fn,
                   generator=generator, num_workers=data_loader.num_workers,
                   pin_memory=data_loader.pin_memory, timeout=data_loader.timeout,
                   worker_init_fn=data_loader.worker_init_fn,
                   multiprocessing_context=data_loader.multiprocessing_context,
                   prefetch_factor=data_loader.prefetch_factor,
                   persistent_workers=data_loader.persistent_workers)

    def add_batch_listener(self, fn: Callable[[int], None]) -> None:
        """fn(rows) is called with each batch's row count just before the batch is handed out."""
        self._batch_listeners.append(fn)

    def __iter__(self):
        for batch in super().__iter__():
            rows = batch_rows(batch)
            if rows is None:
                rows = len(batch) if hasattr(batch, "__len__") else 0
            for fn in self._batch_listeners:
                fn(rows)
            yield batch


def _slice(batch, sl: slice):
    if isinstance(batch, torch.Tensor):
        return batch[sl] if batch.dim() > 0 else batch
    if isinstance(batch, dict):
        return type(batch)({k: _slice(v, sl) for k, v in batch.items()})
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):
        return type(batch)(*(_slice(v, sl) for v in batch))
    if isinstance(batch, (list, tuple)):
        return type(batch)(_slice(v, sl) for v in batch)
    return batch


def microbatches(batch, max_rows: int) -> Iterator:
    """Split a logical batch (nested tensors, rows on dim 0) into physical micro-batches.

    Run forward + backward on each (no optimizer.step() in between) and one step at the end: the
    engine clips every sample exactly once and adds noise once for the logical batch. An empty
    batch yields nothing.

    Example:
        >>> [mb.shape[0] for mb in microbatches(torch.zeros(5, 3), 2)]
        [2, 2, 1]
    """
    if int(max_rows) <= 0:
        raise ValueError(f"max_rows must be > 0, got {max_rows}")
    rows = batch_rows(batch) or 0
    for start in range(0, rows, int(max_rows)):
        yield _slice(batch, slice(start, min(rows, start + int(max_rows))))
