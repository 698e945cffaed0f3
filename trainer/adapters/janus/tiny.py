"""The tiny-random Janus: a real `JanusConfig` at tiny size, built once under the cache.

A 2-layer Llama text model, a 32 px SigLIP-style vision tower and a VQ with 64 codes, seeded
(`JanusSizes()`, whose fields other small models of the family set: experiments/miniature); a
byte-level tokenizer with Janus's special tokens; saved with its processor under
`<cache_dir>/tiny-random/janus/<version>-<key>/` (`tiny_random_dir`, on the shared
`tiny_random_folder`) and loaded back through `from_pretrained` by the adapter (adapter.py), like
a hub checkpoint. Its outputs are noise.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch

from trainer.adapters.common import byte_level_tokenizer, tiny_random_folder
from trainer.adapters.janus.processor import build_processor, with_image_token_names
from trainer.adapters.janus.text import BOI, BOS, EOI, EOS, IMAGE_TOKEN, PAD

__all__ = ["TINY_VERSION", "JanusSizes", "tiny_model", "tiny_random_dir", "tiny_tokenizer"]

#: Bump when the builder changes what it saves: the cache folder is named after it.
TINY_VERSION = "v2"


def tiny_tokenizer():
    """The byte-level tokenizer with Janus's special tokens and image token names."""
    fast = byte_level_tokenizer(BOS, EOS, PAD)
    fast.add_tokens([IMAGE_TOKEN, BOI, EOI], special_tokens=True)
    # JanusProcessor reads these names (the hub's Janus-Pro tokenizer config has them).
    return with_image_token_names(fast)


@dataclass(frozen=True)
class JanusSizes:
    """The sizes of a small Janus-architecture model. The defaults are tiny-random's (changing
    them changes its files: bump TINY_VERSION). experiments/miniature builds its models here
    with its own sizes."""

    #: Llama text model: hidden size, layers, attention heads and key-value heads
    lm_hidden: int = 64
    lm_layers: int = 2
    lm_heads: int = 4
    lm_kv_heads: int = 2
    #: SigLIP-style understanding encoder: hidden size, layers, heads
    vision_hidden: int = 32
    vision_layers: int = 2
    vision_heads: int = 2
    #: square input side (px) and patch side: (image_size / patch_size)^2 understanding tokens,
    #: and as many VQ codes per image (Janus's VQ grid is the vision patch grid)
    image_size: int = 32
    patch_size: int = 8
    #: VQ tokenizer: codebook entries, code dimension, channels; None multipliers: all 1 over
    #: log2(patch_size) + 1 levels (one downsampling per level but the last)
    vq_codes: int = 64
    vq_embed_dim: int = 8
    vq_channels: int = 32
    vq_channel_multiplier: tuple[int, ...] | None = None
    max_positions: int = 512

    def vq_levels(self) -> list[int]:
        if self.vq_channel_multiplier is not None:
            return list(self.vq_channel_multiplier)
        return [1] * (int(math.log2(self.patch_size)) + 1)


def tiny_model(tokenizer, sizes: JanusSizes | None = None, seed: int = 0):
    """A `JanusForConditionalGeneration` of `sizes` (default: tiny-random's), initialised from
    `seed` without touching the global RNG."""
    from transformers import (
        JanusConfig,
        JanusForConditionalGeneration,
        JanusVisionConfig,
        JanusVQVAEConfig,
        LlamaConfig,
    )

    z = sizes or JanusSizes()
    if z.image_size % z.patch_size or 2 ** (len(z.vq_levels()) - 1) != z.patch_size:
        raise ValueError(
            f"{z}: the VQ must downsample by patch_size ({z.patch_size}) so that its grid is the "
            "vision patch grid (JanusConfig sets vq num_patches from the vision config)"
        )
    text = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=z.lm_hidden,
        intermediate_size=2 * z.lm_hidden,
        num_hidden_layers=z.lm_layers,
        num_attention_heads=z.lm_heads,
        num_key_value_heads=z.lm_kv_heads,
        max_position_embeddings=z.max_positions,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    vision = JanusVisionConfig(
        hidden_size=z.vision_hidden,
        num_hidden_layers=z.vision_layers,
        num_attention_heads=z.vision_heads,
        image_size=z.image_size,
        patch_size=z.patch_size,
        projection_dim=z.lm_hidden,
        mlp_ratio=2.0,
        depth=2,
        num_image_tokens=(z.image_size // z.patch_size) ** 2,
    )
    vq = JanusVQVAEConfig(
        embed_dim=z.vq_embed_dim,
        num_embeddings=z.vq_codes,
        latent_channels=z.vq_channels,
        base_channels=z.vq_channels,
        channel_multiplier=z.vq_levels(),
        num_res_blocks=1,
        projection_dim=z.lm_hidden,
        image_token_embed_dim=z.lm_hidden,
        num_hidden_layers=2,
    )
    config = JanusConfig(
        text_config=text,
        vision_config=vision,
        vq_config=vq,
        image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return JanusForConditionalGeneration(config).eval()


def tiny_random_dir() -> Path:
    """Build (once) and return the tiny-random Janus directory under the cache."""

    def build(tmp: Path) -> None:
        tokenizer = tiny_tokenizer()
        model = tiny_model(tokenizer)
        model.save_pretrained(tmp)
        vc = model.config.vision_config
        n_tokens = (vc.image_size // vc.patch_size) ** 2
        build_processor(tokenizer, vc.image_size, num_image_tokens=n_tokens).save_pretrained(tmp)

    return tiny_random_folder("janus", TINY_VERSION, build)
