"""Tiny random models of five families and a small BPE tokenizer, built in a second, for unit tests."""

from __future__ import annotations

import functools
from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
from transformers import (
    AutoModelForCausalLM,
    Gemma3TextConfig,
    GPT2Config,
    LlamaConfig,
    OPTConfig,
    PreTrainedTokenizerFast,
    Qwen2Config,
)

from sparsellm.data import builtin_corpus

ARCHITECTURES = ("llama", "qwen2", "gemma3", "opt", "gpt2")
VOCAB = 320


@functools.lru_cache(maxsize=2)
def _trained_bpe(add_bos: bool) -> Tokenizer:
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["<unk>", "<bos>", "<eos>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator([builtin_corpus()[:60_000]], trainer)
    if add_bos:
        tokenizer.post_processor = processors.TemplateProcessing(
            single="<bos> $A", pair="<bos> $A <bos> $B", special_tokens=[("<bos>", 1)])
    return tokenizer


def make_tokenizer(add_bos: bool = False) -> PreTrainedTokenizerFast:
    """A byte-level BPE of 320 tokens trained on the builtin corpus; Gemma-style BOS when asked."""
    return PreTrainedTokenizerFast(tokenizer_object=_trained_bpe(add_bos), unk_token="<unk>",
                                   bos_token="<bos>", eos_token="<eos>", pad_token="<eos>")


def make_config(arch: str, layers: int = 2, hidden: int = 64, intermediate: int = 128):
    common = {"vocab_size": VOCAB, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2}
    if arch == "llama":
        return LlamaConfig(hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, **common)
    if arch == "qwen2":
        return Qwen2Config(hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, **common)
    if arch == "gemma3":
        return Gemma3TextConfig(hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                                num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                max_position_embeddings=512, sliding_window=16,
                                layer_types=["sliding_attention", "full_attention"] * (layers // 2)
                                + ["sliding_attention"] * (layers % 2), **common)
    if arch == "opt":
        return OPTConfig(hidden_size=hidden, ffn_dim=intermediate, num_hidden_layers=layers, num_attention_heads=4,
                         max_position_embeddings=512, word_embed_proj_dim=hidden, **common)
    if arch == "gpt2":
        return GPT2Config(n_embd=hidden, n_inner=intermediate, n_layer=layers, n_head=4, n_positions=512, **common)
    raise ValueError(arch)


def make_model(arch: str, seed: int = 0, **sizes) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(make_config(arch, **sizes), dtype=torch.float32)
    with torch.no_grad():  # random init at std 0.02 makes every layer near-identical; widen the spread
        for name, param in model.named_parameters():
            if param.dim() == 2 and "embed" not in name and "wte" not in name and "wpe" not in name:
                param.mul_(torch.empty(param.shape[1]).uniform_(0.5, 3.0))
    return model.eval()


def save_tiny(folder: Path, arch: str = "llama", seed: int = 0, **sizes) -> Path:
    """Write a tiny model with its tokenizer (BOS-first for Gemma, as the real tokenizer does)."""
    make_model(arch, seed, **sizes).save_pretrained(folder)
    make_tokenizer(add_bos=arch == "gemma3").save_pretrained(folder)
    return folder
