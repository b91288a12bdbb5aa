"""End to end on tiny random components: prompt -> frames -> MP4 that PyAV decodes."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from cineray.pipelines.generate import (
    Timer,
    _Steps,
    base_frames,
    generate,
    image_to_video,
    render_to_file,
)
from cineray.pipelines.stages import (
    GenerationRequest,
    decode,
    denoise_window,
    denoise_windows,
    encode_images,
    encode_text,
    image_latent,
    mux,
    to_uint8,
)
from cineray.pipelines.windows import Blender, WindowConfig, plan_windows
from cineray.video import read_mp4

REQ = GenerationRequest("a blue square moving left", seed=11, camera="zoom_in")


def _decoded(result):
    frames, fps = read_mp4(mux(result.frames, result.fps))
    return frames, fps


@pytest.mark.parametrize("n", [17, 1, 18])  # one window; a still; 2 windows, the last trimmed
def test_text_to_video_mp4(components, n):
    result = generate(components, replace(REQ, frames=n))
    frames, fps = _decoded(result)
    assert frames.shape == (n, 32, 32, 3) and fps == 8.0
    assert result.frames.std() > 1  # random weights render noise, not a blank clip
    assert {"encode_text", "denoise", "decode"} <= set(result.timings)


def test_image_to_video_starts_on_the_image_latent(components, image):
    result = image_to_video(components, replace(REQ, frames=9, fps=12.0), image)
    frames, fps = _decoded(result)
    assert frames.shape == (9, 32, 32, 3) and fps == 12.0
    # The causal VAE decodes latent frame 0 alone, so frame 0 is exactly the decoded image latent.
    first = to_uint8(decode(components, image_latent(components, image)[None, :, None]))
    assert np.array_equal(result.preview[0], first[0])


def test_long_clip_of_five_windows(components):
    seen = []
    result = generate(components, replace(REQ, frames=65, fps=16.0),
                      progress=lambda stage, f: seen.append(f))
    frames, fps = _decoded(result)
    assert frames.shape == (65, 32, 32, 3) and fps == 16.0
    assert len(result.plan.windows) == 5 and result.plan.keyframes.count == 17
    # the keyframe pass's 2 steps, then the 5 windows' 2 steps taken together
    assert seen == sorted(seen) and seen[-1] == pytest.approx(1.0) and len(seen) == 2 + 2
    assert result.timings["denoise_keyframes"] > 0


def test_upscale_full_doubles_size_and_frame_rate(components):
    result = generate(components, replace(REQ, frames=9, upscale="full"))
    frames, fps = _decoded(result)
    assert frames.shape == (17, 64, 64, 3) and fps == 16.0
    assert result.preview.shape == (9, 32, 32, 3)
    spatial = generate(components, replace(REQ, frames=9, upscale="spatial"))
    assert spatial.frames.shape == (9, 64, 64, 3) and spatial.fps == 8.0
    assert np.array_equal(spatial.preview, result.preview)


def test_same_seed_same_clip_and_windows_run_in_any_order(components):
    """Windows depend only on the keyframes: denoising them in reverse order (as parallel
    replicas might finish) and blending gives exactly the pipeline's clip."""
    components = replace(components, windows=WindowConfig(9, 1))  # 2 windows + keyframe pass
    req = replace(REQ, frames=17)
    a = generate(components, req)
    assert np.array_equal(a.frames, generate(components, req).frames)
    assert not np.array_equal(a.frames, generate(components, replace(req, seed=12)).frames)

    plan, text = plan_windows(17, req.fps, components.windows), encode_text(components, req)
    assert len(plan.windows) == 2 and plan.keyframes is not None
    kf = torch.cat(list(base_frames(components, req, text, plan.keyframes.plan, None, Timer(),
                                    _Steps(None, 1))), dim=2)
    keyframes = encode_images(components, kf[0].transpose(0, 1))
    latents = {w.index: denoise_window(components, req, text, w, keyframes, req.seed)
               for w in reversed(plan.windows)}
    blender = Blender(plan)
    out = [blender.add(w, decode(components, latents[w.index])) for w in plan.windows]
    assert np.array_equal(to_uint8(torch.cat(out, dim=2)), a.frames)


def test_jointly_denoised_windows_are_decoded_and_blended_like_any_others(components):
    """The default overlap shares one latent group between neighbours: the pipeline denoises
    them together, then decodes and blends them as it does independent windows."""
    req = replace(REQ, frames=41)
    a = generate(components, req)
    plan, text = a.plan, encode_text(components, req)
    assert len(plan.windows) == 3 and plan.shared == ((0, 4, 1), (1, 4, 1))
    kf = torch.cat(list(base_frames(components, req, text, plan.keyframes.plan, None, Timer(),
                                    _Steps(None, 1))), dim=2)
    keyframes = encode_images(components, kf[0].transpose(0, 1))
    latents = denoise_windows(components, req, text, plan.windows, keyframes, req.seed,
                              plan.shared)
    videos = [decode(components, z) for z in latents]
    blender = Blender(plan)
    out = [blender.add(w, v) for w, v in zip(plan.windows, videos, strict=True)]
    assert np.array_equal(to_uint8(torch.cat(out, dim=2)), a.frames)
    apart = generate(replace(components, windows=WindowConfig(joint=False)), req)
    assert apart.plan.shared == () and not np.array_equal(apart.frames, a.frames)


def test_render_to_file_writes_an_mp4_under_the_storage_root(components, local_storage):
    uri, result = render_to_file(components, replace(REQ, frames=5), storage=local_storage)
    assert uri.startswith(local_storage.root) and "/renders/a-blue-square-moving-left-seed11-" in uri
    frames, fps = read_mp4(local_storage.read_bytes(uri))
    assert frames.shape == (5, 32, 32, 3) and fps == 8.0 and "mux" in result.timings
    assert [n.rsplit("/", 1)[-1] for n in local_storage.ls("renders")] == [uri.rsplit("/", 1)[-1]]
