"""``run(config)``: the whole fine-tuning job, from checks to the run folder.

Order matters: every check that can fail on bad input (options, data, model folder, the privacy
budget) runs before the model's weights are loaded or a batch is drawn. Then: train with
evaluations on the dev slice, checkpoints (atomic) at each evaluation, the best dev checkpoint
evaluated once on the test split, and the run folder written (see report.py).
"""
from __future__ import annotations

import copy
import math
import os
import shutil
import random
import time
from datetime import datetime
from pathlib import Path

import torch

from dpkern.finetune import methods
from dpkern.finetune.config import FinetuneConfig, FinetuneError, repo_root
from dpkern.finetune.data import PadCollate, TokenizedDataset, check_labels, load_splits
from dpkern.finetune.models import (apply_lora, check_model_dir, count_parameters, load_model,
                                    load_tokenizer, resolve_model_dir, select_trainable)
from dpkern.finetune.privacy import calibrate, PrivatePlan
from dpkern.finetune.report import (MetricsLog, load_checkpoint, plot_curves, save_checkpoint,
                                    write_json)
from dpkern.finetune.sft import SFTStages
from dpkern.finetune.train import Throughput, evaluate, train_step

RESUME_KEYS = ("model", "data", "task", "max_length", "train_size", "dev_size", "private",
               "epsilon", "delta", "noise_multiplier", "max_grad_norm", "clipping", "accountant",
               "method", "accept_uncertified_epsilon", "lmo_params", "lmo_mgf_domain", "sft_rank",
               "sft_stage1_steps", "batch_size", "steps", "epochs", "lr", "trainable", "lora_r",
               "seed")


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise FinetuneError(f"--device {name}: no CUDA device is available here")
    return torch.device(name)


def _check_backend(backend: str, device: torch.device) -> None:
    """A backend asked for by name must be able to run on the device (auto always can)."""
    if backend == "cuda":
        import dpkern
        if device.type != "cuda":
            raise FinetuneError("--backend cuda: needs --device cuda (the CUDA kernels run on GPU "
                                "tensors only); use --backend auto or torch on CPU")
        if not dpkern.cuda_available():
            raise FinetuneError(f"--backend cuda: the CUDA extension is not usable here "
                                f"({dpkern.cuda_unavailable_reason()}); use --backend auto")
    if backend == "triton" and device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise FinetuneError("--backend triton: on CPU the Triton kernels run only under "
                            "TRITON_INTERPRET=1 (slow, for tests); use --backend auto or torch")


def _run_dir(cfg: FinetuneConfig) -> Path:
    if cfg.output_dir:
        return Path(cfg.output_dir).expanduser()
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    tag = "private" if cfg.private else "nonprivate"
    return repo_root() / "runs" / f"{stamp}-{Path(cfg.model).name}-{Path(cfg.data).stem}-{tag}"


def _subset(rows: list, n: int | None, seed: int | None) -> list:
    if n is None or n >= len(rows):
        return rows
    idx = sorted(random.Random(0 if seed is None else seed).sample(range(len(rows)), n))
    return [rows[i] for i in idx]


def _trainable_state(model) -> dict:
    return {n: p.detach().to("cpu", copy=True) for n, p in model.named_parameters()
            if p.requires_grad}


def _load_trainable(model, state: dict) -> None:
    params = dict(model.named_parameters())
    with torch.no_grad():
        for n, t in state.items():
            params[n].copy_(t)


def _check_resume(cfg: FinetuneConfig, out: Path) -> FinetuneConfig:
    """The saved config of the run in ``out`` (settings that shape the run come from there)."""
    import json
    ck, saved = out / "checkpoint.pt", out / "config.json"
    if not ck.is_file() or not saved.is_file():
        raise FinetuneError(f"--resume: {out} holds no checkpoint.pt/config.json to resume from "
                            "(give the --output-dir of an earlier run)")
    old = json.loads(saved.read_text())
    merged = FinetuneConfig(**{**cfg.to_dict(), **{k: old[k] for k in RESUME_KEYS if k in old}})
    return merged.validate()


def run(cfg: FinetuneConfig, log=print) -> dict:
    """Runs the job; returns the summary dict (also written to summary.json in the run folder)."""
    cfg.validate()
    out = _run_dir(cfg)
    if cfg.resume:
        if not cfg.output_dir:
            raise FinetuneError("--resume needs --output-dir (the folder of the run to continue)")
        cfg = _check_resume(cfg, out)
    elif (out / "checkpoint.pt").exists():
        raise FinetuneError(f"--output-dir: {out} already holds a run; add --resume to continue "
                            "it or choose another folder")
    method = methods.check_method(cfg)
    device = _device(cfg.device)
    _check_backend(cfg.backend, device)

    # ---- input checks: data, labels, model folder, budget (no weights loaded yet) -------------
    causal = cfg.task == "causal-lm"
    splits = load_splits(cfg.data, task=cfg.task, text_column=cfg.text_column,
                         label_column=cfg.label_column, seed=cfg.seed)
    num_labels = None if causal else check_labels(splits, cfg.num_labels)
    model_dir = resolve_model_dir(cfg.model)
    check_model_dir(model_dir, cfg.task)
    train_rows = _subset(splits.train, cfg.train_size, cfg.seed)
    dev_rows = _subset(splits.dev, cfg.dev_size, cfg.seed)
    n_train = len(train_rows)
    steps = cfg.planned_steps(n_train)
    plan = calibrate(cfg, n_train, steps) if cfg.private else None

    # ---- model, tokenizer, data -------------------------------------------------------------
    if cfg.seed is not None:
        torch.manual_seed(cfg.seed)
    tok = load_tokenizer(model_dir)
    model = load_model(model_dir, cfg.task, num_labels, cfg.seed)
    if cfg.lora_r is not None or cfg.trainable == "lora":
        for p in model.parameters():
            p.requires_grad_(False)
        model = apply_lora(model, cfg.lora_r or 8, cfg.task)
    else:
        select_trainable(model, cfg.trainable)
    model.to(device)
    n_trainable, n_total = count_parameters(model)
    collate = PadCollate(tok.pad_token_id)
    train_ds = TokenizedDataset(train_rows, tok, cfg.max_length, causal)
    dev_ds = TokenizedDataset(dev_rows, tok, cfg.max_length, causal)
    test_ds = TokenizedDataset(splits.test, tok, cfg.max_length, causal)

    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.lr,
                            weight_decay=cfg.weight_decay)
    engine, sft = None, None
    if method == "dp-sft":  # checks the layers to project before any batch
        sft = SFTStages(cfg, steps, model)
    if cfg.private:
        engine, model, opt = methods.make_private(cfg, method, model, opt, plan)
    if sft is not None:
        sft.start(model)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / max(cfg.warmup_steps, 1)) * max(0.0, 1 - s / steps))
    sampler = methods.poisson_sampler(n_train, plan.sample_rate if plan else
                                      min(1.0, cfg.batch_size / n_train), cfg)

    # ---- run folder, resume -------------------------------------------------------------------
    out.mkdir(parents=True, exist_ok=True)
    metrics = MetricsLog(out / "metrics.jsonl")
    start, best = 0, {"dev": -math.inf, "step": 0, "state": None}
    if cfg.resume:
        ck = load_checkpoint(out / "checkpoint.pt")
        _load_trainable(model, ck["trainable"])
        if sft is not None:  # stage 2: rebuild the projected optimizer before loading its state
            opt = sft.load_state_dict(ck["sft"], engine, model, opt, plan)
        opt.load_state_dict(ck["optimizer"])
        sched.load_state_dict(ck["scheduler"])
        sampler.generator.set_state(ck["sampler_rng"])
        if engine is not None:
            engine.accountant.load_state_dict(ck["accountant"])
        torch.set_rng_state(ck["torch_rng"])
        start, best = ck["step"], ck["best"]
        metrics.truncate_after(start)
        log(f"resumed {out} at step {start}/{steps}")
    else:
        metrics.path.unlink(missing_ok=True)
        write_json(out / "config.json", cfg.to_dict())
    write_json(out / "config.json", cfg.to_dict())

    what = "NON-PRIVATE" if not cfg.private else "LMO-DP noise given" if (
        cfg.method == "lmo-dp" and cfg.lmo_params is not None) else (
        f"ε={cfg.epsilon:g}" if cfg.noise_multiplier is None else "σ given")
    log(f"dpkern finetune [{what}] {Path(str(model_dir)).name} ({n_trainable:,} of "
        f"{n_total:,} params trained, {cfg.trainable if cfg.lora_r is None else 'lora'})"
        f" on {splits.source}: {n_train} train rows, {len(dev_ds)} dev, {len(test_ds)} test "
        f"({splits.test_name}); {steps} steps of expected batch {cfg.batch_size} on {device}")
    if plan:
        log(f"privacy ({cfg.method}): {plan.describe(cfg)}")
    if sft is not None:
        log(f"dp-sft: steps 1-{sft.stage1_steps} plain DP-SGD (stage 1, charged), then "
            f"{len(sft.layers)} Linear weights clipped and noised in rank-{sft.rank} subspaces "
            "from the stage-1 trajectory")
    log(f"run folder: {out}")

    eval_every = cfg.eval_every or max(1, math.ceil(steps / 4))
    ckpt_every = cfg.checkpoint_every or eval_every
    eps_every = 1 if steps <= 200 else max(1, steps // 100)
    key = "perplexity" if causal else "accuracy"
    sign = -1.0 if causal else 1.0

    def checkpoint(step: int) -> None:
        save_checkpoint(out / "checkpoint.pt", {
            "step": step, "trainable": _trainable_state(model), "optimizer": opt.state_dict(),
            "scheduler": sched.state_dict(), "sampler_rng": sampler.generator.get_state(),
            "accountant": engine.accountant.state_dict() if engine else None,
            "torch_rng": torch.get_rng_state(), "best": best,
            "sft": sft.state_dict() if sft is not None else None})

    t_start = time.perf_counter()
    speed = Throughput()
    eps = (engine.get_epsilon(cfg.delta) if start > 0 else 0.0) if engine else None
    bar = _progress(cfg, steps, start)
    batches = sampler.batches(steps - start)
    for step in range(start + 1, steps + 1):
        idx = next(batches)
        loss, tokens = train_step(model, opt, train_ds, idx,
                                  physical_batch_size=cfg.physical_batch_size, collate=collate,
                                  device=device, causal_lm=causal, private=cfg.private)
        sched.step()
        if sft is not None:
            opt = sft.after_step(step, engine, model, opt, plan)
        speed.add(len(idx), tokens)
        if engine and (step % eps_every == 0 or step == steps):
            eps = engine.get_epsilon(cfg.delta)
        rows_s, tok_s = speed.rates()
        metrics.write(kind="train", step=step, loss=None if math.isnan(loss) else loss,
                      batch=len(idx), epsilon=eps, lr=sched.get_last_lr()[0],
                      rows_per_s=rows_s, time_s=time.perf_counter() - t_start)
        if bar is not None:
            bar.set_postfix_str(f"loss {loss:.3f} ε {eps if eps is not None else '-'!s:.6} "
                                f"{rows_s:.0f} rows/s {tok_s:.0f} tok/s")
            bar.update(1)
        if step % eval_every == 0 or step == steps:
            ev = evaluate(model, dev_ds, collate=collate, device=device, causal_lm=causal)
            metrics.write(kind="eval", step=step, epsilon=eps, **ev)
            if sign * ev[key] > best["dev"]:
                best = {"dev": sign * ev[key], "step": step, "state": _trainable_state(model)}
            msg = (f"step {step}: dev {key} {ev[key]:.4f} loss {ev['loss']:.4f}"
                   + (f" ε {eps:.3f}" if eps is not None else "")
                   + f" ({time.perf_counter() - t_start:.0f} s)")
            bar.write(msg) if bar is not None else log(msg)
        if step % ckpt_every == 0 or step == steps:
            checkpoint(step)
    if bar is not None:
        bar.close()
    train_time = time.perf_counter() - t_start

    # ---- report -------------------------------------------------------------------------------
    if best["state"] is not None:
        _load_trainable(model, best["state"])
    test = evaluate(model, test_ds, collate=collate, device=device, causal_lm=causal)
    metrics.write(kind="test", step=best["step"], epsilon=eps, **test)
    model_dir_out = out / "model"
    _save_model(model, tok, model_dir_out)
    privacy = plan.report(cfg, steps, eps, n_train, engine,
                          noise_steps=sft.noise_steps(opt) if sft is not None else None) \
        if plan else {"private": False}
    if sft is not None:
        privacy["dp_sft"] = sft.report()
    write_json(out / "privacy.json", privacy)
    png = plot_curves(metrics.read(), out / "curves.png",
                      title=f"{Path(str(model_dir)).name} on {Path(splits.source).name}: {what}",
                      delta=cfg.delta if cfg.private else None)
    label = privacy.get("epsilon_label")
    summary = {"private": cfg.private, "test_split": splits.test_name, f"test_{key}": test[key],
               "test_loss": test["loss"], "best_dev_step": best["step"],
               f"best_dev_{key}": sign * best["dev"], "epsilon": eps, "delta": cfg.delta
               if cfg.private else None, "noise_multiplier": plan.noise_multiplier if plan and
               plan.mechanism is None else None, "steps": steps, "train_seconds": train_time, "run_dir": str(out),
               "model_dir": str(model_dir_out), "plot": str(png) if png else None, "method": cfg.method,
               "epsilon_certified": privacy.get("epsilon_certified"), "epsilon_label": label}
    if "certified_epsilon_same_noise" in privacy:
        summary["certified_epsilon_same_noise"] = privacy["certified_epsilon_same_noise"]
    write_json(out / "summary.json", summary)
    log(f"{splits.test_name} {key}: {test[key]:.4f} (model of step {best['step']}, chosen on dev)"
        + (f"; ε spent = {eps:.3f} at δ = {cfg.delta:g} ({label})" if plan else
           "; NON-PRIVATE (no ε)") + f"; training took {train_time:.0f} s")
    if plan and not plan.certified:
        log(f"WARNING: ε = {eps:.3f} is LMO-DP's own accounting, NOT CERTIFIED; a proven bound for "
            f"the noise this run added is ε = {privacy['certified_epsilon_same_noise']:.3f} "
            f"(see privacy.json)")
    return summary


def _progress(cfg: FinetuneConfig, steps: int, start: int):
    if not cfg.progress:
        return None
    from tqdm.auto import tqdm
    return tqdm(total=steps, initial=start, desc="private" if cfg.private else "non-private",
                unit="step", dynamic_ncols=True)


def _save_model(model, tok, path: Path) -> None:
    """The selected model (with its wrappers' forwards untouched: state only) and tokenizer.

    Written into ``<path>.tmp`` and renamed over ``path`` at the end: an interrupted save never
    leaves a half-written model folder (the previous one, if any, stays until the rename)."""
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    target = model
    if hasattr(model, "merge_and_unload"):  # LoRA: save the merged full model
        target = copy.deepcopy(model).merge_and_unload()
    target.save_pretrained(str(tmp))
    tok.save_pretrained(str(tmp))
    old = path.with_name(path.name + ".old")
    if path.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(path, old)
    os.replace(tmp, path)
    shutil.rmtree(old, ignore_errors=True)
