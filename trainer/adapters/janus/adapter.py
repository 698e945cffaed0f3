"""Janus / Janus-Pro through transformers' `JanusForConditionalGeneration`.

Sequences (Janus's own chat format, `<|User|>` / `<|Assistant|>`, turns separated by a blank line,
opened by the system prompt of Janus's `VLChatProcessor` unless the checkpoint's
`processor_config.json` sets `use_default_system_prompt: false`; `chat_pieces` builds it, for
training and for `answer()` alike):

    understanding  [BOS] {system}\\n\\n<|User|>: [BOI][IMG x N][EOI]\\n{question}\\n\\n<|Assistant|>: {answer}[EOS] ...
                   loss: cross-entropy on answer tokens and their EOS only (-100 elsewhere)
    answering      the same up to and including `<|Assistant|>:`; greedy decoding continues it
                   (`answer()`: left-padded batch, KV cache, the processor's image preprocessing)
    generation     [BOS] <|User|>: [BOI][IMG x N][EOI]\\n{prompt}\\n\\n<|Assistant|>:[BOI] c_0 .. c_{M-2}
                   loss: cross-entropy of the generation head over the target's VQ codes c_0..c_{M-1}
                   (teacher forcing: the hidden state before code j predicts code j)
    text_to_image  [BOS] <|User|>: {caption}\\n\\n<|Assistant|>:[BOI] c_0 .. c_{M-2}
                   the same loss, no condition image (Janus's own text-to-image format)

[IMG x N] are the understanding encoder's features (SigLIP + aligner) of the input image; the codes
c_j come from the model's own VQ model, frozen, run in float32, assigned as Janus's tokenizer
assigns them (LlamaGen VQ-16 with `codebook_l2_norm`: nearest codebook entry after
L2-normalising both the encoder output and the codebook, `nearest_codes`; transformers'
`JanusVQVAEVectorQuantizer.forward` skips the normalisation); code inputs are embedded with
`generation_embeddings` + `generation_aligner` as Janus does at inference.

`tiny-random` builds a real `JanusConfig` at tiny size (32 px images, 16 image tokens, 64-code VQ,
2-layer Llama) with a fixed seed, and a byte-level tokenizer with the Janus special tokens; both are
saved under `<cache_dir>/tiny-random/janus/` and loaded back through `from_pretrained`, like a hub
checkpoint. Its outputs are noise.

The chat format and text encoder live in text.py, `build_processor` in processor.py, the
tiny-random builder in tiny.py; what every family shares (loading frame, `understanding_loss`,
`save`, `answer`, the probe's KV-cache branches) in trainer/adapters/common.py.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from pipeline.manifest import ManifestError
from pipeline.pretrained import CustomCodeRefused, from_pretrained
from trainer.adapters.common import BaseAdapter, read_json, scale_grad
from trainer.adapters.janus.processor import CLIP_MEAN, CLIP_STD, build_processor
from trainer.adapters.janus.text import BOI, EOI, IMAGE_TOKEN, SYSTEM_PROMPT, JanusTextEncoder
from trainer.adapters.janus.tiny import tiny_random_dir

__all__ = ["JanusAdapter", "nearest_codes"]


# --------------------------------------------------------------------------------------------
# VQ codes


def nearest_codes(latents: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """Janus's code assignment: (B, C, H, W) latents, (K, C) codebook -> (B, H*W) int64 codes.

    LlamaGen's `VectorQuantizer` with `l2_norm=True` (Janus's VQ-16): both the latent vectors
    and the codebook rows are L2-normalised before the nearest entry is taken, so a codebook row
    with a large norm does not win by size. Same distance expansion as LlamaGen.
    """
    b, c = latents.shape[:2]
    z = F.normalize(latents.permute(0, 2, 3, 1).reshape(-1, c).float(), p=2, dim=-1)
    e = F.normalize(codebook.float(), p=2, dim=-1)
    d = z.pow(2).sum(1, keepdim=True) + e.pow(2).sum(1) - 2 * z @ e.t()
    return d.argmin(dim=1).view(b, -1)


def _image_processor(path: str):
    from transformers import AutoImageProcessor

    return from_pretrained(AutoImageProcessor, path)


def _load_processor(path: str):
    """The folder's own processor, or None when it has none (an older checkpoint, say)."""
    from transformers import AutoProcessor

    if not (Path(path) / "processor_config.json").is_file() and not any(
        (Path(path) / n).is_file() for n in ("chat_template.jinja", "chat_template.json")
    ):
        return None
    try:
        return from_pretrained(AutoProcessor, path)
    except CustomCodeRefused:
        raise  # never fall back quietly from a folder that asks to run its code
    except Exception as exc:  # noqa: BLE001 - an unreadable processor is rebuilt from the adapter
        import logging

        logging.getLogger(__name__).warning(
            "%s: its processor does not load (%s: %s); checkpoints get a JanusProcessor built "
            "from the model's image size and normalisation instead",
            path,
            type(exc).__name__,
            exc,
        )
        return None


# --------------------------------------------------------------------------------------------
# adapter


class JanusAdapter(BaseAdapter):
    """UniMRG losses for Janus / Janus-Pro (see the module docstring for the sequences)."""

    name: ClassVar[str] = "janus"
    #: the understanding encoder (SigLIP and the aligner): `trainer.encoder_lr_scale` applies
    encoder_patterns: tuple[str, ...] = ("model.vision_model.*", "model.aligner.*")
    #: Janus's own generation guidance (its `generate` default at temperature 1)
    probe_cfg_weight: ClassVar[float] = 5.0
    tiny_random_dir = staticmethod(tiny_random_dir)

    def __init__(
        self,
        model,
        tokenizer,
        image_mean=CLIP_MEAN,
        image_std=CLIP_STD,
        random_weights: bool = False,
        source: str = "",
        system_prompt: str = SYSTEM_PROMPT,
        image_processor: Any = None,
    ):
        super().__init__(
            model,
            tokenizer,
            image_mean,
            image_std,
            random_weights,
            source,
            system_prompt,
            image_processor,
        )
        #: The base model's processor (saved unchanged into checkpoints); None: it had none.
        self.processor: Any = None
        #: The folder the weights were loaded from.
        self.model_dir: Path | None = None
        cfg = model.config
        self.image_size = int(cfg.vision_config.image_size)
        self.num_image_tokens = (self.image_size // int(cfg.vision_config.patch_size)) ** 2

    def language_model(self) -> Any:
        return self.model.model.language_model

    # ---- loading and saving

    @classmethod
    def model_class(cls) -> Any:
        from transformers import JanusForConditionalGeneration

        return JanusForConditionalGeneration

    @classmethod
    def _from_folder(
        cls, spec: str, path: str, meta: dict[str, Any], model, tokenizer, image_size: int | None
    ) -> JanusAdapter:
        """The folder's processor (or its image processor settings) and system prompt setting.
        `image_size`: none or the vision encoder's own size (the only one Janus takes)."""
        own = int(model.config.vision_config.image_size)
        if image_size is not None and int(image_size) != own:
            raise ManifestError(
                f"trainer.image_size: {image_size} px, but {spec}'s vision encoder takes {own} px "
                "only; leave image_size unset"
            )
        processor = _load_processor(path)
        pre_json = read_json(path, "preprocessor_config.json") or {}
        if processor is not None:
            pre = processor.image_processor
            mean, std = pre.image_mean, pre.image_std
        else:
            pre = _image_processor(path) if pre_json else None
            mean, std = pre_json.get("image_mean", CLIP_MEAN), pre_json.get("image_std", CLIP_STD)
        proc_json = read_json(path, "processor_config.json") or {}
        adapter = cls(
            model,
            tokenizer,
            mean,
            std,
            bool(meta.get("random_weights", False)),
            source=spec,
            system_prompt=SYSTEM_PROMPT if proc_json.get("use_default_system_prompt", True) else "",
            image_processor=pre,
        )
        adapter.processor = processor
        adapter.model_dir = Path(path)
        return adapter

    def _save_processor(self, path: Path) -> None:
        """`AutoProcessor`'s files (processor config, image processor, chat template) and the
        tokenizer: the base model's own processor, or one built for it."""
        if self.processor is not None:
            self.processor.save_pretrained(path)  # the base model's own, unchanged
        else:
            build_processor(
                self.tokenizer,
                self.image_size,
                self.image_mean,
                self.image_std,
                self.num_image_tokens,
            ).save_pretrained(path)
        # The checkpoint answers with the system prompt it was trained with (AutoProcessor's
        # chat template prepends it when this is true).
        proc_path = path / "processor_config.json"
        proc_cfg = json.loads(proc_path.read_text()) if proc_path.is_file() else {}
        proc_cfg["use_default_system_prompt"] = bool(self.system_prompt)
        proc_path.write_text(json.dumps(proc_cfg, indent=2) + "\n")

    def text_encoder(self) -> JanusTextEncoder:
        t = self.tokenizer
        ids = {n: t.convert_tokens_to_ids(n) for n in (IMAGE_TOKEN, BOI, EOI)}
        for n, i in ids.items():
            if i is None or i == t.unk_token_id:
                raise ValueError(f"{self.source}: tokenizer has no {n!r} token")
        if ids[IMAGE_TOKEN] != self.model.config.image_token_id:
            raise ValueError(
                f"{self.source}: tokenizer's {IMAGE_TOKEN} id {ids[IMAGE_TOKEN]} "
                f"!= config.image_token_id {self.model.config.image_token_id}"
            )
        pad = t.pad_token_id if t.pad_token_id is not None else t.eos_token_id
        max_pos = int(self.model.config.text_config.max_position_embeddings)
        return JanusTextEncoder(
            tokenizer=t,
            bos_id=t.bos_token_id,
            eos_id=t.eos_token_id,
            pad_id=pad,
            image_id=ids[IMAGE_TOKEN],
            boi_id=ids[BOI],
            eoi_id=ids[EOI],
            num_image_tokens=self.num_image_tokens,
            max_length=min(max_pos - self.num_image_tokens - 2, 4096),
            system_prompt=self.system_prompt,
        )

    # ---- pieces

    def _understanding_pixels(self, images: torch.Tensor) -> torch.Tensor:
        x = images.to(self.device, non_blocking=True).float().div_(255)
        mean = torch.tensor(self.image_mean, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(self.image_std, device=x.device).view(1, 3, 1, 1)
        return (x - mean) / std

    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        """Understanding encoder (SigLIP + aligner): uint8 (B,3,S,S) -> (B, N, D).

        The features' gradient is multiplied by `condition_grad_scale` (forward unchanged), for
        the understanding and the generation losses alike, as the released code does.
        """
        jm = self.model.model
        out = jm.vision_model(self._understanding_pixels(images))
        return scale_grad(jm.aligner(out.last_hidden_state), self.condition_grad_scale)

    @torch.no_grad()
    def encode_targets(self, images: torch.Tensor) -> torch.Tensor:
        """The frozen VQ model's codes of uint8 images (B,3,S,S): (B, M) int64, row-major.

        Assigned the tokenizer's way (`nearest_codes`, L2-normalised), not by
        `vq.quantize`, whose forward compares unnormalised vectors.
        """
        vq = self.model.model.vqmodel
        x = images.to(self.device, non_blocking=True).float().div_(127.5).sub_(1.0)
        with torch.autocast(x.device.type, enabled=False):
            h = vq.quant_conv(vq.encoder(x))
            return nearest_codes(h, vq.quantize.embedding.weight)

    @torch.no_grad()
    def decode_codes(self, codes: torch.Tensor) -> torch.Tensor:
        """VQ codes (B, M) -> uint8 images (B,3,S,S)."""
        with torch.autocast(codes.device.type, enabled=False):
            px = self.model.model.vqmodel.decode(codes)
        return ((px.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)

    def _embed(self, input_ids: torch.Tensor, images: torch.Tensor | None) -> torch.Tensor:
        ids = input_ids.to(self.device, non_blocking=True)
        emb = self.model.get_input_embeddings()(ids)
        if images is not None:
            feats = self.image_features(images)
            mask = (ids == self.model.config.image_token_id).unsqueeze(-1)
            if int(mask.sum()) != feats.shape[0] * feats.shape[1]:
                raise ValueError(
                    f"{int(mask.sum())} image tokens in input_ids for {feats.shape[0]} images x "
                    f"{feats.shape[1]} features"
                )
            emb = emb.masked_scatter(mask, feats.to(emb.dtype))
        return emb

    # ---- losses (`understanding_loss`: BaseAdapter's)

    def generation_loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Mean cross-entropy of the generation head over all M codes of the target image,
        conditioned on `batch["image"]` and the prompt, or on the caption alone when the batch
        has no `image` (text_to_image).

        Rows are right-padded, so each row's codes start right after its own text: the code
        embeddings are placed at [len_i, len_i + M - 1) and the predicting hidden states are
        gathered from [len_i - 1, len_i + M - 1). (Right padding keeps every query attending to
        at least one real key, which keeps all attention kernels NaN-free.)
        """
        codes = self.encode_targets(batch["target"])
        dev = codes.device
        mask = batch["attention_mask"].to(dev, non_blocking=True)
        # text_to_image batches have no condition image (the caption alone).
        text = self._embed(batch["input_ids"], batch.get("image"))
        b, length = mask.shape
        m = codes.shape[1]
        lens = mask.sum(1)
        gen = self.model.prepare_embeddings_for_image_generation(codes[:, :-1]).to(text.dtype)
        embeds = torch.cat([text, text.new_zeros(b, m - 1, text.shape[-1])], dim=1)
        span = torch.arange(m, device=dev)
        rows = torch.arange(b, device=dev)[:, None]
        cols = lens[:, None] + span[:-1]
        embeds = embeds.index_put((rows.expand_as(cols), cols), gen)
        full_mask = torch.arange(length + m - 1, device=dev)[None] < (lens + m - 1)[:, None]
        hidden = self._lm(embeds, full_mask.long())
        # The hidden state at [BOI] predicts c_0, the one at c_{j-1} predicts c_j.
        pred = lens[:, None] - 1 + span
        h = hidden[rows.expand_as(pred), pred]
        logits = self.model.model.generation_head(h)
        return F.cross_entropy(logits.flatten(0, 1).float(), codes.flatten())

    # ---- probe

    @torch.no_grad()
    def generate(
        self,
        images: torch.Tensor,
        prompt: str,
        seed: int = 0,
        temperature: float = 1.0,
        cfg_weight: float = 1.0,
    ) -> torch.Tensor:
        """Generate an image per input image for `prompt`: uint8 (B,3,S,S).

        Samples the M codes one by one with a KV cache (temperature 0: greedy), then decodes them
        with the VQ model. `cfg_weight` != 1: classifier-free guidance, logits
        `u + cfg_weight * (c - u)` (Janus's rule; its own generation default is 5.0 at
        temperature 1), where the unconditional branch `u` is the one the trainer trains: the
        prompt dropped, the condition image kept.
        """
        branches = self._branches(prompt, images, cfg_weight)
        b = images.shape[0]
        gen = torch.Generator(device=self.device).manual_seed(seed)
        codes = torch.empty(b, self.num_image_tokens, dtype=torch.long, device=self.device)
        for j in range(self.num_image_tokens):
            logits = [self.model.model.generation_head(br[0]).float() for br in branches]
            if len(logits) == 2:
                cond, uncond = logits
                logits = [uncond + cfg_weight * (cond - uncond)]
            if temperature <= 0:
                tok = logits[0].argmax(-1)
            else:
                probs = torch.softmax(logits[0] / temperature, dim=-1)
                tok = torch.multinomial(probs, 1, generator=gen).squeeze(-1)
            codes[:, j] = tok
            if j + 1 == self.num_image_tokens:
                break
            self._advance(
                branches, self.model.prepare_embeddings_for_image_generation(tok[:, None])
            )
        return self.decode_codes(codes)

    # ---- answering (evaluation): `answer`, `answer_ids` are BaseAdapter's

    def _default_image_processor(self):
        """A JanusImageProcessor (long side to the model's size, padded to a square with the
        processor's background colour, normalised) from this adapter's size and normalisation,
        for a checkpoint that has none."""
        from transformers import JanusImageProcessor

        return JanusImageProcessor(
            size={"height": self.image_size, "width": self.image_size},
            image_mean=list(self.image_mean),
            image_std=list(self.image_std),
        )

    def _answer_ids(
        self, images: list[Any], prompts: list[str], max_new_tokens: int
    ) -> list[list[int]]:
        """Questions formatted by `chat_pieces` exactly as in training, images through the
        processor's own understanding preprocessing, greedy decoding (`_greedy`)."""
        enc = self.text_encoder()
        rows = [enc.question(p) for p in prompts]
        dtype = next(self.model.parameters()).dtype
        pixels = self.image_processor(images=list(images), return_tensors="pt")["pixel_values"]
        return self._greedy(
            rows,
            enc.pad_id,
            enc.bos_id,
            enc.eos_id,
            max_new_tokens,
            config={"max_length": None},
            pixel_values=pixels.to(self.device, dtype),
            generation_mode="text",
        )
