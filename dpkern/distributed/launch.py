"""A torchrun-free launcher: run fn(rank, world_size, *args) in `nprocs` fresh processes.

    results = launch.spawn(worker, 2, backend="gloo", args=(cfg,), timeout_s=120)

Every process gets NVLink multicast switched off (NO_MULTICAST_ENV) before it starts, a process
group (MASTER_ADDR 127.0.0.1, a free port, init and collective timeout), and, for NCCL, its own
GPU (cuda:rank). The parent waits at most `timeout_s`: a hang, a crash or an exception in any rank
kills every rank and raises here with the failing rank's traceback, so a test fails instead of
blocking. What each fn returns comes back in a list, by rank (it travels through torch.save).
"""
from __future__ import annotations

import datetime
import os
import socket
import sys
import tempfile
import time
import traceback
from typing import Callable

import torch
import torch.multiprocessing as mp

from dpkern.distributed.comm import NO_MULTICAST_ENV, disable_nvlink_multicast

__all__ = ["free_port", "spawn"]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _child(rank: int, world: int, backend: str, port: int, fn: Callable, args: tuple,
           folder: str, coll_timeout_s: float) -> None:
    import torch.distributed as dist
    os.environ.update(NO_MULTICAST_ENV)  # again: a child must not rely on its parent's env alone
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    try:
        kw = {}
        if backend == "nccl":
            torch.cuda.set_device(rank)
            kw["device_id"] = torch.device("cuda", rank)
        dist.init_process_group(backend, rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=coll_timeout_s), **kw)
        try:
            out = fn(rank, world, *args)
            dist.barrier()  # no rank tears the group down while a peer still talks to it
        finally:
            dist.destroy_process_group()
        torch.save(out, os.path.join(folder, f"out{rank}.pt"))
    except BaseException:
        with open(os.path.join(folder, f"err{rank}.txt"), "w") as f:
            f.write(traceback.format_exc())
        raise SystemExit(1)
    # Done and saved: leave without the interpreter's teardown, where a collective library's
    # background thread destroyed while joinable aborts the process ("terminate called without
    # an active exception", exit code -6 seen under CPU contention) after the work succeeded.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def spawn(fn: Callable, nprocs: int, *, backend: str = "gloo", args: tuple = (),
          timeout_s: float = 300.0, coll_timeout_s: float | None = None) -> list:
    """Run fn(rank, nprocs, *args) in nprocs spawned processes; returns their results by rank.

    Args:
        fn: a module-level (picklable) function.
        nprocs: world size (> 0). backend: "gloo" or "nccl" (one GPU per rank).
        timeout_s: wall-clock limit for the whole run; past it every rank is killed.
        coll_timeout_s: the process group's collective timeout (default timeout_s).
    Raises RuntimeError naming the rank that failed (with its traceback) or the timeout.
    """
    if int(nprocs) <= 0:
        raise ValueError(f"nprocs must be > 0, got {nprocs}")
    if backend not in ("gloo", "nccl"):
        raise ValueError(f"backend must be 'gloo' or 'nccl', got {backend!r}")
    if backend == "nccl" and torch.cuda.device_count() < nprocs:
        raise RuntimeError(f"backend='nccl' with {nprocs} ranks needs {nprocs} GPUs, found "
                           f"{torch.cuda.device_count()}")
    disable_nvlink_multicast()  # inherited by the children at start
    try:
        return _spawn_once(fn, nprocs, backend, args, timeout_s, coll_timeout_s)
    except _PortTaken:  # another process took the free port before rank 0 bound it: once more
        return _spawn_once(fn, nprocs, backend, args, timeout_s, coll_timeout_s)


class _PortTaken(RuntimeError):
    pass


def _spawn_once(fn, nprocs, backend, args, timeout_s, coll_timeout_s) -> list:
    ctx = mp.get_context("spawn")
    with tempfile.TemporaryDirectory(prefix="dpkern_dist_") as folder:
        port = free_port()
        procs = [ctx.Process(target=_child, daemon=False,
                             args=(r, nprocs, backend, port, fn, tuple(args), folder,
                                   float(coll_timeout_s or timeout_s)))
                 for r in range(nprocs)]
        for p in procs:
            p.start()
        deadline = time.monotonic() + float(timeout_s)
        failed = None
        while any(p.is_alive() for p in procs):
            if time.monotonic() > deadline:
                failed = f"timed out after {timeout_s:.0f} s (a rank hung?)"
                break
            if any(p.exitcode not in (None, 0) for p in procs):
                failed = "a rank failed"
                break
            time.sleep(0.05)
        for p in procs:
            if p.is_alive():
                p.kill()
            p.join(5)
        errs = []
        for r in range(nprocs):
            path = os.path.join(folder, f"err{r}.txt")
            if os.path.exists(path):
                errs.append(f"--- rank {r} ---\n" + open(path).read())
        codes = [p.exitcode for p in procs]
        if failed or errs or any(c != 0 for c in codes):
            err = _PortTaken if any("address already in use" in e.lower() or "eaddrinuse"
                                    in e.lower() for e in errs) else RuntimeError
            raise err(f"spawn({getattr(fn, '__name__', fn)}, {nprocs}, {backend}): "
                      f"{failed or 'a rank failed'}; exit codes {codes}\n" + "\n".join(errs))
        return [torch.load(os.path.join(folder, f"out{r}.pt"), weights_only=False)
                for r in range(nprocs)]
