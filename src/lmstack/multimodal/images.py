"""Image input for every vision model and the server: decode and check untrusted bytes, then turn pictures
into the (N, 3, S, S) tensors the encoders read. PIL + numpy + torch only (torchvision does not import beside
this torch build).

What is refused, each with an LmstackError that names the problem (the server turns it into a 400):
- bytes PIL cannot read, or a file that is cut short;
- modes whose colours a plain RGB conversion would get wrong: CMYK, 16-bit and float greyscale;
- an image over `max_pixels` (checked from the header, before the pixels are decoded);
- a data URL that is not base64 image data.
Greyscale, palette and alpha images are converted (alpha is composited on white, as a viewer shows it).

Usage:
    from lmstack.multimodal.images import decode_image, decode_data_url, to_pixels, image_hash
    img = decode_image(open("cat.png", "rb").read())             # PIL RGB image
    img = decode_image(decode_data_url("data:image/png;base64,iVBOR..."))
    x = to_pixels([img], size=64)                                # (1, 3, 64, 64) float in [-1, 1]
    key = image_hash(img)                                        # the prefix cache's key for this picture
"""
from __future__ import annotations

import base64
import binascii
import hashlib
import io
import re
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from lmstack.errors import LmstackError

MAX_PIXELS = 4096 * 4096
"""Default cap on width x height: bigger pictures are refused before decoding (a decompression bomb guard)."""

_CONVERTIBLE = {"RGB", "RGBA", "L", "LA", "P", "PA", "1"}
_DATA_URL = re.compile(r"^data:(image/[A-Za-z0-9.+-]+)?(;[^,]*)?,(.*)$", re.DOTALL)


def decode_image(data: bytes, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """Untrusted bytes -> an RGB PIL image, or an LmstackError naming what is wrong with them."""
    if not data:
        raise LmstackError("the image is empty (0 bytes)")
    try:
        img = Image.open(io.BytesIO(data))
    except (UnidentifiedImageError, OSError) as err:
        raise LmstackError(f"the image could not be read: not a PNG/JPEG/GIF/WebP/BMP file PIL knows ({err})") from None
    w, h = img.size
    if w * h > max_pixels:
        raise LmstackError(f"the image is {w}x{h} = {w * h} pixels, over the cap of {max_pixels}; "
                           "send a smaller picture")
    if img.mode not in _CONVERTIBLE:
        raise LmstackError(f"image mode {img.mode!r} is not supported (CMYK, 16-bit and float images are refused); "
                           "convert it to 8-bit RGB first")
    try:
        img.load()
    except (OSError, SyntaxError, ValueError) as err:  # truncated or corrupt pixel data
        raise LmstackError(f"the image is corrupt or cut short: {err}") from None
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img.convert("RGB")


def decode_data_url(url: str) -> bytes:
    """'data:image/png;base64,....' -> the image bytes."""
    match = _DATA_URL.match(url.strip()) if isinstance(url, str) else None
    if match is None:
        raise LmstackError("an image URL must be a data URL (data:image/png;base64,...)")
    mime, params, payload = match.groups()
    if mime is None:
        raise LmstackError("the data URL names no image type; expected data:image/<type>;base64,...")
    if ";base64" not in (params or ""):
        raise LmstackError("the data URL is not base64-encoded; expected data:image/<type>;base64,...")
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise LmstackError("the image's base64 does not decode") from None


def read_image_file(path: str | Path, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """A local picture, checked like any upload."""
    path = Path(path)
    if not path.is_file():
        raise LmstackError(f"no image file at {path}")
    return decode_image(path.read_bytes(), max_pixels)


def to_pixels(images, size: int) -> torch.Tensor:
    """PIL images -> (N, 3, size, size) float32 in [-1, 1]; a picture of another size is resized (bicubic)."""
    out = []
    for img in images:
        if img.mode != "RGB":
            img = img.convert("RGB")
        if img.size != (size, size):
            img = img.resize((size, size), Image.BICUBIC)
        out.append(np.asarray(img, dtype=np.uint8))
    arr = torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2).float()
    return arr / 127.5 - 1.0


def from_pixels(x: torch.Tensor) -> list[Image.Image]:
    """(N, 3, S, S) in [-1, 1] -> PIL images (for report grids and reconstructions)."""
    arr = ((x.detach().float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(a) for a in arr]


def image_hash(img: Image.Image) -> str:
    """A content hash of the decoded pixels: the same picture sent as PNG or as a re-encoded PNG keys alike."""
    rgb = img.convert("RGB")
    h = hashlib.sha256(f"{rgb.size[0]}x{rgb.size[1]}".encode())
    h.update(rgb.tobytes())
    return h.hexdigest()
