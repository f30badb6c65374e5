"""DP optimizers for data-parallel training: the clipped sums are summed across ranks, the noise is
added once.

Every rank clips its own samples (the engine's book-keeping at the end of each backward leaves
Σ_{i on this rank} c_i G_i in the optimizer's fp32 accumulators). At `step()`:

* DistributedDPOptimizer (replicated parameters: plain module or DDP): one bucketed sum
  all-reduce of every accumulator, so each rank holds S = Σ_{all i} c_i G_i. Then every rank runs
  the single-process release on S: it adds the SAME z — z depends only on (key, counter step,
  global element index), the key is shared from rank 0 and the counter advances in lock step —
  divides by the global B_expected and updates. The noise is added after the sum, so it enters
  once (not W times, not √W times), and the replicas stay bit-identical without a broadcast.
* ShardedDPOptimizer (FSDP2 / HSDP parameters, dpkern/distributed/sharded.py): each parameter's
  sum is reduce-scattered to the rows this rank owns as soon as the engine writes it; each rank
  adds the noise of its own rows at their global element offsets (the same z an unsharded run
  draws there) and steps its shard.

Both keep the DPOptimizer contract: std σC per coordinate, once per logical step, scaled by the
public (global) expected batch size.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from dpkern.distributed import comm
from dpkern.optim.dp_optimizer import DPOptimizer

__all__ = ["DistributedDPOptimizer", "shard_rows"]


def shard_rows(n_rows: int, world: int, r: int) -> tuple[int, int]:
    """[start, stop) of rank r's rows under torch.chunk-style Shard(0) (what FSDP2 uses)."""
    chunk = -(-int(n_rows) // int(world)) if n_rows else 0
    start = min(r * chunk, n_rows)
    return start, min(start + chunk, n_rows)


class DistributedDPOptimizer(DPOptimizer):
    """DPOptimizer over a data-parallel group with replicated parameters (DDP or a plain module).

    Built by DistributedPrivacyEngine (`adopt` turns the engine's DPOptimizer into this class, so
    the engine's book-keeping keeps writing into the same object). Attributes added:
        group: the process group (None: the default group).
        global_samples: rows summed over all ranks in the last step (diagnostic).
    """

    group = None
    global_samples = 0

    @classmethod
    def adopt(cls, opt: DPOptimizer, *, group=None, key: bytes | None = None) -> "DPOptimizer":
        """Make `opt` (built by PrivacyEngine.make_private) an instance of this class in place.

        key: 16 bytes shared by all ranks (the noise key); None keeps opt's own key, which must
            then already be equal on all ranks (deterministic mode, same seed everywhere).
        """
        if not isinstance(opt, DPOptimizer):
            raise TypeError(f"adopt: need a DPOptimizer, got {type(opt).__name__}")
        opt.__class__ = cls
        opt.group = group
        opt.global_samples = 0
        if key is not None:
            set_noise_key(opt.noise_generator, key)
        opt._setup_distributed()
        return opt

    def _setup_distributed(self) -> None:
        pass

    # ---- the cross-rank sum, then the single-process release --------------------------------
    def _reduce_accumulators(self) -> None:
        accs = [self.accumulator(p) for p in self.params]  # zeros where this rank saw nothing
        comm.all_reduce_sum_(accs, self.group)

    def _reduce_counts(self) -> bool:
        """Sums the rows over ranks (diagnostic) and whether every rank may step; returns the
        latter. One collective, so a refusal is raised on every rank instead of leaving the
        others waiting in the gradient sum."""
        ok = self.backwards > 0 or self._empty_batch
        n = torch.tensor([float(self.samples), 0.0 if ok else 1.0], dtype=torch.float64)
        if comm.is_distributed(self.group) and comm.world_size(self.group) > 1:
            n = n.to(comm.comm_device(self.group))
            dist.all_reduce(n, group=self.group)
        self.global_samples = int(n[0].item())
        return n[1].item() == 0

    def step(self, closure=None):
        # Every rank calls step() once per logical step, with or without local rows: the sums
        # below are collectives. The checks of DPOptimizer.step run after them on every rank.
        loss = None
        if closure is not None:  # its backward must land in the accumulators before the sum
            with torch.enable_grad():
                loss = closure()
        if not self._reduce_counts():
            raise RuntimeError(
                "optimizer.step() without a new backward pass on some rank: if a rank's share "
                "of the batch is empty, the DistributedDPDataLoader reports it (or call "
                "optimizer.signal_empty_batch() there); every rank must call step() each logical "
                "step")
        self._reduce_accumulators()
        super().step()
        return loss

    def in_sync(self, module: torch.nn.Module) -> bool:
        """True when every rank holds bit-identical copies of module's parameters (a collective)."""
        if not comm.is_distributed(self.group) or comm.world_size(self.group) == 1:
            return True
        dev = comm.comm_device(self.group)
        h = torch.tensor([_fingerprint(p) for p in module.parameters()], dtype=torch.float64,
                         device=dev)
        lo, hi = h.clone(), h.clone()
        dist.all_reduce(lo, op=dist.ReduceOp.MIN, group=self.group)
        dist.all_reduce(hi, op=dist.ReduceOp.MAX, group=self.group)
        return bool(torch.equal(lo, hi))


def _fingerprint(p: torch.Tensor) -> float:
    """A float64 checksum of the bits of p (changes if any element's bits change, almost surely)."""
    x = p.detach().reshape(-1)
    bits = x.view(torch.int32) if x.element_size() == 4 else x.view(torch.int16)
    w = torch.arange(1, bits.numel() + 1, device=bits.device, dtype=torch.float64)
    return float(((bits.double() + 0.5) * (w.remainder(9973) + 1)).sum().item())


def set_noise_key(gen, key: bytes) -> None:
    """Give a NoiseGenerator the key shared by all ranks (16 bytes broadcast from rank 0)."""
    gen.adopt_key(key)
