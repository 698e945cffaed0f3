"""`unimrg preview`: contact sheet of image | depth | segment, flagged when weights are random."""

from __future__ import annotations

import pytest
from PIL import Image, ImageChops

from pipeline.manifest import parse_manifest
from pipeline.preview import CELL, HEADER, PAD, make_preview
from pipeline.shards import Layout
from pipeline.stage import build_stage, run_stage


def _manifest(root, depth="tiny-random"):
    return parse_manifest(
        {
            "output_dir": "out",
            "sources": [{"name": "s", "path": "imgs"}],
            "stages": {
                "depth": {"model": depth, "input_size": 28, "batch_size": 2},
                "segment": {"model_type": "tiny-random", "points_per_side": 2},
            },
        },
        base_dir=root,
    )


def test_contact_sheet_of_real_labels_says_random_weights(image_shards: Layout, tmp_path):
    m = _manifest(image_shards.root.parent)
    for name in ("depth", "segment"):
        run_stage(build_stage(name, m), image_shards)
    out = make_preview(m, tmp_path / "sheet.png", n=4)
    with Image.open(out) as im:
        im = im.convert("RGB")
        # banner + column titles + 4 rows (3 from shard 0, 1 from shard 1), 3 columns
        assert im.size == (PAD + 3 * (CELL[0] + PAD), 2 * HEADER + 4 * (CELL[1] + PAD) + PAD)
        assert im.getpixel((2, 2)) == (200, 30, 30)  # the red "random weights" banner
        # every cell got an image, not a grey "not labelled" placeholder
        for c in range(3):
            x = PAD + c * (CELL[0] + PAD) + CELL[0] // 2
            y = 2 * HEADER + 3 * (CELL[1] + PAD) + CELL[1] // 2
            assert im.getpixel((x, y)) != (90, 90, 90)


def test_missing_labels_are_placeholders(image_shards: Layout, tmp_path):
    m = _manifest(image_shards.root.parent)
    out = make_preview(m, tmp_path / "sheet.png", n=1)
    with Image.open(out) as im:
        im = im.convert("RGB")
        x = PAD + (CELL[0] + PAD) + 2
        assert im.getpixel((x, 2 * HEADER + CELL[1] - 4)) == (90, 90, 90)


def test_no_images_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="no image shards yet"):
        make_preview(_manifest(tmp_path), tmp_path / "x.png")


def test_image_cells_honour_exif_orientation(tmp_path):
    """Labels are made at the EXIF-oriented size; the image beside them must be oriented too."""
    import hashlib
    import io

    import pyarrow as pa

    from pipeline.shards import IMAGE_SCHEMA, write_parquet_atomic

    tall = Image.new("RGB", (40, 120), (0, 200, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # displayed rotated: 120 wide, 40 high
    buf = io.BytesIO()
    tall.save(buf, "JPEG", exif=exif.tobytes())
    data = buf.getvalue()
    m = parse_manifest(
        {"output_dir": "out", "sources": [{"name": "s", "path": "imgs"}]}, base_dir=tmp_path
    )
    row = {
        "image_id": hashlib.sha256(data).hexdigest(),
        "image": {"bytes": data, "path": "r.jpg"},
        "width": 120,
        "height": 40,
        "source": "s",
    }
    write_parquet_atomic(
        pa.Table.from_pylist([row], schema=IMAGE_SCHEMA), Layout(m.out).image_shard(0)
    )
    out = make_preview(m, tmp_path / "sheet.png", n=1)
    with Image.open(out) as im:
        red, green, _ = im.convert("RGB").crop((PAD, 0, PAD + CELL[0], im.height)).split()
    # the photo is pure green; titles are white and the background grey, so keep G - R only
    box = ImageChops.subtract(green, red).point(lambda v: 255 if v > 100 else 0).getbbox()
    assert box is not None, "the image is drawn"
    width, height = box[2] - box[0], box[3] - box[1]
    assert width > 2 * height, f"drawn {width}x{height}: not rotated as EXIF says"
