"""Tiny random-init Hugging Face models (no network) and padded batches for the engine tests."""
from __future__ import annotations

import torch

VOCAB = 61  # odd on purpose
PAD = 0


def _quiet(cfg):
    for k in ("hidden_dropout_prob", "attention_probs_dropout_prob", "resid_pdrop", "embd_pdrop",
              "attn_pdrop", "attention_dropout", "classifier_dropout", "summary_first_dropout"):
        if hasattr(cfg, k):
            setattr(cfg, k, 0.0)
    return cfg


def llama(tied: bool = False):
    from transformers import LlamaConfig, LlamaForCausalLM
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
                      pad_token_id=PAD, tie_word_embeddings=tied)
    return LlamaForCausalLM(_quiet(cfg))


def qwen2():
    from transformers import Qwen2Config, Qwen2ForCausalLM
    cfg = Qwen2Config(vocab_size=VOCAB, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
                      pad_token_id=PAD, tie_word_embeddings=True)
    return Qwen2ForCausalLM(_quiet(cfg))


def gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel
    cfg = GPT2Config(vocab_size=VOCAB, n_embd=16, n_layer=2, n_head=2, n_positions=64)
    return GPT2LMHeadModel(_quiet(cfg))


def bert():
    from transformers import BertConfig, BertForSequenceClassification
    cfg = BertConfig(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=24, max_position_embeddings=64, num_labels=3,
                     pad_token_id=PAD)
    return BertForSequenceClassification(_quiet(cfg))


def roberta():
    from transformers import RobertaConfig, RobertaForSequenceClassification
    cfg = RobertaConfig(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=2,
                        num_attention_heads=2, intermediate_size=24, max_position_embeddings=70,
                        num_labels=2, pad_token_id=1)
    return RobertaForSequenceClassification(_quiet(cfg))


def lora_llama():
    from peft import LoraConfig, get_peft_model
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0,
                     init_lora_weights=False)
    return get_peft_model(llama(), cfg)


MODELS = {"llama": llama, "qwen2": qwen2, "gpt2": gpt2, "bert": bert, "roberta": roberta,
          "lora_llama": lora_llama}


def batch_for(name: str, bsz: int, seq: int = 9, seed: int = 0) -> dict:
    """Right-padded batch with varied lengths (the first row is full length)."""
    g = torch.Generator().manual_seed(seed)
    pad = 1 if name == "roberta" else PAD
    ids = torch.randint(2, VOCAB, (bsz, seq), generator=g)
    lengths = torch.randint(3, seq + 1, (bsz,), generator=g)
    lengths[0] = seq
    mask = (torch.arange(seq)[None, :] < lengths[:, None]).long()
    ids = torch.where(mask.bool(), ids, torch.full_like(ids, pad))
    batch = {"input_ids": ids, "attention_mask": mask}
    if name in ("bert", "roberta"):
        n_labels = 3 if name == "bert" else 2
        batch["labels"] = torch.randint(0, n_labels, (bsz,), generator=g)
    return batch


def build(name: str, seed: int = 0):
    torch.manual_seed(seed)
    model = MODELS[name]()
    model.train()
    return model
