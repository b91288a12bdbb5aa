"""One-process generation: the stages of stages.py chained as streams, window by window.

    text -> plan -> [keyframe pass] -> denoise the windows (jointly) -> for each: decode -> blend
         -> [hold a still camera's background] -> spatial x2 (chunked) -> temporal x2 (chunked)
         -> uint8 frames -> MP4

Windows flow through decode, blending and the upscalers as they finish, so no stage holds a
long clip in memory; only the finished uint8 frames grow with the clip's length. Windows
denoised jointly (WindowConfig.joint) finish together, then flow on the same way.
Task variants share the stream helpers: `generate` (text-to-video, or image-to-video when the
request holds an image), `image_to_video`, `extend`.
"""

from __future__ import annotations

import hashlib
import re
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace

import numpy as np
import torch

from cineray.evaluator import still_camera
from cineray.pipelines import provenance
from cineray.pipelines.conditioning import unspecified_camera
from cineray.pipelines.safety import check_prompt
from cineray.pipelines.stages import (
    Components,
    GenerationRequest,
    PromptEmbedding,
    decode,
    denoise_latents,
    denoise_window,
    denoise_windows,
    derive_seed,
    encode_images,
    encode_text,
    image_latent,
    prefix_frames,
    sampler_config,
    to_uint8,
    upscale,
    upscaler_context,
)
from cineray.pipelines.training import to_video
from cineray.pipelines.windows import Blender, WindowPlan, plan_windows
from cineray.storage import Storage

# progress(stage, fraction of the whole job's denoising steps done, in [0, 1])
ProgressFn = Callable[[str, float], None]


@dataclass
class GenerationResult:
    frames: np.ndarray  # uint8 (T, H, W, 3), after the upscalers
    fps: float
    preview: np.ndarray  # uint8 (T0, h, w, 3): the base-resolution frames
    timings: dict[str, float] = field(default_factory=dict)  # seconds per stage
    plan: WindowPlan | None = None
    seed: int = 0


class Timer:
    """Seconds per stage, summed over calls (the stages interleave as windows stream)."""

    def __init__(self):
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, stage: str):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[stage] = self.seconds.get(stage, 0.0) + time.perf_counter() - t0


class _Steps:
    """Turns the sampler's per-window step callbacks into one fraction for the whole job."""

    def __init__(self, progress: ProgressFn | None, windows: int):
        self.progress, self.total, self.done = progress, max(windows, 1), 0

    def window(self, stage: str, count: int = 1):
        """The step callback of `count` windows sampled together."""
        if self.progress is None:
            return None
        base, self.done = self.done, self.done + count
        return lambda i, n: self.progress(stage, (base + count * i / n) / self.total)


def check_request(components: Components, request: GenerationRequest) -> None:
    """The safety filter first (a blocked prompt raises BlockedPrompt before any stage runs),
    then checks that need the components: the base size against the latent grid."""
    check_prompt(request.prompt).raise_if_blocked()
    multiple = components.vae.spatial_factor * components.denoiser.cfg.patch[1]
    for name in ("width", "height"):
        v = getattr(request, name)
        if v % multiple:
            raise ValueError(f"{name} must be a multiple of {multiple} (VAE factor "
                             f"{components.vae.spatial_factor} x denoiser patch), got {v}")


# ---------------------------------------------------------------------------------------------
# Task variants
# ---------------------------------------------------------------------------------------------


def generate(components: Components, request: GenerationRequest,
             progress: ProgressFn | None = None) -> GenerationResult:
    """Text-to-video (image-to-video when request.image is set), any length."""
    check_request(components, request)
    timer = Timer()
    with timer("encode_text"):
        text = encode_text(components, request)
    plan = plan_windows(request.frames, request.fps, components.windows)
    first = None
    if request.image is not None:
        with timer("encode_image"):
            first = image_latent(components, request.image)
    steps = _Steps(progress, len(plan.all_windows()))
    base = base_frames(components, request, text, plan, first, timer, steps)
    return finish(components, request, base, request.frames, timer, plan)


def image_to_video(components: Components, request: GenerationRequest, image: np.ndarray,
                   progress: ProgressFn | None = None) -> GenerationResult:
    """Animate `image` (uint8 (H, W, 3)): it is held exactly as latent frame 0."""
    return generate(components, replace(request, image=image), progress)


def extend(components: Components, request: GenerationRequest, clip: np.ndarray,
           context: int = 5, progress: ProgressFn | None = None) -> GenerationResult:
    """Continue `clip` (uint8 (T, H, W, 3)) by request.frames frames: each step holds the last
    `context` frames (1 + 4m) as an exact latent prefix and samples the rest of a window."""
    check_request(components, request)
    if clip.ndim != 4 or clip.shape[1:] != (request.height, request.width, 3):
        raise ValueError(f"clip must be uint8 (T, {request.height}, {request.width}, 3), "
                         f"got {clip.shape}")
    limit = components.windows.frames - 4
    if (context - 1) % 4 or not 1 <= context <= min(limit, len(clip)):
        raise ValueError(f"context must be 1 + 4m frames, at most {limit} and at most the clip's "
                         f"{len(clip)} frames, got {context}")
    timer = Timer()
    with timer("encode_text"):
        text = encode_text(components, request)
    new = components.windows.frames - context  # new frames per step
    steps = _Steps(progress, -(-request.frames // new))
    base = extension_frames(components, request, text, clip, context, timer, steps)
    return finish(components, request, base, len(clip) + request.frames, timer, None,
                  given=len(clip))


# ---------------------------------------------------------------------------------------------
# Streams
# ---------------------------------------------------------------------------------------------


def base_frames(components: Components, request: GenerationRequest, text: PromptEmbedding,
                plan: WindowPlan, first: torch.Tensor | None, timer: Timer,
                steps: _Steps) -> Iterator[torch.Tensor]:
    """Finished base-resolution frames (1, 3, n, H, W) of `plan`, in order.

    first: (C, h, w) latent of the clip's first frame (image-to-video), or None. A plan with a
    keyframe pass renders it first (the same way, recursively) and encodes its frames as images.
    """
    keyframes = plan_keyframes(components, request, text, plan, first, timer, steps)
    blender = Blender(plan)
    stage = "denoise" if plan.windows[0].level == 0 else "denoise_keyframes"
    joint = None
    if plan.shared:  # the level's windows denoised together, then decoded one by one
        with timer(stage):
            joint = denoise_windows(components, request, text, plan.windows, keyframes,
                                    request.seed, plan.shared,
                                    steps.window(stage, len(plan.windows)))
    for window in plan.windows:
        if joint is not None:
            z = joint[window.index]
        else:
            with timer(stage):
                z = denoise_window(components, request, text, window, keyframes, request.seed,
                                   steps.window(stage))
        with timer("decode"):
            video = decode(components, z)
        with timer("blend"):
            done = blender.add(window, video)
        yield done


def plan_keyframes(components: Components, request: GenerationRequest, text: PromptEmbedding,
                   plan: WindowPlan, first: torch.Tensor | None, timer: Timer,
                   steps: _Steps) -> torch.Tensor | None:
    """The latents (N, C, h, w) the plan's windows are conditioned on: its keyframe pass,
    rendered first (recursively, as base_frames) and encoded as images, with the given first
    frame held as keyframe 0; just `first` for a one-window plan; None when nothing is given."""
    keyframes = None if first is None else first[None]
    if plan.keyframes is not None:
        images = torch.cat(list(base_frames(components, request, text, plan.keyframes.plan,
                                            first, timer, steps)), dim=2)  # (1, 3, count, H, W)
        with timer("encode_keyframes"):
            keyframes = encode_images(components, images[0].transpose(0, 1))
        if first is not None:
            keyframes[0] = first  # the given image itself, not its decode-encode round trip
    return keyframes


def extension_frames(components: Components, request: GenerationRequest, text: PromptEmbedding,
                     clip: np.ndarray, context: int, timer: Timer,
                     steps: _Steps) -> Iterator[torch.Tensor]:
    """The clip's own frames, then request.frames new ones, one window at a time."""
    video = to_video(torch.from_numpy(np.ascontiguousarray(clip))[None])  # (1, 3, T, H, W)
    yield video
    ctx, remaining, i = video[:, :, -context:], request.frames, 0
    while remaining > 0:
        new = min(remaining, components.windows.frames - context)
        latent_frames = 1 + -(-(context - 1 + new) // 4)
        with timer("encode_context"):
            prefix = components.vae.encode(ctx.to(components.device)).cpu()
        with timer("denoise"):
            z = denoise_latents(components, request, text, prefix_frames(prefix, latent_frames),
                                request.fps, derive_seed(request.seed, "extend", i),
                                steps.window("denoise"))
        with timer("decode"):
            out = decode(components, z)[:, :, context : context + new]
        yield out
        ctx = torch.cat([ctx, out], dim=2)[:, :, -context:]
        remaining, i = remaining - new, i + 1


# A still camera's background: a pixel within HOLD_LEVELS[0] grey levels of the plate is set to
# it, one beyond HOLD_LEVELS[1] is left alone, and one between is blended linearly.
HOLD_LEVELS = (8.0, 16.0)


def hold_background(chunks: Iterator[torch.Tensor], plate_frames: int, given: int = 0,
                    levels: tuple[float, float] = HOLD_LEVELS,
                    fps: float | None = None) -> Iterator[torch.Tensor]:
    """A still camera's frames (a stream of chunks (1, 3, n, H, W)) with the background held on
    one plate: the last of the `given` frames the caller supplied (an image-to-video first
    frame, the end of a clip being extended), else the per-pixel median of the first
    `plate_frames` frames.

    The world a locked-off shot films does not change behind its objects, but the decoder
    redraws the background from each latent frame, and the denoiser's latents of it differ a
    little from one to the next: a drift of a grey level or two. Pixels that stay near the plate
    are set to it; the objects (and whatever differs from the background by more than a few
    grey levels) pass unchanged, since a pixel moves by at most levels[1] grey levels and only
    towards the plate. The given frames pass unchanged. Streams: only the frames the plate
    needs are held back.

    fps: the camera was left to the prompt, so hold only if the first `plate_frames` frames
    (at this rate) read as a still camera (cineray.evaluator.still_camera); otherwise the
    stream passes unchanged."""
    lo, hi = (v / 127.5 for v in levels)  # grey levels -> the [-1, 1] scale
    need = max(given or plate_frames, plate_frames if fps else 0)
    buf, plate, hold, done = [], None, True, 0
    for chunk in chunks:
        if plate is None:
            buf.append(chunk)
            if sum(c.shape[2] for c in buf) < need:
                continue
            chunk, buf = torch.cat(buf, dim=2), []
            plate = _plate(chunk[:, :, : given or plate_frames], given)
            hold = fps is None or _still(chunk[:, :, :plate_frames], fps)
        yield _held(chunk, plate, lo, hi, max(0, given - done)) if hold else chunk
        done += chunk.shape[2]
    if buf:  # a stream shorter than the plate needs: its own median
        chunk = torch.cat(buf, dim=2)
        hold = fps is None or _still(chunk, fps)
        yield _held(chunk, _plate(chunk, 0), lo, hi, given) if hold else chunk


def _still(video: torch.Tensor, fps: float) -> bool:
    return still_camera(to_uint8(video), fps)


def _plate(video: torch.Tensor, given: int) -> torch.Tensor:
    return video[:, :, given - 1 : given] if given else video.median(dim=2, keepdim=True).values


def _held(video: torch.Tensor, plate: torch.Tensor, lo: float, hi: float,
          keep: int) -> torch.Tensor:
    d = (video - plate).abs().amax(dim=1, keepdim=True)  # the largest channel difference
    out = torch.lerp(video, plate.expand_as(video), ((hi - d) / (hi - lo)).clamp(0, 1))
    out[:, :, :keep] = video[:, :, :keep]
    return out


def upscale_stream(components: Components, kind: str, chunks: Iterator[torch.Tensor],
                   timer: Timer) -> Iterator[torch.Tensor]:
    """Run one upscaler stage over a stream of frame chunks (1, 3, n, H, W), in chunks of
    components.upscale_chunk frames with enough context on each side that the result equals
    upscaling the whole clip at once."""
    halo, step = upscaler_context(components, kind), components.upscale_chunk
    buf, buf_start, done = None, 0, 0  # buf holds frames [buf_start, ...) of the stream
    for chunk in chunks:
        buf = chunk if buf is None else torch.cat([buf, chunk], dim=2)
        while buf_start + buf.shape[2] - done >= step + halo:
            with timer(f"upscale_{kind}"):
                out = _upscale_span(components, kind, buf, buf_start, done, done + step, halo)
            done += step
            keep = max(done - halo, buf_start) - buf_start  # drop frames no chunk needs again
            buf, buf_start = buf[:, :, keep:], buf_start + keep
            yield out
    if buf is not None and buf_start + buf.shape[2] > done:
        with timer(f"upscale_{kind}"):
            out = _upscale_span(components, kind, buf, buf_start, done, None, halo)
        yield out


def _upscale_span(components, kind, buf, buf_start, a, b, halo) -> torch.Tensor:
    """Upscaled frames for input frames [a, b) of the stream (b None: to the end of the stream).
    Temporal stage: input frame i becomes output 2i and the midpoint to i + 1 output 2i + 1;
    the stream's last frame has no midpoint."""
    end = buf_start + buf.shape[2]
    lo, hi = max(a - halo, buf_start), end if b is None else b + halo
    y = upscale(components, kind, buf[:, :, lo - buf_start : hi - buf_start])
    if kind == "spatial":
        return y[:, :, a - lo : (end if b is None else b) - lo]
    return y[:, :, 2 * (a - lo) : (y.shape[2] if b is None else 2 * (b - lo))]


def finish(components: Components, request: GenerationRequest, base: Iterator[torch.Tensor],
           frames: int, timer: Timer, plan: WindowPlan | None,
           given: int | None = None) -> GenerationResult:
    """Hold a still camera's background (request.hold_background; the plate from the plan's
    first window, so a caller without the window config can pass the plan), upscale the stream of
    `frames` base frames as the request asks; collect the uint8 output and the base-resolution
    preview into arrays allocated once (no list + concatenate copy). given: leading frames the
    caller supplied, which stay as they are (default: the request's image, if any)."""
    if request.hold_background and (request.camera == "static" or unspecified_camera(request.camera)):
        given = (request.image is not None) if given is None else given
        auto = None if request.camera == "static" else request.fps  # the prompt chose: look
        plate = plan.windows[0].length if plan is not None else components.windows.frames
        base = hold_background(base, plate, int(given), fps=auto)
    preview = _Collector(frames, request.height, request.width)
    stream, fps = preview.tee(base), request.fps
    size, length = (request.height, request.width), frames
    if request.upscale in ("spatial", "full"):
        stream = upscale_stream(components, "spatial", stream, timer)
        size = (2 * request.height, 2 * request.width)
    if request.upscale == "full":
        stream, fps = upscale_stream(components, "temporal", stream, timer), fps * 2
        length = 2 * frames - 1
    out = _Collector(length, *size)
    for chunk in stream:
        out.add(chunk)
    return GenerationResult(frames=out.done(), fps=fps, preview=preview.done(),
                            timings=dict(timer.seconds), plan=plan, seed=request.seed)


class _Collector:
    """Fills a preallocated uint8 (T, H, W, 3) array from chunks (1, 3, n, H, W)."""

    def __init__(self, frames: int, height: int, width: int):
        self.array, self.n = np.empty((frames, height, width, 3), np.uint8), 0

    def add(self, chunk: torch.Tensor) -> None:
        k = chunk.shape[2]
        self.array[self.n : self.n + k] = to_uint8(chunk)
        self.n += k

    def tee(self, stream: Iterator[torch.Tensor]) -> Iterator[torch.Tensor]:
        for chunk in stream:
            self.add(chunk)
            yield chunk

    def done(self) -> np.ndarray:
        if self.n != len(self.array):
            raise RuntimeError(f"expected {len(self.array)} frames, the stream gave {self.n}")
        return self.array


# ---------------------------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------------------------


def request_digest(request: GenerationRequest) -> str:
    """10 hex digits over every request field: different settings, different digest."""
    h = hashlib.blake2b(digest_size=5)
    for name, value in sorted(vars(request).items()):
        h.update(name.encode() + (value.tobytes() if isinstance(value, np.ndarray)
                                  else repr(value).encode()))
    return h.hexdigest()


def default_render_path(request: GenerationRequest) -> str:
    """renders/<prompt-slug>-seed<seed>-<digest>.mp4 (relative to the storage root); the digest
    covers every request field, so different settings never overwrite each other."""
    slug = re.sub(r"[^a-z0-9]+", "-", request.prompt.lower()).strip("-")[:48] or "untitled"
    return f"renders/{slug}-seed{request.seed}-{request_digest(request)}.mp4"


def manifest_info(components: Components, request: GenerationRequest,
                  job_id: str | None = None) -> provenance.ManifestInfo:
    """What the watermark and the C2PA manifest of this request's clip state. job_id defaults
    to one derived from the request (same request, same id), as one-process renders have no
    job record."""
    model = provenance.model_id({"vae": components.vae, "denoiser": components.denoiser,
                                 "upscaler_spatial": components.upscaler_spatial,
                                 "upscaler_temporal": components.upscaler_temporal})
    job = job_id or f"render-{request_digest(request)}"
    return provenance.ManifestInfo(model, request.prompt, job,
                                   provenance.Payload.for_job(model, job))


def render_to_file(components: Components, request: GenerationRequest, out: str | None = None,
                   storage: Storage | None = None, progress: ProgressFn | None = None,
                   provenance_cfg: provenance.ProvenanceConfig | None = None,
                   ) -> tuple[str, GenerationResult]:
    """Generate, then watermark, mux and sign (provenance.package: always, whatever the
    request says) and write the MP4 atomically; returns (absolute URI, result).
    out: a local path, s3:// URI or a path under the storage root (default: renders/...).
    provenance_cfg: watermark key and signing material (None: environment, then defaults)."""
    result = generate(components, request, progress)
    data = provenance.package(result.frames, result.fps, manifest_info(components, request),
                              provenance_cfg, timings=result.timings)
    storage = storage or Storage()
    return storage.write_bytes(out or default_render_path(request), data), result


__all__ = ["GenerationResult", "generate", "image_to_video", "extend", "render_to_file",
           "sampler_config"]
