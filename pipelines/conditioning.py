"""Turning prompts and labels into the denoiser's Conditioning (shared by training and generation)."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import torch

from cineray.models.dit import Conditioning, focal_to_param
from cineray.models.text_encoder import TextEmbedding, TextEncoder
from cineray.world import CAMERAS

UNSPECIFIED = "unspecified"


def unspecified_camera(name: str | None) -> bool:
    """None, "" or "unspecified": no camera motion asked for, the prompt decides."""
    return name in (None, "", UNSPECIFIED)


def camera_index(name: str | None) -> int:
    """Index into CAMERAS; an unspecified camera -> len(CAMERAS) (the prompt decides)."""
    if unspecified_camera(name):
        return len(CAMERAS)
    if name not in CAMERAS:
        raise ValueError(f"unknown camera motion {name!r}; use one of {', '.join(CAMERAS)}")
    return CAMERAS.index(name)


class CachedTextEncoder:
    """TextEncoder with a per-prompt LRU cache: training captions repeat, and MiniLM would
    otherwise cost ~10% of a tiny denoiser step."""

    def __init__(self, encoder: TextEncoder, max_items: int = 20_000):
        self.encoder, self.max_items = encoder, max_items
        self.cache: OrderedDict[str, tuple[torch.Tensor, ...]] = OrderedDict()

    def __call__(self, prompts: Sequence[str]) -> TextEmbedding:
        missing = [p for p in dict.fromkeys(prompts) if p not in self.cache]
        if missing:
            emb = self.encoder(missing)
            for i, p in enumerate(missing):
                self.cache[p] = (emb.tokens[i].half(), emb.mask[i], emb.pooled[i])
        rows = [self.cache[p] for p in prompts]
        for p in prompts:
            self.cache.move_to_end(p)
        while len(self.cache) > self.max_items:  # after the lookup: never this batch's rows
            self.cache.popitem(last=False)
        return TextEmbedding(tokens=torch.stack([r[0].float() for r in rows]),
                             mask=torch.stack([r[1] for r in rows]),
                             pooled=torch.stack([r[2] for r in rows]))


def build_conditioning(text: TextEmbedding, cameras: Sequence[str | None],
                       speeds: Sequence[float], focals_mm: Sequence[float],
                       fps: Sequence[float], frames: torch.Tensor) -> Conditioning:
    """Batch of B: text (B, ...), per-clip camera name, speed, focal length (mm), fps, and
    conditioning frames (B, C + 2, T, H, W)."""
    cam = torch.tensor([camera_index(c) for c in cameras], dtype=torch.long)
    params = torch.tensor([[float(s), focal_to_param(float(f))] for s, f in zip(speeds, focals_mm,
                                                                                  strict=True)])
    dev = frames.device
    return Conditioning(text=text.tokens.to(dev), text_mask=text.mask.to(dev),
                        pooled=text.pooled.to(dev), camera=cam.to(dev), camera_params=params.to(dev),
                        fps=torch.tensor([float(f) for f in fps], device=dev), frames=frames)


def guided_conditioning(text: TextEmbedding, negative: TextEmbedding | None,
                        cameras: Sequence[str | None], speeds: Sequence[float],
                        focals_mm: Sequence[float], fps: Sequence[float],
                        frames: torch.Tensor) -> tuple[Conditioning, Conditioning | None]:
    """The prompt's conditioning and the unconditional branch's for classifier-free guidance
    (None without a negative prompt embedding). The unconditional branch has the negative
    prompt and drops the camera too (as training's camera dropout does), so guidance pushes
    towards the asked camera motion as well as towards the prompt."""
    cond = build_conditioning(text, cameras, speeds, focals_mm, fps, frames)
    if negative is None:
        return cond, None
    n = len(cameras)
    return cond, build_conditioning(negative, [UNSPECIFIED] * n, [0.0] * n, focals_mm, fps, frames)
