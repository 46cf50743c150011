"""Test helpers: a tiny tokenizer and a tiny random Llama, built offline in about a second.

They live apart from ``selpo.models`` because the tokenizer is trained on the sentiment task's prompts, and
the sentiment task loads its models through ``selpo.models``: kept there, they made an import circle. Nothing
in the package imports this module (tests/test_imports.py checks it).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from .sentiment import review_prompts, sentiment_lexicon

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def tiny_tokenizer():
    """A byte-level BPE tokenizer (1024 tokens, ChatML template) trained offline in a fraction of a second.

    Trained on the default task's prompts and VADER's lexicon, so the tiny test model sees realistic
    token counts; BPE training on a fixed corpus is deterministic.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    words = sorted(w for w in sentiment_lexicon() if w.isalpha())
    corpus = review_prompts(200, seed=0) + [" ".join(words[i:i + 16]) for i in range(0, len(words), 16)]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    bpe.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=1024, special_tokens=specials, show_progress=False,
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, unk_token="<|endoftext|>", bos_token="<|im_start|>",
                                        eos_token="<|im_end|>", pad_token="<|im_end|>")
    tokenizer.chat_template = CHATML_TEMPLATE
    return tokenizer


TINY_BODY = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                 num_key_value_heads=2, max_position_embeddings=1024)


def tiny_model_dir(tmp_dir: str | os.PathLike, *, tokenizer=None, tie_word_embeddings: bool = True,
                   seed: int = 0, body: dict | None = None, name: str = "tiny-llama") -> str:
    """Saves a randomly initialised LlamaForCausalLM, by default tiny (``TINY_BODY``: hidden 32, 2 layers, 2 heads)
    for fast tests; ``body`` replaces those sizes (a benchmark's larger random model).

    Uses ``tiny_tokenizer()`` unless a tokenizer is given; returns the folder (``tmp_dir/name``).
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = tiny_tokenizer() if tokenizer is None else tokenizer
    config = LlamaConfig(vocab_size=len(tokenizer), **(TINY_BODY if body is None else body),
                         tie_word_embeddings=tie_word_embeddings,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    folder = Path(tmp_dir) / name
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)
