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
* ShardedDPOptimizer (FSDP2 parameters, DTensors sharded on dim 0): the full-size accumulators are
  summed and cut to this rank's rows (reduce-scatter on NCCL, all-reduce + slice elsewhere); each
  rank adds the noise of its own rows at their global element offsets (the same z an unsharded run
  draws there) and steps its shard.

Both keep the DPOptimizer contract: std σC per coordinate, once per logical step, scaled by the
public (global) expected batch size.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from dpkern.distributed import comm
from dpkern.optim.dp_optimizer import DPOptimizer

__all__ = ["DistributedDPOptimizer", "ShardedDPOptimizer", "shard_rows"]


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


class ShardedDPOptimizer(DistributedDPOptimizer):
    """DPOptimizer over FSDP2 (`fully_shard`) parameters: DTensors sharded on dim 0 of a 1-D mesh.

    The engine's accumulators are full-size (each rank's forward sees the unsharded weights, so
    its per-sample norms and book-keeping are complete for its own samples); step() sums them
    across ranks into this rank's rows, adds those rows' noise at their global element offsets and
    steps the sharded parameters. Post-processors (which need whole matrices) are refused.
    """

    def _setup_distributed(self) -> None:
        from torch.distributed.tensor import DTensor, Shard
        if self.grad_postprocessors:
            raise ValueError("grad_postprocessors: not supported with FSDP2 (they need whole "
                             "matrices; each rank holds only its rows)")
        if self.mechanism is not None:
            raise ValueError("mechanism: only the Gaussian mechanism is supported with FSDP2")
        self.fused = False  # the fused kernel takes plain tensors; sharded steps use the inner opt
        self._rows: dict = {}
        world, me = comm.world_size(self.group), comm.rank(self.group)
        for p, name in self.params.items():
            if not isinstance(p, DTensor):
                raise ValueError(f"{name}: not an FSDP2 (DTensor) parameter; with fully_shard, "
                                 "shard every module that owns trainable parameters, and call "
                                 "make_private after fully_shard")
            if p.device_mesh.ndim != 1 or tuple(p.placements) != (Shard(0),):
                raise NotImplementedError(f"{name}: placements {p.placements} on a "
                                          f"{p.device_mesh.ndim}-D mesh; only Shard(0) on a 1-D "
                                          "mesh (plain FSDP2) is supported")
            if p.device_mesh.size() != world:
                raise ValueError(f"{name}: its mesh has {p.device_mesh.size()} ranks, the "
                                 f"process group {world}")
            start, stop = shard_rows(p.shape[0], world, me) if p.dim() else (0, 0)
            local = p.to_local()
            if local.shape[0] != stop - start:
                raise RuntimeError(f"{name}: local shard has {local.shape[0]} rows, expected "
                                   f"{stop - start} (torch.chunk layout)")
            row = p.numel() // max(p.shape[0], 1)
            self._rows[p] = (start, stop)
            # The shard's first element in the unsharded model's global index space.
            self.global_offsets[p] = self.global_offsets[p] + start * row

    def _reduce_accumulators(self) -> None:
        from torch.distributed.tensor import DTensor
        world = comm.world_size(self.group)
        nccl = comm.is_distributed(self.group) and dist.get_backend(self.group) == "nccl"
        full = [self.accumulator(p) for p in self.params]
        if not nccl:
            comm.all_reduce_sum_(full, self.group)
        for (p, _), acc in zip(self.params.items(), full):
            start, stop = self._rows[p]
            if nccl and world > 1:
                local = _reduce_scatter_rows(acc, world, self.group)[: stop - start]
            else:
                local = acc[start:stop]
            local = local.contiguous()
            self.summed[p] = DTensor.from_local(local, p.device_mesh, p.placements,
                                                shape=p.shape, stride=p.stride(), run_check=False)

    def add_noise_(self, acc, std: float) -> None:
        """Noise of this rank's rows: local element k has global index global_offsets[p] + k."""
        if std <= 0:
            return
        if self._release_step is None:
            raise RuntimeError("ShardedDPOptimizer.add_noise_ runs inside step() only")
        p = next((q for q, a in self.summed.items() if a is acc), None)
        if p is None:
            raise RuntimeError("ShardedDPOptimizer.add_noise_: accumulator of no parameter")
        from dpkern.mechanisms.noise_ops import gaussian_noise_add_
        local = acc.to_local()
        if local.numel():
            gaussian_noise_add_(local, std=float(std), offset=int(self.global_offsets[p]),
                                words=self.noise_generator.kernel_words(self._release_step),
                                backend=self.noise_backend)


def _reduce_scatter_rows(acc: torch.Tensor, world: int, group) -> torch.Tensor:
    """Sum over ranks of acc's rows of this rank (chunk layout), padded to ceil(n/world) rows."""
    chunk = -(-acc.shape[0] // world)
    pad = chunk * world - acc.shape[0]
    src = acc if pad == 0 else torch.cat([acc, acc.new_zeros((pad, *acc.shape[1:]))])
    out = acc.new_empty((chunk, *acc.shape[1:]))
    dist.reduce_scatter_tensor(out, src.contiguous(), group=group)
    return out


def set_noise_key(gen, key: bytes) -> None:
    """Give a NoiseGenerator the key shared by all ranks (16 bytes broadcast from rank 0)."""
    gen.adopt_key(key)
