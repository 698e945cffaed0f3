"""The `text_to_image` task: a caption, no condition image, the target image's VQ codes.

For every adapter: the sequence holds no image block, the loss falls only on the target's codes
and depends on the caption; the data layer reads `captions:` (images looked up as ingested
source `captions-<n>`, unusable records counted); weight 0 (the default) reads nothing; a run
trains it and logs its loss.
"""

from __future__ import annotations

import json

import pytest
import torch

from pipeline.manifest import ManifestError, parse_manifest
from tests.trainer.conftest import random_images
from tests.trainer.test_adapters_common import _grad_at_final_hidden
from trainer.adapters import adapter_class, available_adapters
from trainer.data import TrainData, collate
from trainer.loop import train
from trainer.run_folder import train_fingerprint

ADAPTERS = available_adapters()
CAPTIONS = ["A red disc on a blue field.", "Stripes.", "A grey gradient, darker at the top."]


@pytest.fixture(scope="module", params=ADAPTERS)
def adapter(request):
    return adapter_class(request.param).load("tiny-random")


def _batch(adapter, captions=CAPTIONS[:2], seed: int = 10):
    enc = adapter.text_encoder()
    samples = [
        {
            "task": "text_to_image",
            "batch": 0,
            "input_ids": torch.tensor(enc.text_to_image(c)),
            "target": random_images(1, seed + i, adapter.image_size)[0],
        }
        for i, c in enumerate(captions)
    ]
    return collate(samples, enc.pad_id)


def test_the_sequence_is_the_caption_alone(adapter):
    enc = adapter.text_encoder()
    ids = enc.text_to_image(CAPTIONS[0])
    image_token = adapter.model.config.image_token_id if adapter.name == "janus" else None
    if adapter.name == "janus":
        assert image_token not in ids and ids[-1] == enc.boi_id and ids.count(enc.boi_id) == 1
    else:
        assert enc.ids["image"] not in ids and ids[-1] == enc.ids["img"]
        assert ids.count(enc.ids["boi"]) == 1
    assert "image" not in _batch(adapter)


def test_loss_only_on_the_target_codes_and_it_depends_on_the_caption(adapter):
    batch = _batch(adapter)
    g = _grad_at_final_hidden(adapter, adapter.generation_loss, batch)
    lens = batch["attention_mask"].sum(1).tolist()
    assert lens[0] != lens[1]  # right-padded rows of different lengths
    for row, n in enumerate(lens):
        assert (g[row, : n - 1] == 0).all()  # caption positions carry no loss
        assert int((g[row] > 0).sum()) == adapter.num_image_tokens  # one per code
    with torch.no_grad():
        a = adapter.generation_loss(batch)
        b = adapter.generation_loss(_batch(adapter, captions=CAPTIONS[1:]))
    assert torch.isfinite(a) and a != b


def _with_captions(train_manifest, tmp_path, records, **trainer):
    data = tmp_path / "data"
    data.mkdir(parents=True, exist_ok=True)
    (data / "captions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return train_manifest(
        extra={"captions": [{"path": "data/captions.jsonl", "image_root": "data/images"}]},
        **trainer,
    )


RECORDS = [
    {"image": "img0.png", "caption": CAPTIONS[0]},
    {"image": "img1.png", "caption": CAPTIONS[1]},
    {"image": ["img2.png"], "caption": CAPTIONS[2]},
    {"image": "img3.png", "caption": ""},
    {"image": "not_there.png", "caption": "Nothing."},
    {"image": "broken.jpg", "caption": "Broken."},
]
T2I_ONLY = {
    "understanding": 0.0,
    "reconstruction": 0.0,
    "depth": 0.0,
    "segmentation": 0.0,
    "text_to_image": 1.0,
}


def test_captions_are_read_and_samples_have_no_condition_image(train_manifest, tmp_path):
    m = _with_captions(train_manifest, tmp_path, RECORDS, loss_weights=T2I_ONLY)
    assert "captions-0" in [s.name for s in m.all_sources()]
    data = TrainData.build(m)
    assert list(data.streams) == ["text_to_image"]
    rep = data.report["text_to_image"]
    assert rep == {"records": 6, "used": 3, "no_caption": 1, "missing": 1, "quarantined": 1}
    assert data.captions.captions == CAPTIONS
    enc = adapter_class("janus").load("tiny-random").text_encoder()
    ds = data.dataset(enc, 32, (0, 0, 0))
    s = ds[("text_to_image", 1, 0, 0)]
    assert "image" not in s and s["input_ids"].tolist() == enc.text_to_image(CAPTIONS[1])
    g = int(data.captions.image_rows[1])
    assert data.index.image_ids[g] == data.index.by_path[("captions-0", "img1.png")]
    # The target is the caption's image, stretched as generation targets are.
    assert torch.equal(s["target"], torch.from_numpy(ds.image(g, "reconstruction")))


def test_off_by_default_and_refused_without_captions(train_manifest, tmp_path):
    m = train_manifest()
    assert m.trainer.loss_weights["text_to_image"] == 0.0
    assert m.trainer.loss_weights["depth"] == 1.0  # the four released tasks stay on
    assert "text_to_image" not in TrainData.build(m).streams
    raw = {
        "output_dir": "out",
        "sources": [{"name": "a", "path": "imgs"}],
        "trainer": {"loss_weights": T2I_ONLY},
    }
    with pytest.raises(ManifestError, match=r"loss_weights.text_to_image.*captions"):
        parse_manifest(raw, base_dir=tmp_path)


def test_weight_zero_reads_no_captions(train_manifest, tmp_path):
    m = _with_captions(train_manifest, tmp_path, RECORDS)
    (tmp_path / "data" / "captions.jsonl").write_text("not json at all\n")
    data = TrainData.build(m)  # the unreadable file is never opened
    assert "text_to_image" not in data.streams and data.captions is None


@pytest.mark.parametrize("name", ADAPTERS)
def test_a_run_trains_text_to_image_and_the_fingerprint_covers_the_captions(
    train_manifest, tmp_path, name
):
    m = _with_captions(
        train_manifest,
        tmp_path,
        RECORDS,
        adapter=name,
        loss_weights={
            "understanding": 1.0,
            "reconstruction": 0.0,
            "depth": 0.0,
            "segmentation": 0.0,
            "text_to_image": 1.0,
        },
        max_steps=100,
        save_every=100,
        eval_every=100,
        lr=1e-2,
    )
    fp = train_fingerprint(m)
    result = train(m, progress=False, num_workers=0)
    log = [json.loads(x) for x in (result.output_dir / "log.jsonl").read_text().splitlines()]
    assert set(log[0]["loss"]) == {"understanding", "text_to_image"}
    first = log[0]["loss"]["text_to_image"]
    last = sum(r["loss"]["text_to_image"] for r in log[-3:]) / 3
    assert last < 0.7 * first, f"text_to_image: {first:.3f} -> {last:.3f}"
    (tmp_path / "data" / "captions.jsonl").write_text(
        json.dumps({"image": "img0.png", "caption": "Another caption."}) + "\n"
    )
    assert train_fingerprint(m) != fp
