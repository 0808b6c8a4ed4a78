"""Image bytes in and out, written once: PNG encoding of images and id maps, decoding of id maps (8- or 16-bit
single-channel) and of images. Data shards, generation, evaluation, reports, the CLI and Serve all use these."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from sdm.errors import DatasetError

ID_MODES = ("L", "P", "I", "I;16", "I;16B", "I;16L")  # PIL modes that hold one id per pixel
# The most pixels a stored image or id map may declare (8192x4096): checked on the header, before any pixel is
# decoded, so a decompression bomb (a few KiB that inflate to GiBs; as an id map, 8 bytes a pixel once decoded) never
# is. PIL's own guard only warns below 89M pixels and refuses above twice that.
MAX_PIXELS = 2**25


def png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def encode_png(arr: np.ndarray) -> bytes:
    """An image (HxWx3 uint8) or an id map (HxW; 8-bit when ids fit, else 16-bit) as PNG bytes."""
    if arr.ndim == 3:
        return png_bytes(Image.fromarray(arr.astype(np.uint8)))
    if arr.max(initial=0) <= 255 and arr.min(initial=0) >= 0:
        return png_bytes(Image.fromarray(arr.astype(np.uint8)))
    if arr.max() <= 65535 and arr.min() >= 0:
        return png_bytes(Image.fromarray(arr.astype(np.uint16)))
    raise DatasetError(f"id map values must lie in [0, 65535] to fit a PNG, got [{arr.min()}, {arr.max()}]")


def _open(data: bytes, what: str) -> Image.Image:
    try:
        img = Image.open(io.BytesIO(data))
    except Exception as e:  # PIL raises many types for corrupt data
        raise DatasetError(f"{what} is not a readable image: {e}") from None
    w, h = img.size
    if w * h > MAX_PIXELS:
        raise DatasetError(f"{what} declares {w}x{h} = {w * h} pixels, over the limit of {MAX_PIXELS} "
                           "(a decompression bomb?); not decoded")
    try:
        img.load()
    except Exception as e:
        raise DatasetError(f"{what} is not a readable image: {e}") from None
    return img


def decode_ids(data: bytes, what: str) -> np.ndarray:
    """A single-channel PNG of ids -> int64 HxW."""
    img = _open(data, what)
    if img.mode not in ID_MODES:
        raise DatasetError(f"{what} must be a single-channel id map, got mode {img.mode}")
    return np.array(img).astype(np.int64)


def decode_image(data: bytes, what: str) -> np.ndarray:
    """Any readable image -> uint8 HxWx3 RGB."""
    return np.array(_open(data, what).convert("RGB"))
