"""The registry is the one source of the bench shapes; quick cases are small."""
import math

import pytest

from bench import registry


@pytest.mark.parametrize("name", list(registry.OPS))
def test_op_cases_well_formed(name):
    c = registry.op(name)
    full, quick = c.shapes(quick=False), c.shapes(quick=True)
    assert full and quick
    assert full != quick
    sets = name in registry.TENSOR_SETS  # a shape is a set of tensor shapes
    if not sets:
        for s in full + quick:
            assert len(s) == len(c.dims), (name, s)
    size = lambda s: sum(math.prod(t) for t in s) if sets else math.prod(s)  # noqa: E731
    assert max(size(s) for s in quick) <= 1 << 16, "quick shapes must stay CPU-sized"
    assert max(size(s) for s in full) > max(size(s) for s in quick)


def test_unknown_op_names_the_op():
    with pytest.raises(KeyError, match="no op 'nope'"):
        registry.op("nope")


def test_case_ids_unique_in_both_modes():
    for quick in (True, False):
        ids = [c["id"] for c in registry.cases(quick)]
        assert len(ids) == len(set(ids))


def test_bench_files_take_shapes_from_registry():
    from bench import bench_denoise, bench_lmo, bench_noise_step, bench_persample, bench_rownorm
    assert bench_rownorm.CASES == registry.shapes("rownorm_sq")
    assert bench_persample.LINEAR_CASES == registry.shapes("linear_norm_sq")
    assert bench_persample.BOOKKEEPING_CASES == registry.shapes("bookkeeping_wgrad")
    assert bench_persample.EMB_CASES == registry.shapes("embedding_norm_sq")
    assert bench_persample.HEADLINE == registry.shapes("headline", quick=False)[0]
    assert bench_lmo.SIZES == [s[0] for s in registry.shapes("noise_add")]
    assert bench_noise_step.SHAPES == list(registry.shapes("noise_step")[0])
    from bench import bench_subspace
    assert bench_subspace.BACKPROJ_CASES == registry.shapes("subspace_backproj")
    assert bench_denoise.MODELS["llama-1b"] == dict(hidden=2048, intermediate=5504, layers=22)
    assert tuple(bench_denoise.MODELS["tiny"].values()) == registry.shapes("rmt_denoise", True)[0]
    assert bench_denoise.STEPS == registry.shapes("rmt_denoise_steps")[0][3]
    assert tuple(bench_denoise.MODELS["tiny"].values()) == registry.shapes("rmt_denoise_steps", True)[0][:3]
    assert tuple(bench_denoise.MODELS["llama-1b"].values()) \
        == registry.shapes("rmt_denoise_steps", False)[0][:3]


def test_full_noise_step_set_is_one_billion_parameters():
    n = sum(math.prod(s) for s in registry.shapes("noise_step", quick=False)[0])
    assert len(registry.shapes("noise_step", quick=False)[0]) == 156
    assert 0.99e9 < n < 1.05e9


def test_listing_prints_every_case(capsys):
    registry.main(["--full"])
    out = capsys.readouterr().out.splitlines()
    assert len(out) == len(registry.cases(quick=False))
