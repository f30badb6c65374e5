"""Key management: secure mode, hidden key, checkpoints that neither replay nor skip noise, and the
engine-facing wrappers (noisy_step, FusedNoisyOptimizer)."""
import pickle

import pytest
import torch

from dpkern.noise import (AdamWHyper, FusedNoisyOptimizer, NoiseGenerator, SGDHyper,
                          noisy_step)


def test_secure_mode_refuses_seed_and_draws_distinct_keys():
    with pytest.raises(ValueError, match="refuses a user seed"):
        NoiseGenerator(seed=1)
    a, b = NoiseGenerator(), NoiseGenerator()
    assert a.secure and a.fingerprint != b.fingerprint
    assert a.kernel_words(0) != b.kernel_words(0)


def test_deterministic_mode_needs_a_seed_and_is_reproducible():
    with pytest.raises(ValueError, match="needs seed"):
        NoiseGenerator(secure=False)
    assert NoiseGenerator(secure=False, seed=4).kernel_words(3) == \
        NoiseGenerator(secure=False, seed=4).kernel_words(3)
    assert NoiseGenerator(secure=False, seed=4).fingerprint != NoiseGenerator(secure=False, seed=5).fingerprint


def test_key_never_shown_or_pickled_in_secure_mode():
    g = NoiseGenerator()
    key = g._key
    for text in (repr(g), str(g), f"{g}"):
        assert "hidden" in text and key.hex() not in text and str(key) not in text
    with pytest.raises(TypeError, match="cannot be pickled"):
        pickle.dumps(g)
    sd = g.state_dict()
    assert "key" not in sd and key not in [v for v in sd.values()]
    assert key.hex() not in repr(sd)


def test_secure_resume_continues_the_counter_under_a_fresh_key():
    g = NoiseGenerator()
    for _ in range(5):
        g.next_step()
    sd = g.state_dict()
    fresh = NoiseGenerator()  # a new process: its own key
    fresh.load_state_dict(sd)
    assert fresh.step == 5 and fresh.fingerprint != g.fingerprint
    with pytest.raises(ValueError, match="replay"):  # same live key, step going backwards
        g.load_state_dict({**sd, "step": 3})
    g.load_state_dict(sd)  # same step: fine
    assert g.step == 5


def test_deterministic_resume_and_refusals():
    g = NoiseGenerator(secure=False, seed=9)
    for _ in range(4):
        g.next_step()
    sd = g.state_dict()
    h = NoiseGenerator(secure=False, seed=123)
    h.load_state_dict(sd)
    assert h.step == 4 and h.kernel_words(4) == g.kernel_words(4)
    h.next_step()
    with pytest.raises(ValueError, match="replay"):
        h.load_state_dict(sd)
    with pytest.raises(ValueError, match="secure"):
        NoiseGenerator().load_state_dict(sd)
    with pytest.raises(KeyError, match="step"):
        h.load_state_dict({"secure": False})
    assert pickle.loads(pickle.dumps(g)).kernel_words(1) == g.kernel_words(1)


def test_noisy_step_functional_api():
    torch.manual_seed(0)
    ps = [torch.randn(10), torch.randn(3, 4)]
    grads = [torch.randn(10), None]  # None: no gradient, still noised
    state: dict = {}
    gen = NoiseGenerator(secure=False, seed=1)
    before = [p.clone() for p in ps]
    assert noisy_step(ps, grads, state, AdamWHyper(lr=1e-2), sigma=1.0, max_grad_norm=2.0,
                      expected_batch_size=4, noise=gen, backend="torch") == 0
    assert state["t"] == 1 and len(state["exp_avg"]) == 2 and len(state["exp_avg_sq"]) == 2
    assert not torch.equal(ps[1], before[1])
    noisy_step(ps, grads, state, AdamWHyper(lr=1e-2), 1.0, 2.0, 4, gen, backend="torch")
    assert state["t"] == 2 and gen.step == 2


def _train(opt, ps, n):
    for k in range(n):
        for i, p in enumerate(ps):
            p.grad = torch.full_like(p, 0.1 * (k + 1) * (i + 1))
        opt.step()


@pytest.mark.parametrize("kind", ["sgd", "adamw"])
def test_optimizer_checkpoint_resume_matches_uninterrupted(kind):
    def make(ps, seed):
        return FusedNoisyOptimizer(ps, optimizer=kind, lr=0.05, momentum=0.9, weight_decay=0.01,
                                   noise_multiplier=1.0, max_grad_norm=1.0, expected_batch_size=8,
                                   noise=NoiseGenerator(secure=False, seed=seed), backend="torch")
    torch.manual_seed(0)
    init = [torch.randn(7), torch.randn(2, 5)]
    ps_a = [p.clone() for p in init]
    opt_a = make(ps_a, 3)
    _train(opt_a, ps_a, 4)

    ps_b = [p.clone() for p in init]
    opt_b = make(ps_b, 3)
    _train(opt_b, ps_b, 2)
    sd = opt_b.state_dict()
    ps_c = [p.detach().clone() for p in ps_b]
    opt_c = make(ps_c, 999)  # the key comes from the checkpoint in deterministic mode
    opt_c.load_state_dict(sd)
    assert opt_c.noise.step == 2
    for k in range(2, 4):
        for i, p in enumerate(ps_c):
            p.grad = torch.full_like(p, 0.1 * (k + 1) * (i + 1))
        opt_c.step()
    for a, c in zip(ps_a, ps_c):
        torch.testing.assert_close(a, c, rtol=0, atol=0)
    with pytest.raises(ValueError, match="replay"):  # the live optimizer cannot go back
        opt_c.load_state_dict(sd)


def test_optimizer_one_counter_step_for_all_groups():
    ps = [torch.zeros(4), torch.zeros(4)]
    opt = FusedNoisyOptimizer([{"params": [ps[0]]}, {"params": [ps[1]], "lr": 2.0}],
                              optimizer="sgd", lr=1.0, noise_multiplier=1.0, max_grad_norm=1.0,
                              expected_batch_size=1, noise=NoiseGenerator(secure=False, seed=0),
                              backend="torch")
    opt.step()
    assert opt.noise.step == 1
    # Distinct global offsets: the two groups got different noise; lr 2 doubles the second's.
    assert not torch.allclose(ps[0] * 2, ps[1])
    opt2 = FusedNoisyOptimizer([torch.zeros(4), torch.zeros(4)], optimizer="sgd", lr=1.0,
                               noise_multiplier=1.0, max_grad_norm=1.0, expected_batch_size=1,
                               noise=NoiseGenerator(secure=False, seed=0), backend="torch")
    opt2.step()
    q = [p for g in opt2.param_groups for p in g["params"]]
    torch.testing.assert_close(ps[0], q[0])
    torch.testing.assert_close(ps[1], 2 * q[1])


def test_optimizer_refuses_unknown_kind():
    with pytest.raises(ValueError, match="'sgd' or 'adamw'"):
        FusedNoisyOptimizer([torch.zeros(2)], optimizer="lamb", noise_multiplier=1.0,
                            max_grad_norm=1.0, expected_batch_size=1)
    _ = SGDHyper  # re-exported


def test_adopt_key_before_the_first_step_only():
    """Data-parallel ranks adopt rank 0's key; after a release the generator refuses a new key."""
    a, b = NoiseGenerator(secure=False, seed=1), NoiseGenerator()
    b.adopt_key(a._key)
    assert a.fingerprint == b.fingerprint and a.kernel_words(3) == b.kernel_words(3)
    with pytest.raises(ValueError, match="16 bytes"):
        b.adopt_key(b"short")
    b.next_step()
    with pytest.raises(RuntimeError, match="before step 0"):
        b.adopt_key(bytes(16))
    assert a.fingerprint == b.fingerprint  # the refused key changed nothing
