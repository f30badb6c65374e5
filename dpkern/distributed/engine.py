"""DistributedPrivacyEngine: the PrivacyEngine on torch.distributed (DDP, FSDP2, or a plain module).

    dist.init_process_group("nccl")                       # after disable_nvlink_multicast()
    engine = DistributedPrivacyEngine(accountant="prv")
    model, optimizer, loader = engine.make_private(
        module=model,            # plain module, DistributedDataParallel(model) or fully_shard-ed
        optimizer=torch.optim.AdamW(model.parameters(), lr=1e-4),
        data_loader=DataLoader(dataset, batch_size=per_rank_batch),
        noise_multiplier=1.0, max_grad_norm=1.0, loss_reduction="sum")
    optimizer.average_sum = True             # update = (clipped sum + noise) / B_expected
    for batch in loader:                     # this rank's share of the global Poisson batch
        if batch_rows(batch) > 0:
            per_sample_losses(model, batch).sum().backward()
        optimizer.step(); optimizer.zero_grad()   # every rank, every step (collectives inside)
    engine.get_epsilon(1e-5)                  # identical on every rank

The global logical batch has expected size B = data_loader.batch_size × world_size (or
`expected_batch_size=`, always global); q = B / len(dataset); noise std σC per coordinate, added
once per logical step; the update divides by B. See docs/distributed.md.
"""
from __future__ import annotations

import contextlib

import torch
from torch.utils.data import DataLoader

from dpkern.data.poisson import SecretSampling
from dpkern.distributed import comm
from dpkern.distributed.optimizer import DistributedDPOptimizer
from dpkern.distributed.sharded import ShardedDPOptimizer
from dpkern.distributed.sampler import DistributedDPDataLoader
from dpkern.engine import PrivacyEngine

__all__ = ["DistributedPrivacyEngine", "is_fsdp2"]


@contextlib.contextmanager
def _plain_classes(module: torch.nn.Module):
    """While inside: every FSDP2 module shows its original class (fully_shard makes a dynamic
    subclass `FSDP<Name>`, which the layer rules, matched by exact type, would not recognise).
    Only the wrapping runs inside; FSDP's hooks and methods are back as soon as it ends."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover - old torch
        yield
        return
    swapped = []
    for m in module.modules():
        cls = type(m)
        if isinstance(m, FSDPModule):
            orig = [b for b in cls.__bases__ if not issubclass(b, FSDPModule)]
            if len(orig) == 1:
                m.__class__ = orig[0]
                swapped.append((m, cls))
    try:
        yield
    finally:
        for m, cls in swapped:
            m.__class__ = cls


def is_fsdp2(module: torch.nn.Module) -> bool:
    """True when fully_shard was applied to module or one of its submodules."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover - old torch
        return False
    return any(isinstance(m, FSDPModule) for m in module.modules())


class DistributedPrivacyEngine(PrivacyEngine):
    """PrivacyEngine for data-parallel training over a process group.

    Args:
        accountant, secure_mode, backend: as PrivacyEngine.
        group: the data-parallel process group (None: the default group; without an initialised
            process group the engine runs as a world of one).
    Every rank builds its own engine with the same arguments; the noise key and the sampling seed
    come from rank 0 (os.urandom) unless a seed is given (the same on every rank, tests only).
    """

    def __init__(self, accountant: str = "prv", secure_mode: bool = False, *,
                 backend: str | None = None, group=None):
        super().__init__(accountant, secure_mode, backend=backend)
        self.group = group
        self.rank = comm.rank(group)
        self.world_size = comm.world_size(group)
        self.sampling_generator = None  # SecretSampling (shared key) or a seeded torch.Generator

    def make_private(self, *, module: torch.nn.Module, optimizer: torch.optim.Optimizer,
                     data_loader: DataLoader | None, noise_multiplier: float, max_grad_norm,
                     expected_batch_size: int | None = None, sample_rate: float | None = None,
                     seed: int | None = None, poisson_sampling: bool = True, **kwargs):
        """Returns (module, optimizer, data_loader), like PrivacyEngine.make_private.

        Args:
            module: a plain module (its parameters and buffers are broadcast from rank 0), a
                DistributedDataParallel (its gradient sync is switched off: the engine sums the
                clipped gradients itself; the DDP object is returned and may be called), or a
                module on which torch.distributed.fsdp.fully_shard was applied (call this after
                fully_shard; every module owning trainable parameters must be inside a sharded
                unit).
            data_loader: its batch_size is the PER-RANK expected batch; it becomes a
                DistributedDPDataLoader giving this rank's share of each global Poisson batch.
            expected_batch_size: the GLOBAL public normaliser B (default batch_size × world).
            sample_rate: q (default B / len(dataset)).
            seed: tests only (refused in secure mode): the noise key and the sampling generator
                derive from it exactly as in single-process PrivacyEngine.make_private, so a run
                with the same seed draws the same global batches and the same noise.
            other keywords: as PrivacyEngine.make_private.
        """
        from torch.nn.parallel import DistributedDataParallel as DDP
        if seed is not None and self.secure_mode:
            raise ValueError("seed: explicit seeds are not allowed with secure_mode=True")
        if not poisson_sampling:
            raise ValueError("poisson_sampling=False is not supported by DistributedPrivacyEngine")
        outer, inner = module, module
        if isinstance(module, DDP):
            inner = module.module
            # The engine's layers return no weight gradient, so DDP's reducer has nothing to do;
            # no_sync's switch, kept off for good, also skips DDP's forward-time collectives, so
            # a rank whose share of the batch is empty may skip forward / backward.
            module.require_backward_grad_sync = False
            module.require_forward_param_sync = False
        sharded = is_fsdp2(inner)
        if not sharded and not isinstance(module, DDP):
            comm.broadcast_module_(inner, self.group)

        if data_loader is not None:
            n_data = len(data_loader.dataset)
            if expected_batch_size is None:
                if data_loader.batch_size is None:
                    raise ValueError("expected_batch_size: the data_loader has no batch_size")
                expected_batch_size = int(data_loader.batch_size) * self.world_size
            if sample_rate is None:
                sample_rate = min(1.0, expected_batch_size / n_data)
        elif expected_batch_size is None or sample_rate is None:
            raise ValueError("data_loader=None needs expected_batch_size= and sample_rate=")

        with _plain_classes(inner):
            _, dp_opt, _ = super().make_private(
                module=inner, optimizer=optimizer, data_loader=None,
                noise_multiplier=noise_multiplier, max_grad_norm=max_grad_norm,
                expected_batch_size=expected_batch_size, sample_rate=sample_rate, seed=seed,
                **kwargs)
        key = comm.shared_secret(16, self.group) if seed is None else None
        cls = ShardedDPOptimizer if sharded else DistributedDPOptimizer
        dp_opt = cls.adopt(dp_opt, group=self.group, key=key)

        if seed is None:  # rank 0's 128-bit key: every rank draws the same global mask
            self.sampling_generator = SecretSampling(comm.shared_secret(16, self.group))
        else:  # PrivacyEngine's convention: the same global batches as one process
            self.sampling_generator = torch.Generator().manual_seed(seed + 1)
        if data_loader is not None:
            data_loader = DistributedDPDataLoader.from_data_loader(
                data_loader, sample_rate=sample_rate, rank=self.rank, world_size=self.world_size,
                generator=self.sampling_generator)
            data_loader.add_batch_listener(dp_opt.signal_batch)
        return outer, dp_opt, data_loader

    def make_private_with_epsilon(self, *, module, optimizer, data_loader, target_epsilon: float,
                                  target_delta: float, epochs: int, **kwargs):
        """make_private with σ calibrated for `epochs` epochs of the GLOBAL sampling rate."""
        from dpkern.accounting import get_noise_multiplier
        bsz = kwargs.get("expected_batch_size") or data_loader.batch_size * self.world_size
        q = kwargs.get("sample_rate") or min(1.0, bsz / len(data_loader.dataset))
        steps = int(epochs) * max(1, round(1.0 / q))
        sigma = get_noise_multiplier(target_epsilon, target_delta, q, steps,
                                     accountant=self.accountant_name)
        return self.make_private(module=module, optimizer=optimizer, data_loader=data_loader,
                                 noise_multiplier=sigma, **kwargs)

    # ---- checkpoints ----------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """The engine's own state: accountant history and the sampling generator (the same on
        every rank). Save it with the optimizer's state_dict (noise counter) and the model."""
        return {"accountant": self.accountant.state_dict(), "world_size": self.world_size,
                "sampling_rng": None if self.sampling_generator is None
                else self.sampling_generator.get_state()}

    def save_distributed_checkpoint(self, path, *, module, optimizer) -> None:
        """Model, optimizer (DTensor shards under FSDP2 / HSDP) and DP state (accountant, sampler,
        noise counter) to the torch.distributed.checkpoint directory `path`; every rank calls it,
        after a step. See dpkern/distributed/checkpoint.py."""
        from dpkern.distributed import checkpoint
        checkpoint.save(path, engine=self, module=module, optimizer=optimizer)

    def load_distributed_checkpoint(self, path, *, module, optimizer) -> None:
        """Restores save_distributed_checkpoint's directory after make_private (same σ, C, global
        B and q), resharding to this run's world size: same ε, noise counter and global batches."""
        from dpkern.distributed import checkpoint
        checkpoint.load(path, engine=self, module=module, optimizer=optimizer)

    def load_state_dict(self, state: dict) -> None:
        if int(state.get("world_size", self.world_size)) != self.world_size:
            raise ValueError(f"load_state_dict: checkpoint written by {state['world_size']} ranks, "
                             f"this run has {self.world_size}")
        self.accountant.load_state_dict(state["accountant"])
        if state.get("sampling_rng") is not None:
            if self.sampling_generator is None:
                raise RuntimeError("load_state_dict: call make_private before loading")
            self.sampling_generator.set_state(state["sampling_rng"])

