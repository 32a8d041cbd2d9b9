"""The shapes world's pictures: a Scene (a list of coloured shapes on a background) and its renderer.

A Scene says exactly what is in a picture -- every object's shape, colour, size, centre, radius and
z-order (list order: later objects are drawn over earlier ones) -- so every question about the picture
is answered from the Scene, never from the pixels or the text. render(scene) is a pure function of the
scene: the same scene gives the same pixels (the noise texture draws from the scene's texture_seed).

Shapes are drawn without anti-aliasing, so each object's pixels carry exactly its named colour, and
occlusion(scene) can say, from per-object masks, what fraction of each object is still visible.

Usage:
    from lmstack.multimodal.shapes import Obj, Scene, render, occlusion
    scene = Scene(size=64, background="gray", texture="stripes", texture_seed=0,
                  objects=(Obj("circle", "red", "large", 20, 30, 9), Obj("star", "blue", "small", 44, 30, 5)))
    image = render(scene)                  # PIL.Image, RGB, 64x64
    occlusion(scene)                       # [1.0, 1.0]: fraction of each object left visible
    Scene.from_dict(scene.to_dict()) == scene
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw

from lmstack.errors import LmstackError

SHAPES = ("circle", "square", "triangle", "star", "diamond", "cross")
COLOURS = {
    "red": (220, 30, 30), "green": (30, 170, 50), "blue": (40, 70, 220), "yellow": (240, 220, 30),
    "purple": (140, 50, 180), "orange": (250, 140, 20), "cyan": (30, 200, 220), "pink": (250, 130, 190),
}
# backgrounds are neutral greys, never one of the object colours, so an object never vanishes into them
BACKGROUNDS = {"white": (245, 245, 245), "gray": (128, 128, 128), "black": (15, 15, 15)}
TEXTURES = ("plain", "stripes", "dots", "noise")
SIZES = {"small": 0.08, "large": 0.14}  # radius as a fraction of the image side
MIN_SIDE, MAX_SIDE = 32, 512


def _check_name(kind: str, value: str, allowed) -> None:
    if value not in allowed:
        raise LmstackError(f"unknown {kind} {value!r}; allowed: {', '.join(allowed)}")


def check_side(size: int) -> None:
    """Raise unless `size` is an allowed image side in pixels (32..512)."""
    if not isinstance(size, int) or isinstance(size, bool) or not MIN_SIDE <= size <= MAX_SIDE:
        raise LmstackError(f"size must be an integer in {MIN_SIDE}..{MAX_SIDE} pixels, got {size!r}")


def radius_for(size_name: str, side: int) -> int:
    """The radius in pixels of a `size_name` ('small' or 'large') object in a `side`-pixel image."""
    _check_name("size", size_name, SIZES)
    return max(2, round(SIZES[size_name] * side))


@dataclass(frozen=True)
class Obj:
    """One shape: what it is, and where (centre cx, cy and radius in pixels; its bbox is the square around it)."""

    shape: str
    colour: str
    size: str
    cx: int
    cy: int
    radius: int

    def __post_init__(self):
        _check_name("shape", self.shape, SHAPES)
        _check_name("colour", self.colour, COLOURS)
        _check_name("size", self.size, SIZES)
        if self.radius < 1:
            raise LmstackError(f"object radius must be >= 1 pixel, got {self.radius}")

    @property
    def bbox(self) -> tuple[int, int, int, int]:
        """(x0, y0, x1, y1), inclusive pixel corners of the square that holds the shape."""
        return (self.cx - self.radius, self.cy - self.radius, self.cx + self.radius, self.cy + self.radius)

    def to_dict(self) -> dict:
        return {"shape": self.shape, "colour": self.colour, "size": self.size, "cx": self.cx, "cy": self.cy,
                "radius": self.radius, "bbox": list(self.bbox)}


@dataclass(frozen=True)
class Scene:
    """A whole picture: side length, background colour and texture, and the objects in z-order (first = bottom)."""

    size: int
    background: str = "gray"
    texture: str = "plain"
    texture_seed: int = 0
    objects: tuple[Obj, ...] = field(default_factory=tuple)

    def __post_init__(self):
        check_side(self.size)
        _check_name("background", self.background, BACKGROUNDS)
        _check_name("texture", self.texture, TEXTURES)
        object.__setattr__(self, "objects", tuple(self.objects))

    def to_dict(self) -> dict:
        visible = occlusion(self)
        objs = [dict(o.to_dict(), z=i, visible=round(v, 4), occluded=v < 1.0)
                for i, (o, v) in enumerate(zip(self.objects, visible))]
        return {"size": self.size, "background": self.background, "texture": self.texture,
                "texture_seed": self.texture_seed, "objects": objs}

    @classmethod
    def from_dict(cls, d: dict) -> "Scene":
        """The Scene a to_dict() wrote; derived fields (bbox, z, visible, occluded) are recomputed, not read."""
        try:
            objs = tuple(Obj(o["shape"], o["colour"], o["size"], int(o["cx"]), int(o["cy"]), int(o["radius"]))
                         for o in d["objects"])
            return cls(int(d["size"]), d["background"], d["texture"], int(d["texture_seed"]), objs)
        except (KeyError, TypeError) as e:
            raise LmstackError(f"malformed scene: missing or bad field {e}") from None


def _polygon(obj: Obj) -> list[tuple[float, float]]:
    """The outline of a polygonal shape around its centre (y grows downwards, so triangles point up)."""
    cx, cy, r = obj.cx, obj.cy, obj.radius
    if obj.shape == "square":
        return [(cx - r, cy - r), (cx + r, cy - r), (cx + r, cy + r), (cx - r, cy + r)]
    if obj.shape == "diamond":
        return [(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)]
    if obj.shape == "triangle":
        return [(cx, cy - r), (cx + r, cy + r), (cx - r, cy + r)]
    if obj.shape == "star":
        pts = []
        for k in range(10):  # five outer points alternating with five inner ones
            rad = r if k % 2 == 0 else r * 0.45
            angle = -math.pi / 2 + k * math.pi / 5
            pts.append((cx + rad * math.cos(angle), cy + rad * math.sin(angle)))
        return pts
    if obj.shape == "cross":
        w = max(1, round(r / 3))
        return [(cx - w, cy - r), (cx + w, cy - r), (cx + w, cy - w), (cx + r, cy - w), (cx + r, cy + w),
                (cx + w, cy + w), (cx + w, cy + r), (cx - w, cy + r), (cx - w, cy + w), (cx - r, cy + w),
                (cx - r, cy - w), (cx - w, cy - w)]
    raise LmstackError(f"unknown shape {obj.shape!r}; allowed: {', '.join(SHAPES)}")


def _draw(draw: ImageDraw.ImageDraw, obj: Obj, fill) -> None:
    if obj.shape == "circle":
        draw.ellipse(obj.bbox, fill=fill)
    else:
        draw.polygon(_polygon(obj), fill=fill)


def object_mask(obj: Obj, side: int) -> np.ndarray:
    """A (side, side) bool array: the pixels `obj` covers when drawn alone."""
    mask = Image.new("L", (side, side), 0)
    _draw(ImageDraw.Draw(mask), obj, 255)
    return np.asarray(mask) > 0


def occlusion(scene: Scene) -> list[float]:
    """For each object, the fraction of its own pixels that no later (higher-z) object covers."""
    masks = [object_mask(o, scene.size) for o in scene.objects]
    out = []
    for i, m in enumerate(masks):
        covered = np.zeros_like(m)
        for later in masks[i + 1:]:
            covered |= later
        total = int(m.sum())
        out.append(1.0 if total == 0 else float((m & ~covered).sum()) / total)
    return out


def _background(scene: Scene) -> np.ndarray:
    """The background pixels: a plain colour, or the colour with a texture in a slightly lighter/darker shade."""
    side = scene.size
    base = np.array(BACKGROUNDS[scene.background], dtype=np.int16)
    shade = base + (-35 if base.mean() > 128 else 35)  # darker on light backgrounds, lighter on dark
    img = np.broadcast_to(base, (side, side, 3)).copy()
    yy, xx = np.mgrid[0:side, 0:side]
    period = max(4, side // 8)
    if scene.texture == "stripes":
        img[((xx + yy) // (period // 2)) % 2 == 1] = shade
    elif scene.texture == "dots":
        img[((xx % period) - period // 2) ** 2 + ((yy % period) - period // 2) ** 2 <= max(1, period // 5) ** 2] = shade
    elif scene.texture == "noise":
        rng = np.random.default_rng(scene.texture_seed)
        img = img + rng.integers(-25, 26, size=(side, side, 1), dtype=np.int16)
    return np.clip(img, 0, 255).astype(np.uint8)


def render(scene: Scene) -> Image.Image:
    """The RGB picture of `scene`: background, then each object in z-order in its exact named colour."""
    image = Image.fromarray(_background(scene), mode="RGB")
    draw = ImageDraw.Draw(image)
    for obj in scene.objects:
        _draw(draw, obj, COLOURS[obj.colour])
    return image


__all__ = ["SHAPES", "COLOURS", "BACKGROUNDS", "TEXTURES", "SIZES", "Obj", "Scene", "render", "occlusion",
           "object_mask", "radius_for", "check_side"]
