"""A tiny random Llama that stands in for the base model in fast tests."""

from __future__ import annotations

from pathlib import Path

from transformers import LlamaConfig

from contributions.architecture import architecture_from_config

# Special tokens of the tiny tokenizer, in id order (ids 0, 1, 2), ChatML-style like SmolLM2.
TINY_PAD, TINY_BOS, TINY_EOS = "<|pad|>", "<|im_start|>", "<|im_end|>"

TINY_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

_TINY_CORPUS = [
    "The capital of France is Paris.",
    "What is the capital of France? Paris is the capital of France.",
    "Add 123 and 456: the sum is 579.",
    "Translate hello to French: bonjour.",
    "user assistant system: you are a helpful assistant.",
    "The quick brown fox jumps over the lazy dog.",
]


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


def tiny_tokenizer():
    """A byte-level BPE tokenizer trained offline on a few sentences; fits vocab_size=320.

    256 byte symbols + 3 special tokens + merges up to 320 ids, so every id it produces is
    inside the tiny model's embedding table.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    vocab_size = tiny_llama_config().vocab_size
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[TINY_PAD, TINY_BOS, TINY_EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_TINY_CORPUS, trainer=trainer)
    assert tokenizer.get_vocab_size() <= vocab_size
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=TINY_BOS,
        eos_token=TINY_EOS,
        pad_token=TINY_PAD,
        chat_template=TINY_CHAT_TEMPLATE,
    )


def save_tiny_llama(path: Path, *, seed: int = 0) -> Path:
    """Write a tiny random Llama (safetensors) and a working tokenizer into ``path``.

    The weights are a seeded random init, so two calls with the same seed write identical
    tensors (and so the same sha256). Takes well under a second.
    """
    import torch
    from transformers import LlamaForCausalLM

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tokenizer = tiny_tokenizer()
    config = tiny_llama_config()
    config.bos_token_id = tokenizer.bos_token_id
    config.eos_token_id = tokenizer.eos_token_id
    config.pad_token_id = tokenizer.pad_token_id
    generator_state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    finally:
        torch.random.set_rng_state(generator_state)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
