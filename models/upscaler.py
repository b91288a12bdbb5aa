"""Upscaler cascade stages: spatial x2 super-resolution and temporal x2 frame interpolation.

Both are small convolutional regression networks that predict a residual over a fixed
interpolation (bilinear in space, the average of neighbouring frames in time), so an untrained
stage already returns a sensible clip and training only has to add the detail. They work on
pixels in [-1, 1]: at the tiny preset the base clip is 32x32, where a latent upsampler (LTX-Video's
choice at high resolution) would have a 8x8 grid to work from.

Unlike the VAE, these stages are not causal: an interpolated frame needs the frame after it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn


@dataclass
class UpscalerConfig:
    kind: str = "spatial"  # "spatial" (H, W x2) or "temporal" (T -> 2T - 1)
    channels: int = 32
    blocks: int = 4
    temporal_kernel: int = 3  # time extent of the context convolutions


UPSCALER_PRESETS = {
    "tiny_spatial": UpscalerConfig(kind="spatial"),
    "tiny_temporal": UpscalerConfig(kind="temporal"),
    "base_spatial": UpscalerConfig(kind="spatial", channels=128, blocks=8),
    "base_temporal": UpscalerConfig(kind="temporal", channels=128, blocks=8),
}


class TimeConv(nn.Module):
    """Conv3d with 'same' padding, replicate in time (so the first/last frames see themselves)."""

    def __init__(self, cin: int, cout: int, kt: int):
        super().__init__()
        self.kt = kt
        self.conv = nn.Conv3d(cin, cout, (kt, 3, 3), padding=(0, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = self.kt // 2
        x = torch.cat([x[:, :, :1]] * p + [x] + [x[:, :, -1:]] * p, dim=2)
        return self.conv(x)


class Block(nn.Module):
    def __init__(self, c: int, kt: int):
        super().__init__()
        self.conv1 = TimeConv(c, c, kt)
        self.conv2 = TimeConv(c, c, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv2(F.silu(self.conv1(F.silu(x))))


class Upscaler(nn.Module):
    def __init__(self, cfg: UpscalerConfig):
        super().__init__()
        if cfg.kind not in ("spatial", "temporal"):
            raise ValueError(f"UpscalerConfig.kind must be 'spatial' or 'temporal', got {cfg.kind!r}")
        self.cfg = cfg
        c = cfg.channels
        self.conv_in = TimeConv(3, c, cfg.temporal_kernel)
        self.context = nn.Sequential(*(Block(c, cfg.temporal_kernel) for _ in range(cfg.blocks // 2)))
        if cfg.kind == "spatial":
            self.refine = nn.Sequential(*(Block(c, 1) for _ in range(cfg.blocks - cfg.blocks // 2)))
            self.conv_out = TimeConv(c, 3 * 4, 1)  # 4 sub-pixels per pixel (pixel shuffle x2)
        else:
            self.pair = TimeConv(2 * c, c, 1)  # features of frames i and i+1 -> frame i + 1/2
            self.refine = nn.Sequential(*(Block(c, 1) for _ in range(cfg.blocks - cfg.blocks // 2)))
            self.conv_out = TimeConv(c, 3, 1)
        nn.init.zeros_(self.conv_out.conv.weight)  # start as plain interpolation
        nn.init.zeros_(self.conv_out.conv.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, 3, T, H, W) in [-1, 1] -> spatial: (B, 3, T, 2H, 2W); temporal: (B, 3, 2T-1, H, W)."""
        h = self.context(self.conv_in(x))
        if self.cfg.kind == "spatial":
            return self._spatial(x, h)
        return self._temporal(x, h)

    def _spatial(self, x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        b = x.shape[0]
        base = F.interpolate(rearrange(x, "b c t h w -> (b t) c h w"), scale_factor=2,
                             mode="bilinear", align_corners=False)
        res = self.conv_out(self.refine(h))  # (B, 12, T, H, W)
        res = F.pixel_shuffle(rearrange(res, "b c t h w -> (b t) c h w"), 2)  # (BT, 3, 2H, 2W)
        return rearrange(base + res, "(b t) c h w -> b c t h w", b=b)

    def _temporal(self, x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        if x.shape[2] < 2:
            return x
        mid = self.pair(torch.cat([h[:, :, :-1], h[:, :, 1:]], dim=1))  # (B, C, T-1, H, W)
        mid = 0.5 * (x[:, :, :-1] + x[:, :, 1:]) + self.conv_out(self.refine(mid))
        # interleave: x0, m0, x1, m1, ..., x_{T-1}
        out = torch.stack([x[:, :, :-1], mid], dim=3)  # (B, 3, T-1, 2, H, W)
        out = rearrange(out, "b c t two h w -> b c (t two) h w")
        return torch.cat([out, x[:, :, -1:]], dim=2)
