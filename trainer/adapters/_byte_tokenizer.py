"""The byte-level tokenizer the tiny-random models share (_janus_tiny.py, _emu3_tiny.py).

One token per byte (the 256 symbols of byte-level BPE, no merges), so any text encodes without a
trained vocabulary; each family then adds its own special tokens. Not an adapter (its name
starts with `_`).
"""

from __future__ import annotations

from typing import Any


def byte_level_tokenizer(bos: str, eos: str, pad: str, **extra: Any):
    """A `PreTrainedTokenizerFast` over bytes with these BOS / EOS / PAD tokens; `extra`: more
    keyword arguments for its constructor (Emu3's `extra_special_tokens`, say)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=bos,
        eos_token=eos,
        pad_token=pad,
        model_max_length=512,
        **extra,
    )
