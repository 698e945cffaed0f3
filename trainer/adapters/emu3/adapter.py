"""Emu3 through transformers' `Emu3ForConditionalGeneration`: one VQ tokenizer for both directions.

Emu3 has no separate understanding encoder: an image enters the sequence as its VQ codes, mapped
into the text vocabulary (`config.vocabulary_map`, `<|visual token 000123|>` -> token id), in
Emu3's layout (the HF processor's and the original fine-tuning code's alike):

    image block    [BOI] "{h}*{w}" [IMG] v(0,0) .. v(0,w-1) [EOL] .. v(h-1,0) .. v(h-1,w-1) [EOL] [EOF] [EOI]

([BOI] `<|image start|>`, the size prefix as text, [IMG] `<|image token|>`, [EOL] `<|extra_200|>`
after every row, [EOF] `<|extra_201|>`, [EOI] `<|image end|>`). Sequences:

    understanding  [BOS] {system} USER: {image block}{question} ASSISTANT: {answer}[EOS] ...
                   loss: cross-entropy on answer tokens and their EOS only
    answering      the same up to and including `ASSISTANT:`; greedy decoding continues it
    generation     [BOS] {image block of the input}{prompt}[BOI] "{h}*{w}" [IMG] v(0,0) ..
                   loss: cross-entropy over the full vocabulary on the target's visual tokens only
                   (EOL, EOF, EOI carry none, as Emu3's fine-tuning with
                   `apply_loss_on_only_vision`); the hidden state before a token predicts it
    text_to_image  [BOS] {caption}[BOI] "{h}*{w}" [IMG] v(0,0) ..   (Emu3-Gen's own format)
                   the same loss, no condition image

The DataLoader workers (no model) write the image block with `<image>` placeholders, as the HF
processor does; the adapter replaces them on the device with the frozen VQ model's codes (run in
float32), mapped through the vocabulary with an EOL after each row (`image_tokens`). Logits are
projected only at the positions that carry loss (the vocabulary has 184k entries), in chunks
recomputed in the backward pass (`lm_cross_entropy`), so no (tokens x vocabulary) tensor is kept.

Resolution: square images of `image_size` px (a multiple of the VQ's downsampling, 8) give
(s/8) x (s/8 + 1) tokens per image. A generation sequence holds two image blocks, so it must fit
the model's context (`max_position_embeddings`, 9216 for Emu3): 512 px (4160 tokens per image)
fits; 720 px, Emu3-Gen's own output size, does not. `trainer.image_size` chooses it; a size that
does not fit is refused at load with the largest one that does (`max_image_size`).

The probe generates with Emu3's constraints (only visual tokens inside a row, EOL forced at row
ends: `Emu3PrefixConstrainedLogitsHelper`), top-k 2048 sampling and classifier-free guidance on
log-probabilities with weight 3 (Emu3-Gen's `image_generation.py`), the unconditional branch being
the one the trainer trains (prompt dropped, image kept).

`tiny-random` builds a real `Emu3Config` at tiny size (32 px images, a 4-level VQ with 64 codes
whose `hidden_size` is `base_channels * channel_multiplier[-1]`, a 2-layer text model) with a
fixed seed, a byte-level tokenizer with Emu3's special and visual tokens, and the vocabulary map
joining them; all saved under `<cache_dir>/tiny-random/emu3/` and loaded back through
`from_pretrained`. Its outputs are noise.

The chat format, text encoder and `lm_cross_entropy` live in text.py, the preprocessor config
in processor.py, the tiny-random builder in tiny.py; what every family shares (loading frame,
`understanding_loss`, `save`, `answer`, the probe's KV-cache branches) in
trainer/adapters/common.py.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from pipeline.manifest import ManifestError
from pipeline.pretrained import from_pretrained
from trainer.adapters.common import BaseAdapter, read_json, scale_grad
from trainer.adapters.emu3.processor import VQ_MEAN, VQ_STD, write_preprocessor
from trainer.adapters.emu3.text import (
    BOI,
    EOF,
    EOI,
    IMAGE_TOKEN,
    IMG,
    SYSTEM_PROMPT,
    Emu3TextEncoder,
    lm_cross_entropy,
)
from trainer.adapters.emu3.tiny import tiny_random_dir

__all__ = ["PROMPT_RESERVE", "Emu3Adapter"]

#: Tokens a generation sequence needs besides its two image blocks (BOS, the prompt).
PROMPT_RESERVE = 64


# --------------------------------------------------------------------------------------------
# adapter


class Emu3Adapter(BaseAdapter):
    """UniMRG losses for Emu3 (see the module docstring for the sequences).

    No trainable understanding encoder (`encoder_patterns` empty): images enter as the frozen VQ
    model's codes, and `condition_grad_scale` acts on the condition image's token embeddings
    (Emu3's "encoder output")."""

    name: ClassVar[str] = "emu3"
    #: Emu3-Gen's own sampling: guidance 3 on log-probabilities, top-k 2048
    probe_cfg_weight: ClassVar[float] = 3.0
    probe_top_k: ClassVar[int] = 2048
    tiny_random_dir = staticmethod(tiny_random_dir)

    def __init__(
        self,
        model,
        tokenizer,
        image_size: int | None = None,
        image_mean=VQ_MEAN,
        image_std=VQ_STD,
        random_weights: bool = False,
        source: str = "",
        system_prompt: str = SYSTEM_PROMPT,
        image_processor: Any = None,
        default_size: int = 512,
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
        self.factor = int(model.model.vqmodel.vision_spatial_factor)
        self.context = int(model.config.text_config.max_position_embeddings)
        mapping = model.model.vocabulary_mapping
        self.eol_id = int(mapping.eol_token_id)
        self.image_token_id = int(mapping.image_token_id)
        img2bpe = mapping.img2bpe
        self.codebook_size = len(img2bpe)
        #: VQ code -> token id, and the visual token ids in code order
        self.visual_ids = torch.tensor([img2bpe[c] for c in range(self.codebook_size)])
        if image_size is None:
            image_size = min(default_size, self.max_image_size)
        self.image_size = self.check_image_size(int(image_size))

    def language_model(self) -> Any:
        return self.model.model.text_model

    # ---- resolution

    def block_length(self, size: int) -> int:
        """Tokens of one square `size`-px image block (markers, size prefix, rows + EOL)."""
        g = size // self.factor
        prefix = len(self.tokenizer.encode(f"{g}*{g}", add_special_tokens=False))
        return 2 + prefix + 1 + g * (g + 1) + 2

    def sequence_length(self, size: int) -> int:
        """Positions a generation sequence needs at `size` px: two image blocks plus
        `PROMPT_RESERVE` for BOS and the prompt."""
        return 2 * self.block_length(size) + PROMPT_RESERVE

    @property
    def max_image_size(self) -> int:
        """The largest square size (a multiple of the VQ's downsampling) that fits the context."""
        size = self.factor
        while self.sequence_length(size + self.factor) <= self.context:
            size += self.factor
        return size

    def check_image_size(self, size: int) -> int:
        if size <= 0 or size % self.factor:
            raise ManifestError(
                f"trainer.image_size: {size} px is not a positive multiple of the VQ's "
                f"downsampling ({self.factor})"
            )
        if self.sequence_length(size) > self.context:
            raise ManifestError(
                f"trainer.image_size: {size} px needs {self.sequence_length(size)} positions "
                f"for a condition and a target image ({self.block_length(size)} tokens each) plus "
                f"the prompt, beyond {self.source or 'the model'}'s context of {self.context}; "
                f"the largest that fits is {self.max_image_size} px"
            )
        return size

    @property
    def grid(self) -> tuple[int, int]:
        g = self.image_size // self.factor
        return g, g

    @property
    def num_image_tokens(self) -> int:
        """VQ codes per generated image (the positions the generation loss predicts)."""
        h, w = self.grid
        return h * w

    # ---- loading and saving

    @classmethod
    def model_class(cls) -> Any:
        from transformers import Emu3ForConditionalGeneration

        return Emu3ForConditionalGeneration

    @classmethod
    def _from_folder(
        cls, spec: str, path: str, meta: dict[str, Any], model, tokenizer, image_size: int | None
    ) -> Emu3Adapter:
        """The folder's image processor and metadata; `image_size` (none: the one the folder was
        saved at, else the model's `image_area` side, within the context) checked by
        `check_image_size`."""
        from transformers import AutoImageProcessor

        pre = read_json(path, "preprocessor_config.json") or {}
        side = int(math.sqrt(float(model.config.to_dict().get("image_area", 512 * 512))))
        return cls(
            model,
            tokenizer,
            image_size=image_size or meta.get("image_size"),
            image_mean=pre.get("image_mean", VQ_MEAN),
            image_std=pre.get("image_std", VQ_STD),
            random_weights=bool(meta.get("random_weights", False)),
            source=spec,
            image_processor=from_pretrained(AutoImageProcessor, path) if pre else None,
            default_size=side,
        )

    def _save_processor(self, path: Path) -> None:
        """The tokenizer and the image processor's config (`write_preprocessor`)."""
        self.tokenizer.save_pretrained(path)
        proc = self.image_processor
        write_preprocessor(path, self.image_mean, self.image_std, proc.min_pixels, proc.max_pixels)

    def _meta(self) -> dict[str, Any]:
        return {"image_size": self.image_size}

    def text_encoder(self) -> Emu3TextEncoder:
        t = self.tokenizer
        names = {"image": IMAGE_TOKEN, "boi": BOI, "eoi": EOI, "img": IMG, "eof": EOF}
        ids = {k: t.convert_tokens_to_ids(n) for k, n in names.items()}
        for k, i in ids.items():
            if i is None or i == t.unk_token_id:
                raise ValueError(f"{self.source}: tokenizer has no {names[k]!r} token")
        if ids["image"] != self.image_token_id:
            raise ValueError(
                f"{self.source}: tokenizer's {IMAGE_TOKEN} id {ids['image']} != the vocabulary "
                f"map's {self.image_token_id}"
            )
        ids.update(
            bos=t.bos_token_id,
            eos=t.eos_token_id,
            pad=t.pad_token_id if t.pad_token_id is not None else t.eos_token_id,
        )
        return Emu3TextEncoder(
            tokenizer=t,
            ids=ids,
            grid=self.grid,
            max_length=self.context,
            system_prompt=self.system_prompt,
        )

    # ---- pieces

    @torch.no_grad()
    def encode_codes(self, images: torch.Tensor) -> torch.Tensor:
        """The frozen VQ model's codes of uint8 square images (B,3,S,S): (B, h, w) int64."""
        x = images.to(self.device, non_blocking=True).float().div_(255)
        mean = torch.tensor(self.image_mean, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(self.image_std, device=x.device).view(1, 3, 1, 1)
        return torch.stack(self._encode_pixels((x - mean) / std))

    def _encode_pixels(self, pixels: torch.Tensor, sizes=None) -> list[torch.Tensor]:
        """Normalised pixels (B,3,H,W) -> per image its (h, w) codes, cropped to `sizes`
        ((height, width) px each, the processor's padding left out)."""
        vq = self.model.model.vqmodel
        b, _, hh, ww = pixels.shape
        sizes = torch.tensor(sizes if sizes is not None else [[hh, ww]] * b)
        with torch.autocast(pixels.device.type, enabled=False):
            out = vq.encode(pixels.float(), sizes, return_dict=True).image_tokens
        return [c.long() for c in out]

    def image_tokens(self, codes: torch.Tensor) -> torch.Tensor:
        """VQ codes (B, h, w) -> token ids (B, h*(w+1)): each row mapped, then EOL."""
        b, h, _ = codes.shape
        vis = self.visual_ids.to(codes.device)[codes]
        eol = vis.new_full((b, h, 1), self.eol_id)
        return torch.cat([vis, eol], dim=2).flatten(1)

    @torch.no_grad()
    def decode_codes(self, codes: torch.Tensor) -> torch.Tensor:
        """VQ codes (B, h, w) -> uint8 images (B,3,8h,8w)."""
        with torch.autocast(codes.device.type, enabled=False):
            px = self.model.model.vqmodel.decode(codes)
        mean = torch.tensor(self.image_mean, device=px.device).view(1, 3, 1, 1)
        std = torch.tensor(self.image_std, device=px.device).view(1, 3, 1, 1)
        return ((px.float() * std + mean).clamp(0, 1) * 255).round().to(torch.uint8)

    def fill_images(self, input_ids: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """Replace the `<image>` placeholders of each row by that row's image tokens."""
        ids = input_ids.to(self.device, non_blocking=True)
        mask = ids == self.image_token_id
        if int(mask.sum()) != tokens.numel():
            raise ValueError(
                f"{int(mask.sum())} <image> placeholders in input_ids for {tokens.shape[0]} "
                f"images x {tokens.shape[1]} tokens"
            )
        return ids.masked_scatter(mask, tokens.to(ids.dtype)), mask

    def _embed(self, input_ids: torch.Tensor, images: torch.Tensor | None) -> torch.Tensor:
        """Embeddings of `input_ids` with the condition images' tokens in place of the
        placeholders; their gradient is scaled by `condition_grad_scale` (forward unchanged).
        `images` None: a sequence without an image (text_to_image)."""
        if images is None:
            ids = input_ids.to(self.device, non_blocking=True)
            return self.model.get_input_embeddings()(ids)
        ids, mask = self.fill_images(input_ids, self.image_tokens(self.encode_codes(images)))
        emb = self.model.get_input_embeddings()(ids)
        if self.condition_grad_scale != 1.0:
            emb = torch.where(mask[..., None], scale_grad(emb, self.condition_grad_scale), emb)
        return emb

    # ---- losses (`understanding_loss`: BaseAdapter's, over `token_loss`)

    def token_loss(self, hidden: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Over the full vocabulary in chunks recomputed in the backward (`lm_cross_entropy`)."""
        return lm_cross_entropy(self.model.lm_head, hidden, target)

    def generation_targets(self, batch: dict[str, torch.Tensor]):
        """(input embeddings, attention mask, label positions (B, M), labels (B, M)).

        The target's tokens T (visual tokens with an EOL after each row) follow each row's own
        text (rows are right-padded): T[:-1] is placed at [len_i, len_i + n - 1); the hidden
        state at len_i - 1 + j predicts T[j], and only visual j (not EOL) carry labels.
        """
        codes = self.encode_codes(batch["target"])
        tokens = self.image_tokens(codes)
        dev = tokens.device
        mask = batch["attention_mask"].to(dev, non_blocking=True)
        # text_to_image batches have no condition image (the caption alone).
        text = self._embed(batch["input_ids"], batch.get("image"))
        b, length = mask.shape
        n = tokens.shape[1]
        lens = mask.sum(1)
        span = torch.arange(n, device=dev)
        rows = torch.arange(b, device=dev)[:, None]
        cols = lens[:, None] + span[:-1]
        inputs = self.model.get_input_embeddings()(tokens[:, :-1]).to(text.dtype)
        embeds = torch.cat([text, text.new_zeros(b, n - 1, text.shape[-1])], dim=1)
        embeds = embeds.index_put((rows.expand_as(cols), cols), inputs)
        full_mask = torch.arange(length + n - 1, device=dev)[None] < (lens + n - 1)[:, None]
        w = codes.shape[2]
        visual = span[span % (w + 1) != w]
        pred = lens[:, None] - 1 + visual
        return embeds, full_mask.long(), pred, tokens[:, visual]

    def generation_loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Mean cross-entropy (full vocabulary) over the target image's visual tokens."""
        embeds, mask, pred, labels = self.generation_targets(batch)
        hidden = self._lm(embeds, mask)
        rows = torch.arange(pred.shape[0], device=pred.device)[:, None].expand_as(pred)
        return lm_cross_entropy(
            self.model.lm_head, hidden[rows, pred].flatten(0, 1), labels.flatten()
        )

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
        """Generate an image per input image for `prompt`: uint8 (B,3,S,S) (`generate_tokens`
        decoded by the VQ model)."""
        tokens = self.generate_tokens(images, prompt, seed, temperature, cfg_weight)
        h, w = self.grid
        codes = self.model.model.vocabulary_mapping.convert_bpe2img(tokens.view(-1, h, w + 1))
        return self.decode_codes(codes.long())

    @torch.no_grad()
    def generate_tokens(
        self,
        images: torch.Tensor,
        prompt: str,
        seed: int = 0,
        temperature: float = 1.0,
        cfg_weight: float = 1.0,
    ) -> torch.Tensor:
        """The target's h*(w+1) tokens (B, n), sampled one by one with a KV cache.

        Emu3's constraints: inside a row only visual tokens can be drawn (logits of the visual
        rows of the head only), the EOL at each row's end is forced. Sampling: top-k
        `probe_top_k` at `temperature` (0: greedy). `cfg_weight` != 1: guidance on
        log-probabilities `u + cfg_weight * (c - u)` (transformers'
        `UnbatchedClassifierFreeGuidanceLogitsProcessor`, Emu3-Gen's rule), with the branch the
        trainer trains unconditionally (prompt dropped, image kept) as `u`.
        """
        branches = self._branches(prompt, images, cfg_weight)
        b = images.shape[0]
        h, w = self.grid
        head = self.model.lm_head.weight
        vis = self.visual_ids.to(self.device)
        lo = int(vis[0])
        contiguous = bool((vis == torch.arange(lo, lo + len(vis), device=vis.device)).all())
        w_vis = head[lo : lo + len(vis)] if contiguous else head[vis]
        gen = torch.Generator(device=self.device).manual_seed(seed)
        n = h * (w + 1)
        out = torch.empty(b, n, dtype=torch.long, device=self.device)
        for j in range(n):
            if j % (w + 1) == w:
                tok = torch.full((b,), self.eol_id, device=self.device)
            else:
                logits = [F.linear(br[0], w_vis.to(br[0].dtype)).float() for br in branches]
                logits = [torch.log_softmax(x, dim=-1) for x in logits]
                if len(logits) == 2:
                    cond, uncond = logits
                    logits = [uncond + cfg_weight * (cond - uncond)]
                tok = vis[self._sample(logits[0], temperature, gen)]
            out[:, j] = tok
            if j + 1 == n:
                break
            self._advance(branches, self.model.get_input_embeddings()(tok[:, None]))
        return out

    def _sample(self, logits: torch.Tensor, temperature: float, gen) -> torch.Tensor:
        if temperature <= 0:
            return logits.argmax(-1)
        k = min(self.probe_top_k, logits.shape[-1])
        top, idx = logits.topk(k, dim=-1)
        probs = torch.softmax(top / temperature, dim=-1)
        return idx.gather(-1, torch.multinomial(probs, 1, generator=gen)).squeeze(-1)

    # ---- answering (evaluation): `answer`, `answer_ids` are BaseAdapter's

    def _default_image_processor(self):
        """An Emu3ImageProcessor (aspect kept, area between its min and max pixels, sides
        multiples of 8, normalised) at this adapter's image size, for a checkpoint that has
        none."""
        from transformers import Emu3ImageProcessor

        area = self.image_size**2
        return Emu3ImageProcessor(
            image_mean=list(self.image_mean),
            image_std=list(self.image_std),
            min_pixels=area,
            max_pixels=area,
        )

    def _answer_ids(
        self, images: list[Any], prompts: list[str], max_new_tokens: int
    ) -> list[list[int]]:
        """Questions formatted by `chat_pieces` as in training; each image through the
        checkpoint's Emu3ImageProcessor (it keeps its aspect ratio, so its code grid and size
        prefix are its own) and the VQ model into its tokens; greedy decoding (`_greedy`)."""
        enc = self.text_encoder()
        rows = []
        for image, prompt in zip(images, prompts):
            inputs = self.image_processor(images=[image], return_tensors="pt")
            size = [int(x) for x in inputs["image_sizes"][0]]
            codes = self._encode_pixels(inputs["pixel_values"].to(self.device), [size])[0][None]
            ids = torch.tensor([enc.question(prompt, *codes.shape[1:])])
            filled, _ = self.fill_images(ids, self.image_tokens(codes))
            if filled.shape[1] + max_new_tokens > self.context:
                raise ValueError(
                    f"answer: a {size[1]}x{size[0]} px image gives {filled.shape[1]} tokens, "
                    f"with {max_new_tokens} new ones beyond the context of {self.context}; "
                    "lower the image processor's max_pixels"
                )
            rows.append(filled[0].tolist())
        return self._greedy(rows, enc.pad_id, enc.ids["bos"], enc.ids["eos"], max_new_tokens)
