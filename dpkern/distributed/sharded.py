"""ShardedDPOptimizer: the DP optimizer over FSDP2 (`fully_shard`) parameters, 1-D or HSDP meshes.

Each rank's forward sees the unsharded weights, so its per-sample norms and book-keeping are
complete for its own samples: the engine writes each parameter's full-size fp32 clipped sum
S_r(p) = Σ_{i on rank r} c_i G_i(p). This optimizer takes S_r(p) the moment it is written
(`param_summed`, the engine book-keeps parameter by parameter in model order when
`sum_each_param` is set), reduces it to the rows this rank owns and frees the full-size buffer:

* 1-D mesh, placements (Shard(0),): reduce-scatter over the mesh (torch.chunk row layout, rows
  zero-padded to a multiple of the mesh size when they do not divide).
* 2-D mesh (HSDP), placements (Replicate(), Shard(0)): reduce-scatter over the shard dimension,
  then all-reduce of the shard over the replicate dimension. Every replica of a shard then holds
  the same sum of ALL ranks' clipped gradients for those rows.

The shard sums accumulate over the backward passes of a logical step (gradient accumulation) in
fp32 shard-sized buffers (`local_sums`); no full-size sum outlives its backward. At step() each
rank adds the noise of its rows at their global element indices (the parameter's offset in the
unsharded model + start_row × row size): z_j = Philox(key, step, j), so the union over shards is
the z of one unsharded process, and the replicas of a shard (HSDP) draw the same z for the same j
(same key, same counter) — the noise enters the update once, not once per replica.

Memory: at most `inflight_bytes` of reductions in flight plus the sum being written, i.e. one
parameter's full-size sum with the default 0. Every rank must run the same number of backward
passes per step (FSDP2 already needs this for its own collectives): each backward issues one
reduction per parameter, in model order, on every rank (zeros for a parameter this rank's
backward did not touch).
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import torch
import torch.distributed as dist

from dpkern.distributed import comm
from dpkern.distributed.optimizer import DistributedDPOptimizer, shard_rows

__all__ = ["ShardedDPOptimizer"]

_reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


@dataclass(frozen=True)
class _Layout:
    """Where rank r's rows of one parameter live: rows [start, stop) of the unsharded parameter,
    `shards` ranks in the shard group, and the replicate group (HSDP) or None."""
    start: int
    stop: int
    shards: int
    shard_group: object
    replicate_group: object


class ShardedDPOptimizer(DistributedDPOptimizer):
    """DPOptimizer over FSDP2 parameters: DTensors with placements (Shard(0),) on a 1-D mesh or
    (Replicate(), Shard(0)) on a 2-D (replicate × shard) mesh.

    Attributes:
        inflight_bytes: bytes of full-size sums whose reduction may still be in flight when the
            engine writes the next one (default 0: each reduction completes first, so at most one
            full-size sum exists at a time). A larger value lets the reductions overlap the next
            parameters' book-keeping (NCCL) at that much extra memory; all are complete when the
            backward pass ends.
        reduce_at_step: True keeps this rank's full-size sums until step() and reduces them
            there, once per step: k micro-batches then cost one reduction per parameter instead
            of k, at the memory of every full-size sum (and the engine's grouped launches and B = 1
            path stay on). Default False.
        local_sums: {parameter: fp32 sum of this step's clipped gradients over all ranks, this
            rank's rows only} (plain tensors, (stop - start, *shape[1:])).
    Post-processors (which need whole matrices) and non-Gaussian mechanisms are refused.
    """

    inflight_bytes = 0
    reduce_at_step = False

    @property
    def sum_each_param(self) -> bool:  # read by the engine at every backward
        return not self.reduce_at_step

    def _setup_distributed(self) -> None:
        from torch.distributed.tensor import DTensor, Replicate, Shard
        if self.grad_postprocessors:
            raise ValueError("grad_postprocessors: not supported with FSDP2 (they need whole "
                             "matrices; each rank holds only its rows)")
        if self.mechanism is not None:
            raise ValueError("mechanism: only the Gaussian mechanism is supported with FSDP2")
        self.fused = False  # the fused kernel takes plain tensors; sharded steps use the inner opt
        world = comm.world_size(self.group)
        self._layout: dict = {}
        self._rows: dict = {}
        for p, name in self.params.items():
            if not isinstance(p, DTensor):
                raise ValueError(f"{name}: not an FSDP2 (DTensor) parameter; with fully_shard, "
                                 "shard every module that owns trainable parameters, and call "
                                 "make_private after fully_shard")
            mesh, placements = p.device_mesh, tuple(p.placements)
            if placements not in ((Shard(0),), (Replicate(), Shard(0))):
                raise NotImplementedError(
                    f"{name}: placements {placements} on a {mesh.ndim}-D mesh; supported: "
                    "(Shard(0),) on a 1-D mesh (FSDP2) and (Replicate(), Shard(0)) on a 2-D "
                    "replicate x shard mesh (HSDP)")
            if mesh.size() != world:
                raise ValueError(f"{name}: its mesh has {mesh.size()} ranks, the process group "
                                 f"{world}; the mesh must span the data-parallel group")
            shards = mesh.size(mesh.ndim - 1)
            me = mesh.get_local_rank(mesh.ndim - 1) if comm.is_distributed() else 0
            start, stop = shard_rows(p.shape[0], shards, me) if p.dim() else (0, 0)
            local = p.to_local()
            if local.shape[0] != stop - start:
                raise RuntimeError(f"{name}: local shard has {local.shape[0]} rows, expected "
                                   f"{stop - start} (torch.chunk layout)")
            dist_on = comm.is_distributed()
            self._layout[p] = _Layout(
                start, stop, shards, mesh.get_group(mesh.ndim - 1) if dist_on else None,
                mesh.get_group(0) if dist_on and mesh.ndim == 2 and mesh.size(0) > 1 else None)
            self._rows[p] = (start, stop)
            row = p.numel() // max(p.shape[0], 1)
            # The shard's first element in the unsharded model's global index space.
            self.global_offsets[p] = self.global_offsets[p] + start * row
        self._order = list(self.params)
        self._index = {p: i for i, p in enumerate(self._order)}
        self._reset_sums()

    def _reset_sums(self) -> None:
        self.local_sums: dict = {}
        self._next = 0  # parameters [0, _next) of _order are reduced for this backward
        self._inflight: deque = deque()
        self._inflight_nbytes = 0

    # ---- called by the engine: one reduction per parameter, in model order ------------------
    def param_summed(self, p: torch.nn.Parameter) -> None:
        i = self._index[p]
        if i < self._next:
            raise RuntimeError(f"{self.params[p]}: its clipped sum was written after a later "
                               "parameter's; the sharded reductions need model order")
        while self._next <= i:  # parameters this backward skipped join with zeros, in order
            self._reduce(self._order[self._next])
            self._next += 1

    def note_backward(self, rows: int, nonfinite=0) -> None:
        super().note_backward(rows, nonfinite)
        if self.reduce_at_step:
            return
        while self._next < len(self._order):
            self._reduce(self._order[self._next])
            self._next += 1
        self._wait(0)
        self._next = 0

    def _reduce(self, p) -> None:
        full = self.summed.pop(p, None)
        if full is None:  # this rank's backward did not touch p: it contributes zeros
            full = torch.zeros(p.shape, device=p.device,
                               dtype=torch.float64 if p.dtype == torch.float64 else torch.float32)
        lay = self._layout[p]
        if not comm.is_distributed(self.group) or comm.world_size(self.group) == 1:
            self._add_local(p, full)
            return
        work, out = None, full
        if lay.shards > 1:
            chunk = -(-full.shape[0] // lay.shards)
            pad = chunk * lay.shards - full.shape[0]
            if pad:  # one extra full-size copy, only when the rows do not divide
                full = torch.cat([full, full.new_zeros((pad, *full.shape[1:]))])
            out = full.new_empty((chunk, *full.shape[1:]))
            work = _reduce_scatter(out, full, group=lay.shard_group, async_op=True)
        self._inflight.append((p, work, out, full))
        self._inflight_nbytes += full.numel() * full.element_size()
        del full
        self._wait(self.inflight_bytes)

    def _wait(self, limit: int) -> None:
        """Completes the oldest reductions until at most `limit` bytes are in flight."""
        while self._inflight and self._inflight_nbytes > limit:
            p, work, out, full = self._inflight.popleft()
            self._inflight_nbytes -= full.numel() * full.element_size()
            if work is not None:
                work.wait()
            lay = self._layout[p]
            if lay.shards == 1:  # replicate-only mesh: the whole parameter is this rank's
                out = out[lay.start:lay.stop]
            del full  # the full-size sum is freed here (the work held it until now)
            if lay.replicate_group is not None:
                dist.all_reduce(out, group=lay.replicate_group)
            self._add_local(p, out[: lay.stop - lay.start])

    def _add_local(self, p, part: torch.Tensor) -> None:
        acc = self.local_sums.get(p)
        if acc is None:
            self.local_sums[p] = part
        else:
            acc.add_(part)

    # ---- the step ---------------------------------------------------------------------------
    def _reduce_accumulators(self) -> None:
        """The reductions ran during the backward passes (or run now, with reduce_at_step): wrap
        the shard sums as DTensors (zeros where no backward ran this step, e.g. an empty global
        batch)."""
        from torch.distributed.tensor import DTensor
        if self.reduce_at_step:
            for p in self._order:
                self._reduce(p)
        self._wait(0)
        for p in self._order:
            lay = self._layout[p]
            local = self.local_sums.get(p)
            if local is None:
                local = torch.zeros((lay.stop - lay.start, *p.shape[1:]), device=p.device,
                                    dtype=torch.float64 if p.dtype == torch.float64
                                    else torch.float32)
            self.summed[p] = DTensor.from_local(local.contiguous(), p.device_mesh, p.placements,
                                                shape=p.shape, stride=p.stride(), run_check=False)

    def step(self, closure=None):
        loss = super().step(closure)
        self._reset_sums()
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        self._wait(0)
        super().zero_grad(set_to_none)
        self._reset_sums()

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
