"""A DP step issues its GPU work without waiting for the GPU: no host-GPU synchronisation in the
backward pass (per-sample norms, release bounds, clip factors, book-keeping) nor in
optimizer.step() (fused noise + AdamW). A hidden sync leaves the GPU idle while the host launches
the rest of the step (on the 1B Llama, an H100 showed the DP step host-bound). Skipped without a GPU."""
import contextlib

import pytest
import torch

from dpkern import PrivacyEngine
from dpkern.losses import per_sample_losses
from tests.conftest import sync_is_an_error
from tests.engine import _models

pytestmark = pytest.mark.gpu


def test_the_check_catches_a_blocking_copy():
    """The guard itself: a pageable host-to-device copy (what torch.tensor(..., device="cuda")
    does) raises inside it."""
    with pytest.raises(RuntimeError, match="synchroniz"), sync_is_an_error():
        torch.tensor([1.0, 2.0], device="cuda")


def _three_steps(name, dtype, clipping, bsz=4):
    """Three DP steps (AdamW, fused noise); the third one's backward and step under the guard.
    bsz = 1 takes the one-gradient path (engine._Clipper._single_sample)."""
    torch.manual_seed(0)
    model = _models.build(name).cuda()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    engine = PrivacyEngine(accountant="rdp", backend="auto")
    model, opt, _ = engine.make_private(module=model, optimizer=opt, data_loader=None,
                                        noise_multiplier=1.0, max_grad_norm=1.0,
                                        clipping=clipping, expected_batch_size=4,
                                        sample_rate=0.01, loss_reduction="sum", seed=0)
    assert opt.fused_available()
    batch = {k: v.cuda() for k, v in _models.batch_for(name, bsz, seq=63, seed=1).items()}
    amp = (torch.autocast("cuda", dtype=torch.bfloat16) if dtype == torch.bfloat16
           else contextlib.nullcontext())
    for step in range(3):  # the first steps fill caches (compiled kernels, descriptor tables)
        with amp:
            loss = per_sample_losses(model, batch).sum()
        with sync_is_an_error() if step == 2 else contextlib.nullcontext():
            loss.backward()
            opt.step()
            opt.zero_grad()
    return model


@pytest.mark.parametrize("name,dtype,clipping,bsz", [
    ("llama", torch.float32, "flat", 4), ("llama", torch.bfloat16, "flat", 4),
    ("bert", torch.float32, "per_layer", 4), ("gpt2", torch.float32, "automatic", 4),
    ("llama", torch.float32, "flat", 1), ("llama", torch.bfloat16, "per_layer", 1)])
def test_backward_and_step_do_not_synchronise(name, dtype, clipping, bsz):
    model = _three_steps(name, dtype, clipping, bsz)
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_a_blocking_upload_in_the_backward_is_caught(monkeypatch):
    """The release bounds once uploaded their per-parameter constants with torch.tensor(...,
    device="cuda"), a sync per backward; put back, the guard fails the step."""
    import dpkern.layers.bounds as bounds
    monkeypatch.setattr(bounds, "_device_constants", lambda values, device: torch.tensor(
        values, dtype=torch.float64, device=device))
    with pytest.raises(RuntimeError, match="synchroniz"):
        _three_steps("llama", torch.float32, "flat")
