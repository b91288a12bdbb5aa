"""Where the evaluated clips come from. Every source turns a SuiteItem into a Clip, and the same
judging code scores them all, so each figure of the model sits beside its context:

    model            the generation pipeline with the exported components of a checkpoint folder
    real             the world's own render of the item's scene: the upper bound
    random           the same pipeline with random weights: must score 0 valid
    reconstruct      the world's clip through the exported VAE's encode + decode only: can the
                     latent stage carry colour, shape and motion before a denoiser learns it?
    upscale_spatial  the world's clip through the exported spatial upscaler (judged at 2x size)
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from cineray.jobs.eval_suite import SuiteItem
from cineray.pipelines.generate import generate
from cineray.pipelines.stages import Components, GenerationRequest, to_uint8
from cineray.pipelines.training import to_video
from cineray.pipelines.weights import load_component
from cineray.pipelines.windows import WindowConfig
from cineray.world import render

SOURCES = ("model", "real", "random", "reconstruct", "upscale_spatial")
NEEDS_CHECKPOINT = {"model": ("vae", "denoiser"), "reconstruct": ("vae",),
                    "upscale_spatial": ("upscaler_spatial",)}  # fmt: skip


@dataclass
class Clip:
    frames: np.ndarray  # uint8 (T, H, W, 3)
    fps: float
    reference: np.ndarray | None  # i2v: what frame 0 should show, uint8 (H, W, 3) at clip size
    seconds: float  # time to make the clip


class Source:
    """Makes clips for suite items; subclasses define `make(item) -> (frames, fps)`."""

    name = "source"

    def __call__(self, item: SuiteItem) -> Clip:
        t0 = time.perf_counter()
        frames, fps = self.make(item)
        ref = None if item.image is None else self.reference(item, frames.shape[1:3])
        return Clip(frames, fps, ref, time.perf_counter() - t0)

    def make(self, item: SuiteItem) -> tuple[np.ndarray, float]:
        raise NotImplementedError

    def reference(self, item: SuiteItem, size: tuple[int, int]) -> np.ndarray:
        """The given image, re-rendered from the scene when the clip has another size."""
        if size == item.image.shape[:2]:
            return item.image
        return render(item.scene, size[1], size[0], 1, item.fps)[0]


class RealSource(Source):
    name = "real"

    def make(self, item):
        s = item.scene
        return render(s, item.width, item.height, item.frames, item.fps), item.fps


class PipelineSource(Source):
    """Text-to-video (image-to-video for i2v items) at base resolution, no upscaling."""

    def __init__(self, name: str, components: Components, steps: int | None = None):
        self.name, self.components, self.steps = name, components, steps

    def make(self, item):
        s = item.scene
        request = GenerationRequest(
            prompt=item.prompt, seed=item.seed, frames=item.frames, fps=item.fps,
            width=item.width, height=item.height, camera=s.camera, camera_speed=s.camera_speed,
            focal_length_mm=s.focal_length_mm, steps=self.steps, image=item.image)  # fmt: skip
        return generate(self.components, request).frames, item.fps


class ReconstructSource(Source):
    """The world's clip through a VAE (encode -> decode, posterior mean)."""

    name = "reconstruct"

    def __init__(self, vae: torch.nn.Module):
        self.vae = vae

    @torch.no_grad()
    def make(self, item):
        clip = RealSource().make(item)[0]
        x = to_video(torch.from_numpy(clip)[None]).to(_device(self.vae))  # (1, 3, T, H, W)
        y = self.vae.decode(self.vae.encode(x), chunk=1).clamp(-1, 1)
        return to_uint8(y.cpu()), item.fps


class UpscaleSource(Source):
    """The world's clip through the spatial upscaler: (T, H, W) -> (T, 2H, 2W)."""

    name = "upscale_spatial"

    def __init__(self, upscaler: torch.nn.Module):
        self.upscaler = upscaler

    @torch.no_grad()
    def make(self, item):
        clip = RealSource().make(item)[0]
        x = to_video(torch.from_numpy(clip)[None]).to(_device(self.upscaler))
        return to_uint8(self.upscaler(x).clamp(-1, 1).cpu()), item.fps


def _device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def parse_sources(text: str | list[str] | tuple[str, ...]) -> list[str]:
    """'model,real' -> ['model', 'real'], checked against SOURCES."""
    names = [s.strip() for s in (text.split(",") if isinstance(text, str) else text) if s.strip()]
    bad = [n for n in names if n not in SOURCES]
    if bad or not names:
        raise ValueError(f"--sources {','.join(names) or text!r}: give a comma-separated list "
                         f"from {', '.join(SOURCES)}")  # fmt: skip
    return list(dict.fromkeys(names))


def check_checkpoint(names: list[str], checkpoint: str | Path) -> None:
    """Every component the chosen sources need must be exported under `checkpoint`."""
    folder = Path(checkpoint)
    if not folder.is_dir():
        raise FileNotFoundError(f"--checkpoint {str(checkpoint)!r} is not a folder; give the "
                                f"folder holding vae/, denoiser/, ... (as exported by training)")
    for name in names:
        missing = [c for c in NEEDS_CHECKPOINT.get(name, ())
                   if not (folder / c / "config.json").is_file()]  # fmt: skip
        if missing:
            raise FileNotFoundError(f"source {name!r} needs exported {', '.join(missing)} under "
                                    f"{folder} (no {missing[0]}/config.json); export them or "
                                    f"leave {name!r} out of --sources")  # fmt: skip


def make_sources(names: list[str], checkpoint: str | Path | None, windows: WindowConfig,
                 seed: int = 0, steps: int | None = None,
                 device: str = "cpu") -> list[Source]:  # fmt: skip
    """Build the named sources (checking the checkpoint first when one needs it)."""
    if any(n in NEEDS_CHECKPOINT for n in names):
        check_checkpoint(names, checkpoint)
    out = []
    for name in names:
        if name == "real":
            out.append(RealSource())
        elif name == "model":
            comps = replace(Components.load(checkpoint, device=device), windows=windows)
            out.append(PipelineSource("model", comps, steps))
        elif name == "random":
            with tempfile.TemporaryDirectory() as empty:  # no exported component: all random
                comps = Components.load(empty, device=device, seed=seed)
            out.append(PipelineSource("random", replace(comps, windows=windows), steps))
        elif name == "reconstruct":
            out.append(ReconstructSource(load_component(Path(checkpoint) / "vae", device)))
        else:
            up = load_component(Path(checkpoint) / "upscaler_spatial", device)
            out.append(UpscaleSource(up))
    return out
