"""Tiny components with random weights (an empty checkpoint folder), shared by the session."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from cineray.models.upscaler import UPSCALER_PRESETS
from cineray.pipelines.flow import SamplerConfig
from cineray.pipelines.stages import Components, random_component


@pytest.fixture(scope="session")
def components(tmp_path_factory):
    """Tiny random components; 2 sampler steps with guidance keep every render cheap.

    Torch runs single-threaded meanwhile: these models are too small to gain from a second
    thread, and on a shared 2-core machine two threads measured ~5x slower (spin-waiting)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    comps = Components.load(tmp_path_factory.mktemp("no-checkpoint"), seed=0)
    assert set(comps.random) == {"vae", "denoiser"}
    # Missing upscalers load as plain interpolation; random residuals make the chunking and
    # context tests see what a trained stage does (its output depends on neighbouring frames).
    ups = {f"upscaler_{k}": random_component(f"upscaler_{k}", UPSCALER_PRESETS[f"tiny_{k}"], i)
           for i, k in enumerate(("spatial", "temporal"), start=2)}
    yield replace(comps, sampler=SamplerConfig(steps=2, guidance=3.0), **ups)
    torch.set_num_threads(threads)


@pytest.fixture
def image():
    """A 32x32 test card: a red square on a blue-grey gradient."""
    y, x = np.mgrid[0:32, 0:32]
    img = np.stack([x * 4, y * 4, np.full_like(x, 160)], axis=-1).astype(np.uint8)
    img[10:20, 12:22] = (230, 20, 20)
    return img
