"""The batched decoder (pipeline/stages/segment/decoder.py) against segment-anything's own
prompt encoder + mask decoder, in float32 on CPU: tiny SAM and, slow, the real ViT-B decoder
size (random weights: the outputs are noise, only their agreement matters)."""

from __future__ import annotations

import pytest
import torch

from pipeline.stages.segment.decoder import BatchedDecoder
from pipeline.stages.segment.model import build_sam


def _reference(sam, emb: torch.Tensor, coords: torch.Tensor):
    labels = torch.ones(coords.shape[0], dtype=torch.int)
    sparse, dense = sam.prompt_encoder(
        points=(coords[:, None], labels[:, None]), boxes=None, masks=None
    )
    return sam.mask_decoder(
        image_embeddings=emb,
        image_pe=sam.prompt_encoder.get_dense_pe(),
        sparse_prompt_embeddings=sparse,
        dense_prompt_embeddings=dense,
        multimask_output=True,
    )


def _check(sam, n_prompts: int, pad_to: int | None = None) -> None:
    torch.manual_seed(1)
    with torch.no_grad():
        # Weights with some spread so that the check is not trivially near zero.
        for p in sam.mask_decoder.parameters():
            p.add_(torch.randn_like(p) * 0.02)
        pe = sam.prompt_encoder
        c = pe.embed_dim
        h, w = pe.image_embedding_size
        emb = torch.randn(1, c, h, w)
        size = pe.input_image_size[0]
        coords = torch.rand(n_prompts, 2) * size
        ref_masks, ref_iou = _reference(sam, emb, coords)
        dec = BatchedDecoder(sam, pad_to=pad_to)
        masks, iou = dec(dec.prepare(emb), coords)
    assert masks.shape == ref_masks.shape and iou.shape == ref_iou.shape
    scale = ref_masks.abs().max().item()
    assert scale > 0
    torch.testing.assert_close(masks, ref_masks, rtol=1e-4, atol=1e-5 * scale)
    torch.testing.assert_close(iou, ref_iou, rtol=1e-4, atol=1e-5)


def test_batched_decoder_matches_package_decoder_fp32():
    _check(build_sam("tiny-random"), n_prompts=37)


def test_padded_static_batch_gives_the_same_outputs():
    _check(build_sam("tiny-random"), n_prompts=5, pad_to=16)


def test_bfloat16_decoder_stays_close():
    sam = build_sam("tiny-random")
    torch.manual_seed(0)
    with torch.no_grad():
        emb = torch.randn(1, 32, 16, 16)
        coords = torch.rand(8, 2) * 256
        ref, ref_iou = _reference(sam, emb, coords)
        dec = BatchedDecoder(sam, dtype=torch.bfloat16)
        out, iou = dec(dec.prepare(emb), coords)
    assert out.dtype == torch.float32
    rel = (out - ref).abs().mean() / ref.abs().mean()
    assert rel < 0.05, rel
    assert (iou - ref_iou).abs().max() < 0.05


@pytest.mark.slow
def test_batched_decoder_matches_package_decoder_vit_b_size():
    # The ViT-B prompt encoder and mask decoder are the same for vit_l/vit_h (256 channels,
    # 64x64 embeddings); the encoder is not needed here.
    from segment_anything.build_sam import _build_sam

    sam = _build_sam(
        encoder_embed_dim=768,
        encoder_depth=1,
        encoder_num_heads=12,
        encoder_global_attn_indexes=[0],
        checkpoint=None,
    ).eval()
    _check(sam, n_prompts=6)


class _SyncCounter:
    """Counts the aten ops that make the host wait for the device: `_local_scalar_dense` (what
    `.item()`, `bool()`, `.tolist()` of a scalar run), `nonzero`, boolean-mask indexing and
    `masked_select` (both a hidden `nonzero`)."""

    def __init__(self) -> None:
        from torch.utils._python_dispatch import TorchDispatchMode

        counts = self.counts = {}

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                name = func.overloadpacket.__name__
                bool_index = name == "index" and any(
                    isinstance(i, torch.Tensor) and i.dtype == torch.bool
                    for i in (args[1] if len(args) > 1 else [])
                )
                if name in ("_local_scalar_dense", "nonzero", "masked_select") or bool_index:
                    key = "bool index" if bool_index else name
                    counts[key] = counts.get(key, 0) + 1
                return func(*args, **(kwargs or {}))

        self.mode = Mode()


@pytest.mark.parametrize("decoder", ["package", "batched"])
def test_per_batch_filter_path_has_two_syncs(decoder, monkeypatch):
    """One `nonzero` for the IoU filter, one for stability + crop edge together, nothing else
    (no `.item()`, no boolean indexing) in the decode-and-filter step of a prompt batch."""
    import numpy as np

    from pipeline.stages.segment.fast import FastMaskGenerator

    torch.manual_seed(0)
    sam = build_sam("tiny-random")
    # Thresholds that keep some masks so every step runs on non-empty tensors.
    gen = FastMaskGenerator(
        sam, points_per_side=4, pred_iou_thresh=1e-9, stability_score_thresh=1e-9, decoder=decoder
    )
    real = FastMaskGenerator._process_points
    seen: list[dict] = []

    def counted(self, *args, **kwargs):
        counter = _SyncCounter()
        with counter.mode:
            out = real(self, *args, **kwargs)
        seen.append((counter.counts, len(out)))
        return out

    monkeypatch.setattr(FastMaskGenerator, "_process_points", counted)
    rng = np.random.default_rng(0)
    gen.generate([rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)])
    assert seen
    for counts, _ in seen:
        assert counts == {"nonzero": 2}, counts


@pytest.mark.slow
def test_compiled_decoder_with_padded_batches_matches_eager():
    """torch.compile with static shapes (about 90 s of compiling on a 2-core CPU): batches
    smaller than pad_to are padded, so both calls below reuse one compiled graph."""
    torch.manual_seed(0)
    sam = build_sam("tiny-random")
    emb, coords = torch.randn(1, 32, 16, 16), torch.rand(5, 2) * 256
    with torch.no_grad():
        eager = BatchedDecoder(sam)
        compiled = BatchedDecoder(sam, compile=True, pad_to=8)
        for n in (5, 3):
            want = eager(eager.prepare(emb), coords[:n])
            got = compiled(compiled.prepare(emb), coords[:n])
            for a, b in zip(got, want, strict=True):
                assert a.shape == b.shape
                torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
