"""Upscaler stages against the interpolation they refine, on fresh world clips.

Each clip is one synthetic-world scene rendered twice, at the stage's input and at its target,
at the size the pipeline runs the stage (spatial: 32x32 -> 64x64 at 8 fps; temporal: 8 -> 16 fps
at 64x64, after the spatial stage), from seeds the training set never used. Measured per stage:
PSNR of the trained stage's output and of its plain interpolation (the same module with a zero
residual head: bilinear in space, frame averages in time) against the target render, and their
ratio as a PSNR gain in dB. PSNR is that of the mean squared error over all clips, on the frames
the stage makes (every frame in space; the in-between frames in time): a mean of per-clip PSNRs
would be ruled by the scenes where plain interpolation is exact (a still object under a still
camera). Also the share of clips each way. A stage with no exported weights is reported as
missing.

    nice python benchmarks/bench_upscale.py [--checkpoint checkpoints/cineray-tiny] [--clips 64]
writes benchmarks/results/upscale.json.
"""

from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path

import numpy as np
import torch

from cineray.models.upscaler import Upscaler
from cineray.pipelines.training import to_video
from cineray.pipelines.weights import DEFAULT_CHECKPOINT, load_component
from cineray.world import WorldConfig, render, sample_scene

RESULTS = Path(__file__).resolve().parent / "results"
SEED0 = 10**9  # far from the dataset seeds


def mse(a: torch.Tensor, b: torch.Tensor) -> float:
    """Both in [-1, 1]; mean squared error on the [0, 1] scale."""
    return ((a.clamp(-1, 1) - b) / 2).pow(2).mean().item()


def psnr(err: float) -> float:
    return 10 * np.log10(1.0 / max(err, 1e-12))


def pair(kind: str, scene, world: WorldConfig) -> tuple[torch.Tensor, torch.Tensor]:
    t, fps = world.frames, world.fps
    if kind == "spatial":
        lo, hi = render(scene, 32, 32, t, fps), render(scene, 64, 64, t, fps)
    else:
        lo, hi = render(scene, 64, 64, t, fps), render(scene, 64, 64, 2 * t - 1, 2 * fps)
    return (to_video(torch.from_numpy(np.ascontiguousarray(x))[None]) for x in (lo, hi))


@torch.no_grad()
def measure(kind: str, folder: Path, clips: int) -> dict:
    path = folder / f"upscaler_{kind}"
    if not (path / "config.json").is_file():
        return {"missing": f"upscaler_{kind}/ (no exported weights)"}
    trained = load_component(path).eval()
    plain = Upscaler(copy.deepcopy(trained.cfg)).eval()  # zero residual head: interpolation
    world = WorldConfig()
    made = slice(None) if kind == "spatial" else slice(1, None, 2)  # the frames the stage makes
    ours, base = [], []
    for i in range(clips):
        lo, hi = pair(kind, sample_scene(world, SEED0 + i), world)
        ours.append(mse(trained(lo)[:, :, made], hi[:, :, made]))
        base.append(mse(plain(lo)[:, :, made], hi[:, :, made]))
    ours_m, base_m = psnr(float(np.mean(ours))), psnr(float(np.mean(base)))
    ours, base = np.array(ours), np.array(base)
    return {"clips": clips, "psnr_db": ours_m, "interpolation_psnr_db": base_m,
            "gain_db": ours_m - base_m, "clips_better": float(np.mean(ours < base)),
            "clips_worse": float(np.mean(ours > base))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", default=str(DEFAULT_CHECKPOINT))
    ap.add_argument("--clips", type=int, default=64)
    args = ap.parse_args()
    torch.set_num_threads(1)
    out = {kind: measure(kind, Path(args.checkpoint), args.clips)
           for kind in ("spatial", "temporal")}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "upscale.json").write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
