"""Pictures in chat requests: OpenAI `image_url` content parts -> checked PIL images -> placeholder ids for a VLM.

A part looks like {"type": "image_url", "image_url": {"url": "data:image/png;base64,..."}}. The server reads:
- data: URLs (base64 image data), decoded and checked by multimodal/images.py;
- local files ("file:///x.png" or a plain path) only when started with --allow_local_images (a client could
  otherwise read any picture the server's user can); without it, a 400 that names the flag;
- nothing from the network (an http(s) URL is a 400: the server fetches nothing).
Every refusal is a 400 naming the part (`messages.K.content.J`) and what is wrong: a corrupt image, a CMYK or
16-bit one, one over the pixel cap (checked from the header, before decoding), base64 that does not decode, too
many images in one request. A server whose model takes no images answers "this model does not take images".

Each picture becomes a marker in the message text; once the chat template has rendered the ids, `RequestImages`
swaps each marker for the picture's placeholder ids (multimodal/engine_adapter.py: encoded once, keyed by its
pixels, so the prefix cache keys on the picture) and holds the lease that pins the pictures until the request ends.

Usage:
    served = ServedImages(model, tokenizer, ImageLimits(max_images=4, allow_local_images=False))
    images = served.request()
    text = images.part_text(part, "messages.0.content.1")   # the marker, or APIError(400)
    ids = images.expand(rendered_ids)                         # then images.release() when the request is over
"""
from __future__ import annotations

import base64
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from lmstack.errors import LmstackError
from lmstack.multimodal.engine_adapter import ImageLease, ImagePrompt, VLMEngineModel
from lmstack.multimodal.images import decode_data_url, decode_image, read_image_file
from lmstack.serve.errors import APIError

NO_IMAGES = ("this model does not take images; send text only, or serve a vision-language model "
             "(lmstack serve --model VLM_DIR)")


@dataclass
class ImageLimits:
    max_images: int = 4
    """Most image parts one chat request may carry (400 above)."""
    max_pixels: int = 2048 * 2048
    """Largest picture, width x height, read from its header before decoding (400 above)."""
    allow_local_images: bool = False
    """Let image_url name a file on the server's disk (file:///x.png or a path); off: a 400 naming this flag."""

    def __post_init__(self) -> None:
        for name in ("max_images", "max_pixels"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name}={v!r} is not allowed; {name} must be an integer >= 1")


def part_url(part: Any, where: str) -> str:
    """The URL of an image_url part ({"url": ...} or, as some clients send it, the URL itself)."""
    spec = getattr(part, "image_url", None)
    url = spec.get("url") if isinstance(spec, dict) else spec
    if not isinstance(url, str) or not url.strip():
        raise APIError(400, f"{where}: an image_url part needs image_url.url (a data:image/...;base64 URL)",
                       param=where)
    return url.strip()


def read_part(part: Any, limits: ImageLimits, where: str) -> Image.Image:
    """An image_url part -> a checked RGB picture, or APIError(400) naming the part and the problem."""
    url = part_url(part, where)
    scheme = url.split(":", 1)[0].lower() if ":" in url[:12] else ""
    try:
        if scheme == "data":
            return decode_image(decode_data_url(url), limits.max_pixels)
        if scheme in ("http", "https", "ftp"):
            raise APIError(400, f"{where}: image URLs must be data: URLs (data:image/png;base64,...); this server "
                                "fetches nothing from the network", param=where, code="invalid_image")
        if scheme not in ("", "file") and len(scheme) > 1:  # (a one-letter "scheme" is a Windows drive)
            raise APIError(400, f"{where}: unsupported image URL scheme {scheme!r}; send a data: URL",
                           param=where, code="invalid_image")
        if not limits.allow_local_images:
            raise APIError(400, f"{where}: local image paths are off on this server (start it with "
                                "--allow_local_images to allow them); send a data: URL", param=where,
                           code="invalid_image")
        path = Path(url[len("file://"):] if scheme == "file" else url)
        return read_image_file(path, limits.max_pixels)
    except LmstackError as e:
        raise APIError(400, f"{where}: {e}", param=where, code="invalid_image") from None


def image_note(_: Any, __: str) -> str:
    """What a picture becomes where only a request's text is read (the guard's input check, the feedback log)."""
    return "[image]"


class RequestImages:
    """The pictures of one chat request: image parts -> markers, rendered ids -> placeholder ids, and the lease."""

    def __init__(self, served: "ServedImages"):
        self.limits = served.limits
        self.prompt = ImagePrompt(served.model, served.tokenizer)
        self.lease = ImageLease()

    def part_text(self, part: Any, where: str) -> str:
        if len(self.prompt.images) >= self.limits.max_images:
            raise APIError(400, f"{where}: too many images; this server takes at most {self.limits.max_images} per "
                                "request (--max_images)", param=where, code="limit_exceeded")
        return self.prompt.add(read_part(part, self.limits, where))

    @property
    def count(self) -> int:
        return len(self.prompt.images)

    def expand(self, ids: list[int]) -> list[int]:
        try:
            ids, self.lease = self.prompt.expand(ids)
        except LmstackError as e:
            raise APIError(400, str(e), param="messages", code="invalid_image") from None
        return ids

    def release(self) -> None:
        self.lease.release()


class ServedImages:
    """What a server serving a VLM holds for pictures: the engine's model (its image store) and the limits."""

    def __init__(self, model: VLMEngineModel, tokenizer: Any, limits: ImageLimits | None = None):
        self.model, self.tokenizer = model, tokenizer
        self.limits = limits or ImageLimits()

    def request(self) -> RequestImages:
        return RequestImages(self)

    def stats(self) -> dict:
        store = self.model.store
        return {"images_stored": len(store), "images_encoded": store.encoded, "images_reused": store.reused}


def file_data_url(path: str | Path, max_pixels: int = 2048 * 2048) -> str:
    """A local picture, checked like any upload, as a data: URL (what `lmstack chat --image` sends)."""
    read_image_file(path, max_pixels)  # checked first: LmstackError naming the file's problem
    with Image.open(Path(path)) as img:
        fmt = (img.format or "png").lower()
    return f"data:image/{fmt};base64," + base64.b64encode(Path(path).read_bytes()).decode()
