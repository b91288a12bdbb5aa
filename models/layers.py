"""Building blocks shared by the model files.

Axis letters used throughout: B batch, C channels, T frames, H height, W width, L tokens,
D model width, N heads. Video tensors are (B, C, T, H, W); token tensors are (B, L, D).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

# ---------------------------------------------------------------------------------------------
# Attention backend: one function for every attention layer.
# ---------------------------------------------------------------------------------------------

_XFORMERS = None  # lazily imported module, or False when unavailable


def _xformers_ops():
    """xformers.ops if it is installed, else None. Imported on first CUDA use only, because the
    CPU wheel cannot run its kernels and the import alone costs ~1 s."""
    global _XFORMERS
    if _XFORMERS is None:
        try:
            import xformers.ops as xops  # noqa: PLC0415

            _XFORMERS = xops
        except Exception:  # ImportError, or a build that fails to load its CUDA kernels
            _XFORMERS = False
    return _XFORMERS or None


def attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_mask: torch.Tensor | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Scaled dot-product attention.

    q: (B, N, Lq, Dh), k and v: (B, N, Lk, Dh), key_mask: (B, Lk) bool, True = attend.
    Returns (B, N, Lq, Dh). backend: "auto" (xformers on CUDA when installed, else SDPA),
    "sdpa" or "xformers".
    """
    use_xformers = backend == "xformers" or (
        backend == "auto" and q.is_cuda and _xformers_ops() is not None
    )
    if use_xformers:
        xops = _xformers_ops()
        if xops is None:
            raise RuntimeError("attention backend 'xformers' requested but xformers is not installed")
        bias = None
        if key_mask is not None:
            # xformers wants an additive bias of shape (B, N, Lq, Lk).
            bias = torch.zeros(key_mask.shape, dtype=q.dtype, device=q.device)
            bias = bias.masked_fill(~key_mask, float("-inf"))
            bias = bias[:, None, None, :].expand(q.shape[0], q.shape[1], q.shape[2], k.shape[2])
        out = xops.memory_efficient_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_bias=bias
        )
        return out.transpose(1, 2)
    mask = None if key_mask is None else key_mask[:, None, None, :]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


# ---------------------------------------------------------------------------------------------
# Positions and conditioning embeddings
# ---------------------------------------------------------------------------------------------


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10_000.0) -> torch.Tensor:
    """Sinusoidal embedding of a float tensor (B,) -> (B, dim) (DiT / ADM convention)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class RoPE3D(nn.Module):
    """Rotary position embedding over (t, h, w) token coordinates.

    The head dimension is split into three even parts, one per axis. Positions are plain
    coordinates, so a clip longer than any seen in training just gets larger t values
    (rotary positions extrapolate better than a learned table, which has no row for them).
    """

    def __init__(self, head_dim: int, theta: float = 100.0):
        super().__init__()
        assert head_dim % 6 == 0, "head_dim must split into 3 even parts"
        self.part = head_dim // 3
        inv = 1.0 / theta ** (torch.arange(0, self.part, 2).float() / self.part)
        self.register_buffer("inv_freq", inv, persistent=False)

    def forward(self, coords: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """coords: (L, 3) float -> cos, sin: (L, head_dim // 2) each."""
        angles = torch.cat([coords[:, i, None] * self.inv_freq[None] for i in range(3)], dim=-1)
        return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs of channels. x: (B, N, L, Dh); cos, sin: (L, Dh // 2)."""
    x1, x2 = x[..., 0::2], x[..., 1::2]
    out = torch.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)
    return out.flatten(-2)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN: x (B, L, D), shift/scale (B, D)."""
    return x * (1 + scale[:, None]) + shift[:, None]


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int, out: int | None = None):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, out or dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


# ---------------------------------------------------------------------------------------------
# Causal video convolutions with a streaming cache
# ---------------------------------------------------------------------------------------------
# A causal layer at time t sees only frames <= t. Passing the same `cache` dict through calls on
# consecutive temporal chunks makes chunked processing exactly equal to processing the whole clip,
# so memory stays flat as clips grow (the cache holds a couple of frames per layer).


class CausalConv3d(nn.Module):
    """Conv3d, causal in time: the stream starts with kt-1 copies of its first frame."""

    def __init__(self, cin: int, cout: int, kernel=(3, 3, 3), stride=(1, 1, 1)):
        super().__init__()
        kt, kh, kw = kernel
        self.kt, self.st = kt, stride[0]
        self.conv = nn.Conv3d(cin, cout, kernel, stride=stride, padding=(0, kh // 2, kw // 2))

    def forward(self, x: torch.Tensor, cache: dict | None = None) -> torch.Tensor:
        if cache is not None and self in cache:
            x = torch.cat([cache[self], x], dim=2)
        elif self.kt > 1:
            x = torch.cat([x[:, :, :1]] * (self.kt - 1) + [x], dim=2)
        n_out = (x.shape[2] - self.kt) // self.st + 1
        if cache is not None:
            cache[self] = x[:, :, n_out * self.st :]  # frames still needed by the next chunk
        weight, bias = self.weight_and_bias()
        return F.conv3d(x[:, :, : (n_out - 1) * self.st + self.kt], weight, bias,
                        self.conv.stride, self.conv.padding)

    def weight_and_bias(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.conv.weight, self.conv.bias


class SteadyTimeConv(CausalConv3d):
    """The time convolution of a depth-to-space upsampler: `phases` groups of output channels,
    one per sub-frame, whose responses to a constant input agree. Each group's weights summed
    over time, and its bias, are replaced by their mean over the groups; only the part that
    responds to change (weights summing to zero over time) stays particular to a sub-frame.
    Unconstrained, every sub-frame has its own offset, and an unchanged latent decodes to frames
    that flicker with the sub-frame's phase (~0.25 grey level a frame in a trained tiny VAE).
    The stored weights are the unconstrained ones, so older checkpoints load as they are."""

    def __init__(self, c: int, phases: int = 2, kt: int = 3):
        super().__init__(c, phases * c, (kt, 1, 1))
        self.phases = phases

    def weight_and_bias(self) -> tuple[torch.Tensor, torch.Tensor]:
        w = self.conv.weight.unflatten(0, (self.phases, -1))  # (P, C, Cin, kt, 1, 1)
        dc = w.sum(3, keepdim=True)
        w = w - (dc - dc.mean(0, keepdim=True)) / self.kt
        b = self.conv.bias.unflatten(0, (self.phases, -1))
        return w.flatten(0, 1), b.mean(0, keepdim=True).expand_as(b).flatten()


class FrameNorm(nn.GroupNorm):
    """GroupNorm over each frame separately: statistics never cross time, so the result does not
    depend on how a clip is chunked (a norm over T would break causality and chunking)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = x.shape[0]
        y = super().forward(rearrange(x, "b c t h w -> (b t) c h w"))
        return rearrange(y, "(b t) c h w -> b c t h w", b=b)


class ResBlock3d(nn.Module):
    """Pre-norm residual block of two causal convolutions. kt=1 makes it purely spatial."""

    def __init__(self, cin: int, cout: int, kt: int = 3):
        super().__init__()
        self.norm1 = FrameNorm(min(8, cin), cin)
        self.conv1 = CausalConv3d(cin, cout, (kt, 3, 3))
        self.norm2 = FrameNorm(min(8, cout), cout)
        self.conv2 = CausalConv3d(cout, cout, (kt, 3, 3))
        self.skip = nn.Conv3d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor, cache: dict | None = None) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)), cache)
        h = self.conv2(F.silu(self.norm2(h)), cache)
        return self.skip(x) + h


class Downsample(nn.Module):
    """Strided causal conv: x2 in space and/or time. In time, frame 0 stays alone
    (T = 1 + 2k -> 1 + k), which is what lets a still image be a one-frame video."""

    def __init__(self, c: int, cout: int, spatial: bool, temporal: bool):
        super().__init__()
        stride = (2 if temporal else 1, 2 if spatial else 1, 2 if spatial else 1)
        self.conv = CausalConv3d(c, cout, (3 if temporal else 1, 3, 3), stride=stride)

    def forward(self, x: torch.Tensor, cache: dict | None = None) -> torch.Tensor:
        return self.conv(x, cache)


class Upsample(nn.Module):
    """x2 in time (frame 0 -> 1 frame, every later frame -> 2) and/or space (nearest + conv).
    steady: the two sub-frames respond alike to a constant input (SteadyTimeConv)."""

    def __init__(self, c: int, cout: int, spatial: bool, temporal: bool, steady: bool = False):
        super().__init__()
        self.spatial, self.temporal = spatial, temporal
        self.time_conv = None
        if temporal:
            self.time_conv = SteadyTimeConv(c) if steady else CausalConv3d(c, 2 * c, (3, 1, 1))
        self.conv = CausalConv3d(c, cout, (1, 3, 3))

    def forward(self, x: torch.Tensor, cache: dict | None = None) -> torch.Tensor:
        if self.temporal:
            first = cache is None or self not in cache
            if cache is not None:
                cache[self] = True
            # channels -> 2 sub-frames per frame: (B, 2C, T, H, W) -> (B, C, 2T, H, W)
            x = rearrange(self.time_conv(x, cache), "b (r c) t h w -> b c (t r) h w", r=2)
            if first:
                x = x[:, :, 1:]  # the stream's first latent frame is a single frame
        if self.spatial:
            x = F.interpolate(x, scale_factor=(1, 2, 2), mode="nearest")
        return self.conv(x, cache)


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
