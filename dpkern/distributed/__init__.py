"""DP training on torch.distributed: DDP, FSDP2 (fully_shard) or a plain replicated module.

    DistributedPrivacyEngine   make_private over a process group (docs/distributed.md)
    DistributedDPOptimizer     sum all-reduce of the clipped sums, noise once, replicated update
    ShardedDPOptimizer         FSDP2 / HSDP: each sum reduce-scattered as it is written, noise at
                               global offsets
    DistributedDPDataLoader    this rank's share of the global Poisson batch
    disable_nvlink_multicast   NCCL_NVLS_ENABLE=0 etc., before init_process_group
    launch.spawn               torchrun-free launcher (time limit, multicast off in every rank)
    checkpoint                 torch.distributed.checkpoint save / load of model, optimizer and
                               DP state (engine.save/load_distributed_checkpoint)
"""
from dpkern.distributed import launch  # noqa: F401  (dpkern.distributed.launch.spawn)
from dpkern.distributed.comm import NO_MULTICAST_ENV, disable_nvlink_multicast
from dpkern.distributed.engine import DistributedPrivacyEngine, is_fsdp2
from dpkern.distributed.optimizer import DistributedDPOptimizer, shard_rows
from dpkern.distributed.sharded import ShardedDPOptimizer
from dpkern.distributed.sampler import (DistributedDPDataLoader, DistributedPoissonSampler,
                                        split_counts)

__all__ = ["DistributedPrivacyEngine", "DistributedDPOptimizer", "ShardedDPOptimizer",
           "DistributedDPDataLoader", "DistributedPoissonSampler", "NO_MULTICAST_ENV",
           "disable_nvlink_multicast", "is_fsdp2", "shard_rows", "split_counts"]
