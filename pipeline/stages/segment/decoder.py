"""segment-anything's prompt encoder + mask decoder math for many point prompts on one image.

`BatchedDecoder` runs what `PromptEncoder(points=...)` followed by `MaskDecoder(...,
multimask_output=True)` compute, with the checkpoint's own modules (no weights copied), but laid
out for thousands of prompts per image:

- attention is `torch.nn.functional.scaled_dot_product_attention` (fused kernels on CUDA);
- the image embedding (plus the no-mask dense embedding) and the dense positional encoding are
  broadcast over the prompts, never copied per prompt (the package `repeat_interleave`s both);
- what depends only on the image is computed once per image (`prepare`): the flattened
  embedding and positional encoding, and the first layer's token-to-image keys and values and its
  image-to-token queries (layer 0's keys are the same image for every prompt);
- only the three multimask outputs are upscaled and projected (the package computes four and
  drops the first);
- optional bfloat16 (`dtype`), optional `torch.compile` of the per-prompt part; with `compile`,
  the prompt batch is padded to a fixed size so every call has the same shapes.

In float32 its outputs equal the package's decoder to float tolerance (tests/pipeline/
test_sam_decoder.py); the `exact` precision mode still runs the package's own decoder, so its
masks are bit-identical to `SamAutomaticMaskGenerator`'s.

Usage:
    dec = BatchedDecoder(sam, dtype=torch.bfloat16)
    ctx = dec.prepare(image_embedding)          # [1, C, h, w], once per image (or crop)
    low_res, iou = dec(ctx, coords)             # coords [B, 2] in the resized input frame
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["BatchedDecoder", "ImageContext", "point_prompts"]


@dataclass
class ImageContext:
    """Per-image tensors shared by every prompt batch: keys [1, HW, C], key_pe [1, HW, C], the
    first layer's projected keys/values [1, heads, HW, d] and image-to-token queries."""

    keys: torch.Tensor
    key_pe: torch.Tensor
    l0_t2i_k: torch.Tensor
    l0_t2i_v: torch.Tensor
    l0_i2t_q: torch.Tensor
    size: tuple[int, int]


def point_prompts(prompt_encoder: Any, coords: torch.Tensor) -> torch.Tensor:
    """Sparse embeddings [B, 2, C] of one positive point per prompt plus the padding point: the
    values `PromptEncoder(points=(coords[:, None], ones), boxes=None)` gives, without its
    boolean-mask assignments (each one a hidden `nonzero`, so a host sync, on CUDA)."""
    pe = prompt_encoder
    # The padding point goes through the encoding too (then is replaced), as in the package:
    # the same [B, 2, 2] matmul shape gives the same float rounding, so the same embeddings.
    pts = coords.float()[:, None] + 0.5
    pts = torch.cat([pts, torch.zeros_like(pts)], 1)
    emb = pe.pe_layer.forward_with_coords(pts, pe.input_image_size)
    point = emb[:, 0] + pe.point_embeddings[1].weight  # label 1
    pad = pe.not_a_point_embed.weight.expand(coords.shape[0], -1)  # label -1: zeroed, then this
    return torch.stack([point, pad], 1)


def _heads(x: torch.Tensor, n: int) -> torch.Tensor:
    b, t, c = x.shape
    return x.reshape(b, t, n, c // n).transpose(1, 2)


def _merge(x: torch.Tensor) -> torch.Tensor:
    b, n, t, d = x.shape
    return x.transpose(1, 2).reshape(b, t, n * d)


class BatchedDecoder(nn.Module):
    """Prompt encoding + mask decoding for point prompts on one image (see module docstring)."""

    def __init__(
        self,
        sam: Any,
        dtype: torch.dtype = torch.float32,
        compile: bool = False,
        pad_to: int | None = None,
    ) -> None:
        super().__init__()
        self.pe = sam.prompt_encoder
        self.dec = sam.mask_decoder
        self.tr = sam.mask_decoder.transformer
        self.dtype = dtype
        self.pad_to = pad_to
        self._body = torch.compile(self._prompts, dynamic=False) if compile else self._prompts

    # ------------------------------------------------------------ per image

    def prepare(self, image_embedding: torch.Tensor) -> ImageContext:
        """What every prompt on this image shares, computed once."""
        pe = self.pe
        _, c, h, w = image_embedding.shape
        dense = pe.no_mask_embed.weight.reshape(1, -1, 1, 1)
        src = (image_embedding + dense).to(self.dtype)
        keys = src.flatten(2).transpose(1, 2)
        key_pe = pe.get_dense_pe().to(self.dtype).flatten(2).transpose(1, 2)
        with self._autocast():
            layer = self.tr.layers[0]
            k = keys + key_pe
            t2i, i2t = layer.cross_attn_token_to_image, layer.cross_attn_image_to_token
            ctx = ImageContext(
                keys=keys,
                key_pe=key_pe,
                l0_t2i_k=_heads(t2i.k_proj(k), t2i.num_heads),
                l0_t2i_v=_heads(t2i.v_proj(keys), t2i.num_heads),
                l0_i2t_q=_heads(i2t.q_proj(k), i2t.num_heads),
                size=(h, w),
            )
        return ctx

    # ------------------------------------------------------------ per prompt batch

    def forward(self, ctx: ImageContext, coords: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Low-resolution mask logits [B, 3, 4h, 4w] and predicted IoU [B, 3], both float32, for
        one positive point per prompt (`coords` [B, 2], x/y in the encoder's input frame)."""
        n = coords.shape[0]
        if self.pad_to is not None and n < self.pad_to:
            coords = torch.cat([coords, coords[-1:].expand(self.pad_to - n, 2)])
        tokens = self._tokens(coords)
        with self._autocast():
            masks, iou = self._body(ctx, tokens)
        return masks[:n].float(), iou[:n].float()

    def _tokens(self, coords: torch.Tensor) -> torch.Tensor:
        """[iou, mask x4, point, padding point] tokens, as PromptEncoder + predict_masks build."""
        b = coords.shape[0]
        out = torch.cat([self.dec.iou_token.weight, self.dec.mask_tokens.weight], 0)
        sparse = point_prompts(self.pe, coords)
        return torch.cat([out.expand(b, -1, -1), sparse], 1).to(self.dtype)

    def _prompts(self, ctx: ImageContext, tokens: torch.Tensor):
        tr, dec = self.tr, self.dec
        # Under autocast LayerNorm returns float32; casting its outputs back keeps the
        # per-prompt image tokens [B, HW, C] in the decoder dtype (half the memory traffic).
        dt = self.dtype
        query_pe = tokens
        queries, keys = tokens, ctx.keys
        for i, layer in enumerate(tr.layers):
            # self-attention of the tokens
            if layer.skip_first_layer_pe:
                queries = self._attn(layer.self_attn, queries, queries, queries)
            else:
                q = queries + query_pe
                queries = queries + self._attn(layer.self_attn, q, q, queries)
            queries = layer.norm1(queries).to(dt)
            # tokens attend to the image
            a = layer.cross_attn_token_to_image
            q = queries + query_pe
            if i == 0:
                out = self._sdpa(a, a.q_proj(q), ctx.l0_t2i_k, ctx.l0_t2i_v)
            else:
                out = self._attn(a, q, keys + ctx.key_pe, keys)
            queries = layer.norm2(queries + out).to(dt)
            queries = layer.norm3(queries + layer.mlp(queries)).to(dt)
            # the image attends to the tokens
            a = layer.cross_attn_image_to_token
            q = queries + query_pe
            if i == 0:
                out = self._sdpa(a, ctx.l0_i2t_q, a.k_proj(q), a.v_proj(queries))
            else:
                out = self._attn(a, keys + ctx.key_pe, q, queries)
            keys = layer.norm4(keys + out).to(dt)
        a = tr.final_attn_token_to_image
        out = self._attn(a, queries + query_pe, keys + ctx.key_pe, keys)
        hs = tr.norm_final_attn(queries + out).to(dt)

        b = hs.shape[0]
        h, w = ctx.size
        src = keys.transpose(1, 2).reshape(b, -1, h, w)
        up = dec.output_upscaling(src)
        mask_tokens = hs[:, 2 : 1 + dec.num_mask_tokens]  # multimask outputs: tokens 1..3
        hyper = torch.stack(
            [
                mlp(mask_tokens[:, j])
                for j, mlp in enumerate(list(dec.output_hypernetworks_mlps)[1:])
            ],
            1,
        )
        _, c, uh, uw = up.shape
        masks = (hyper @ up.reshape(b, c, uh * uw)).reshape(b, -1, uh, uw)
        iou = dec.iou_prediction_head(hs[:, 0])[:, 1:]
        return masks, iou

    def _attn(self, a: nn.Module, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        n = a.num_heads
        return self._sdpa(a, _heads(a.q_proj(q), n), _heads(a.k_proj(k), n), _heads(a.v_proj(v), n))

    @staticmethod
    def _sdpa(a: nn.Module, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        n = a.num_heads
        if q.dim() == 3:
            q = _heads(q, n)
        if k.dim() == 3:
            k = _heads(k, n)
        if v.dim() == 3:
            v = _heads(v, n)
        # Broadcast the per-image side over the prompt batch as a view (no copy).
        b = max(q.shape[0], k.shape[0], v.shape[0])
        q, k, v = (x.expand(b, *x.shape[1:]) for x in (q, k, v))
        return a.out_proj(_merge(F.scaled_dot_product_attention(q, k, v)))

    def _autocast(self):
        if self.dtype == torch.float32:
            return torch.autocast(self.pe.no_mask_embed.weight.device.type, enabled=False)
        return torch.autocast(self.pe.no_mask_embed.weight.device.type, dtype=self.dtype)
