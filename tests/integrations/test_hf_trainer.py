"""DPTrainer / make_trainer_private: a Hugging Face Trainer script made private in a few lines.

Checked on a tiny random BERT: training runs through the engine (σ calibrated, noise steps =
optimizer steps, ε logged and ≤ target), the trainable weights move, the Trainer's own clipping is
off, and a plain Trainer converted in place behaves the same.
"""
from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from dpkern.accounting import create_accountant  # noqa: E402
from dpkern.integrations import DPTrainer, PrivacyArguments, make_trainer_private  # noqa: E402
from tests.cli._tiny import make_tiny_bert, sentence  # noqa: E402


class ToyDataset(torch.utils.data.Dataset):
    def __init__(self, tok, n: int, seed: int = 0):
        import random
        rng = random.Random(seed)
        self.items = []
        for _ in range(n):
            y = rng.randrange(2)
            enc = tok(sentence(rng, y), truncation=True, max_length=16)
            self.items.append({"input_ids": enc["input_ids"], "labels": y})

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    path = make_tiny_bert(tmp_path_factory.mktemp("tiny_bert_trainer"))
    tok = transformers.AutoTokenizer.from_pretrained(str(path))
    return path, tok, ToyDataset(tok, 200)


def training_args(tmp_path, **kw):
    base = dict(output_dir=str(tmp_path / "out"), per_device_train_batch_size=20, max_steps=6,
                learning_rate=1e-2, logging_steps=2, save_strategy="no", report_to=[],
                use_cpu=True, disable_tqdm=True, remove_unused_columns=False)
    return transformers.TrainingArguments(**{**base, **kw})


def test_dp_trainer_trains_privately_and_reports_epsilon(tmp_path, setup):
    path, tok, ds = setup
    model = transformers.AutoModelForSequenceClassification.from_pretrained(str(path),
                                                                            num_labels=2)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer = DPTrainer(model=model, args=training_args(tmp_path), train_dataset=ds,
                        data_collator=transformers.DataCollatorWithPadding(tok),
                        privacy_args=PrivacyArguments(target_epsilon=2.0, target_delta=1e-5,
                                                      physical_batch_size=8))
    trainer.train()
    eps = trainer.get_epsilon()
    q = 20 / 200
    acc = create_accountant("prv")
    acc.step(noise_multiplier=trainer.noise_multiplier, sample_rate=q, num_steps=6)
    assert eps == pytest.approx(acc.get_epsilon(1e-5), rel=1e-12)
    assert 1.9 < eps <= 2.0, "σ is calibrated for exactly the planned 6 steps"
    assert trainer.dp_optimizer.noise_steps == 6
    assert trainer.args.max_grad_norm == 0.0
    logged = [h for h in trainer.state.log_history if "epsilon" in h]
    assert logged and all(0 < h["epsilon"] <= 2.0 for h in logged)
    moved = [n for n, p in model.named_parameters() if not torch.equal(p.detach(), before[n])]
    assert "classifier.weight" in moved and len(moved) == len(before)


def test_make_trainer_private_converts_an_existing_trainer(tmp_path, setup):
    path, tok, ds = setup
    model = transformers.AutoModelForSequenceClassification.from_pretrained(str(path),
                                                                            num_labels=2)
    trainer = transformers.Trainer(model=model, args=training_args(tmp_path, max_steps=3),
                                   train_dataset=ds,
                                   data_collator=transformers.DataCollatorWithPadding(tok))
    make_trainer_private(trainer, PrivacyArguments(noise_multiplier=1.0))
    trainer.train()
    assert trainer.dp_optimizer.noise_steps == 3 and trainer.noise_multiplier == 1.0
    acc = create_accountant("prv")
    acc.step(noise_multiplier=1.0, sample_rate=0.1, num_steps=3)
    assert trainer.get_epsilon() == pytest.approx(acc.get_epsilon(1e-5), rel=1e-12)
    with pytest.raises(ValueError, match="already private"):
        make_trainer_private(trainer)


def test_bad_privacy_arguments_and_accumulation(tmp_path, setup):
    path, tok, ds = setup
    with pytest.raises(ValueError, match="target_epsilon"):
        PrivacyArguments(target_epsilon=0)
    with pytest.raises(ValueError, match="target_delta"):
        PrivacyArguments(target_delta=1.5)
    model = transformers.AutoModelForSequenceClassification.from_pretrained(str(path),
                                                                            num_labels=2)
    with pytest.raises(ValueError, match="gradient_accumulation_steps"):
        DPTrainer(model=model, args=training_args(tmp_path, gradient_accumulation_steps=2),
                  train_dataset=ds, data_collator=transformers.DataCollatorWithPadding(tok))
