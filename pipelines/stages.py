"""Generation stages: plain functions over loaded components (no Ray, house rule 4).

    encode_text -> plan_windows (windows.py) -> denoise_window -> decode -> upscale -> mux

Each stage takes and returns tensors or small dataclasses, so the same functions run in one
process (generate.py), behind one Ray Serve deployment per stage, and in batch jobs. Videos in
torch are float (B, 3, T, H, W) in [-1, 1]; latents are the VAE's normalised (B, C, T', h, w).
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import hashlib
import json
import logging
import os
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from cineray.models.dit import DIT_PRESETS, DiT
from cineray.models.text_encoder import TEXT_PRESETS, TextEmbedding, TextEncoder
from cineray.models.upscaler import UPSCALER_PRESETS, Upscaler
from cineray.models.video_vae import VAE_PRESETS, VideoVAE
from cineray.pipelines.conditioning import (
    CachedTextEncoder,
    guided_conditioning,
    unspecified_camera,
)
from cineray.pipelines.flow import SAMPLERS, FlowConfig, RectifiedFlow, SamplerConfig, SamplingRun
from cineray.pipelines.training import to_video
from cineray.pipelines.weights import DEFAULT_CHECKPOINT, build, load_component
from cineray.pipelines.windows import Window, WindowConfig, average_shared
from cineray.video import write_mp4
from cineray.world import CAMERAS

logger = logging.getLogger(__name__)

UPSCALE_MODES = ("none", "spatial", "full")  # full = spatial x2, then temporal x2
DEFAULT_CAMERA_SPEED = 0.15  # the middle of the world's camera speed range (cineray.world)


@dataclass
class GenerationRequest:
    """One clip to render. Checked on creation; errors name the field and the fix."""

    prompt: str
    negative_prompt: str = ""
    seed: int = 0
    frames: int = 17  # output frames at the base frame rate (the upscale "full" gives 2T - 1)
    fps: float = 8.0
    width: int = 32  # base resolution: a multiple of the VAE factor x the denoiser patch
    height: int = 32
    camera: str | None = None  # a name in cineray.world.CAMERAS; None = the prompt decides
    camera_speed: float | None = None  # None: DEFAULT_CAMERA_SPEED for a moving camera, else 0
    focal_length_mm: float = 50.0
    guidance: float | None = None  # None: the components' sampler defaults
    camera_guidance: float | None = None  # None: the sampler's (flow.SamplerConfig); 0 = off
    steps: int | None = None
    sampler: str | None = None  # "euler" | "heun"
    image: np.ndarray | None = None  # uint8 (height, width, 3): image-to-video first frame
    upscale: str = "none"  # "none" | "spatial" | "full"
    # With camera "static": hold the background on a still plate (generate.hold_background);
    # with no camera asked for, only if the first window reads as a still camera.
    hold_background: bool = True

    def __post_init__(self):
        _expect(isinstance(self.prompt, str), "prompt", self.prompt, "a string")
        _expect(isinstance(self.negative_prompt, str), "negative_prompt", self.negative_prompt,
                "a string")
        _expect(_is_int(self.seed) and 0 <= self.seed < 2**63, "seed", self.seed,
                "an integer in [0, 2^63)")
        _expect(_is_int(self.frames) and self.frames >= 1, "frames", self.frames,
                "an integer >= 1")
        _expect(_is_num(self.fps) and self.fps > 0, "fps", self.fps, "a number > 0")
        for name in ("width", "height"):
            v = getattr(self, name)
            _expect(_is_int(v) and v > 0, name, v, "a positive integer (e.g. 32)")
        if not unspecified_camera(self.camera) and self.camera not in CAMERAS:
            raise ValueError(f"camera {self.camera!r} is unknown; use one of {', '.join(CAMERAS)}"
                             f" (or leave it out)")
        _expect(self.camera_speed is None or (_is_num(self.camera_speed) and self.camera_speed >= 0),
                "camera_speed", self.camera_speed, "a number >= 0")
        _expect(_is_num(self.focal_length_mm) and self.focal_length_mm > 0, "focal_length_mm",
                self.focal_length_mm, "a number > 0 (e.g. 50)")
        _expect(self.guidance is None or (_is_num(self.guidance) and self.guidance >= 0),
                "guidance", self.guidance, "a number >= 0 (1 = no guidance)")
        _expect(self.camera_guidance is None
                or (_is_num(self.camera_guidance) and self.camera_guidance >= 0),
                "camera_guidance", self.camera_guidance, "a number >= 0 (0 = off)")
        _expect(self.steps is None or (_is_int(self.steps) and self.steps >= 1), "steps",
                self.steps, "an integer >= 1")
        _expect(self.sampler is None or self.sampler in SAMPLERS, "sampler", self.sampler,
                f"one of {', '.join(SAMPLERS)}")
        _expect(isinstance(self.hold_background, bool), "hold_background", self.hold_background,
                "true or false")
        _expect(self.upscale in UPSCALE_MODES, "upscale", self.upscale,
                f"one of {', '.join(UPSCALE_MODES)}")
        if self.image is not None:
            shape = getattr(self.image, "shape", None)
            _expect(isinstance(self.image, np.ndarray) and self.image.dtype == np.uint8
                    and shape == (self.height, self.width, 3), "image",
                    f"{getattr(self.image, 'dtype', type(self.image))} {shape}",
                    f"a uint8 array ({self.height}, {self.width}, 3) (resize it to the clip size)")

    @property
    def resolved_camera_speed(self) -> float:
        if self.camera_speed is not None:
            return float(self.camera_speed)
        moving = not unspecified_camera(self.camera) and self.camera != "static"
        return DEFAULT_CAMERA_SPEED if moving else 0.0


def _is_int(v) -> bool:
    return isinstance(v, int | np.integer) and not isinstance(v, bool)


def _is_num(v) -> bool:
    return isinstance(v, int | float | np.number) and not isinstance(v, bool) and np.isfinite(v)


def _expect(ok: bool, name: str, value, what: str) -> None:
    if not ok:
        raise ValueError(f"{name} must be {what}, got {value!r}")


# ---------------------------------------------------------------------------------------------
# Components
# ---------------------------------------------------------------------------------------------


@dataclass
class Components:
    """Everything generation needs, loaded once per process (or once per Serve replica)."""

    text: CachedTextEncoder
    vae: VideoVAE
    denoiser: DiT
    upscaler_spatial: Upscaler
    upscaler_temporal: Upscaler
    flow: RectifiedFlow
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    windows: WindowConfig = field(default_factory=WindowConfig)
    decode_chunk: int = 1  # latent frames per VAE decode chunk (exact; bounds decode memory)
    upscale_chunk: int = 16  # frames per upscaler chunk
    random: tuple[str, ...] = ()  # components built with random weights (no exported folder)

    @property
    def device(self) -> torch.device:
        return next(self.denoiser.parameters()).device

    @classmethod
    def load(cls, folder: str | os.PathLike = DEFAULT_CHECKPOINT, preset: str = "tiny",
             device: str | torch.device = "cpu", seed: int = 0,
             text: CachedTextEncoder | None = None) -> Components:
        """Load the exported components under `folder` ({vae, denoiser, upscaler_spatial,
        upscaler_temporal}/). A missing VAE or denoiser is built from `preset` with random weights
        (seeded by `seed`) and a warning: it renders noise until a trained one is exported. A
        missing upscaler is its untrained self, which is exactly its fixed interpolation (its
        residual head starts at zero). `folder`/sampler.json, when there, holds the sampler
        defaults the checkpoint was evaluated with (SamplerConfig fields; requests override)."""
        if preset not in TEXT_PRESETS:
            raise ValueError(f"preset must be one of {', '.join(TEXT_PRESETS)}, got {preset!r}")
        presets = {"vae": VAE_PRESETS[preset], "denoiser": DIT_PRESETS[preset],
                   "upscaler_spatial": UPSCALER_PRESETS[f"{preset}_spatial"],
                   "upscaler_temporal": UPSCALER_PRESETS[f"{preset}_temporal"]}
        models, random, interpolating = {}, [], []
        for i, (name, cfg) in enumerate(presets.items()):
            path = Path(folder) / name
            if (path / "config.json").is_file():
                models[name] = load_component(path, device)
                continue
            if name.startswith("upscaler"):  # untrained: its fixed interpolation, exactly
                models[name] = build(name, copy.deepcopy(cfg)).to(device).eval()
                interpolating.append(name)
                continue
            models[name] = random_component(name, copy.deepcopy(cfg), seed + i).to(device).eval()
            random.append(name)
        if random:
            logger.warning("no exported %s under %s: using random %r weights (they render noise "
                           "until trained components are exported there)", ", ".join(random),
                           folder, preset)
        if interpolating:
            logger.warning("no exported %s under %s: upscaling by plain interpolation (bilinear "
                           "in space, frame averages in time)", ", ".join(interpolating), folder)
        vae_c, dit_c = models["vae"].cfg.latent_channels, models["denoiser"].cfg.latent_channels
        if vae_c != dit_c:
            raise ValueError(f"the VAE has {vae_c} latent channels but the denoiser expects "
                             f"{dit_c}; export both from the same training run into {folder}")
        text = text or shared_text_encoder(preset, str(device))
        flow = RectifiedFlow(FlowConfig(), models["denoiser"].cfg.prediction)
        return cls(text=text, flow=flow, sampler=checkpoint_sampler(folder),
                   random=tuple(random), **models)


def checkpoint_sampler(folder: str | os.PathLike) -> SamplerConfig:
    """SamplerConfig from `folder`/sampler.json (the defaults shipped with a checkpoint), or the
    built-in defaults when there is none."""
    path = Path(folder) / "sampler.json"
    if not path.is_file():
        return SamplerConfig()
    values = json.loads(path.read_text())
    known = {f.name for f in dataclasses.fields(SamplerConfig)}
    if not isinstance(values, dict) or set(values) - known:
        raise ValueError(f"{path}: expected an object with keys among {', '.join(sorted(known))}, "
                         f"got {values!r}")
    return SamplerConfig(**values)


@functools.lru_cache(maxsize=4)
def shared_text_encoder(preset: str, device: str) -> CachedTextEncoder:
    """One frozen text encoder per process (loading MiniLM takes seconds; it never changes)."""
    return CachedTextEncoder(TextEncoder(TEXT_PRESETS[preset]).to(device))


def random_component(name: str, cfg, seed: int) -> torch.nn.Module:
    """A component with random weights, deterministic in `seed`. Zero-initialised layers
    (adaLN-Zero gates, output heads) get small random values too: a fresh DiT predicts exactly
    zero, which would make every seed render the same blank clip."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = build(name, cfg)
        with torch.no_grad():
            for p in model.parameters():
                if not p.any():
                    p.normal_(0.0, 0.02)
    return model


# ---------------------------------------------------------------------------------------------
# Stages
# ---------------------------------------------------------------------------------------------


@dataclass
class PromptEmbedding:
    """encode_text's output: the prompt and (when guidance is on) the negative prompt."""

    cond: TextEmbedding  # tokens (1, L, 384), mask (1, L), pooled (1, 384)
    uncond: TextEmbedding | None


def sampler_config(components: Components, request: GenerationRequest) -> SamplerConfig:
    """The components' sampler defaults with the request's choices on top."""
    s = components.sampler
    return replace(s, method=request.sampler or s.method, steps=request.steps or s.steps,
                   guidance=s.guidance if request.guidance is None else float(request.guidance),
                   camera_guidance=(s.camera_guidance if request.camera_guidance is None
                                    else float(request.camera_guidance)),
                   # a request's own scale holds for every camera motion
                   camera_guidance_by_motion=(s.camera_guidance_by_motion
                                              if request.camera_guidance is None else {}),
                   negative_prompt=request.negative_prompt)


def encode_text(components: Components, request: GenerationRequest) -> PromptEmbedding:
    guided = sampler_config(components, request).guidance != 1.0
    prompts = [request.prompt, request.negative_prompt] if guided else [request.prompt]
    emb = components.text(prompts)
    rows = [TextEmbedding(emb.tokens[i : i + 1], emb.mask[i : i + 1], emb.pooled[i : i + 1])
            for i in range(len(prompts))]
    return PromptEmbedding(rows[0], rows[1] if guided else None)


@torch.no_grad()
def encode_images(components: Components, images: torch.Tensor) -> torch.Tensor:
    """Images (N, 3, H, W) in [-1, 1] -> image latents (N, C, h, w), each encoded alone (a
    one-frame video): what frame 0 of any clip encodes to, and what keyframes are.

    Encoded a few at a time (as many frames as one decode chunk covers), so that a long clip's
    keyframes do not raise peak memory above one window's (measured: all 17 keyframes of a
    65-frame clip in one batch doubled the working set of the whole render)."""
    dev, vae = components.device, components.vae
    parts = images.split(vae.temporal_factor * components.decode_chunk)
    return torch.cat([vae.encode(p[:, :, None].to(dev))[:, :, 0].cpu() for p in parts])


def image_latent(components: Components, image: np.ndarray) -> torch.Tensor:
    """uint8 (H, W, 3) -> (C, h, w): the image-to-video first frame."""
    return encode_images(components, to_video(torch.from_numpy(image)[None, None])[:, :, 0])[0]


def window_frames(components: Components, request: GenerationRequest, window: Window,
                  keyframes: torch.Tensor | None, anchors_only: bool = False) -> torch.Tensor:
    """The window's conditioning frames (1, C + 2, T', h, w): latents, `exact` and `key` masks.

    keyframes: (N, C, h, w) image latents of its plan's keyframes, or None (nothing given).
    window.exact -> latent frame 0 held exactly; window.keys (window.anchors if anchors_only)
    -> group-end guides."""
    c, s = components.vae.cfg.latent_channels, components.vae.spatial_factor
    frames = torch.zeros(1, c + 2, window.latent_frames, request.height // s, request.width // s)
    if keyframes is None:
        return frames
    if window.exact is not None:
        frames[0, :c, 0], frames[0, c, 0] = keyframes[window.exact], 1.0
    for j, k in window.anchors if anchors_only else window.keys:
        frames[0, :c, j], frames[0, c + 1, j] = keyframes[k], 1.0
    return frames


def prefix_frames(prefix: torch.Tensor, latent_frames: int) -> torch.Tensor:
    """Conditioning frames holding `prefix` (1, C, p, h, w) exactly as the first p latent frames
    (window context / video extension) of a window of `latent_frames` -> (1, C + 2, T', h, w)."""
    b, c, p, h, w = prefix.shape
    frames = torch.zeros(b, c + 2, latent_frames, h, w)
    frames[:, :c, :p], frames[:, c, :p] = prefix, 1.0
    return frames


def latents_run(components: Components, request: GenerationRequest, text: PromptEmbedding,
                frames: torch.Tensor, fps: float, noise_seed: int,
                released: torch.Tensor | None = None) -> SamplingRun:
    """The sampling of latents (1, C, T', h, w) given conditioning frames (1, C + 2, T', h, w),
    ready to run whole or one step at a time. released: the frames that take over below the
    sampler's key_release (fewer keyframe guides), or None."""

    def conditioning(frames: torch.Tensor):
        return guided_conditioning(text.cond, text.uncond, [request.camera],
                                   [request.resolved_camera_speed], [request.focal_length_mm],
                                   [fps], frames.to(components.device))

    cfg = sampler_config(components, request)
    shape = (1, components.vae.cfg.latent_channels, *frames.shape[2:])
    late = conditioning(released) if released is not None else None
    return SamplingRun(components.denoiser, components.flow, cfg, shape, *conditioning(frames),
                       noise_seed, late)


def released_frames(components: Components, request: GenerationRequest, window: Window,
                    keyframes: torch.Tensor | None) -> torch.Tensor | None:
    """The window's conditioning frames with its anchor keys alone, where the sampler releases
    keys and that is fewer keys; else None."""
    if (keyframes is None or window.anchors == window.keys
            or sampler_config(components, request).key_release == 0):
        return None
    return window_frames(components, request, window, keyframes, anchors_only=True)


def denoise_latents(components: Components, request: GenerationRequest, text: PromptEmbedding,
                    frames: torch.Tensor, fps: float, noise_seed: int,
                    progress=None) -> torch.Tensor:
    """Sample latents (1, C, T', h, w) given conditioning frames (1, C + 2, T', h, w)."""
    return latents_run(components, request, text, frames, fps, noise_seed).run(progress).cpu()


def denoise_window(components: Components, request: GenerationRequest, text: PromptEmbedding,
                   window: Window, keyframes: torch.Tensor | None, seed: int,
                   progress=None) -> torch.Tensor:
    """One window's latents (1, C, T', h, w): a pure function of (window, conditioning, seed),
    so any worker computes the same result; its noise seed is derived from the request seed and
    the window's place in the plan."""
    return window_run(components, request, text, window, keyframes, seed).run(progress).cpu()


def window_run(components: Components, request: GenerationRequest, text: PromptEmbedding,
               window: Window, keyframes: torch.Tensor | None, seed: int) -> SamplingRun:
    """denoise_window one step at a time: the same noise, conditioning and steps."""
    return latents_run(components, request, text,
                       window_frames(components, request, window, keyframes), window.fps,
                       derive_seed(seed, "window", window.level, window.index),
                       released_frames(components, request, window, keyframes))


def window_step(run: SamplingRun, x: torch.Tensor | None, i: int) -> torch.Tensor:
    """Step i of a window's run from x (None: its noise); the last step returns the latents.
    The exact frames that finishing sets are never shared, so averaging the shared frames
    before or after finishing is the same."""
    x = run.step(run.start() if x is None else x, i)
    return run.finish(x) if i == len(run.ts) - 2 else x


def denoise_windows(components: Components, request: GenerationRequest, text: PromptEmbedding,
                    windows: tuple[Window, ...], keyframes: torch.Tensor | None, seed: int,
                    shared: tuple[tuple[int, int, int], ...], progress=None) -> list[torch.Tensor]:
    """A level's windows denoised jointly (WindowPlan.shared): each sampler step of every
    window, then the latent groups neighbours share averaged, so that the windows agree where
    they overlap. Each window's latents (1, C, T', h, w), in order."""
    runs = [window_run(components, request, text, w, keyframes, seed) for w in windows]
    xs: list[torch.Tensor | None] = [None] * len(runs)
    steps = len(runs[0].ts) - 1
    for i in range(steps):
        xs = [window_step(run, x, i) for run, x in zip(runs, xs, strict=True)]
        average_shared(xs, shared)
        if progress is not None:
            progress(i + 1, steps)
    return [x.cpu() for x in xs]


@torch.no_grad()
def decode(components: Components, latents: torch.Tensor, chunk: int | None = None) -> torch.Tensor:
    """Latents (B, C, T', h, w) -> video (B, 3, 1 + 4(T'-1), H, W) in [-1, 1], decoded in
    temporal chunks of `chunk` latent frames (the causal VAE makes this exact)."""
    z = latents.to(components.device)
    return components.vae.decode(z, chunk=chunk or components.decode_chunk).clamp(-1, 1).cpu()


@torch.no_grad()
def upscale(components: Components, kind: str, video: torch.Tensor) -> torch.Tensor:
    """One cascade stage on a video (B, 3, T, H, W): "spatial" -> (B, 3, T, 2H, 2W),
    "temporal" -> (B, 3, 2T - 1, H, W)."""
    if kind not in ("spatial", "temporal"):
        raise ValueError(f"upscale stage must be 'spatial' or 'temporal', got {kind!r}")
    model = getattr(components, f"upscaler_{kind}")
    return model(video.to(components.device)).clamp(-1, 1).cpu()


def upscaler_context(components: Components, kind: str) -> int:
    """Frames of context each side that make a chunked upscale equal to a whole-clip one: the
    temporal receptive radius (conv_in and the context blocks are the only kernels with time
    extent) plus one frame for the temporal stage's pairing of neighbours."""
    cfg = getattr(components, f"upscaler_{kind}").cfg
    return (cfg.temporal_kernel // 2) * (1 + cfg.blocks // 2) + 1


def to_uint8(video: torch.Tensor) -> np.ndarray:
    """Video (1, 3, T, H, W) in [-1, 1] -> uint8 (T, H, W, 3)."""
    x = ((video[0].float() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
    return x.permute(1, 2, 3, 0).contiguous().numpy()


def mux(frames: np.ndarray, fps: float, crf: int = 12) -> bytes:
    """uint8 (T, H, W, 3) -> H.264 MP4 bytes (yuv420p, which every player decodes)."""
    return write_mp4(frames, fps, crf=crf, pix_fmt="yuv420p")


def derive_seed(seed: int, *path) -> int:
    """A 63-bit seed from the request seed and a path (stable across processes and machines,
    unlike hash())."""
    digest = hashlib.blake2b(repr((int(seed), *path)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def load_image(path: str | os.PathLike, size: tuple[int, int] | None = None) -> np.ndarray:
    """Read an image file as uint8 (H, W, 3) RGB; size (width, height) centre-crops it to that
    aspect and resizes it."""
    from PIL import Image, ImageOps  # noqa: PLC0415  (only image-to-video needs it)

    try:
        with Image.open(path) as im:
            im = im.convert("RGB")
            if size is not None:
                im = ImageOps.fit(im, size, Image.Resampling.BICUBIC)
            return np.asarray(im, dtype=np.uint8).copy()
    except (OSError, ValueError) as err:
        raise ValueError(f"cannot read image {str(path)!r} ({err}); give a PNG or JPEG file")\
            from None
