"""``tiny-llama``: a small random LLaMA with a byte-level tokenizer, built locally (no network).

Hidden size 64, 2 layers, 4 heads (2 KV heads), MLP 128, vocabulary = 256 bytes + 4 special tokens.
Weights are drawn from a fixed seed, so every build is identical.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from fedlora.models.folders import save_model_folder

SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<unk>"]


def byte_level_tokenizer() -> PreTrainedTokenizerFast:
    """A tokenizer with one token per byte (no merges): any text round-trips, vocabulary 260."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS + alphabet)}
    core = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )


def tiny_llama_config(hidden_size: int = 64, num_layers: int = 2, vocab_size: int = 260) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=False,
    )


def build_tiny_llama_folder(target: Path, hidden_size: int = 64, num_layers: int = 2, seed: int = 0) -> Path:
    """Write the tiny model and its tokenizer to ``target`` (atomically: build aside, then rename)."""
    tokenizer = byte_level_tokenizer()
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = LlamaForCausalLM(tiny_llama_config(hidden_size, num_layers, len(tokenizer)))
    return save_model_folder(target, model, tokenizer)


def tiny_llama_folder(cache: Path, hidden_size: int = 64, num_layers: int = 2) -> Path:
    """The cached folder of the tiny model of this size (``<cache>/models/tiny-llama-h<H>-l<L>``), built once."""
    target = cache / "models" / f"tiny-llama-h{hidden_size}-l{num_layers}"
    if not (target / "config.json").exists():
        build_tiny_llama_folder(target, hidden_size, num_layers)
    return target
