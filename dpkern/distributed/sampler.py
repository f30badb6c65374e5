"""Poisson sampling over the global dataset, split across ranks.

Every rank holds the same sampling generator (seeded from rank 0), so every rank draws the same
global mask: record j is in the logical batch with probability q, independently — exactly the
single-process `PoissonSampler` draw for the same generator state. The selected indices are then
cut into `world_size` contiguous, balanced pieces, and rank r keeps piece r: each selected record
goes to exactly one rank, and the union over ranks (in rank order) *is* the single-process batch.
Every rank also knows every rank's local size (`local_sizes`), which FSDP needs to keep the number
of forward / backward passes equal across ranks.
"""
from __future__ import annotations

from typing import Callable, Iterator

import torch
from torch.utils.data import DataLoader, Dataset

from dpkern.data.poisson import DPDataLoader, PoissonSampler, _CollateWithEmpty, batch_rows


def split_counts(n: int, world: int) -> list[int]:
    """Balanced sizes of `world` contiguous pieces of n items (the first n % world get one more)."""
    base, extra = divmod(int(n), int(world))
    return [base + (1 if r < extra else 0) for r in range(world)]


class DistributedPoissonSampler(PoissonSampler):
    """Batch sampler yielding rank `rank`'s share of each global Poisson batch.

    Args:
        num_samples: global dataset size N.
        sample_rate: q in (0, 1]; the global batch has expected size q·N.
        rank, world_size: this process's place in the data-parallel group.
        steps: batches per epoch (default round(1/q)).
        generator: torch.Generator, the SAME state on every rank (DistributedPrivacyEngine seeds it
            from rank 0).
    Example:
        >>> g = lambda: torch.Generator().manual_seed(0)
        >>> a = list(DistributedPoissonSampler(100, 0.1, rank=0, world_size=2, generator=g()))
        >>> b = list(DistributedPoissonSampler(100, 0.1, rank=1, world_size=2, generator=g()))
        >>> [x + y for x, y in zip(a, b)] == list(PoissonSampler(100, 0.1, generator=g()))
        True
    """

    def __init__(self, num_samples: int, sample_rate: float, *, rank: int, world_size: int,
                 steps: int | None = None, generator: torch.Generator | None = None):
        if int(world_size) <= 0:
            raise ValueError(f"world_size must be > 0, got {world_size}")
        if not 0 <= int(rank) < int(world_size):
            raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
        super().__init__(num_samples, sample_rate, steps, generator)
        self.rank, self.world_size = int(rank), int(world_size)
        self.local_sizes: list[int] = [0] * self.world_size  # of the batch last handed out

    def __iter__(self) -> Iterator[list]:
        for chosen in super().__iter__():
            self.local_sizes = split_counts(len(chosen), self.world_size)
            start = sum(self.local_sizes[:self.rank])
            yield chosen[start:start + self.local_sizes[self.rank]]


class DistributedDPDataLoader(DPDataLoader):
    """DPDataLoader whose batches are this rank's share of the global Poisson batch.

    Reports the local row count to the listeners (the DP optimizer): a rank whose share is empty
    may step without a backward; it contributes zeros to the summed gradient.

    Attributes:
        local_sizes: rows each rank got in the batch last handed out (the same list on all ranks).
    """

    def __init__(self, dataset: Dataset, *, sample_rate: float, rank: int, world_size: int,
                 steps: int | None = None, collate_fn: Callable | None = None,
                 generator: torch.Generator | None = None, **kwargs):
        from torch.utils.data._utils.collate import default_collate
        sampler = DistributedPoissonSampler(len(dataset), sample_rate, rank=rank,
                                            world_size=world_size, steps=steps, generator=generator)
        DataLoader.__init__(self, dataset, batch_sampler=sampler,
                            collate_fn=_CollateWithEmpty(collate_fn or default_collate, dataset),
                            **kwargs)
        self.sample_rate = sampler.sample_rate
        self._batch_listeners: list[Callable[[int], None]] = []

    @classmethod
    def from_data_loader(cls, data_loader: DataLoader, *, sample_rate: float, rank: int,
                         world_size: int, generator: torch.Generator | None = None
                         ) -> "DistributedDPDataLoader":
        return cls(data_loader.dataset, sample_rate=sample_rate, rank=rank, world_size=world_size,
                   collate_fn=data_loader.collate_fn, generator=generator,
                   num_workers=data_loader.num_workers, pin_memory=data_loader.pin_memory,
                   timeout=data_loader.timeout, worker_init_fn=data_loader.worker_init_fn,
                   multiprocessing_context=data_loader.multiprocessing_context,
                   prefetch_factor=data_loader.prefetch_factor,
                   persistent_workers=data_loader.persistent_workers)

    @property
    def local_sizes(self) -> list[int]:
        return list(self.batch_sampler.local_sizes)

    def padding_batch(self):
        """A 1-row batch (record 0's structure and values) for a rank whose share is empty when the
        model's collectives need every rank to run forward / backward (FSDP2): use it with a loss
        multiplied by 0, which makes its clipped contribution exactly zero."""
        batch = self.collate_fn.collate_fn([self.dataset[0]])
        if batch_rows(batch) != 1:
            raise RuntimeError("padding_batch: collating one record did not give a 1-row batch")
        return batch
