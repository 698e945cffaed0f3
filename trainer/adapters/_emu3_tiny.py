"""The tiny-random Emu3: a real `Emu3Config` at tiny size, built once under the cache.

32 px images, a 4-level VQ with 64 codes, a 2-layer text model, seeded; a byte-level tokenizer
with Emu3's special and visual tokens and the vocabulary map joining them; saved under
`<cache_dir>/tiny-random/emu3/<version>-<key>/` (`tiny_random_dir`) and loaded back through `from_pretrained` by
trainer/adapters/emu3.py. Its outputs are noise. Not an adapter (its name starts with `_`).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from pipeline.fingerprint import tiny_random_cache
from pipeline.shards import atomic_build_dir
from trainer.adapters._byte_tokenizer import byte_level_tokenizer
from trainer.adapters._emu3_text import BOI, BOS, EOF, EOI, EOL, EOS, IMAGE_TOKEN, IMG, PAD, VISUAL
from trainer.adapters._model_spec import META_FILE

#: Emu3's VQ (SBER-MoVQGAN style) works on [-1, 1] pixels.
VQ_MEAN = VQ_STD = (0.5, 0.5, 0.5)


#: Bump when the builder changes what it saves: the cache folder is named after it.
TINY_VERSION = "v1"


def _tiny_tokenizer(codebook_size: int):
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


def _tiny_model(tokenizer, codebook_size: int):
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
    final = tiny_random_cache("emu3", TINY_VERSION, ("torch", "transformers", "tokenizers"))

    def build(tmp: Path) -> None:
        tokenizer = _tiny_tokenizer(64)
        model = _tiny_model(tokenizer, 64)
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        _write_preprocessor(tmp, VQ_MEAN, VQ_STD, 32 * 32, 32 * 32)
        (tmp / META_FILE).write_text(
            json.dumps({"adapter": "emu3", "random_weights": True, "image_size": 32})
        )

    return atomic_build_dir(final, build, marker=META_FILE)


def _write_preprocessor(path: Path, mean, std, min_pixels: int, max_pixels: int) -> None:
    cfg = {
        "image_processor_type": "Emu3ImageProcessor",
        "image_mean": list(mean),
        "image_std": list(std),
        "min_pixels": int(min_pixels),
        "max_pixels": int(max_pixels),
        "spatial_factor": 8,
        "do_resize": True,
        "do_pad": True,
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "resample": 3,
    }
    (path / "preprocessor_config.json").write_text(json.dumps(cfg, indent=2))
