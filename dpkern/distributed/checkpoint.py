"""Distributed checkpoints through torch.distributed.checkpoint (DCP): model, optimizer (DTensor
shards under FSDP2 / HSDP) and the DP state, in one checkpoint directory written by all ranks.

    engine.save_distributed_checkpoint(path, module=model, optimizer=optimizer)   # every rank
    ...                                       # later, maybe another world size:
    model, optimizer, loader = engine.make_private(...)     # same DP arguments, global B and q
    engine.load_distributed_checkpoint(path, module=model, optimizer=optimizer)   # every rank

The DP state saved beside the tensors: the accountant's history and the Poisson sampler's
generator (engine), the release count, noise counter, deterministic key (not in secure mode)
and DP configuration (optimizer). The run resumes with the same ε, the same noise counter (no
noise replayed or skipped) and the same global Poisson batches. DCP reshards the model and the
optimizer state on load, so the world size may differ from the saving run's: the global expected
batch size B and the sampling rate q must be the same (then each global batch, its noise
z_j = Philox(key, step, j) at global element indices j, and the accounting are unchanged; only the
split of each batch over ranks and the fp32 summation order differ).
"""
from __future__ import annotations

import copy

__all__ = ["save", "load"]


def _dp_state(engine, optimizer) -> dict:
    extra = optimizer.state_dict()["dpkern"]
    return {"engine": engine.state_dict(), "optimizer": extra,
            "sample_rate": float(engine.sample_rate), "world_size": engine.world_size}


def _model_optim(module, optimizer):
    from torch.distributed.checkpoint.state_dict import get_state_dict
    from torch.nn.parallel import DistributedDataParallel as DDP
    inner = module.module if isinstance(module, DDP) else module
    # The inner torch optimizer: DCP's state-dict helpers may run a zero-gradient step on an
    # optimizer without state, which must not be a DP release.
    model_sd, optim_sd = get_state_dict(inner, optimizer.original_optimizer)
    return inner, model_sd, optim_sd


def save(path, *, engine, module, optimizer) -> None:
    """Writes model, optimizer and DP state to the DCP directory `path` (collective: every rank
    calls it, between steps)."""
    import torch.distributed.checkpoint as dcp
    if optimizer.backwards or optimizer.summed or getattr(optimizer, "local_sums", None):
        raise RuntimeError("save_distributed_checkpoint: clipped sums of an unfinished step are "
                           "not saved; call it after optimizer.step()")
    _, model_sd, optim_sd = _model_optim(module, optimizer)
    dcp.save({"model": model_sd, "optim": optim_sd, "dpkern": _dp_state(engine, optimizer)},
             checkpoint_id=path, process_group=engine.group)


def load(path, *, engine, module, optimizer) -> None:
    """Restores what `save` wrote into `module`, `optimizer` (the DPOptimizer of make_private)
    and `engine`, resharding to this run's world size. Refuses, before changing anything, a
    checkpoint of another DP configuration (σ, C, global B, loss reduction, q)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_state_dict
    mine = _dp_state(engine, optimizer)
    # The DP state first, alone: DCP loads tensors in place (the model's and the optimizer's own
    # storage), so the checks must pass before the model and optimizer entries are read.
    sd = {"dpkern": copy.deepcopy(mine)}
    dcp.load(sd, checkpoint_id=path, process_group=engine.group)
    dp = sd["dpkern"]
    if dp["sample_rate"] != mine["sample_rate"]:
        raise ValueError(f"load_distributed_checkpoint: the checkpoint was written with sample "
                         f"rate {dp['sample_rate']!r}, this run has {mine['sample_rate']!r}")
    extra = dp["optimizer"]
    for k, v in extra.get("config", {}).items():
        if getattr(optimizer, k) != v:
            raise ValueError(f"load_distributed_checkpoint: the checkpoint was written with "
                             f"{k}={v!r}, this optimizer has {k}={getattr(optimizer, k)!r}")
    copy.deepcopy(engine.accountant).load_state_dict(dp["engine"]["accountant"])  # a check only
    # First change: the noise counter (refuses a state that would replay noise).
    optimizer.noise_generator.load_state_dict(extra["noise"])
    inner, model_sd, optim_sd = _model_optim(module, optimizer)
    sd = {"model": model_sd, "optim": optim_sd}
    dcp.load(sd, checkpoint_id=path, process_group=engine.group)
    set_state_dict(inner, optimizer.original_optimizer, model_state_dict=sd["model"],
                   optim_state_dict=sd["optim"])
    optimizer.noise_steps = int(extra.get("noise_steps", 0))
    optimizer.nonfinite_samples = int(extra.get("nonfinite_samples", 0))
    # Resharded: the engine's state (accountant, global sampler) does not depend on the world size.
    engine.load_state_dict(dict(dp["engine"], world_size=engine.world_size))
