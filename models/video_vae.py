"""Causal 3D convolutional video autoencoder.

Frame 0 is encoded on its own and every later latent frame covers `temporal_factor` frames, as in
the open video VAEs (CogVideoX, Wan, LTX-Video): a still image is a one-frame video, and a clip of
T = 1 + 4k frames maps to 1 + k latent frames. Every layer is causal in time and normalises each
frame separately, so encoding or decoding in temporal chunks with a shared cache gives exactly the
same result as one pass over the whole clip, with memory that does not grow with clip length.

Full-resolution levels use spatial-only kernels (kt=1): at 32x32 most of the cost is there, and
time is mixed in the strided downsamplers and at the lower levels, where it is cheap.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from cineray.models.layers import CausalConv3d, Downsample, FrameNorm, ResBlock3d, Upsample


@dataclass
class VAEConfig:
    in_channels: int = 3
    latent_channels: int = 8
    channels: list[int] = field(default_factory=lambda: [24, 48, 64])  # per level
    res_blocks: int = 1  # per level
    temporal_downs: int = 2  # number of x2 time downsamples (2 -> 4x)
    spatial_downs: int = 2  # number of x2 space downsamples (2 -> 4x)
    spatial_only_levels: int = 1  # first levels use kt=1 kernels (cheap at full resolution)
    logvar_min: float = -30.0
    logvar_max: float = 20.0
    # Decoder time upsamplers whose sub-frames respond alike to a constant input, so an unchanged
    # latent decodes to an unchanged frame (layers.SteadyTimeConv). False: the plain
    # depth-to-space of earlier checkpoints, whose config.json does not name it.
    steady_upsample: bool = False


VAE_PRESETS = {
    "tiny": VAEConfig(steady_upsample=True),
    "base": VAEConfig(latent_channels=16, channels=[128, 256, 512, 512], res_blocks=2,
                      temporal_downs=2, spatial_downs=3, spatial_only_levels=1,
                      steady_upsample=True),
}


class VideoVAE(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        self.cfg = cfg
        n = len(cfg.channels)
        if max(cfg.spatial_downs, cfg.temporal_downs) > n - 1:
            raise ValueError("VAEConfig needs one more level in `channels` than downsamples")
        self.temporal_factor = 2 ** cfg.temporal_downs
        self.spatial_factor = 2 ** cfg.spatial_downs
        ch = cfg.channels
        kts = [1 if i < cfg.spatial_only_levels else 3 for i in range(n)]

        # Encoder: conv_in -> [res blocks, downsample] per level -> mid -> (mean, logvar)
        self.enc_in = CausalConv3d(cfg.in_channels, ch[0], (1, 3, 3))
        self.enc_blocks = nn.ModuleList()
        for i in range(n):
            level = nn.ModuleList(ResBlock3d(ch[i], ch[i], kts[i]) for _ in range(cfg.res_blocks))
            if i < n - 1:
                level.append(Downsample(ch[i], ch[i + 1], i < cfg.spatial_downs,
                                        i < cfg.temporal_downs))
            self.enc_blocks.append(level)
        self.enc_mid = ResBlock3d(ch[-1], ch[-1])
        self.enc_norm = FrameNorm(8, ch[-1])
        self.enc_out = CausalConv3d(ch[-1], 2 * cfg.latent_channels, (1, 3, 3))

        # Decoder mirrors the encoder.
        self.dec_in = CausalConv3d(cfg.latent_channels, ch[-1], (1, 3, 3))
        self.dec_mid = ResBlock3d(ch[-1], ch[-1])
        self.dec_blocks = nn.ModuleList()
        for i in reversed(range(n)):
            level = nn.ModuleList(ResBlock3d(ch[i], ch[i], kts[i]) for _ in range(cfg.res_blocks))
            if i > 0:
                level.append(Upsample(ch[i], ch[i - 1], i - 1 < cfg.spatial_downs,
                                      i - 1 < cfg.temporal_downs, cfg.steady_upsample))
            self.dec_blocks.append(level)
        self.dec_norm = FrameNorm(8, ch[0])
        self.dec_out = CausalConv3d(ch[0], cfg.in_channels, (1, 3, 3))

        # Per-channel latent statistics, measured on data after training (set_latent_stats), so
        # the denoiser sees unit-variance latents. Identity until then.
        self.register_buffer("latent_mean", torch.zeros(cfg.latent_channels))
        self.register_buffer("latent_std", torch.ones(cfg.latent_channels))

    # -- shapes ----------------------------------------------------------------------------------

    def latent_shape(self, frames: int, height: int, width: int) -> tuple[int, int, int]:
        self.check_frames(frames)
        s = self.spatial_factor
        if height % s or width % s:
            raise ValueError(f"height and width must be multiples of {s}, got {height}x{width}")
        return 1 + (frames - 1) // self.temporal_factor, height // s, width // s

    def check_frames(self, frames: int) -> None:
        if (frames - 1) % self.temporal_factor:
            raise ValueError(
                f"frames must be 1 + {self.temporal_factor}k (e.g. 17, 33), got {frames}")

    # -- encoder / decoder ------------------------------------------------------------------------

    def _encode_chunk(self, x: torch.Tensor, cache: dict) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.enc_in(x, cache)
        for level in self.enc_blocks:
            for block in level:
                h = block(h, cache)
        h = self.enc_mid(h, cache)
        h = self.enc_out(torch.nn.functional.silu(self.enc_norm(h)), cache)
        mean, logvar = h.chunk(2, dim=1)
        return mean, logvar.clamp(self.cfg.logvar_min, self.cfg.logvar_max)

    def _decode_chunk(self, z: torch.Tensor, cache: dict) -> torch.Tensor:
        h = self.dec_mid(self.dec_in(z, cache), cache)
        for level in self.dec_blocks:
            for block in level:
                h = block(h, cache)
        return self.dec_out(torch.nn.functional.silu(self.dec_norm(h)), cache)

    def encode_dist(self, x: torch.Tensor, chunk: int | None = None):
        """x: (B, 3, T, H, W) in [-1, 1], T = 1 + 4k -> raw (mean, logvar), each (B, C, T', h, w).

        chunk: frames per chunk after the first frame (a multiple of temporal_factor), or None
        for one pass. Chunked and whole-clip results are equal.
        """
        self.check_frames(x.shape[2])
        if chunk is None:
            return self._encode_chunk(x, {})
        if chunk % self.temporal_factor:
            raise ValueError(f"chunk must be a multiple of {self.temporal_factor}, got {chunk}")
        cache: dict = {}
        parts = [self._encode_chunk(x[:, :, :1], cache)]
        for s in range(1, x.shape[2], chunk):
            parts.append(self._encode_chunk(x[:, :, s : s + chunk], cache))
        return tuple(torch.cat(p, dim=2) for p in zip(*parts, strict=True))

    def encode(self, x: torch.Tensor, chunk: int | None = None, sample: bool = False,
               generator: torch.Generator | None = None) -> torch.Tensor:
        """x (B, 3, T, H, W) in [-1, 1] -> normalised latents (B, C, T', H/s, W/s)."""
        mean, logvar = self.encode_dist(x, chunk)
        z = mean
        if sample:
            noise = torch.randn(mean.shape, generator=generator, device=mean.device)
            z = mean + torch.exp(0.5 * logvar) * noise
        return self.normalize(z)

    def decode(self, z: torch.Tensor, chunk: int | None = None) -> torch.Tensor:
        """Normalised latents (B, C, T', h, w) -> video (B, 3, 1 + 4(T'-1), H, W), roughly [-1, 1].

        chunk: latent frames per chunk after the first, or None for one pass.
        """
        z = self.denormalize(z)
        if chunk is None:
            return self._decode_chunk(z, {})
        cache: dict = {}
        parts = [self._decode_chunk(z[:, :, :1], cache)]
        for s in range(1, z.shape[2], chunk):
            parts.append(self._decode_chunk(z[:, :, s : s + chunk], cache))
        return torch.cat(parts, dim=2)

    def forward(self, x: torch.Tensor, generator: torch.Generator | None = None):
        """Training pass: (recon, mean, logvar), sampling the posterior."""
        mean, logvar = self.encode_dist(x)
        noise = torch.randn(mean.shape, generator=generator, device=mean.device)
        z = mean + torch.exp(0.5 * logvar) * noise
        return self._decode_chunk(z, {}), mean, logvar

    # -- latent normalisation ---------------------------------------------------------------------

    def normalize(self, z: torch.Tensor) -> torch.Tensor:
        return (z - self.latent_mean[:, None, None, None]) / self.latent_std[:, None, None, None]

    def denormalize(self, z: torch.Tensor) -> torch.Tensor:
        return z * self.latent_std[:, None, None, None] + self.latent_mean[:, None, None, None]

    @torch.no_grad()
    def set_latent_stats(self, videos: torch.Tensor) -> None:
        """Measure per-channel mean/std of posterior means on a batch of clips (B, 3, T, H, W)."""
        mean, _ = self.encode_dist(videos)
        self.latent_mean.copy_(mean.mean(dim=(0, 2, 3, 4)))
        self.latent_std.copy_(mean.std(dim=(0, 2, 3, 4)).clamp_min(1e-4))
