"""The released recipe's preprocessing and gradient details: stretch, pad, nearest, grad scale."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from trainer.adapters.common import scale_grad
from trainer.data import TrainData
from trainer.resize import square_image


def _png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def _halves(w: int = 8, h: int = 4) -> bytes:
    """Left half red, right half blue, w x h."""
    a = np.zeros((h, w, 3), np.uint8)
    a[:, : w // 2] = (255, 0, 0)
    a[:, w // 2 :] = (0, 0, 255)
    return _png(a)


def test_stretch_fills_the_square_without_padding():
    out = square_image(_halves(), 8, (1, 2, 3), mode="stretch", resample="nearest")
    assert out.shape == (3, 8, 8)
    assert not (out.transpose(1, 2, 0) == (1, 2, 3)).all(-1).any()  # no fill anywhere
    assert (out[:, :, :4] == np.array([255, 0, 0])[:, None, None]).all()  # stretched, not cut
    assert (out[:, :, 4:] == np.array([0, 0, 255])[:, None, None]).all()


def test_pad_keeps_the_aspect_ratio_and_pads_with_the_fill():
    out = square_image(_halves(), 8, (1, 2, 3), mode="pad", resample="nearest")
    rows_fill = (out.transpose(1, 2, 0) == (1, 2, 3)).all(-1).all(1)
    assert rows_fill.tolist() == [True, True, False, False, False, False, True, True]
    assert (out[:, 2:6, :4] == np.array([255, 0, 0])[:, None, None]).all()


def test_nearest_keeps_edge_targets_binary_where_bicubic_does_not():
    a = np.zeros((48, 64), np.uint8)
    a[::5, :] = 255  # one-pixel lines
    a[:, ::7] = 255
    data = _png(a)
    near = square_image(data, 32, (0, 0, 0), mode="stretch", resample="nearest")
    cubic = square_image(data, 32, (0, 0, 0), mode="stretch", resample="bicubic")
    assert set(np.unique(near).tolist()) == {0, 255}
    assert len(np.unique(cubic)) > 2


def test_dataset_pads_understanding_and_stretches_generation(train_manifest):
    from trainer.adapters.janus.adapter import JanusAdapter

    encoder = JanusAdapter.load("tiny-random").text_encoder()
    data = TrainData.build(train_manifest())
    fill = (7, 8, 9)
    ds = data.dataset(encoder, 32, fill, uncond_rate={"depth": 1.0})
    # img0 is 48x40 (not square): padded for understanding, stretched for generation.
    g = int(data.understanding.image_rows[0])
    und = ds[("understanding", 0, 1, 0)]["image"].numpy()
    dep = ds[("depth", g, 1, 0)]
    is_fill = lambda x: (x.transpose(1, 2, 0) == fill).all(-1)  # noqa: E731
    assert is_fill(und).all(1).any()  # whole rows of padding
    assert not is_fill(dep["image"].numpy()).all(1).any()
    # Segmentation targets keep only the label's values (nearest); depth's rate 1 drops it.
    seg = ds[("segmentation", g, 1, 0)]["target"].numpy()
    assert set(np.unique(seg).tolist()) <= {0, 255}
    assert dep["input_ids"].tolist() == encoder.generation("")
    assert ds.uncond_rate["reconstruction"] == 0.1  # the released default stays


def test_released_uncond_rates_never_drop_depth_or_segmentation_prompts(train_manifest):
    from trainer.adapters.janus.adapter import JanusAdapter

    encoder = JanusAdapter.load("tiny-random").text_encoder()
    m = train_manifest()
    data = TrainData.build(m)
    ds = data.dataset(encoder, 32, (0, 0, 0), uncond_rate=m.trainer.uncond_rate)
    empty = encoder.generation("")
    g = int(data.streams["depth"][0])
    for task in ("depth", "segmentation"):
        assert all(ds[(task, g, s, 0)]["input_ids"].tolist() != empty for s in range(60))
    dropped = sum(
        ds[("reconstruction", g, s, 0)]["input_ids"].tolist() == empty for s in range(200)
    )
    assert 5 <= dropped <= 40  # ~0.1 of 200


class _Toy(torch.nn.Module):
    def __init__(self, scale: float):
        super().__init__()
        torch.manual_seed(0)
        self.encoder = torch.nn.Linear(4, 3)
        self.head = torch.nn.Linear(3, 2)
        self.scale = scale

    def forward(self, x):
        return self.head(scale_grad(self.encoder(x), self.scale))


def test_condition_grad_scale_scales_only_the_encoders_gradient():
    x = torch.randn(5, 4, generator=torch.Generator().manual_seed(1))
    grads, outs = {}, {}
    for s in (1.0, 0.1):
        toy = _Toy(s)
        out = toy(x)
        out.square().sum().backward()
        outs[s] = out.detach()
        grads[s] = {n: p.grad.clone() for n, p in toy.named_parameters()}
    assert torch.equal(outs[1.0], outs[0.1])  # forward unchanged
    for n in ("head.weight", "head.bias"):
        assert torch.equal(grads[1.0][n], grads[0.1][n])
    for n in ("encoder.weight", "encoder.bias"):
        torch.testing.assert_close(grads[0.1][n], 0.1 * grads[1.0][n])
        assert grads[1.0][n].abs().sum() > 0


@pytest.mark.parametrize("loss", ["understanding", "generation"])
def test_janus_adapter_scales_the_encoders_gradient_for_both_losses(loss):
    """On tiny-random Janus: the vision tower gets 0.1x its gradient, the language model 1x."""
    from tests.trainer.conftest import generation_batch, understanding_batch
    from trainer.adapters.janus.adapter import JanusAdapter

    grads = {}
    for s in (1.0, 0.1):
        ad = JanusAdapter.load("tiny-random")
        ad.condition_grad_scale = s
        batch = understanding_batch(ad) if loss == "understanding" else generation_batch(ad)
        fn = ad.understanding_loss if loss == "understanding" else ad.generation_loss
        fn(batch).backward()
        named = dict(ad.model.named_parameters())
        grads[s] = {
            "vision": named["model.vision_model.embeddings.patch_embedding.weight"].grad.clone(),
            "aligner": next(
                p.grad.clone() for n, p in named.items() if n.startswith("model.aligner")
            ),
            "lm": named["model.language_model.layers.0.self_attn.q_proj.weight"].grad.clone(),
        }
    for part in ("vision", "aligner"):
        torch.testing.assert_close(grads[0.1][part], 0.1 * grads[1.0][part])
    torch.testing.assert_close(grads[0.1]["lm"], grads[1.0]["lm"])
