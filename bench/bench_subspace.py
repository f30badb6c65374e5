"""DP-SFT projected step vs the full DP step, and the fused projection kernel.

GPU: a Llama-style ~1B model (hidden 2048, MLP 5632, 16 layers, vocab 32000, untied head; random
init from transformers' LlamaConfig), bf16 autocast, AdamW, B = 8 × T = 512, loss_reduction="sum"
(the engine refuses "mean" with bf16 output gradients). "full": PrivacyEngine (book-keeping
clipping of every parameter). "subspace-r": SubspacePrivacyEngine with every decoder Linear and
the lm_head projected at rank r (random orthonormal bases; embeddings and norms stay full). Step
time (forward + backward + clip + noise + update) and peak memory per case; the kernel case times
subspace_project (triton vs torch) at the MLP down-projection shape. CPU: tiny shapes, correctness.
"""
import pytest
import torch

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


@pytest.mark.parametrize("mode", STEP_MODES)
def test_llama_step_bench(timed, mode):
    import gc

    from dpkern.engine import PrivacyEngine
    from dpkern.subspace import SubspacePrivacyEngine
    gc.collect()  # the previous mode's model and optimizer states
    if HAS_GPU:
        torch.cuda.empty_cache()
    model, cfg = _llama()
    bsz, seq = BATCH
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
    use_bf16 = HAS_GPU

    def step():
        with torch.autocast(DEV, dtype=torch.bfloat16, enabled=use_bf16):
            logits = model(input_ids=ids).logits
        loss = torch.nn.functional.cross_entropy(
            logits[:, :-1].float().reshape(-1, cfg.vocab_size), ids[:, 1:].reshape(-1),
            reduction="none").view(bsz, -1).mean(1).sum()
        loss.backward()
        opt.step()
        opt.zero_grad()
        return loss

    loss = step()  # correctness before timing: finite loss, the projected weights moved
    assert torch.isfinite(loss)
    n_proj = len(getattr(opt, "bases", {}))
    assert n_proj == (0 if mode == "full" else 7 * cfg.num_hidden_layers + 1)
    info = timed(step)
    info.update(op="dp_step", mode=mode, batch=list(BATCH), projected_layers=n_proj,
                n_params=sum(p.numel() for p in model.parameters()))
