"""The HTTP API's shapes: the request model, its translation to a GenerationRequest, errors.

POST /v1/videos takes OpenAI Videos API fields (prompt, model, size "WxH", seconds,
input_reference) plus cineray's own (frames, fps, negative_prompt, seed, guidance, steps,
sampler, camera {motion, speed, focal_length_mm, hold_background, guidance}, upscale, n,
callback_url).
Every error is JSON: {"error": {"message", "type", "param", "code"}}; `param` names the field
("size", "camera.motion") so a client can point at it.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import math
import secrets
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

MODELS = ("cineray-tiny",)
DEFAULT_FRAMES = 17  # the tiny family's base clip: 1 + 4k frames, 2 s at 8 fps


class ApiError(Exception):
    """An HTTP error answered as the API's JSON error object."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None,
                 headers: dict | None = None, **extra):
        super().__init__(message)
        self.status, self.headers = status, headers or {}
        self.body = {"error": {"message": message, "type": type, "param": param, "code": code,
                               **extra}}


class Camera(BaseModel):
    model_config = ConfigDict(extra="forbid")
    motion: str | None = Field(None, description="static, pan_left, pan_right, tilt_up, ...")
    speed: float | None = Field(None, ge=0, description="Camera speed (default: the world's).")
    focal_length_mm: float = Field(50.0, gt=0)
    hold_background: bool = Field(True, description="With motion 'static' (or none, where "
                                  "the first window reads as still): hold the background "
                                  "still.")
    guidance: float | None = Field(None, ge=0, le=20, description="Camera guidance: push the "
                                   "asked motion further from a still camera (0 = off).")


class VideoRequest(BaseModel):
    """POST /v1/videos."""

    model_config = ConfigDict(extra="forbid")
    prompt: str = Field(..., min_length=1, max_length=4000)
    model: Literal["cineray-tiny"] = "cineray-tiny"
    size: str = Field("32x32", description="Base size 'WxH' (before upscaling).")
    seconds: float | None = Field(None, gt=0, le=600, description="Duration (or give frames).")
    frames: int | None = Field(None, ge=1, description="Frames at the base frame rate.")
    fps: float = Field(8.0, gt=0, le=120)
    negative_prompt: str = Field("", max_length=4000)
    seed: int | None = Field(None, ge=0, lt=2**63, description="Default: a random seed.")
    guidance: float | None = Field(None, ge=0, le=50)
    steps: int | None = Field(None, ge=1, le=500)
    sampler: Literal["euler", "heun"] | None = None
    camera: Camera | None = None
    upscale: Literal["none", "spatial", "full"] = "none"
    n: int = Field(1, ge=1, le=4, description="Samples (seeds seed .. seed + n - 1).")
    input_reference: str | None = Field(None, description="First frame: a data: URL (PNG/JPEG).")
    callback_url: str | None = Field(None, pattern=r"^https?://", max_length=2000)

    @field_validator("size")
    @classmethod
    def _size(cls, v: str) -> str:
        w, x, h = v.lower().partition("x")
        if not (x and w.isdigit() and h.isdigit() and int(w) > 0 and int(h) > 0):
            raise ValueError(f"size must be 'WIDTHxHEIGHT' in pixels, e.g. '32x32', got {v!r}")
        return f"{int(w)}x{int(h)}"

    @property
    def width(self) -> int:
        return int(self.size.split("x")[0])

    @property
    def height(self) -> int:
        return int(self.size.split("x")[1])

    def frame_count(self) -> int:
        """frames, else seconds at fps (a 2 s clip at 8 fps: 17 frames, both ends included)."""
        if self.frames is not None:
            return self.frames
        if self.seconds is not None:
            return int(round(self.seconds * self.fps)) + 1
        return DEFAULT_FRAMES


def parse_request(data: dict) -> VideoRequest:
    """Validate a JSON/form body; ApiError 422 naming the field."""
    if not isinstance(data, dict):
        raise ApiError(422, "the body must be a JSON object", param=None, code="invalid_body")
    if isinstance(data.get("camera"), str):  # multipart forms carry the object as JSON text
        try:
            data = {**data, "camera": json.loads(data["camera"])}
        except json.JSONDecodeError:
            raise ApiError(422, "camera must be a JSON object, e.g. {\"motion\": \"pan_left\"}",
                           param="camera", code="invalid_value") from None
    try:
        req = VideoRequest.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        param = ".".join(str(p) for p in err["loc"]) or None
        msg = err["msg"].removeprefix("Value error, ")
        raise ApiError(422, f"{param}: {msg}" if param else msg, param=param,
                       code="invalid_value") from None
    if req.seconds is not None and req.frames is not None:
        raise ApiError(422, "give seconds or frames, not both", param="seconds",
                       code="invalid_value")
    return req


# Field of a GenerationRequest error message -> the API field it came from.
_PARAMS = {"camera": "camera.motion", "camera_speed": "camera.speed",
           "focal_length_mm": "camera.focal_length_mm",
           "hold_background": "camera.hold_background",
           "camera_guidance": "camera.guidance", "width": "size", "height": "size",
           "image": "input_reference", "frames": "frames", "fps": "fps", "seed": "seed",
           "steps": "steps", "guidance": "guidance", "sampler": "sampler", "upscale": "upscale",
           "prompt": "prompt", "negative_prompt": "negative_prompt"}


def param_of(message: str) -> str | None:
    """GenerationRequest errors start with the field's name: map it to the API's."""
    return _PARAMS.get(message.split(" ", 1)[0])


def decode_image(data: bytes | str, width: int, height: int):
    """A PNG/JPEG (bytes or a data: URL) -> uint8 (height, width, 3), centre-cropped/resized."""
    from cineray.pipelines.stages import load_image

    if isinstance(data, str):
        head, _, payload = data.partition(",")
        if not (head.startswith("data:image/") and head.endswith(";base64")):
            raise ApiError(422, "input_reference must be a data: URL of a PNG or JPEG "
                           "(data:image/png;base64,...)", param="input_reference",
                           code="invalid_value")
        try:
            data = base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError):
            raise ApiError(422, "input_reference is not valid base64", param="input_reference",
                           code="invalid_value") from None
    try:
        return load_image(io.BytesIO(data), (width, height))
    except ValueError:
        raise ApiError(422, "input_reference is not a readable PNG or JPEG image",
                       param="input_reference", code="invalid_value") from None


def to_record(req: VideoRequest, seed: int | None = None) -> dict:
    """The validated request as the job record stores it (no image bytes: those are a file)."""
    out = req.model_dump(exclude={"input_reference"})
    out.update(width=req.width, height=req.height, frames=req.frame_count(),
               seed=req.seed if req.seed is not None else (seed if seed is not None
                                                           else secrets.randbelow(2**31)),
               input_reference=None)
    return out


def generation_request(record: dict, image=None):
    """Record's request -> GenerationRequest (ValueError naming the field when invalid)."""
    from cineray.pipelines.stages import GenerationRequest

    cam = record.get("camera") or {}
    return GenerationRequest(
        prompt=record["prompt"], negative_prompt=record.get("negative_prompt", ""),
        seed=record["seed"], frames=record["frames"], fps=record["fps"],
        width=record["width"], height=record["height"], camera=cam.get("motion"),
        camera_speed=cam.get("speed"), focal_length_mm=cam.get("focal_length_mm", 50.0),
        hold_background=cam.get("hold_background", True), camera_guidance=cam.get("guidance"),
        guidance=record.get("guidance"),
        steps=record.get("steps"), sampler=record.get("sampler"), image=image,
        upscale=record.get("upscale", "none"))


def request_from_record(record: dict, jobs) -> object:
    """generation_request with the input image read back from the job's folder."""
    image = None
    if record.get("input_reference"):
        import numpy as np
        from PIL import Image

        with Image.open(io.BytesIO(jobs.read(record["input_reference"]))) as im:
            image = np.asarray(im.convert("RGB"), dtype=np.uint8).copy()
    return generation_request(record, image)


def png_bytes(image) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


def output_frames(record: dict) -> int:
    """Frames of the delivered clip (the temporal upscaler doubles the rate: 2T - 1)."""
    t = record["frames"]
    return 2 * t - 1 if record.get("upscale") == "full" else t


def budget_check(record: dict, budget: int) -> None:
    """frames x width x height of the base clip against the configured budget: 413."""
    cost = record["frames"] * record["width"] * record["height"]
    if cost > budget:
        side = int(math.sqrt(budget / record["frames"]))
        raise ApiError(413, f"request is over the budget: {record['frames']} frames x "
                       f"{record['width']}x{record['height']} = {cost:,} frame pixels; the limit "
                       f"is {budget:,} (e.g. {record['frames']} frames at most ~{side}x{side}, or "
                       f"fewer frames)", param="size", code="over_budget")
