"""The engine on a CUDA device (skipped without a GPU): same results as the CPU reference, on the
torch backend and on "auto" (the Triton kernels of dpkern.ops where they exist)."""
import copy

import pytest
import torch

from dpkern import PrivacyEngine
from dpkern.losses import per_sample_losses
from tests.engine import _models
from tests.engine._reference import clipped_mean, per_sample_grads, total_norms
from tests.engine.test_vs_reference import assert_updates_close

pytestmark = pytest.mark.gpu


@pytest.fixture(autouse=True)
def _ieee_fp32(monkeypatch):
    """The 1e-5 comparisons need IEEE fp32 dots; the GPU default "tf32r" rounds operands to TF32
    on purpose (a different precision contract, tested by the ops' own tests)."""
    monkeypatch.setenv("DPKERN_NORM_FP32_DOT", "ieee")
    monkeypatch.delenv("DPKERN_FP32_DOT", raising=False)


def _dp_grads(model, batch, clipping, c, bsz, backend, dtype=torch.float32):
    """Released mean gradient; bf16 runs loss_reduction='sum' (the engine refuses bf16 + 'mean')
    and divides by bsz afterwards."""
    red = "mean" if dtype == torch.float32 else "sum"
    model = copy.deepcopy(model).to("cuda", dtype)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0)
    engine = PrivacyEngine(accountant="rdp", backend=backend)
    model, opt, _ = engine.make_private(module=model, optimizer=opt, data_loader=None,
                                        noise_multiplier=0.0, max_grad_norm=c, clipping=clipping,
                                        expected_batch_size=bsz, sample_rate=0.01,
                                        loss_reduction=red)
    opt.fused = False  # materialised path: p.grad holds the released gradient
    losses = per_sample_losses(model, {k: v.cuda() for k, v in batch.items()})
    (losses.mean() if red == "mean" else losses.sum()).backward()
    bounds = {n: u.cpu() for n, (_, u) in opt.last_clip.items()}
    opt.step()
    div = 1 if red == "mean" else bsz
    return ({n: p.grad.double().cpu() / div for n, p in model.named_parameters() if p.requires_grad},
            bounds)


@pytest.mark.parametrize("backend", ["torch", "auto"])
@pytest.mark.parametrize("name", ["llama", "gpt2", "bert", "lora_llama"])
def test_cuda_matches_per_sample_reference(name, backend):
    model = _models.build(name)
    batch = _models.batch_for(name, 5, seed=5)
    psg = per_sample_grads(model, batch)
    c = float(total_norms(psg).median())
    for clipping in ("flat", "per_layer", "automatic"):
        got, bounds = _dp_grads(model, batch, clipping, c, 5, backend)
        assert_updates_close(got, clipped_mean(psg, clipping, c, 5, bounds=bounds))


@pytest.mark.parametrize("backend", ["torch", "auto"])
def test_cuda_bf16_llama_full_size_unclipped_equals_plain_gradient(backend):
    """Hidden 1024, 4 layers, vocab 8192, B = 8, T = 256 in bf16 with C huge: the DP gradient is
    the plain bf16 autograd mean gradient (same forward, same output grads) up to the rounding of
    bf16 weight-grad GEMM outputs (ours accumulate in fp32)."""
    from transformers import LlamaConfig, LlamaForCausalLM
    cfg = LlamaConfig(vocab_size=8192, hidden_size=1024, intermediate_size=2816,
                      num_hidden_layers=4, num_attention_heads=16, num_key_value_heads=4,
                      max_position_embeddings=512, tie_word_embeddings=True, pad_token_id=0)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg)
    batch = _models.batch_for("llama", 8, seq=256, seed=1)
    batch["input_ids"] = torch.randint(1, 8192, (8, 256)) * batch["attention_mask"]
    ref = copy.deepcopy(model).to("cuda", torch.bfloat16)
    per_sample_losses(ref, {k: v.cuda() for k, v in batch.items()}).mean().backward()
    want = {n: p.grad.double().cpu() for n, p in ref.named_parameters()}
    del ref
    got, _ = _dp_grads(model, batch, "flat", 1e6, 8, backend, dtype=torch.bfloat16)
    assert_updates_close(got, want, rtol=2e-2)


def test_cuda_noise_std():
    model = torch.nn.Linear(512, 512).cuda()
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    _, opt, _ = PrivacyEngine(accountant="rdp").make_private(
        module=model, optimizer=opt, data_loader=None, noise_multiplier=1.1, max_grad_norm=0.5,
        expected_batch_size=2, sample_rate=0.01, seed=3)
    w = model.weight.detach().clone()
    opt.signal_empty_batch()
    opt.step()
    z = ((w - model.weight.detach()) * 2 / (1.1 * 0.5)).double()
    assert abs(z.std().item() - 1) < 5 / (2 * z.numel()) ** 0.5
