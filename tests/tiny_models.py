"""Tiny random models built from a config, with real tokenizers, so exact code paths run in seconds."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from tunerag.models import package_dir

# The chat template of mistralai/Mistral-7B-Instruct-v0.1 (its tokenizer_config.json on the hub).
MISTRAL_V01_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token }}"
    "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}"
)


def save_mistral_tokenizer(folder: Path) -> None:
    """The real Mistral-7B v0.1 sentencepiece tokenizer (shipped in mistral-common), as a HF folder."""
    from transformers import AutoTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    shutil.copy(package_dir("mistral_common") / "data" / "tokenizer.model.v1", folder / "tokenizer.model")
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
        "add_bos_token": True, "add_eos_token": False, "legacy": False,
        "chat_template": MISTRAL_V01_CHAT_TEMPLATE,
    }))
    tokenizer = AutoTokenizer.from_pretrained(folder)
    (folder / "tokenizer.model").unlink()
    tokenizer.save_pretrained(folder)


def save_tiny_mistral(folder: Path, seed: int = 0) -> Path:
    """A 2-layer random MistralForCausalLM with the real Mistral tokenizer, saved as a normal folder."""
    import torch
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(seed)
    config = MistralConfig(
        vocab_size=32000, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
        bos_token_id=1, eos_token_id=2, tie_word_embeddings=False,
    )
    MistralForCausalLM(config).save_pretrained(folder)
    save_mistral_tokenizer(folder)
    return folder


def save_tiny_bert(folder: Path, minilm_folder: Path) -> Path:
    """A 1-layer, 16-wide random BERT with MiniLM's tokenizer; SentenceTransformer adds mean pooling."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    tokenizer = AutoTokenizer.from_pretrained(minilm_folder)
    tokenizer.save_pretrained(folder)
    torch.manual_seed(0)  # the same random weights every run: tests that train it must not depend on luck
    BertModel(BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=32, max_position_embeddings=256)).save_pretrained(folder)
    return folder
