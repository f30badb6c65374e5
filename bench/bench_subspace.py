"""DP-SFT projected step vs the full DP step, and the fused projection kernel.

GPU: a Llama-style ~1B model (hidden 2048, MLP 5632, 16 layers, vocab 32000, untied head; random
init from transformers' LlamaConfig), bf16 autocast, AdamW, B = 8 × T = 512, loss_reduction="sum"
(the engine refuses "mean" with bf16 output gradients). "full": PrivacyEngine (book-keeping
clipping of every parameter). "subspace-r": SubspacePrivacyEngine with every decoder Linear and
the lm_head projected at rank r (random orthonormal bases; embeddings and norms stay full). Step
time (forward + backward + clip + noise + update) and peak memory per case; the kernel case times
subspace_project (triton vs torch) at the MLP down-projection shape; the back-projection case
(registry "subspace_backproj") times one AdamW step of a projected weight: the fused kernel (ieee
and tf32x3 dots) vs the unfused path (W.grad = U S̃ Vᵀ materialised, torch.optim.AdamW(fused=True)).
CPU: tiny shapes, correctness.
"""
import pytest
import torch

from bench import registry
from bench.conftest import HAS_GPU
from dpkern.subspace import orthonormalize, subspace_project
from dpkern.subspace.reference import subspace_project_ref

DEV = "cuda" if HAS_GPU else "cpu"
KERNEL_CASES = [(8, 512, 5632, 2048, 64), (8, 512, 2048, 2048, 64), (8, 512, 2048, 32000, 64),
                (16, 256, 2048, 5632, 128)] if HAS_GPU else [(2, 17, 24, 40, 4)]
STEP_MODES = ["full", "subspace-16", "subspace-64"]
BATCH = (8, 512) if HAS_GPU else (2, 16)


def _backends():
    return ["torch", "triton"] if HAS_GPU else ["torch"]


@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize("shape", KERNEL_CASES, ids=lambda s: "B{}_T{}_d{}_p{}_r{}".format(*s))
def test_subspace_project_bench(timed, shape, backend):
    bsz, seq, d, p, r = shape
    torch.manual_seed(0)
    a = torch.randn(bsz, seq, d, device=DEV, dtype=torch.bfloat16)
    g = torch.randn(bsz, seq, p, device=DEV, dtype=torch.bfloat16)
    u = orthonormalize(torch.randn(p, r, device=DEV))
    v = orthonormalize(torch.randn(d, r, device=DEV))
    s, n = subspace_project(a, g, u, v, backend=backend)
    s_ref, _ = subspace_project_ref(a[:2].cpu(), g[:2].cpu(), u.cpu(), v.cpu())
    scale = float(s_ref.abs().max())
    assert float((s[:2].double().cpu() - s_ref).abs().max()) <= 2e-2 * scale  # tf32 dots
    flops = 2 * bsz * seq * (p * r + d * r + r * r)
    info = timed(lambda: subspace_project(a, g, u, v, backend=backend), flops=flops,
                 bytes_moved=a.numel() * 2 + g.numel() * 2)
    info.update(op="subspace_project", backend=backend, shape=list(shape))


def _llama():
    from transformers import LlamaConfig, LlamaForCausalLM
    if HAS_GPU:
        kw = dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=16,
                  num_attention_heads=32, num_key_value_heads=32)
    else:
        kw = dict(vocab_size=128, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=4)
    cfg = LlamaConfig(max_position_embeddings=4096, tie_word_embeddings=False, **kw)
    cfg._attn_implementation = "eager"
    torch.manual_seed(0)
    with torch.device(DEV):
        return LlamaForCausalLM(cfg), cfg


def _bases(model, rank):
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.Linear) and (".layers." in "." + name or name == "lm_head"):
            p, d = m.weight.shape
            out[name] = (orthonormalize(torch.randn(p, rank, device=DEV)),
                         orthonormalize(torch.randn(d, rank, device=DEV)))
    return out


def llama_dp_step(mode: str, bsz: int, seq: int):
    """The Llama model made private for `mode` ("full", or "subspace-<r>": every decoder Linear
    and lm_head projected at rank r), AdamW, and one DP training step on random tokens (bf16
    autocast on the GPU). Returns (model, optimizer, cfg, step); step() returns the loss."""
    from dpkern.engine import PrivacyEngine
    from dpkern.subspace import SubspacePrivacyEngine
    model, cfg = _llama()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    common = dict(module=model, optimizer=opt, data_loader=None, noise_multiplier=1.0,
                  max_grad_norm=1.0, expected_batch_size=bsz, sample_rate=1e-3,
                  loss_reduction="sum")
    if mode == "full":
        model, opt, _ = PrivacyEngine(accountant="rdp").make_private(**common)
    else:
        model, opt, _ = SubspacePrivacyEngine(accountant="rdp").make_private(
            subspace=_bases(model, int(mode.split("-")[1])), **common)
    ids = torch.randint(0, cfg.vocab_size, (bsz, seq), device=DEV)

    def step():
        with torch.autocast(DEV, dtype=torch.bfloat16, enabled=HAS_GPU):
            logits = model(input_ids=ids).logits
        loss = torch.nn.functional.cross_entropy(
            logits[:, :-1].float().reshape(-1, cfg.vocab_size), ids[:, 1:].reshape(-1),
            reduction="none").view(bsz, -1).mean(1).sum()
        loss.backward()
        opt.step()
        opt.zero_grad()
        return loss

    return model, opt, cfg, step


@pytest.mark.parametrize("mode", STEP_MODES)
def test_llama_step_bench(timed, mode):
    import gc
    gc.collect()  # the previous mode's model and optimizer states
    if HAS_GPU:
        torch.cuda.empty_cache()
    model, opt, cfg, step = llama_dp_step(mode, *BATCH)
    loss = step()  # correctness before timing: finite loss, the projected weights moved
    assert torch.isfinite(loss)
    n_proj = len(getattr(opt, "bases", {}))
    assert n_proj == (0 if mode == "full" else 7 * cfg.num_hidden_layers + 1)
    info = timed(step)
    info.update(op="dp_step", mode=mode, batch=list(BATCH), projected_layers=n_proj,
                n_params=sum(p.numel() for p in model.parameters()))


BACKPROJ_CASES = registry.shapes("subspace_backproj")
BACKPROJ_MODES = (["triton", "triton-tf32x3", "materialised"] if HAS_GPU
                  else ["torch", "materialised"])


def _backproj_inputs(shape, dtype):
    from dpkern.subspace.backproj import AdamHyper
    p, d, r = shape
    torch.manual_seed(0)
    w = (torch.randn(p, d, device=DEV) * 0.02).to(dtype)
    u = orthonormalize(torch.randn(p, r, device=DEV))
    v = orthonormalize(torch.randn(d, r, device=DEV))
    s = torch.randn(r, r, device=DEV) * 1e-3
    return w, u, s, v, AdamHyper(lr=1e-4, weight_decay=0.01, decoupled=True)


@pytest.mark.parametrize("mode", BACKPROJ_MODES)
@pytest.mark.parametrize("dtype", registry.torch_dtypes("subspace_backproj"), ids=str)
@pytest.mark.parametrize("shape", BACKPROJ_CASES,
                         ids=lambda s: registry.op("subspace_backproj").shape_id(s))
def test_subspace_backproj_bench(timed, shape, dtype, mode):
    """One AdamW step of a projected weight (states exist: step 2 onwards). GB/s counts the bytes
    the fused kernel must move (W read + written, fp32 m and v read + written) for every mode."""
    from dpkern.subspace.backproj import subspace_backproj_step_
    from dpkern.subspace.reference import backproj_update_ref
    w, u, s, v, hyper = _backproj_inputs(shape, dtype)
    if mode == "materialised":
        w = torch.nn.Parameter(w)
        opt = torch.optim.AdamW([w], lr=hyper.lr, weight_decay=hyper.weight_decay, fused=HAS_GPU)

        def fn():
            w.grad = (u @ s @ v.T).to(w.dtype)
            opt.step()
            w.grad = None
        fn()  # states created
        info = timed(fn, bytes_moved=w.numel() * (2 * w.element_size() + 16), baseline=True)
    else:
        cfg = None
        if mode.startswith("triton"):
            from dpkern.kernels.subspace_backproj import subspace_backproj_config
            prec = "tf32x3" if mode.endswith("tf32x3") else "ieee"
            cfg = subspace_backproj_config(*shape[:2], shape[2], w.device, input_precision=prec)
        backend = "triton" if mode.startswith("triton") else mode
        state = {}
        subspace_backproj_step_(w, u, s, v, hyper, state, backend=backend, config=cfg)

        def check():
            """One more step against the fp32 reference (it forms U S̃ Vᵀ). Both gradients carry
            fp32 dot error ρN (N = (|U||S̃|)|V|ᵀ, ρ tests/tolerance.py's policy); Adam's
            normalised update moves by ≲ 2ρN/|g| (a sign flip where |g| ≲ ρN); + half an ulp."""
            w_ref, _, _ = backproj_update_ref(w, u, s, v, state["exp_avg"], state["exp_avg_sq"],
                                              hyper=hyper, t=2, first=False)
            subspace_backproj_step_(w, u, s, v, hyper, state, backend=backend, config=cfg)
            g = (u @ s) @ v.T
            n = (u.abs() @ s.abs()) @ v.abs().T
            rho = 8 * 2.0 ** -23 * (2 * shape[2]) ** 0.5
            half_ulp = 2.0 ** -8 if dtype == torch.bfloat16 else 2.0 ** -23
            amp = torch.clamp(4 * rho * n / g.abs(), max=4.0)
            err = (w.float() - w_ref).abs()
            allowed = 2 * half_ulp * w_ref.abs() + hyper.lr * (1e-5 + amp)
            assert (err <= allowed).all(), float((err / allowed).max())
        info = timed(lambda: subspace_backproj_step_(w, u, s, v, hyper, state, backend=backend,
                                                     config=cfg),
                     bytes_moved=w.numel() * (2 * w.element_size() + 16), check=check)
    info.update(op="subspace_backproj", backend=mode, dtype=str(dtype), shape=list(shape))
