"""What the engine refuses, before training, with an error that names the problem."""
import pytest
import torch
from torch import nn

from dpkern import PrivacyEngine
from dpkern.layers import UnsupportedModuleError


def _make(model, opt=None, **kw):
    opt = opt or torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    args = dict(module=model, optimizer=opt, data_loader=None, noise_multiplier=1.0,
                max_grad_norm=1.0, expected_batch_size=4, sample_rate=0.1)
    args.update(kw)
    return PrivacyEngine(accountant="rdp").make_private(**args)


class WithConv(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(4, 4), nn.Conv2d(1, 1, 3))


def test_unsupported_trainable_module_is_named_with_its_path():
    with pytest.raises(UnsupportedModuleError, match=r"body\.1 \(Conv2d\)"):
        _make(WithConv())


def test_frozen_unsupported_module_is_fine():
    m = WithConv()
    m.body[1].requires_grad_(False)
    _make(m)


def test_batchnorm_is_refused_even_frozen():
    m = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4))
    m[1].requires_grad_(False)
    with pytest.raises(UnsupportedModuleError, match=r"1 \(BatchNorm1d\).*mixes the samples"):
        _make(m)


def test_bare_parameter_on_a_custom_module_is_refused():
    class Scale(nn.Module):
        def __init__(self):
            super().__init__()
            self.alpha = nn.Parameter(torch.ones(4))
    with pytest.raises(UnsupportedModuleError, match=r"<root> \(Scale\).*alpha"):
        _make(Scale())


@pytest.mark.parametrize("kw, match", [
    (dict(noise_multiplier=-0.1), "noise_multiplier"),
    (dict(noise_multiplier=float("nan")), "noise_multiplier"),
    (dict(max_grad_norm=0.0), "max_grad_norm"),
    (dict(max_grad_norm=-1.0), "max_grad_norm"),
    (dict(clipping="per_layer", max_grad_norm=[1.0]), "thresholds for 2"),
    (dict(clipping="nope"), "clipping"),
    (dict(loss_reduction="avg"), "loss_reduction"),
    (dict(expected_batch_size=0), "expected_batch_size"),
])
def test_bad_arguments(kw, match):
    with pytest.raises(ValueError, match=match):
        _make(nn.Linear(3, 2), **kw)


def test_refusal_leaves_the_model_untouched():
    m = nn.Linear(3, 2)
    with pytest.raises(ValueError):
        _make(m, noise_multiplier=-1.0)
    assert "forward" not in m.__dict__


def test_optimizer_params_must_be_the_models():
    m = nn.Linear(3, 2)
    stranger = nn.Parameter(torch.zeros(2))
    with pytest.raises(ValueError, match=r"param_groups\[0\]\['params'\]\[2\].*not a parameter"):
        _make(m, opt=torch.optim.SGD([*m.parameters(), stranger], lr=0.1))


def test_step_twice_without_backward():
    m = nn.Linear(3, 2)
    _, opt, _ = _make(m)
    m(torch.randn(4, 3)).sum().backward()
    opt.step()
    with pytest.raises(RuntimeError, match="without a new backward"):
        opt.step()
    opt.zero_grad()
    with pytest.raises(RuntimeError, match="without a new backward"):
        opt.step()


def test_gradient_from_outside_the_engine():
    class Sneaky(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 2)

        def forward(self, x):  # uses the weight outside its module: never clipped
            return self.lin(x) + nn.functional.linear(x, self.lin.weight)
    m = Sneaky()
    _, opt, _ = _make(m)
    m(torch.randn(4, 3)).sum().backward()
    with pytest.raises(RuntimeError, match=r"outside the engine on parameter 'lin.weight'"):
        opt.step()


def test_explicit_seed_refused_in_secure_mode():
    with pytest.raises(ValueError, match="seed"):
        PrivacyEngine(accountant="rdp", secure_mode=True).make_private(
            module=nn.Linear(3, 2), optimizer=torch.optim.SGD(nn.Linear(3, 2).parameters(), 0.1),
            data_loader=None, noise_multiplier=1.0, max_grad_norm=1.0, expected_batch_size=4,
            sample_rate=0.1, seed=1)


def test_embedding_options_that_mix_samples():
    with pytest.raises(ValueError, match="max_norm"):
        _make(nn.Embedding(10, 4, max_norm=1.0))


def test_make_private_twice():
    m = nn.Linear(3, 2)
    _make(m)
    with pytest.raises(ValueError, match="already wrapped"):
        _make(m)


def test_deepcopy_of_a_private_model_is_a_plain_model():
    import copy
    m = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    _, opt, _ = _make(m)
    c = copy.deepcopy(m)
    c(torch.randn(4, 3)).sum().backward()  # plain autograd on the copy's own parameters
    assert all(p.grad is not None for p in c.parameters())
    assert opt.backwards == 0
    c.zero_grad(set_to_none=True)
    _make(c)  # and it can be made private itself
    c(torch.randn(4, 3)).sum().backward()
    assert all(p.grad is None for p in c.parameters())


@pytest.mark.parametrize("layer, name", [(nn.Linear(3, 2), r"0 \(Linear\)"),
                                         (nn.Embedding(5, 3), r"0 \(Embedding\)")])
def test_float64_linear_and_embedding_weights_refused_up_front(layer, name):
    m = nn.Sequential(layer.double())
    with pytest.raises(UnsupportedModuleError,
                       match=name + r": trainable weight of dtype torch.float64.*model.float\(\)"):
        _make(m)
    assert "forward" not in m[0].__dict__


def test_float64_norm_layer_and_bias_train():
    """float64 per-sample rows (norm weights, a bias beside a frozen weight) stay supported."""
    lin = nn.Linear(3, 3).double()
    lin.weight.requires_grad_(False)
    m = nn.Sequential(lin, nn.LayerNorm(3).double())
    _, opt, _ = _make(m, loss_reduction="sum")
    m(torch.randn(4, 3, dtype=torch.float64)).sum().backward()
    opt.step()
    assert lin.bias.dtype == torch.float64 and torch.isfinite(lin.bias).all()


def test_model_cast_to_float64_after_wrapping_is_named_at_backward():
    m = nn.Sequential(nn.Linear(3, 3), nn.ReLU(), nn.Linear(3, 2))
    engine = PrivacyEngine(accountant="rdp")
    _, opt, _ = engine.make_private(module=m, optimizer=torch.optim.SGD(m.parameters(), lr=0.1),
                                    data_loader=None, noise_multiplier=1.0, max_grad_norm=1.0,
                                    expected_batch_size=4, sample_rate=0.1, loss_reduction="sum")
    m.double()
    with pytest.raises(RuntimeError, match=r"layers 0 \(torch.float64\), 2 \(torch.float64\): "
                                           r"the per-sample kernels take"):
        m(torch.randn(4, 3, dtype=torch.float64)).sum().backward()  # the engine's flush raises
    m.float()  # nothing was kept or counted: training goes on
    assert engine.accountant.history == [] and not opt.summed
    m(torch.randn(4, 3)).sum().backward()
    opt.step()
    assert len(engine.accountant.history) == 1


def test_layers_that_see_different_batch_sizes_are_named():
    class TwoBatches(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(3, 2), nn.Linear(3, 2)

        def forward(self, x):  # b sees the batch reshaped: its dim 0 is not the batch
            return self.a(x).sum() + self.b(x.reshape(2, -1, 3)).sum()
    m = TwoBatches()
    _make(m, loss_reduction="sum")
    with pytest.raises(RuntimeError, match=r"different batch sizes.*b: 2, a: 4"):
        m(torch.randn(4, 1, 3)).sum().backward()


def test_model_split_over_devices_is_refused_naming_them():
    """A model whose trainable parameters sit on two devices (a device_map-style split; "meta"
    stands in for a second GPU on the CPU) is refused at make_private, naming the devices and
    parameters, and left unwrapped. Frozen parameters elsewhere are not the engine's concern."""
    m = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    m[1].to("meta")
    with pytest.raises(UnsupportedModuleError,
                       match=r"on 2 devices \(cpu: 0\.weight, 0\.bias; meta: 1\.weight, 1\.bias\)"
                             r".*one device.*torch\.distributed"):
        _make(m)
    assert "forward" not in m[0].__dict__ and "forward" not in m[1].__dict__
    m[1].requires_grad_(False)
    _make(m)


@pytest.mark.parametrize("backend", ["cuda", "nope"])
def test_engine_backend_refused_up_front(backend, monkeypatch):
    """The engine's per-sample ops run on triton or torch: another backend, given to the engine
    or through DPKERN_BACKEND, is refused before the model is wrapped (it failed at the first
    backward, inside an op)."""
    with pytest.raises(ValueError, match=r"backend must be one of \('auto', 'triton', 'torch'\)"):
        PrivacyEngine(accountant="rdp", backend=backend)
    monkeypatch.setenv("DPKERN_BACKEND", backend)
    m = nn.Linear(3, 2)
    with pytest.raises(ValueError, match=r"DPKERN_BACKEND must be one of .*" + repr(backend)):
        _make(m)
    assert "forward" not in m.__dict__
    monkeypatch.setenv("DPKERN_BACKEND", "torch")
    _make(m)
