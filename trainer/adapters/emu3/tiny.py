"""The tiny-random Emu3: a real `Emu3Config` at tiny size, built once under the cache.

32 px images, a 4-level VQ with 64 codes, a 2-layer text model, seeded; a byte-level tokenizer
with Emu3's special and visual tokens and the vocabulary map joining them; saved under
`<cache_dir>/tiny-random/emu3/<version>-<key>/` (`tiny_random_dir`, on the shared
`tiny_random_folder`) and loaded back through `from_pretrained` by the adapter (adapter.py). Its
outputs are noise.
"""

from __future__ import annotations

from pathlib import Path

import torch

from trainer.adapters.common import byte_level_tokenizer, tiny_random_folder
from trainer.adapters.emu3.processor import VQ_MEAN, VQ_STD, write_preprocessor
from trainer.adapters.emu3.text import BOI, BOS, EOF, EOI, EOL, EOS, IMAGE_TOKEN, IMG, PAD, VISUAL

__all__ = ["TINY_VERSION", "tiny_model", "tiny_random_dir", "tiny_tokenizer"]

#: Bump when the builder changes what it saves: the cache folder is named after it.
TINY_VERSION = "v1"


def tiny_tokenizer(codebook_size: int):
    """The byte-level tokenizer with Emu3's special tokens and `codebook_size` visual tokens."""
    fast = byte_level_tokenizer(
        BOS,
        EOS,
        PAD,
        # The attributes transformers' Emu3Processor reads (as Emu3-Chat-hf's tokenizer has).
        extra_special_tokens={
            "image_token": IMAGE_TOKEN,
            "boi_token": BOI,
            "eoi_token": EOI,
            "image_wrapper_token": IMG,
            "eof_token": EOF,
        },
    )
    fast.add_tokens([EOL], special_tokens=True)
    # Visual tokens last and contiguous, as in Emu3's vocabulary.
    fast.add_tokens([VISUAL.format(i) for i in range(codebook_size)], special_tokens=True)
    return fast


def tiny_model(tokenizer, codebook_size: int):
    """An `Emu3ForConditionalGeneration` at tiny size, seeded without touching the global RNG."""
    from transformers import (
        Emu3Config,
        Emu3ForConditionalGeneration,
        Emu3TextConfig,
        Emu3VQVAEConfig,
    )

    base, mult = 32, [1, 1, 1, 1]  # 4 levels: downsampling 8, as the HF processor assumes
    vq = Emu3VQVAEConfig(
        codebook_size=codebook_size,
        embed_dim=4,
        latent_channels=4,
        base_channels=base,
        channel_multiplier=mult,
        num_res_blocks=1,
        attn_resolutions=[],
        hidden_size=base * mult[-1],  # the VQ's attention width is its last block's channels
        num_attention_heads=1,
        temporal_downsample_factor=4,
    )
    text = Emu3TextConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        attention_dropout=0.0,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    vocab = tokenizer.get_vocab()
    names = [IMAGE_TOKEN, EOL, *(VISUAL.format(i) for i in range(codebook_size))]
    config = Emu3Config(vq_config=vq, text_config=text, vocabulary_map={n: vocab[n] for n in names})
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return Emu3ForConditionalGeneration(config).eval()


def tiny_random_dir() -> Path:
    """Build (once) and return the tiny-random Emu3 directory under the cache."""

    def build(tmp: Path) -> None:
        tokenizer = tiny_tokenizer(64)
        model = tiny_model(tokenizer, 64)
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        write_preprocessor(tmp, VQ_MEAN, VQ_STD, 32 * 32, 32 * 32)

    return tiny_random_folder("emu3", TINY_VERSION, build, meta={"image_size": 32})
