"""Decoding and validating image bytes, the one way every stage does it.

`inspect_image` is what ingest uses: decode fully once, honour EXIF orientation for the recorded
width and height, and raise `UnusableImage` with a reason for anything that cannot be used.
`decode_rgb` is what label stages use: the same orientation rule, converted to 8-bit RGB, so a
label's size always equals the image row's `width` x `height`.
`exif_orientation` reads the same orientation tag from the bytes alone, for decoders that do not
apply it themselves (the depth stage's torchvision/nvjpeg path).
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

from PIL import Image, ImageOps, UnidentifiedImageError

__all__ = [
    "IMAGE_EXTENSIONS",
    "ImageInfo",
    "UnusableImage",
    "decode_rgb",
    "exif_orientation",
    "inspect_image",
    "is_jpeg",
    "use_pixel_limit",
]

IMAGE_EXTENSIONS = frozenset(
    {
        ".jpg",
        ".jpeg",
        ".png",
        ".webp",
        ".tif",
        ".tiff",
        ".bmp",
        ".gif",
        ".jfif",
        ".pbm",
        ".pgm",
        ".ppm",
    }
)

# EXIF orientations 5..8 rotate by 90 degrees: width and height swap.
_SWAPPING_ORIENTATIONS = {5, 6, 7, 8}


def use_pixel_limit(max_pixels: int) -> None:
    """Make the manifest's `max_image_pixels` the one pixel limit in this process.

    Pillow's own `MAX_IMAGE_PIXELS` follows it, up as well as down (Pillow refuses images over
    twice its limit before `inspect_image` can judge them), and Pillow's
    DecompressionBombWarning is silenced process-wide: `inspect_image` turns an image over the
    limit into a quarantine reason itself, and a per-call `warnings.catch_warnings` is not
    thread-safe, so ingest's reader threads would let the warning reach the console.
    """
    Image.MAX_IMAGE_PIXELS = max_pixels
    warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)


class UnusableImage(ValueError):
    """Bytes that cannot be used as an image; the message is the quarantine reason."""


@dataclass(frozen=True)
class ImageInfo:
    width: int
    height: int
    format: str
    mode: str


def inspect_image(data: bytes, max_pixels: int) -> ImageInfo:
    """Fully decode `data` once (first frame for animations) and return its oriented size."""
    if not data:
        raise UnusableImage("empty file (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            w, h = img.size
            if w * h > max_pixels:
                raise UnusableImage(
                    f"decompression bomb: {w}x{h} = {w * h} pixels exceeds max_image_pixels "
                    f"({max_pixels})"
                )
            img.seek(0)
            img.load()
            orientation = img.getexif().get(0x0112, 1)
            fmt, mode = img.format or "unknown", img.mode
    except UnusableImage:
        raise
    except UnidentifiedImageError:
        raise UnusableImage("not an image (unrecognised format)") from None
    except Image.DecompressionBombError as exc:
        raise UnusableImage(f"decompression bomb: {exc}") from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise UnusableImage(f"cannot decode: {exc}") from None
    if w <= 0 or h <= 0:
        raise UnusableImage(f"empty image ({w}x{h})")
    if orientation in _SWAPPING_ORIENTATIONS:
        w, h = h, w
    return ImageInfo(w, h, fmt, mode)


def decode_rgb(
    data: bytes, draft: tuple[int, int] | None = None, long_side: int | None = None
) -> Image.Image:
    """Decode to 8-bit RGB with EXIF orientation applied (first frame of animations).

    16-bit grayscale is scaled to 8 bits; transparency (an alpha channel, or a palette or
    grayscale transparent colour) is composited on black: a fully transparent pixel decodes to
    black, so hidden content is not labelled. `draft=(w, h)` lets a JPEG decode at a reduced
    scale no smaller than that (PIL `draft`), several times cheaper for big photos;
    `long_side=n` does the same keeping the long side >= n (for images longer than n).
    Raises UnusableImage with a reason.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            img.seek(0)
            if long_side is not None and max(img.size) > long_side:
                w, h = img.size
                m = max(w, h)
                draft = (-(-w * long_side // m), -(-h * long_side // m))  # ceil: >= long_side
            if draft is not None and img.format == "JPEG":
                img.draft("RGB", draft)
            img = ImageOps.exif_transpose(img)
            if img.mode in ("I;16", "I;16B", "I;16L", "I"):
                import numpy as np

                arr = np.asarray(img.convert("I"), dtype=np.int64)
                img = Image.fromarray((arr.clip(0, 65535) >> 8).astype(np.uint8), "L")
            if img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info:
                rgba = img.convert("RGBA")
                out = Image.new("RGB", rgba.size, (0, 0, 0))
                out.paste(rgba, mask=rgba.getchannel("A"))
                return out
            return img.convert("RGB")
    except UnidentifiedImageError:
        raise UnusableImage("not an image (unrecognised format)") from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise UnusableImage(f"cannot decode: {exc}") from None


def is_jpeg(data: bytes) -> bool:
    return data[:3] == b"\xff\xd8\xff"


#: Byte strings without which PIL finds no orientation in a PNG/GIF/other file: a PNG `eXIf`
#: chunk, an ImageMagick "Raw profile type exif" text chunk, an XMP `tiff:Orientation`.
_ORIENTATION_MARKERS = (b"eXIf", b"Raw profile type exif", b"tiff:Orientation")


def exif_orientation(data: bytes) -> int:
    """EXIF orientation tag (1..8; 1 when absent), as `pipeline.images` (PIL's `getexif` after
    `exif_transpose`'s load) reads it. JPEG/WebP/TIFF carry it in the header; other formats
    (PNG eXIf, XMP) only go through PIL when the bytes hold a marker of one."""
    headed = is_jpeg(data) or data[:4] in (b"RIFF", b"II*\x00", b"MM\x00*")
    if not headed and not any(m in data for m in _ORIENTATION_MARKERS):
        return 1  # PNG/GIF/BMP without any: torchvision and PIL agree on no orientation
    try:
        with Image.open(io.BytesIO(data)) as im:
            if not headed:
                im.load()  # a PNG's text/eXIf chunks may follow the pixel data
            o = int(im.getexif().get(0x0112, 1))
    except Exception:
        return 1
    return o if 1 <= o <= 8 else 1
