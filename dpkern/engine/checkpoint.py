"""One-file engine checkpoints: model, DP optimizer (inner state, release count, noise counter),
accountant and Poisson sampler, written atomically and checked before anything is loaded.

    engine.save_checkpoint(path="run/ckpt.pt", module=model, optimizer=optimizer)
    ...  # a fresh process: same model / optimizer / make_private arguments, then
    extra = engine.load_checkpoint(path="run/ckpt.pt", module=model, optimizer=optimizer)

File: torch.save of {"format", "config", "digest", "payload"}. `config` is the engine's DP
configuration (σ, C, B_expected, q, clipping, accountant, ...) and the private parameters' names
and shapes; a checkpoint is loaded only into an engine with the same config. `digest` is a SHA-256
over the payload (keys, scalars and every tensor's bytes), so a damaged file is refused even where
torch's zip reader does not check its data. Writing goes to a temporary file in the same folder,
fsync, then rename over `path` (and fsync of the folder): a reader sees the old file or the new one,
never a mix, and a crash mid-write leaves the previous checkpoint intact.

Loading validates the whole file before it changes anything (digest, format, configuration, the
model's keys and shapes, the optimizer's groups and noise state, the accountant's kind and
history): a refused file leaves the model, optimizer, accountant and sampler as they were, and the
error names what disagreed.

Secrets: the noise key of a secure NoiseGenerator is never written, and neither is the key of the
Poisson sampler's SecretSampling (only its draw counter), so a checkpoint cannot disclose which
records later batches hold; a resumed run keeps its own fresh keys and continues both counters,
so its ε equals the uninterrupted run's although its batches and noise differ. Seeded runs
(tests) save the seeded generators' full states and resume bit for bit.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch

FORMAT = "dpkern.engine.checkpoint/1"


def atomic_write(path, write) -> None:
    """Calls ``write(f)`` on a temporary file beside ``path``, fsyncs it and renames it over
    ``path``; then fsyncs the folder so the rename itself survives a crash."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    try:
        fd = os.open(path.parent, os.O_RDONLY)
    except OSError:  # platforms without directory handles
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def digest(obj) -> str:
    """SHA-256 over a nested structure of dicts / lists / tuples / tensors / scalars, in order."""
    h = hashlib.sha256()
    _feed(h, obj)
    return h.hexdigest()


def _feed(h, obj) -> None:
    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu().contiguous()
        h.update(f"T{t.dtype}{tuple(t.shape)}".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    elif isinstance(obj, dict):
        h.update(f"D{len(obj)}".encode())
        for k, v in obj.items():
            _feed(h, k)
            _feed(h, v)
    elif isinstance(obj, (list, tuple)):
        h.update(f"{type(obj).__name__[0]}{len(obj)}".encode())
        for v in obj:
            _feed(h, v)
    else:
        h.update(f"S{type(obj).__name__}:{obj!r};".encode())


def engine_config(engine, module, optimizer) -> dict:
    """What a checkpoint must agree on to be resumed by this engine: the DP configuration and the
    private parameters (names, shapes, dtypes)."""
    cfg = dict(engine._config)
    cfg.update(noise_multiplier=optimizer.noise_multiplier, max_grad_norm=optimizer.max_grad_norm,
               expected_batch_size=optimizer.expected_batch_size,
               loss_reduction=optimizer.loss_reduction, average_sum=bool(optimizer.average_sum),
               accountant=engine.accountant_name, sample_rate=engine.sample_rate,
               secure_mode=engine.secure_mode,
               mechanism=None if engine.mechanism is None else repr(engine.mechanism))
    cfg["params"] = [[name, list(p.shape), str(p.dtype)] for p, name in optimizer.params.items()]
    return cfg


def _check_args(engine, module, optimizer, where: str):
    from dpkern.distributed.engine import DistributedPrivacyEngine
    from dpkern.subspace.engine import SubspacePrivacyEngine
    if isinstance(engine, (DistributedPrivacyEngine, SubspacePrivacyEngine)):
        raise NotImplementedError(
            f"{where}: {type(engine).__name__} keeps state a one-file checkpoint does not hold "
            "(per-rank shards / subspace bases); save model.state_dict(), optimizer.state_dict() "
            "and engine.state_dict() as docs/distributed.md and dpkern/subspace/README.md say")
    if engine.optimizer is None:
        raise RuntimeError(f"{where}: call make_private first (the checkpoint holds the state of a "
                           "private run)")
    if not isinstance(module, torch.nn.Module):
        raise TypeError(f"{where}: module must be a torch.nn.Module, got {type(module).__name__}")
    optimizer = engine.optimizer if optimizer is None else optimizer
    if optimizer is not engine.optimizer:
        raise ValueError(f"{where}: optimizer is not the DPOptimizer this engine's make_private "
                         "returned (its noise counter and release count are what resumes)")
    own = {id(p) for p in module.parameters()}
    if not all(id(p) in own for p in optimizer.params):
        raise ValueError(f"{where}: module is not the module this engine made private")
    return optimizer


def save(engine, *, path, module, optimizer=None, checkpoint_dict: dict | None = None) -> Path:
    optimizer = _check_args(engine, module, optimizer, "save_checkpoint")
    if optimizer.backwards:
        raise RuntimeError("save_checkpoint: a backward pass has run since the last step(); save "
                           "between steps (the clipped sums of a half-done step are not saved)")
    payload = {"module": module.state_dict(), "optimizer": optimizer.state_dict(),
               "engine": engine.state_dict(), "user": dict(checkpoint_dict or {})}
    blob = {"format": FORMAT, "config": engine_config(engine, module, optimizer),
            "digest": digest(payload), "payload": payload}
    path = Path(path)
    atomic_write(path, lambda f: torch.save(blob, f))
    return path


def load(engine, *, path, module, optimizer=None, map_location="cpu",
         weights_only: bool = True) -> dict:
    optimizer = _check_args(engine, module, optimizer, "load_checkpoint")
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"load_checkpoint: no checkpoint file at {path}")
    try:
        blob = torch.load(path, map_location=map_location, weights_only=weights_only)
    except Exception as e:
        raise ValueError(f"load_checkpoint: {path} is damaged or not a dpkern checkpoint "
                         f"({type(e).__name__}: {str(e)[:200]})") from e
    if not isinstance(blob, dict) or blob.get("format") != FORMAT:
        got = blob.get("format") if isinstance(blob, dict) else type(blob).__name__
        raise ValueError(f"load_checkpoint: {path} is not a dpkern engine checkpoint (format "
                         f"{got!r}, expected {FORMAT!r})")
    payload = blob.get("payload")
    if not isinstance(payload, dict) or digest(payload) != blob.get("digest"):
        raise ValueError(f"load_checkpoint: {path} is damaged (its SHA-256 digest does not match "
                         "its contents); nothing was loaded")
    _check_config(blob.get("config") or {}, engine_config(engine, module, optimizer), path)
    _check_module(payload["module"], module, path)

    optimizer.check_state_dict(payload["optimizer"])
    engine.check_state_dict(payload["engine"])
    # Every check has passed: nothing below refuses a well-formed, matching checkpoint.
    module.load_state_dict(payload["module"])
    optimizer.load_state_dict(payload["optimizer"])
    engine.load_state_dict(payload["engine"])
    return payload.get("user", {})


def _check_config(saved: dict, mine: dict, path) -> None:
    for k in list(mine) + [k for k in saved if k not in mine]:  # the config's own order
        a, b = saved.get(k), mine.get(k)
        if a == b:
            continue
        if k == "params":
            sa = {n: (s, d) for n, s, d in (a or [])}
            sb = {n: (s, d) for n, s, d in (b or [])}
            diff = sorted(set(sa) ^ set(sb)) or [n for n in sb if sa[n] != sb[n]]
            raise ValueError(f"load_checkpoint: {path} was written for other private parameters "
                             f"(first difference: {diff[0]!r}); nothing was loaded")
        raise ValueError(f"load_checkpoint: {path} was written with {k}={a!r}, this engine has "
                         f"{k}={b!r}; nothing was loaded")


def _check_module(state: dict, module, path) -> None:
    mine = module.state_dict()
    missing = sorted(set(mine) - set(state))
    extra = sorted(set(state) - set(mine))
    if missing or extra:
        raise ValueError(f"load_checkpoint: {path} holds another model's state (missing "
                         f"{missing[:3]}, unexpected {extra[:3]}); nothing was loaded")
    for k, v in mine.items():
        if tuple(state[k].shape) != tuple(v.shape):
            raise ValueError(f"load_checkpoint: {path}: {k} has shape {tuple(state[k].shape)}, the "
                             f"model has {tuple(v.shape)}; nothing was loaded")
