"""Probe metrics against hand-computed values, and the spatial question's answer."""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
from PIL import Image

from tests.trainer.evaluation.conftest import _rle
from trainer.evaluation.probes import (
    HeldOutImage,
    boundary_f_score,
    depth_metrics,
    psnr,
    spatial_questions,
)


def test_depth_metrics_after_scale_and_shift():
    t = np.array([0.2, 0.4, 0.6, 0.8])
    exact = depth_metrics(3 * t - 1, t)  # any affine copy aligns exactly
    assert exact["abs_rel"] == pytest.approx(0, abs=1e-9) and exact["delta1"] == 1.0
    # p = [0,1,0,1]: the fit is b=0.4, s=0.2 -> aligned [0.4, 0.6, 0.4, 0.6]
    m = depth_metrics(np.array([0.0, 1.0, 0.0, 1.0]), t)
    assert m["abs_rel"] == pytest.approx((1 + 0.5 + 1 / 3 + 0.25) / 4)
    assert m["delta1"] == 0.0  # ratios 2, 1.5, 1.5, 1.33
    # pixels with a target under 0.05 and pixels outside `valid` do not count
    t2 = np.array([0.0, 0.2, 0.4, 0.6, 0.8, 0.5])
    p2 = np.array([9.0, 0.0, 1.0, 0.0, 1.0, 7.0])
    valid = np.array([True, True, True, True, True, False])
    assert depth_metrics(p2, t2, valid)["abs_rel"] == pytest.approx(m["abs_rel"])


def test_boundary_f_score():
    target = np.zeros((20, 20), bool)
    target[:, 5] = True
    shifted = np.roll(target, 1, axis=1)
    assert boundary_f_score(shifted, target, tolerance=1) == 1.0
    assert boundary_f_score(shifted, target, tolerance=0) == 0.0
    half = target.copy()
    half[10:, 5] = False  # rows 0..9: precision 1; recall 11/20 (row 10 is within 1 px)
    assert boundary_f_score(half, target, tolerance=1) == pytest.approx(2 * 0.55 / 1.55)
    empty = np.zeros_like(target)
    assert boundary_f_score(empty, empty) == 1.0 and boundary_f_score(empty, target) == 0.0


def test_psnr():
    a = np.zeros((4, 4, 3), np.uint8)
    assert psnr(a + 1, a) == pytest.approx(10 * np.log10(255**2))
    assert psnr(a, a) == float("inf")
    b = a.copy()
    b[0, 0] = 255  # outside `valid`: ignored
    valid = np.ones((4, 4), bool)
    valid[0, 0] = False
    assert psnr(b.transpose(2, 0, 1), a.transpose(2, 0, 1), valid) == float("inf")


def _item(w=60, h=40, near_right=True):
    img = Image.new("RGB", (w, h), (128, 128, 128))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    ramp = np.linspace(1.0, 5.0, w, dtype=np.float32)
    depth = np.tile(ramp if near_right else ramp[::-1], (h, 1))
    left = np.zeros((h, w), bool)
    left[10:30, 2:15] = True
    right = np.zeros((h, w), bool)
    right[10:30, 45:58] = True
    return HeldOutImage("ab" * 32, buf.getvalue(), depth, None, [_rle(left), _rle(right)], None)


@pytest.mark.parametrize("near_right", [True, False])
def test_spatial_answer_is_the_box_on_the_nearer_mask(near_right):
    (q,) = spatial_questions(_item(near_right=near_right))
    img = np.asarray(Image.open(io.BytesIO(base64.b64decode(q["image"]))).convert("RGB"))
    red = (img[..., 0] > 200) & (img[..., 1] < 60) & (img[..., 2] < 60)
    red_on_right = np.nonzero(red)[1].mean() > img.shape[1] / 2
    red_is_near = red_on_right == near_right
    assert q["answer"] == ("A" if red_is_near else "B")
    assert q["A"] == "the object in the red box" and q["category"] == "spatial"


def test_spatial_needs_a_clear_depth_gap():
    item = _item()
    item.depth = np.full_like(item.depth, 2.0)  # flat depth: no question
    assert spatial_questions(item) == []
    assert spatial_questions(HeldOutImage("x", item.image, None, None, [], None)) == []
