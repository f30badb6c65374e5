"""Bad input to `dpkern finetune` fails before any training, with a message naming the culprit.

Each case runs the real CLI entry point (`dpkern.cli.main`) and checks: exit code 2, the message on
stderr, and that nothing was trained (no metrics.jsonl, no checkpoint in the run folder).
"""
from __future__ import annotations

import json

import pytest

from dpkern.cli import main
from tests.cli._tiny import write_tsv

FAST = ["--steps", "2", "--batch-size", "8", "--physical-batch-size", "8", "--no-progress"]


def run_cli(capsys, tmp_path, *args):
    out = tmp_path / "run"
    code = main(["finetune", *FAST, "--output-dir", str(out), *args])  # later options win
    err = capsys.readouterr().err
    trained = (out / "metrics.jsonl").exists() or (out / "checkpoint.pt").exists()
    return code, err, trained


def expect_error(capsys, tmp_path, needles, *args):
    code, err, trained = run_cli(capsys, tmp_path, *args)
    assert code == 2, err
    assert "dpkern finetune: error:" in err
    for needle in needles:
        assert needle in err, err
    assert not trained, "training started despite bad input"


def test_missing_model_dir(capsys, tmp_path, tiny_data):
    expect_error(capsys, tmp_path, ["--model", "does not exist"],
                 "--model", str(tmp_path / "nope"), "--data", str(tiny_data))


def test_model_dir_without_config(capsys, tmp_path, tiny_data):
    (tmp_path / "empty_model").mkdir()
    expect_error(capsys, tmp_path, ["--model", "config.json"],
                 "--model", str(tmp_path / "empty_model"), "--data", str(tiny_data))


def test_model_that_is_not_a_classifier(capsys, tmp_path, tiny_data):
    d = tmp_path / "vision"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model_type": "vit"}))
    (d / "model.safetensors").write_bytes(b"")
    expect_error(capsys, tmp_path, ["--model", "not a classifier"],
                 "--model", str(d), "--data", str(tiny_data))


def test_missing_text_column(capsys, tmp_path, tiny_model):
    f = write_tsv(tmp_path / "d.tsv", 40, header=("review", "label"))
    expect_error(capsys, tmp_path, ["--data", "no text column", "review"],
                 "--model", str(tiny_model), "--data", str(f))


def test_missing_label_column(capsys, tmp_path, tiny_model):
    f = write_tsv(tmp_path / "d.tsv", 40, header=("sentence", "stars"))
    expect_error(capsys, tmp_path, ["--data", "no label column 'label'", "--label-column"],
                 "--model", str(tiny_model), "--data", str(f))


@pytest.mark.parametrize("content", ["", "sentence\tlabel\n"], ids=["zero_bytes", "header_only"])
def test_empty_file(capsys, tmp_path, tiny_model, content):
    f = tmp_path / "d.tsv"
    f.write_text(content)
    expect_error(capsys, tmp_path, ["--data", "no data rows"],
                 "--model", str(tiny_model), "--data", str(f))


def test_missing_data_path(capsys, tmp_path, tiny_model):
    expect_error(capsys, tmp_path, ["--data", "does not exist"],
                 "--model", str(tiny_model), "--data", str(tmp_path / "nope.tsv"))


def test_default_sst2_absent_says_where(capsys, tmp_path, tiny_model, monkeypatch):
    import dpkern.finetune.data as data
    monkeypatch.setattr(data, "default_data_dir", lambda: tmp_path / "shared" / "data" / "sst2")
    expect_error(capsys, tmp_path, ["SST-2 was not found", "--data PATH"],
                 "--model", str(tiny_model))


def test_labels_out_of_range(capsys, tmp_path, tiny_model):
    labels = [0, 1] * 19 + [5, 1]
    f = write_tsv(tmp_path / "d.tsv", 40, labels=labels)
    expect_error(capsys, tmp_path, ["--data", "[5]", "out of range", "0 .. 1"],
                 "--model", str(tiny_model), "--data", str(f), "--num-labels", "2")


def test_negative_label(capsys, tmp_path, tiny_model):
    f = write_tsv(tmp_path / "d.tsv", 40, labels=[0, 1] * 19 + [-1, 0])
    expect_error(capsys, tmp_path, ["[-1]", "out of range"],
                 "--model", str(tiny_model), "--data", str(f))


def test_non_integer_label(capsys, tmp_path, tiny_model):
    f = write_tsv(tmp_path / "d.tsv", 40, labels=["pos"] * 40)
    expect_error(capsys, tmp_path, ["'pos'", "not an integer"],
                 "--model", str(tiny_model), "--data", str(f))


@pytest.mark.parametrize("eps", ["0", "-1", "inf", "nan"])
def test_epsilon_not_positive(capsys, tmp_path, tiny_model, tiny_data, eps):
    expect_error(capsys, tmp_path, ["--epsilon", "> 0"],
                 "--model", str(tiny_model), "--data", str(tiny_data), "--epsilon", eps)


def test_impossible_budget(capsys, tmp_path, tiny_model, tiny_data):
    code, err, trained = run_cli(capsys, tmp_path, "--model", str(tiny_model), "--data",
                                 str(tiny_data), "--epsilon", "0.001", "--batch-size", "200",
                                 "--steps", "400")
    assert code == 2 and "impossible budget" in err and "--epsilon" in err, err
    assert not trained


@pytest.mark.parametrize("args,needle", [
    (["--delta", "0"], "--delta"),
    (["--delta", "0.5"], "--delta"),
    (["--max-grad-norm", "0"], "--max-grad-norm"),
    (["--batch-size", "0"], "--batch-size"),
    (["--batch-size", "100000"], "exceeds"),
    (["--lr", "-1"], "--lr"),
    (["--noise-multiplier", "0"], "--noise-multiplier"),
    (["--device", "tpu"], "--device"),
    (["--resume"], "--resume"),
    (["--backend", "cuda", "--device", "cpu"], "--backend cuda"),
], ids=lambda v: v if isinstance(v, str) else "_".join(v))
def test_bad_options(capsys, tmp_path, tiny_model, tiny_data, args, needle):
    out = tmp_path / "run"
    code = main(["finetune", "--model", str(tiny_model), "--data", str(tiny_data),
                 "--output-dir", str(out), *FAST, *args])
    err = capsys.readouterr().err
    assert code == 2 and needle in err, err
    assert not (out / "metrics.jsonl").exists()


def test_existing_run_needs_resume(capsys, tmp_path, tiny_model, tiny_data):
    out = tmp_path / "run"
    out.mkdir()
    (out / "checkpoint.pt").write_bytes(b"x")
    code = main(["finetune", "--model", str(tiny_model), "--data", str(tiny_data),
                 "--output-dir", str(out), *FAST])
    assert code == 2 and "--resume" in capsys.readouterr().err


def test_triton_backend_on_cpu_needs_the_interpreter(capsys, tmp_path, tiny_model, tiny_data,
                                                      monkeypatch):
    if __import__("torch").cuda.is_available():
        pytest.skip("CPU-only check")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    expect_error(capsys, tmp_path, ["--backend triton", "TRITON_INTERPRET=1"],
                 "--model", str(tiny_model), "--data", str(tiny_data), "--backend", "triton")
