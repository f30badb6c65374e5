"""RMTDenoiser(tf32=...): the fp32 GEMMs of a call run in TF32 (default), IEEE fp32, or torch's own
setting, on CUDA; the former setting is restored after the call, also when it raises."""
import contextlib

import pytest
import torch

import dpkern.denoise.denoiser as denoiser_mod
from dpkern.denoise import RMTDenoiser
from dpkern._matmul import fp32_matmul


def _grads():
    torch.manual_seed(0)
    return {"fc.weight": 0.1 * torch.randn(24, 40), "fc.bias": torch.randn(24)}


@pytest.mark.parametrize("tf32, want", [(True, "tf32"), (False, "ieee"), (None, None)])
def test_the_call_runs_in_the_asked_precision(monkeypatch, tf32, want):
    seen = []

    @contextlib.contextmanager
    def spy(device, precision):
        seen.append((torch.device(device).type, precision))
        yield
    monkeypatch.setattr(denoiser_mod, "fp32_matmul", spy)
    calls = []
    real = denoiser_mod._denoise_all
    monkeypatch.setattr(denoiser_mod, "_denoise_all",
                        lambda *a, **k: (calls.append(len(seen)), real(*a, **k))[1])
    RMTDenoiser(tf32=tf32)(_grads(), 0.1)
    assert calls == [len(seen)] and seen == ([("cpu", want)] if want else [])


def test_fp32_matmul_sets_and_restores_the_cuda_setting():
    mm = torch.backends.cuda.matmul
    before = mm.fp32_precision
    with fp32_matmul("cuda", "tf32"):
        assert mm.fp32_precision == "tf32"
        with fp32_matmul("cuda", "ieee"):
            assert mm.fp32_precision == "ieee"
        assert mm.fp32_precision == "tf32"
    assert mm.fp32_precision == before
    with pytest.raises(RuntimeError, match="boom"):
        with fp32_matmul("cuda", "tf32"):
            raise RuntimeError("boom")
    assert mm.fp32_precision == before
    with fp32_matmul("cpu", "tf32"):          # other devices: untouched
        assert mm.fp32_precision == before
    with pytest.raises(ValueError, match="precision"):
        with fp32_matmul("cuda", "tf32x3"):
            pass


def test_bad_tf32_argument_is_refused():
    with pytest.raises(ValueError, match="tf32"):
        RMTDenoiser(tf32="yes")
