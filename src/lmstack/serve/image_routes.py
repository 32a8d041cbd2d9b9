"""Pictures from text in the server: /v1/images/generations (`lmstack serve --diffusion DIR`), as OpenAI's.

POST /v1/images/generations, JSON (the openai client's `images.generate`):
    prompt           1 to MAX_PROMPT_CHARS characters (DALL-E 2's limit)
    model            any name: the server has one generator, and OpenAI's answer does not echo it
    n                1 to MAX_IMAGES pictures (one batch; seeds seed, seed + 1, ... as the generator draws them)
    size             "SxS" equal to the generator's size, or "auto" / absent; any other size is a 400 naming the
                     supported one (the model draws at one resolution; resizing would fake detail)
    response_format  b64_json (the default here: a base64 PNG per picture); url is a 400, since nothing is hosted
    user             accepted (OpenAI's end-user id), unused
    seed, steps, sampler, guidance   lmstack extensions passed to the generator (it checks their ranges: a 400
                     naming the field)
Unknown fields (quality, style, ...) are a 400 naming them, as in the other routes.

The answer is {"created", "data": [{"b64_json": PNG}, ...]}; where the generator warns (a prompt word it does not
know, say), the warnings are in an extra "warnings" list, still with status 200 (the openai client keeps unknown
fields: `resp.warnings`). The generator runs in the server's worker pool, one call at a time (a lock).
Without --diffusion the route answers 404 naming the flag. With --guard, a prompt the moderator blocks is a 400
with code content_policy_violation (OpenAI's answer to a refused prompt), naming the categories.

Usage (server side):
    app = create_app(aengine, config, images=ImageGenerator.from_dir("runs/diffusion"))
"""
from __future__ import annotations

import base64
import io
import threading
import time
from typing import Any

import numpy as np
from fastapi import FastAPI
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field

from lmstack.errors import LmstackError
from lmstack.serve.engine_bridge import ServerState
from lmstack.serve.errors import APIError
from lmstack.serve.guard_routes import refuse_flagged
from lmstack.serve.limits import reject_lone_surrogates

MAX_IMAGES = 4
MAX_PROMPT_CHARS = 1000
MAX_STEPS = 250
"""Most denoising steps one request may ask for (the generator's default is 50): bounds a request's work."""


class ImageGenerationRequest(BaseModel):
    """The /v1/images/generations body."""
    model_config = ConfigDict(extra="forbid")
    prompt: str
    model: str | None = None
    n: int = Field(default=1, ge=1, le=MAX_IMAGES)
    size: str | None = None
    response_format: str | None = None
    user: str | None = None
    seed: int = Field(default=0, ge=0, le=2 ** 31 - 1)
    """lmstack extension: the generator's seed (the same request gives the same pictures)."""
    steps: int | None = Field(default=None, ge=1, le=MAX_STEPS)
    """lmstack extension: denoising steps, 1 to MAX_STEPS (default: the generator's)."""
    sampler: str | None = None
    """lmstack extension: the sampler (default: the generator's)."""
    guidance: float | None = None
    """lmstack extension: classifier-free guidance scale (default: the generator's)."""


def png_b64(picture: np.ndarray) -> str:
    """A uint8 (S, S, 3) picture -> base64 PNG text."""
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(picture, dtype=np.uint8)).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def check_image_request(generator: Any, req: ImageGenerationRequest) -> None:
    """APIError(400) naming the field for what the generator cannot draw."""
    reject_lone_surrogates(req)
    if not req.prompt.strip():
        raise APIError(400, "prompt is empty; describe the picture to draw", param="prompt")
    if len(req.prompt) > MAX_PROMPT_CHARS:
        raise APIError(400, f"prompt has {len(req.prompt)} characters; this server takes at most {MAX_PROMPT_CHARS}",
                       param="prompt")
    if req.response_format not in (None, "b64_json"):
        hint = "; this server hosts no files, so pictures come back inline" if req.response_format == "url" else ""
        raise APIError(400, f"response_format={req.response_format!r} is not supported; use b64_json{hint}",
                       param="response_format")
    side = int(generator.size)
    if req.size not in (None, "auto", f"{side}x{side}"):
        raise APIError(400, f"size={req.size!r} is not supported; this generator draws {side}x{side} pictures",
                       param="size")


def generate_now(generator: Any, lock: threading.Lock, req: ImageGenerationRequest, guard: Any = None) -> dict:
    """The /v1/images/generations answer (runs in the worker pool); with a guard, a blocked prompt is a 400."""
    check_image_request(generator, req)
    refuse_flagged(guard, req.prompt, "prompt", "draw")
    options = {k: v for k in ("steps", "sampler", "guidance") if (v := getattr(req, k)) is not None}
    try:
        with lock:
            pictures, warnings = generator.generate(req.prompt, n=req.n, seed=req.seed, **options)
    except (LmstackError, ValueError) as e:  # a bad steps / sampler / guidance: the generator names it
        message = str(e)
        param = next((k for k in (*options, "prompt") if message.startswith(k) or f"{k}=" in message
                      or f"the {k} " in message), None)
        raise APIError(400, message, param=param) from None
    body: dict[str, Any] = {"created": int(time.time()), "data": [{"b64_json": png_b64(p)} for p in pictures]}
    if warnings:
        body["warnings"] = list(warnings)
    return body


def add_image_routes(app: FastAPI, state: ServerState, auth: list, generator: Any = None, guard: Any = None) -> None:
    """Register /v1/images/generations on `app`, behind `auth` (the API key); `guard` (a safety.guard.Guard)
    judges each prompt first."""
    lock = threading.Lock()

    @app.post("/v1/images/generations", dependencies=auth)
    async def generations(body: ImageGenerationRequest):
        if generator is None:
            raise APIError(404, "this server has no image generator; start it with --diffusion DIR (a directory "
                                "written by lmstack.multimodal.diffusion's ImageGenerator.save)")
        return await state.run(generate_now, generator, lock, body, guard)
