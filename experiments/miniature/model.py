"""The miniature's small UMM: a Janus-architecture model built by the family's own tiny builder.

`build_model` makes a `JanusForConditionalGeneration` with `trainer.adapters.janus.tiny`'s
`tiny_model` at the miniature's sizes (`JanusSizes`: a Llama LM, a SigLIP-style encoder whose
patch grid is also the VQ grid, a VQ tokenizer), seeded per base, puts the trained tokenizer
(tokenizer.py) into its `vqmodel`, and saves it with a byte-level BPE fitted to the
experiment's text and no system prompt, where the trainer loads it (`trainer.model: <dir>`).
Training and answering read the no-system-prompt setting from the saved processor_config.json.
"""

from __future__ import annotations

import json
from pathlib import Path

__all__ = ["build_model", "fit_text_tokenizer", "sizes_of"]


def fit_text_tokenizer(texts: list[str], vocab_size: int = 800):
    """A byte-level BPE fitted to the experiment's text (deterministic), with Janus's special
    tokens: a question becomes ~15 tokens instead of ~90 bytes, most of a step's cost."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from trainer.adapters.janus.processor import with_image_token_names
    from trainer.adapters.janus.text import BOI, BOS, EOI, EOS, IMAGE_TOKEN, PAD

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[BOS, EOS, PAD],
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD, model_max_length=512
    )
    fast.add_tokens([IMAGE_TOKEN, BOI, EOI], special_tokens=True)
    return with_image_token_names(fast)


def texts_of(root: Path) -> list[str]:
    """Every turn of the conversations, every caption and the generation prompts."""
    from trainer.data import DEFAULT_PROMPTS

    texts = [p for lst in DEFAULT_PROMPTS.values() for p in lst]
    for line in (root / "conversations.jsonl").read_text().splitlines():
        texts += [t["value"] for t in json.loads(line)["conversations"]]
    for line in (root / "captions.jsonl").read_text().splitlines():
        texts.append(json.loads(line)["caption"])
    return texts


def sizes_of(cfg):
    """The `JanusSizes` of a protocol Config."""
    from trainer.adapters.janus.tiny import JanusSizes

    return JanusSizes(
        lm_hidden=cfg.lm_hidden,
        lm_layers=cfg.lm_layers,
        lm_heads=cfg.lm_heads,
        lm_kv_heads=cfg.lm_kv_heads,
        vision_hidden=cfg.vision_hidden,
        vision_layers=cfg.vision_layers,
        vision_heads=cfg.vision_heads,
        image_size=cfg.image_size,
        patch_size=cfg.patch_size,
        vq_codes=cfg.vq_codes,
        vq_channels=cfg.vq_channels,
        vq_channel_multiplier=tuple(cfg.vq_channel_multiplier),
    )


def build_model(path: Path, cfg, seed: int, texts: list[str], vq_dir: Path | None) -> Path:
    """The initial model of base `seed`, saved at `path` (kept when it exists). `vq_dir`: the
    trained tokenizer to install (None: keep the builder's random VQ; tests only)."""
    from experiments.miniature.tokenizer import load_vq
    from trainer.adapters.janus.adapter import JanusAdapter
    from trainer.adapters.janus.processor import CLIP_MEAN, CLIP_STD
    from trainer.adapters.janus.tiny import tiny_model

    if (path / "unimrg_adapter.json").exists():
        return path
    tok = fit_text_tokenizer(texts)
    model = tiny_model(tok, sizes_of(cfg), seed=seed)
    if vq_dir is not None and load_vq(model.model.vqmodel, vq_dir) is None:
        raise FileNotFoundError(f"{vq_dir}: no trained tokenizer")
    # No system prompt: ~190 byte-level tokens per question otherwise. Not `random_weights`:
    # the experiment trains this model before any of its outputs is reported.
    adapter = JanusAdapter(
        model, tok, CLIP_MEAN, CLIP_STD, random_weights=False, source="miniature", system_prompt=""
    )
    tmp = path.with_name(path.name + ".tmp")
    adapter.save(tmp)
    tmp.rename(path)
    return path
