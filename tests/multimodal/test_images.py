"""multimodal/images.py: untrusted image bytes are decoded or refused with the problem named."""
import base64
import io

import numpy as np
import pytest
import torch
from PIL import Image

from lmstack.errors import LmstackError
from lmstack.multimodal.images import decode_data_url, decode_image, from_pixels, image_hash, read_image_file, \
    to_pixels


def _png(img: Image.Image, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def test_rgb_round_trip_and_pixels():
    img = Image.new("RGB", (8, 8), (255, 0, 0))
    got = decode_image(_png(img))
    assert got.mode == "RGB" and got.getpixel((3, 3)) == (255, 0, 0)
    x = to_pixels([got], size=8)
    assert x.shape == (1, 3, 8, 8) and torch.allclose(x[0, :, 0, 0], torch.tensor([1.0, -1.0, -1.0]))
    assert from_pixels(x)[0].getpixel((0, 0)) == (255, 0, 0)
    assert to_pixels([got], size=4).shape == (1, 3, 4, 4)


def test_alpha_composites_on_white_and_grey_converts():
    rgba = Image.new("RGBA", (4, 4), (0, 0, 0, 0))
    assert decode_image(_png(rgba)).getpixel((0, 0)) == (255, 255, 255)
    grey = Image.new("L", (4, 4), 10)
    assert decode_image(_png(grey)).getpixel((0, 0)) == (10, 10, 10)


def test_refusals_name_the_problem(tmp_path):
    with pytest.raises(LmstackError, match="could not be read"):
        decode_image(b"definitely not a picture")
    with pytest.raises(LmstackError, match="empty"):
        decode_image(b"")
    with pytest.raises(LmstackError, match="CMYK"):
        decode_image(_png(Image.new("CMYK", (4, 4)), "JPEG"))
    sixteen = Image.fromarray(np.full((4, 4), 40000, dtype=np.uint16))
    with pytest.raises(LmstackError, match="16-bit"):
        decode_image(_png(sixteen))
    with pytest.raises(LmstackError, match="over the cap"):
        decode_image(_png(Image.new("RGB", (64, 64))), max_pixels=1000)
    data = _png(Image.new("RGB", (64, 64), (1, 2, 3)))
    with pytest.raises(LmstackError, match="corrupt or cut short|could not be read"):
        decode_image(data[: len(data) // 2])
    with pytest.raises(LmstackError, match="no image file"):
        read_image_file(tmp_path / "missing.png")


def test_data_urls():
    data = _png(Image.new("RGB", (4, 4), (0, 9, 0)))
    url = "data:image/png;base64," + base64.b64encode(data).decode()
    assert decode_data_url(url) == data
    with pytest.raises(LmstackError, match="does not decode"):
        decode_data_url("data:image/png;base64,@@@not-base64@@@")
    with pytest.raises(LmstackError, match="must be a data URL"):
        decode_data_url("http://example.com/cat.png")
    with pytest.raises(LmstackError, match="not base64"):
        decode_data_url("data:image/png,rawbytes")


def test_hash_keys_on_pixels_not_encoding():
    img = Image.new("RGB", (6, 6), (5, 6, 7))
    a = decode_image(_png(img))
    b = decode_image(_png(img.convert("RGBA")))  # another encoding of the same picture
    assert image_hash(a) == image_hash(b)
    assert image_hash(a) != image_hash(Image.new("RGB", (6, 6), (5, 6, 8)))
