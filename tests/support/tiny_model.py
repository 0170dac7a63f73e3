"""A tiny random Llama that stands in for the base model in fast tests."""

from __future__ import annotations

from transformers import LlamaConfig

from contributions.architecture import architecture_from_config


def tiny_llama_config() -> LlamaConfig:
    return LlamaConfig(
        vocab_size=320,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=True,
    )


def tiny_architecture() -> dict:
    return architecture_from_config(tiny_llama_config())
