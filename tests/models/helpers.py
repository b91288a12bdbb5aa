"""Small builders shared by the model tests."""

from __future__ import annotations

import torch

from cineray.models.dit import Conditioning, empty_frames


def random_conditioning(b: int, c: int, t: int, h: int, w: int, text_len: int = 6) -> Conditioning:
    mask = torch.ones(b, text_len, dtype=torch.bool)
    mask[:, text_len // 2 :] = False  # padded tail, as the tokenizer produces
    return Conditioning(
        text=torch.randn(b, text_len, 384), text_mask=mask, pooled=torch.randn(b, 384),
        camera=torch.randint(0, 9, (b,)), camera_params=torch.rand(b, 2),
        fps=torch.full((b,), 8.0), frames=empty_frames(b, c, t, h, w),
    )
