"""Binary 64x64 images as bytes: PNG (1-bit) for results, PNG or raw 0/1 bytes for queries."""
from __future__ import annotations

import io

import numpy as np
from PIL import Image

from cvae.grid import IMAGE_SIZE

RAW_SIZE = IMAGE_SIZE * IMAGE_SIZE
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def encode_png(image: np.ndarray) -> bytes:
    """One (64, 64) 0/1 image to 1-bit PNG bytes (about 150 bytes for a sprite)."""
    buf = io.BytesIO()
    Image.fromarray(np.asarray(image, dtype=bool)).save(buf, format="PNG", optimize=False)
    return buf.getvalue()


def encode_pngs(images: np.ndarray) -> list[bytes]:
    return [encode_png(im) for im in images]


def decode_image(data: bytes) -> np.ndarray:
    """PNG bytes, or 4096 raw bytes of 0/1, to a (64, 64) uint8 0/1 image.

    Raises ValueError naming what is wrong: not PNG, wrong size, not binary, wrong length.
    """
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise ValueError(f"image must be bytes, got {type(data).__name__}")
    data = bytes(data)
    if data.startswith(PNG_MAGIC):
        try:
            with Image.open(io.BytesIO(data)) as im:
                im.load()
                array = np.asarray(im.convert("L") if im.mode not in ("1", "L") else im)
        except Exception as exc:
            raise ValueError(f"image is not a readable PNG: {exc}") from None
        if array.shape != (IMAGE_SIZE, IMAGE_SIZE):
            raise ValueError(f"image PNG is {array.shape[1]}x{array.shape[0]}, expected 64x64")
        array = array.astype(np.uint8)
        if array.max(initial=0) > 1:  # 8-bit greyscale: accept exactly 0 and 255
            if not np.isin(array, (0, 255)).all():
                raise ValueError("image PNG is not binary (pixels other than 0 and 255)")
            array = (array // 255).astype(np.uint8)
        return array
    if len(data) == RAW_SIZE:
        array = np.frombuffer(data, dtype=np.uint8)
        if array.max(initial=0) > 1:
            raise ValueError("raw image is not binary: bytes must be 0 or 1")
        return array.reshape(IMAGE_SIZE, IMAGE_SIZE).copy()
    raise ValueError(
        f"image is neither PNG nor {RAW_SIZE} raw bytes of 0/1 (got {len(data)} bytes)"
    )
