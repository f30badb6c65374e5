"""What each rank runs in the distributed tests (module level, so spawned processes can import it),
and the single-process runs they are compared with.

The model is a tiny LM (Embedding -> Linear+bias -> GELU -> LayerNorm -> Linear) on random token
ids; a record is (ids (T,), index). `run_suite` runs every distributed scenario in one process
group (one spawn for the whole module keeps CI fast) and returns plain tensors / numbers.
"""
from __future__ import annotations

import io
import itertools
import os

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

N_DATA, T, VOCAB, WIDTH = 40, 7, 29, 12
PER_RANK = 4  # per-rank expected batch: global B_expected = PER_RANK * world
LR, MOMENTUM, C, SEED = 0.5, 0.5, 1.0, 7
MODES = ("plain", "ddp", "fsdp")
# loss = sum of per-sample losses, update divided by B_expected (optimizer.average_sum): the
# engine refuses a mean loss where output gradients are rounded coarser than fp32 (TF32 on GPUs).
SUM = {"loss_reduction": "sum"}


class TinyLM(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(VOCAB, WIDTH)
        self.block = nn.Sequential(nn.Linear(WIDTH, 20), nn.GELU(), nn.LayerNorm(20))
        self.head = nn.Linear(20, VOCAB, bias=False)

    def forward(self, ids):
        return self.head(self.block(self.emb(ids)))


def per_sample_loss(model, ids: torch.Tensor) -> torch.Tensor:
    """(B,) mean next-token cross-entropy of each sequence."""
    logits = model(ids)[:, :-1]
    ce = F.cross_entropy(logits.reshape(-1, VOCAB), ids[:, 1:].reshape(-1), reduction="none")
    return ce.view(ids.shape[0], -1).mean(dim=1)


def dataset() -> TensorDataset:
    g = torch.Generator().manual_seed(1)
    return TensorDataset(torch.randint(0, VOCAB, (N_DATA, T), generator=g), torch.arange(N_DATA))


def fixed_rows(n: int) -> torch.Tensor:
    return torch.randint(0, VOCAB, (n, T), generator=torch.Generator().manual_seed(2))


def build(mode: str, device: torch.device):
    """The model (same init on every process) as `mode` wants it, and its optimizer."""
    torch.manual_seed(0)
    model = TinyLM().to(device)
    if mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP
        model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
    elif mode in ("fsdp", "hsdp"):
        import torch.distributed as dist
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard
        # the mesh on the model's device type: without it FSDP2 picks CUDA whenever a GPU exists,
        # which moves a gloo / CPU run's parameters to the GPU
        world = dist.get_world_size()
        mesh = (init_device_mesh(device.type, (world,)) if mode == "fsdp" else
                init_device_mesh(device.type, (world // 2, 2), mesh_dim_names=("rep", "shard")))
        fully_shard(model.block, mesh=mesh)
        fully_shard(model, mesh=mesh)
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM)
    return model, opt


def full_params(model) -> dict:
    """{name: fp32 CPU copy of the whole parameter} (a collective under FSDP2)."""
    out = {}
    for name, p in model.named_parameters():
        t = p.full_tensor() if hasattr(p, "full_tensor") else p
        out[name.removeprefix("module.")] = t.detach().float().cpu().clone()
    return out


def _engine(mode: str, world: int):
    if mode == "single":
        from dpkern import PrivacyEngine
        return PrivacyEngine(accountant="rdp")
    from dpkern.distributed import DistributedPrivacyEngine
    return DistributedPrivacyEngine(accountant="rdp")


def train(mode: str, device, *, sigma: float, steps: int, world: int = 1, seed: int | None = SEED,
          resume_after: int | None = None) -> dict:
    """`steps` DP steps on Poisson batches. mode "single": PrivacyEngine, batch_size PER_RANK*world
    (the single-process run a `world`-rank run must equal). resume_after=k: after k steps the
    state is saved, a fresh model / optimizer / engine loads it and runs the rest."""
    ds = dataset()
    bsz = PER_RANK * world if mode == "single" else PER_RANK

    def make():
        model, opt = build("plain" if mode == "single" else mode, device)
        eng = _engine(mode, world)
        model, opt, loader = eng.make_private(
            module=model, optimizer=opt, data_loader=DataLoader(ds, batch_size=bsz),
            noise_multiplier=sigma, max_grad_norm=C, seed=seed, **SUM)
        opt.average_sum = True
        return model, opt, loader, eng

    model, opt, loader, eng = make()
    batches = _forever(loader)
    rows, local = [], []
    for k in range(steps):
        if resume_after is not None and k == resume_after:
            state = _save(model, opt, eng)
            model, opt, loader, eng = make()
            _load(state, model, opt, eng)
            batches = _forever(loader)
        ids, idx = next(batches)
        rows.append(idx.tolist())
        local.append(loader.local_sizes if hasattr(loader, "local_sizes") else [len(idx)])
        ids = ids.to(device)
        if ids.shape[0] > 0:
            per_sample_loss(model, ids).sum().backward()
        elif mode in ("fsdp", "hsdp"):  # FSDP's collectives need every rank's forward / backward
            pad, _ = loader.padding_batch()
            (per_sample_loss(model, pad.to(device)).sum() * 0).backward()
        opt.step()
        opt.zero_grad()
    out = {"params": full_params(model), "eps": eng.get_epsilon(1e-5), "rows": rows,
           "local_sizes": local, "noise_steps": opt.noise_steps,
           "counter": opt.noise_generator.step}
    if mode in ("plain", "ddp"):
        out["in_sync"] = opt.in_sync(model)
    return out


def _forever(loader):
    while True:
        yield from loader


def _save(model, opt, eng) -> bytes:
    buf = io.BytesIO()
    torch.save({"model": {k: v.detach().clone() for k, v in model.state_dict().items()},
                "opt": opt.state_dict(), "engine": eng.state_dict()}, buf)
    return buf.getvalue()


def _load(state: bytes, model, opt, eng) -> None:
    st = torch.load(io.BytesIO(state), weights_only=False)
    with torch.no_grad():
        model.load_state_dict(st["model"])
    opt.load_state_dict(st["opt"])
    eng.load_state_dict(st["engine"])


def one_step(mode: str, device, *, sigma: float, rows_by_rank: list[int], rank: int = 0,
             world: int = 1, micro: int | None = None, inflight: int | None = None,
             at_step: bool = False) -> dict:
    """One step over fixed rows with data_loader=None: rank r gets rows_by_rank[r] rows of
    fixed_rows (0 rows: the rank steps without a backward, or a zero-loss padding row under
    FSDP). mode "single": all the rows in one process. Sharded modes also return "trace": what
    was alive while the reductions ran (see _trace_sums); inflight sets the optimizer's
    inflight_bytes, at_step its reduce_at_step."""
    model, opt = build("plain" if mode == "single" else mode, device)
    eng = _engine(mode, world)
    model, opt, _ = eng.make_private(module=model, optimizer=opt, data_loader=None,
                                     noise_multiplier=sigma, max_grad_norm=C,
                                     expected_batch_size=PER_RANK * world, sample_rate=0.2,
                                     seed=SEED, **SUM)
    opt.average_sum = True
    trace = _trace_sums(opt) if mode in ("fsdp", "hsdp") else None
    if inflight is not None:
        opt.inflight_bytes = inflight
    if at_step:
        opt.reduce_at_step = True
    x = fixed_rows(sum(rows_by_rank)).to(device)
    start = sum(rows_by_rank[:rank]) if mode != "single" else 0
    n = rows_by_rank[rank] if mode != "single" else sum(rows_by_rank)
    if n > 0:
        from dpkern.data.poisson import microbatches
        for mb in microbatches(x[start:start + n], micro or n):
            per_sample_loss(model, mb).sum().backward()
            if trace is not None:
                trace["after_backward"].append(_sums_state(opt))
    else:
        opt.signal_empty_batch()
        if mode in ("fsdp", "hsdp"):
            (per_sample_loss(model, fixed_rows(1).to(device)).sum() * 0).backward()
    opt.step()
    return {"params": full_params(model), "eps": eng.get_epsilon(1e-5),
            "counter": opt.noise_generator.step, "trace": trace}


def _trace_sums(opt) -> dict:
    """Spies on the sharded optimizer's param_summed: at each call, the full-size sums alive
    (written and not yet reduced, or in flight) and their elements; the calls' parameter order."""
    trace = {"alive": [], "alive_numel": [], "order": [], "after_backward": [],
             "largest": max(p.numel() for p in opt.params)}
    inner = opt.param_summed

    def spy(p):
        alive = list(opt.summed.values()) + [f for *_, f in opt._inflight]
        trace["alive"].append(len(alive))
        trace["alive_numel"].append(sum(t.numel() for t in alive))
        trace["order"].append(opt.params[p])
        inner(p)
    opt.param_summed = spy
    return trace


def _sums_state(opt) -> dict:
    """After a backward: full-size sums left, shard sums ({name: shape}) and the local shapes."""
    return {"full_left": len(opt.summed) + len(opt._inflight),
            "local": {opt.params[p]: tuple(t.shape) for p, t in opt.local_sums.items()},
            "want": {n: tuple(p.to_local().shape) for p, n in opt.params.items()},
            "sum_abs": {opt.params[p]: float(t.abs().sum()) for p, t in opt.local_sums.items()}}


def run_suite(rank: int, world: int, device_type: str = "cpu") -> dict:
    """Every distributed scenario of tests/distributed, on this rank; keys (scenario, mode, ...)."""
    from dpkern.distributed import NO_MULTICAST_ENV
    device = torch.device("cuda", rank) if device_type == "cuda" else torch.device("cpu")
    out = {"env": {k: os.environ.get(k) for k in NO_MULTICAST_ENV}}
    for mode, sigma in itertools.product(MODES, (0.0, 1.0)):
        out[("train", mode, sigma)] = train(mode, device, sigma=sigma, steps=3, world=world)
    for mode in ("ddp", "fsdp"):
        out[("resume", mode)] = train(mode, device, sigma=1.0, steps=3, world=world,
                                      resume_after=2)
        out[("empty_rank", mode)] = one_step(mode, device, sigma=1.0, rank=rank, world=world,
                                             rows_by_rank=[3] + [0] * (world - 1))
        out[("all_empty", mode)] = one_step(mode, device, sigma=1.0, rank=rank, world=world,
                                            rows_by_rank=[0] * world)
    # Gradient accumulation: micro-batches of 2 rows, rank 0 2 + 2, the others 2 + 1 (FSDP needs
    # the same number of forward / backward passes on every rank).
    for mode in ("ddp", "fsdp"):
        out[("micro", mode)] = one_step(mode, device, sigma=1.0, rank=rank, world=world,
                                        rows_by_rank=[4] + [3] * (world - 1), micro=2)
    # The same with every reduction of a backward in flight at once (inflight_bytes unbounded).
    out[("micro_overlap", "fsdp")] = one_step("fsdp", device, sigma=1.0, rank=rank, world=world,
                                              rows_by_rank=[4] + [3] * (world - 1), micro=2,
                                              inflight=1 << 40)
    # ... and with the full-size sums kept until step() (reduce_at_step: one reduction per step).
    out[("micro_at_step", "fsdp")] = one_step("fsdp", device, sigma=1.0, rank=rank, world=world,
                                              rows_by_rank=[4] + [3] * (world - 1), micro=2,
                                              at_step=True)
    out[("secure", "ddp")] = train("ddp", device, sigma=1.0, steps=2, world=world, seed=None)
    out["refusals"] = refusals(rank, world, device)
    return out


def refusals(rank: int, world: int, device) -> dict:
    """Error messages (or None) of what must be refused, the same way on every rank."""
    from dpkern.distributed import DistributedPrivacyEngine
    got = {}
    model, opt = build("ddp", device)
    model, opt, _ = DistributedPrivacyEngine(accountant="rdp").make_private(
        module=model, optimizer=opt, data_loader=None, noise_multiplier=1.0, max_grad_norm=C,
        expected_batch_size=PER_RANK * world, sample_rate=0.2, seed=SEED, **SUM)
    if rank == 0:  # the other ranks neither backward nor report an empty share
        per_sample_loss(model, fixed_rows(2).to(device)).sum().backward()
    try:
        opt.step()
        got["step_without_backward"] = None
    except RuntimeError as e:
        got["step_without_backward"] = str(e)
    model, opt = build("fsdp", device)
    try:
        DistributedPrivacyEngine(accountant="rdp").make_private(
            module=model, optimizer=opt, data_loader=None, noise_multiplier=1.0, max_grad_norm=C,
            expected_batch_size=PER_RANK * world, sample_rate=0.2, seed=SEED,
            grad_postprocessors=[lambda grads, std: None])
        got["fsdp_postprocessors"] = None
    except ValueError as e:
        got["fsdp_postprocessors"] = str(e)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import Shard
    torch.manual_seed(0)
    model = TinyLM().to(device)
    fully_shard(model, mesh=init_device_mesh(device.type, (world,)),
                shard_placement_fn=lambda p: Shard(1) if p.dim() == 2 else None)
    try:
        DistributedPrivacyEngine(accountant="rdp").make_private(
            module=model, optimizer=torch.optim.SGD(model.parameters(), lr=LR), data_loader=None,
            noise_multiplier=1.0, max_grad_norm=C, expected_batch_size=PER_RANK * world,
            sample_rate=0.2, seed=SEED, **SUM)
        got["fsdp_shard1"] = None
    except NotImplementedError as e:
        got["fsdp_shard1"] = str(e)
    model, opt = build("ddp", device)
    ds = dataset()
    _, opt, _ = DistributedPrivacyEngine(accountant="rdp").make_private_with_epsilon(
        module=model, optimizer=opt, data_loader=DataLoader(ds, batch_size=PER_RANK),
        target_epsilon=3.0, target_delta=1e-5, epochs=2, max_grad_norm=C, seed=SEED)
    got["calibrated_sigma"] = opt.noise_multiplier
    return got


def calibrated_sigma_single(world: int) -> float:
    from dpkern import PrivacyEngine
    model, opt = build("plain", torch.device("cpu"))
    _, opt, _ = PrivacyEngine(accountant="rdp").make_private_with_epsilon(
        module=model, optimizer=opt, data_loader=DataLoader(dataset(), batch_size=PER_RANK * world),
        target_epsilon=3.0, target_delta=1e-5, epochs=2, max_grad_norm=C, seed=SEED)
    return opt.noise_multiplier


def hang_or_fail(rank: int, world: int, what: str):
    """For the launcher tests: rank 1 raises or hangs."""
    import time
    if rank == 1 and what == "fail":
        raise ValueError("rank one fails on purpose")
    if rank == 1 and what == "hang":
        time.sleep(3600)
    return rank


def run_hsdp_suite(rank: int, world: int, device_type: str = "cpu") -> dict:
    """HSDP (2-D mesh: world // 2 replicas x 2 shards) scenarios; keys as run_suite's."""
    device = torch.device("cuda", rank) if device_type == "cuda" else torch.device("cpu")
    out = {}
    for sigma in (0.0, 1.0):
        out[("train", "hsdp", sigma)] = train("hsdp", device, sigma=sigma, steps=3, world=world)
    out[("micro", "hsdp")] = one_step("hsdp", device, sigma=1.0, rank=rank, world=world,
                                      rows_by_rank=[4] + [3] * (world - 1), micro=2)
    out[("empty_rank", "hsdp")] = one_step("hsdp", device, sigma=1.0, rank=rank, world=world,
                                           rows_by_rank=[3] + [0] * (world - 1))
    return out


def dcp_train(rank: int, world: int, path: str, save_after: int | None = None,
              load: bool = False, mode: str = "fsdp", steps: int = 3) -> dict:
    """A `mode` run with the global B and q of a 2-rank run (B = 2 * PER_RANK, q = B / N_DATA) at
    any world size. save_after=k: save_distributed_checkpoint to `path` after step k and go on;
    load: start from `path` and run the steps after the saved one."""
    from dpkern.distributed import DistributedPrivacyEngine
    device = torch.device("cpu")
    model, opt = build(mode, device)
    eng = DistributedPrivacyEngine(accountant="rdp")
    bsz = 2 * PER_RANK
    model, opt, loader = eng.make_private(
        module=model, optimizer=opt, data_loader=DataLoader(dataset(), batch_size=PER_RANK),
        noise_multiplier=1.0, max_grad_norm=C, expected_batch_size=bsz,
        sample_rate=bsz / N_DATA, seed=SEED, **SUM)
    opt.average_sum = True
    first = 0
    if load:
        eng.load_distributed_checkpoint(path, module=model, optimizer=opt)
        first = opt.noise_steps
    batches = _forever(loader)
    rows = []
    for k in range(first, steps):
        ids, idx = next(batches)
        rows.append(idx.tolist())
        if ids.shape[0] > 0:
            per_sample_loss(model, ids).sum().backward()
        else:
            pad, _ = loader.padding_batch()
            (per_sample_loss(model, pad).sum() * 0).backward()
        opt.step()
        opt.zero_grad()
        if save_after is not None and k + 1 == save_after:
            eng.save_distributed_checkpoint(path, module=model, optimizer=opt)
    return {"params": full_params(model), "eps": eng.get_epsilon(1e-5), "rows": rows,
            "counter": opt.noise_generator.step, "noise_steps": opt.noise_steps, "first": first}


def dcp_refusal(rank: int, world: int, path: str) -> str | None:
    """Loading the checkpoint into a run with another sigma is refused: the message, the noise
    counter and whether the parameters are unchanged."""
    from dpkern.distributed import DistributedPrivacyEngine
    model, opt = build("fsdp", torch.device("cpu"))
    eng = DistributedPrivacyEngine(accountant="rdp")
    model, opt, _ = eng.make_private(
        module=model, optimizer=opt, data_loader=DataLoader(dataset(), batch_size=PER_RANK),
        noise_multiplier=2.0, max_grad_norm=C, expected_batch_size=2 * PER_RANK,
        sample_rate=2 * PER_RANK / N_DATA, seed=SEED, **SUM)
    before = full_params(model)
    try:
        eng.load_distributed_checkpoint(path, module=model, optimizer=opt)
    except ValueError as e:
        same = all(torch.equal(before[k], v) for k, v in full_params(model).items())
        return str(e) + f" | counter {opt.noise_generator.step} | params unchanged {same}"
    return None
