"""Fixed-noise error of exported denoisers on fresh world clips.

    python -m cineray.jobs.train val checkpoints/cineray-tiny/denoiser stage25/denoiser

Training losses are not comparable across runs: each draws its own noise levels, captions and
conditioning, and the loss weights (the temporal term) vary with the recipe. This figure holds
all of that fixed: the same world clips (scenes seeded seed + i, which no dataset holds: a
dataset seeds its scenes with 63-bit hashes, make_dataset.clip_seed), the same noise, the same
levels t, each clip's training caption and camera, and no conditioning frames. For each export
and level it reports the mean squared error of the clean-latent estimate, and that of its
frame-to-frame change (what the training's temporal term charges: a wobbling outline, a
shimmering background). Lower is better; one call of the model per clip and level, so it
measures the denoiser alone, not the sampler.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from cineray.models.dit import empty_frames
from cineray.models.text_encoder import TextEncoder
from cineray.pipelines.conditioning import CachedTextEncoder, build_conditioning
from cineray.pipelines.flow import RectifiedFlow
from cineray.pipelines.training import to_video
from cineray.pipelines.weights import DEFAULT_CHECKPOINT, load_component, read_info
from cineray.world import captions, render, sample_scene

DEFAULT_SEED = 10_000_000  # the first scene seed (the model card's tables use it)


def world_latents(cfg, vae, clips: int, seed: int, size: int = 32):
    """`clips` world scenes (seeds seed + i, held-out combinations excluded) rendered at the
    training size and their own fps, encoded: latents (N, C, T', h, w) and the scenes."""
    scenes = [sample_scene(cfg.world, seed + i, heldout=False) for i in range(clips)]
    video = np.stack([render(s, size, size, cfg.world.frames, s.fps) for s in scenes])
    with torch.no_grad():
        z = torch.cat([vae.encode(to_video(torch.from_numpy(v))) for v in np.array_split(
            video, max(1, clips // 16))])
    return z, scenes


def fixed_noise_error(cfg, folders: list[str], clips: int = 128, seed: int = DEFAULT_SEED,
                      levels: tuple[float, ...] = (0.1, 0.2, 0.4, 0.6, 0.8),
                      batch: int = 32) -> dict[str, dict[float, tuple[float, float]]]:
    """{folder: {t: (error, temporal error)}} for each denoiser export folder."""
    for f in folders:
        if read_info(f)["component"] != "denoiser":
            raise ValueError(f"{f} is not a denoiser export (its config.json names another "
                             f"component)")
    if clips < 1 or batch < 1 or not levels or not all(0.0 < t <= 1.0 for t in levels):
        raise ValueError(f"need clips >= 1, batch >= 1 and levels in (0, 1], got clips={clips}, "
                         f"batch={batch}, levels={list(levels)}")
    vae_dir = Path(cfg.task.vae_weights) if cfg.task.vae_weights else DEFAULT_CHECKPOINT / "vae"
    vae = load_component(vae_dir).requires_grad_(False)
    z, scenes = world_latents(cfg, vae, clips, seed)
    text = CachedTextEncoder(TextEncoder(cfg.text))
    gen = torch.Generator().manual_seed(seed)
    noise = torch.randn(z.shape, generator=gen)
    out = {}
    for folder in folders:
        model = load_component(folder).requires_grad_(False).eval()
        flow = RectifiedFlow(cfg.flow, model.cfg.prediction)
        sums = {t: [0.0, 0.0] for t in levels}
        for lo in range(0, clips, batch):
            z0, eps, sc = z[lo:lo + batch], noise[lo:lo + batch], scenes[lo:lo + batch]
            frames = empty_frames(len(sc), *z.shape[1:])
            cond = build_conditioning(
                text([captions(s, s.seed, style="train")[0] for s in sc]),
                [s.camera for s in sc], [s.camera_speed for s in sc],
                [s.focal_length_mm for s in sc], [s.fps for s in sc], frames)
            for t in levels:
                tt = torch.full((len(sc),), t)
                x_t = flow.add_noise(z0, eps, tt)
                with torch.no_grad():
                    pred = model(x_t, tt, cond).float()
                est = pred if flow.prediction == "x" else x_t - t * pred
                sums[t][0] += ((est - z0) ** 2).mean(dim=(1, 2, 3, 4)).sum().item()
                sums[t][1] += ((est.diff(dim=2) - z0.diff(dim=2)) ** 2).mean(
                    dim=(1, 2, 3, 4)).sum().item()
        out[folder] = {t: (e / clips, d / clips) for t, (e, d) in sums.items()}
    return out


def markdown(result: dict[str, dict[float, tuple[float, float]]]) -> str:
    """A table: one row per export, one column per level, 'error / temporal error'."""
    levels = list(next(iter(result.values())))
    lines = ["| export | " + " | ".join(f"t = {t:g}" for t in levels) + " |",
             "|---|" + "---|" * len(levels)]
    for folder, row in result.items():
        lines.append(f"| {folder} | " + " | ".join(f"{e:.4f} / {d:.4f}" for e, d in row.values())
                     + " |")
    return "\n".join(lines)
