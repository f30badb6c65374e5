"""A tiny random BERT (built from a config, saved like a Hub folder) and a toy sentiment data set.

The data is learnable in a few steps: the label is 1 when the sentence holds a positive word.
Nothing here touches the network.
"""
from __future__ import annotations

import csv
import json
import random
from pathlib import Path

POSITIVE = ["good", "great", "fine", "nice", "fun"]
NEGATIVE = ["bad", "awful", "poor", "sad", "dull"]
FILLER = ["the", "movie", "was", "plot", "film", "a", "very", "and", "story", "it"]
SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def tiny_tokenizer(vocab: list[str]):
    """A lower-casing WordPiece tokenizer over ``vocab`` with BERT's [CLS] ... [SEP] template."""
    import transformers
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    ids = {w: i for i, w in enumerate(vocab)}
    tk = Tokenizer(models.WordPiece(ids, unk_token="[UNK]"))
    tk.normalizer = normalizers.BertNormalizer(lowercase=True)
    tk.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tk.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", ids["[CLS]"]), ("[SEP]", ids["[SEP]"])])
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tk, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
        sep_token="[SEP]", mask_token="[MASK]")


def make_tiny_bert(path: Path, *, hidden: int = 16, layers: int = 2, classifier: bool = False,
                   seed: int = 0) -> Path:
    """Saves a random BERT (hidden 16, 2 layers) + WordPiece tokenizer to ``path``."""
    import torch
    import transformers
    transformers.logging.set_verbosity_error()
    path.mkdir(parents=True, exist_ok=True)
    vocab = SPECIAL + POSITIVE + NEGATIVE + FILLER
    tok = tiny_tokenizer(vocab)
    tok.save_pretrained(str(path))
    cfg = transformers.BertConfig(vocab_size=len(vocab), hidden_size=hidden,
                                  num_hidden_layers=layers, num_attention_heads=2,
                                  intermediate_size=2 * hidden, max_position_embeddings=64,
                                  pad_token_id=0)
    torch.manual_seed(seed)
    cls = transformers.BertForSequenceClassification if classifier else transformers.BertModel
    cls(cfg).save_pretrained(str(path))
    return path


def sentence(rng: random.Random, label: int) -> str:
    words = rng.sample(FILLER, 3) + [rng.choice(POSITIVE if label else NEGATIVE)]
    rng.shuffle(words)
    return " ".join(words)


def write_tsv(path: Path, n: int, seed: int = 0, header=("sentence", "label"), labels=None) -> Path:
    rng = random.Random(seed)
    with open(path, "w", newline="") as f:
        w = csv.writer(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        w.writerow(header)
        for i in range(n):
            y = rng.randrange(2)
            w.writerow([sentence(rng, y), labels[i] if labels else y])
    return path


def make_sst2_like(folder: Path, n_train: int = 400, n_dev: int = 60, n_test: int = 60) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    write_tsv(folder / "train.tsv", n_train, seed=1)
    write_tsv(folder / "dev.tsv", n_dev, seed=2)
    write_tsv(folder / "glue_dev.tsv", n_test, seed=3)
    return folder


def write_jsonl(path: Path, n: int, seed: int = 0) -> Path:
    rng = random.Random(seed)
    with open(path, "w") as f:
        for _ in range(n):
            y = rng.randrange(2)
            f.write(json.dumps({"text": sentence(rng, y), "label": y}) + "\n")
    return path
