"""The tiny-random Janus: a real `JanusConfig` at tiny size, built once under the cache.

A 2-layer Llama text model, a 32 px SigLIP-style vision tower and a VQ with 64 codes, seeded; a
byte-level tokenizer with Janus's special tokens; saved with its processor under
`<cache_dir>/tiny-random/janus/<version>-<key>/` (`tiny_random_dir`) and loaded back through `from_pretrained` by
trainer/adapters/janus.py, like a hub checkpoint. Its outputs are noise. Not an adapter (its name
starts with `_`).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from pipeline.fingerprint import tiny_random_cache
from pipeline.shards import atomic_build_dir
from trainer.adapters._byte_tokenizer import byte_level_tokenizer
from trainer.adapters._janus_processor import _with_image_token_names, build_processor
from trainer.adapters._janus_text import BOI, BOS, EOI, EOS, IMAGE_TOKEN, PAD
from trainer.adapters._model_spec import META_FILE

#: Bump when the builder changes what it saves: the cache folder is named after it.
TINY_VERSION = "v2"


def _tiny_tokenizer():
    fast = byte_level_tokenizer(BOS, EOS, PAD)
    fast.add_tokens([IMAGE_TOKEN, BOI, EOI], special_tokens=True)
    # JanusProcessor reads these names (the hub's Janus-Pro tokenizer config has them).
    return _with_image_token_names(fast)


def _tiny_model(tokenizer):
    from transformers import (
        JanusConfig,
        JanusForConditionalGeneration,
        JanusVisionConfig,
        JanusVQVAEConfig,
        LlamaConfig,
    )

    text = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    vision = JanusVisionConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=32,
        patch_size=8,
        projection_dim=64,
        mlp_ratio=2.0,
        depth=2,
        num_image_tokens=16,
    )
    vq = JanusVQVAEConfig(
        embed_dim=8,
        num_embeddings=64,
        latent_channels=32,
        base_channels=32,
        channel_multiplier=[1, 1, 1, 1],
        num_res_blocks=1,
        projection_dim=64,
        image_token_embed_dim=64,
        num_hidden_layers=2,
    )
    config = JanusConfig(
        text_config=text,
        vision_config=vision,
        vq_config=vq,
        image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return JanusForConditionalGeneration(config).eval()


def tiny_random_dir() -> Path:
    """Build (once) and return the tiny-random Janus directory under the cache."""
    final = tiny_random_cache("janus", TINY_VERSION, ("torch", "transformers", "tokenizers"))

    def build(tmp: Path) -> None:
        tokenizer = _tiny_tokenizer()
        model = _tiny_model(tokenizer)
        model.save_pretrained(tmp)
        vc = model.config.vision_config
        n_tokens = (vc.image_size // vc.patch_size) ** 2
        build_processor(tokenizer, vc.image_size, num_image_tokens=n_tokens).save_pretrained(tmp)
        (tmp / META_FILE).write_text(json.dumps({"adapter": "janus", "random_weights": True}))

    return atomic_build_dir(final, build, marker=META_FILE)
