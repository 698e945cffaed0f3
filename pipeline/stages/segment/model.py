"""The Segment Anything models the segment stage loads: a checkpoint, or `tiny-random`.

`load_sam` builds segment-anything's architecture for `model_type` and loads a checkpoint with
`weights_only=True`; `tiny_sam_checkpoint` builds (once, seeded) segment-anything's own `Sam`
classes at tiny size and saves them, so `tiny-random` goes through the same loading code (its
masks are noise).

Usage:
    from pipeline.stages.segment.model import load_sam, tiny_sam_checkpoint
    sam = load_sam("tiny-random", tiny_sam_checkpoint())
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pipeline.fingerprint import tiny_random_cache
from pipeline.shards import atomic_build_dir

__all__ = [
    "TINY_SEED",
    "TINY_VERSION",
    "build_sam",
    "keep_some_masks",
    "load_sam",
    "tiny_sam_checkpoint",
]


def build_sam(model_type: str) -> Any:
    """The SAM architecture for `model_type`, randomly initialised (no checkpoint read)."""
    if model_type == "tiny-random":
        return _tiny_sam()
    from segment_anything import sam_model_registry

    return sam_model_registry[model_type](checkpoint=None)


def load_sam(model_type: str, checkpoint: str | Path) -> Any:
    """Build the architecture and load a checkpoint with `weights_only=True` (no pickled code)."""
    import torch

    model = build_sam(model_type)
    try:
        state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise RuntimeError(f"stages.segment.checkpoint: cannot load {checkpoint}: {exc}") from exc
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise RuntimeError(
            f"stages.segment.checkpoint: {checkpoint} does not fit model_type {model_type}: {exc}"
        ) from exc
    return model.eval()


def _tiny_sam() -> Any:
    """segment-anything's own `Sam` classes at tiny size (256 px input, 16x16 embeddings)."""
    from functools import partial

    import torch
    from segment_anything.modeling import (
        ImageEncoderViT,
        MaskDecoder,
        PromptEncoder,
        Sam,
        TwoWayTransformer,
    )

    img_size, patch, dim = 256, 16, 32
    grid = img_size // patch
    return Sam(
        image_encoder=ImageEncoderViT(
            depth=2,
            embed_dim=48,
            img_size=img_size,
            mlp_ratio=2,
            norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
            num_heads=2,
            patch_size=patch,
            qkv_bias=True,
            use_rel_pos=True,
            global_attn_indexes=(1,),
            window_size=8,
            out_chans=dim,
        ),
        prompt_encoder=PromptEncoder(
            embed_dim=dim,
            image_embedding_size=(grid, grid),
            input_image_size=(img_size, img_size),
            mask_in_chans=8,
        ),
        mask_decoder=MaskDecoder(
            num_multimask_outputs=3,
            transformer=TwoWayTransformer(depth=2, embedding_dim=dim, mlp_dim=64, num_heads=2),
            transformer_dim=dim,
            iou_head_depth=3,
            iou_head_hidden_dim=32,
        ),
        pixel_mean=[123.675, 116.28, 103.53],
        pixel_std=[58.395, 57.12, 57.375],
    ).eval()


TINY_SEED = 0
#: Bump when the tiny weights change: the cache folder is named after it.
TINY_VERSION = "v2"


def keep_some_masks(model: Any, scale: float = 2000.0, iou_bias: float = 0.9) -> Any:
    """Change a randomly initialised SAM so that some masks pass the default thresholds (random
    weights keep none): the mask hypernetworks' output layers x`scale` (crisp logits, so high
    stability scores) and the IoU head's output bias +`iou_bias` (predicted IoU near 0.9). Used
    for `tiny-random` and by the segment benchmark at real sizes; the masks stay noise."""
    import torch

    with torch.no_grad():
        for mlp in model.mask_decoder.output_hypernetworks_mlps:
            mlp.layers[-1].weight *= scale
            mlp.layers[-1].bias *= scale
        model.mask_decoder.iou_prediction_head.layers[-1].bias += iou_bias
    return model


def tiny_sam_checkpoint() -> Path:
    """Build the tiny-random SAM once (seeded), save it atomically, return its `.pth` path.

    Two deterministic changes to the random init (`keep_some_masks`) let some masks pass
    segment-anything's default thresholds, so the offline demo and the tests exercise every step:
    the mask hypernetworks' output layers are scaled x2000 (crisp logits: stability scores around
    0.92-0.98) and the IoU head's output bias is raised by 0.9 (predicted IoU around 0.7-1.0).
    """
    import torch

    folder = tiny_random_cache("sam", TINY_VERSION, ("torch", "segment-anything"))
    path = folder / "sam_tiny.pth"
    if path.is_file():
        return path
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(TINY_SEED)
        model = _tiny_sam()
    keep_some_masks(model)
    atomic_build_dir(folder, lambda tmp: torch.save(model.state_dict(), tmp / path.name), path.name)
    return path
