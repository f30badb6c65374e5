"""Poisson sampling: every record joins each logical batch independently with probability q.

This is the sampling the accountants assume (Poisson-subsampled Gaussian). Batches vary in size and
may be empty; an empty batch is still a step: the optimizer releases noise only and the accountant
advances (DESIGN.md, contracts).
"""
from __future__ import annotations

import os
from typing import Callable, Iterator

import torch
from torch.utils.data import DataLoader, Dataset, Sampler


def secret_generator(seed: int | None = None, *, secure_mode: bool = False,
                     device: str | torch.device = "cpu") -> torch.Generator:
    """A torch.Generator seeded from os.urandom, or from `seed` (refused in secure mode)."""
    if seed is not None and secure_mode:
        raise ValueError("seed: an explicit seed is not allowed in secure_mode (the seed must be "
                         "secret); pass seed=None")
    gen = torch.Generator(device=device)
    gen.manual_seed(int.from_bytes(os.urandom(8), "little") if seed is None else int(seed))
    return gen


class PoissonSampler(Sampler[list]):
    """Batch sampler: yields `steps` lists of indices, each index kept with probability q.

    Args:
        num_samples: dataset size N (> 0).
        sample_rate: q in (0, 1].
        steps: batches per epoch (default round(1 / q), so one epoch sees each record once on
            average).
        generator: torch.Generator (default: seeded from os.urandom).
    Example:
        >>> s = PoissonSampler(100, 0.1, generator=torch.Generator().manual_seed(0))
        >>> len(s), sum(len(b) for b in s) > 0
        (10, True)
    """

    def __init__(self, num_samples: int, sample_rate: float, steps: int | None = None,
                 generator: torch.Generator | None = None):
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
            keep = torch.rand(self.num_samples, generator=self.generator) < self.sample_rate
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
                 collate_fn: Callable | None = None, generator: torch.Generator | None = None,
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
                         generator: torch.Generator | None = None) -> "DPDataLoader":
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
