"""Data for DP training: Poisson sampling (variable, possibly empty batches) and micro-batching."""
from dpkern.data.poisson import (DPDataLoader, PoissonSampler, batch_rows, microbatches,
                                 secret_generator)

__all__ = ["DPDataLoader", "PoissonSampler", "batch_rows", "microbatches", "secret_generator"]
