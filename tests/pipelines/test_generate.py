"""End to end on tiny random components: prompt -> frames -> MP4 that PyAV decodes."""

from __future__ import annotations

from collections import Counter
from dataclasses import replace

import numpy as np
import pytest
import torch

from cineray.evaluator import still_camera
from cineray.pipelines.generate import (
    Timer,
    _Steps,
    base_frames,
    extend,
    generate,
    hold_background,
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
from cineray.world import CAMERAS, WorldConfig, render, sample_scene

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


def _drifting_clip(t=33, seed=0):
    """(1, 3, t, 8, 8): a background that drifts by up to ~3 grey levels frame to frame and a
    bright object moving across it."""
    g = torch.Generator().manual_seed(seed)
    plate = torch.rand(1, 3, 1, 8, 8, generator=g) * 1.6 - 0.8
    video = plate + (torch.rand(1, 3, t, 8, 8, generator=g) - 0.5) * 6 / 127.5
    for i in range(t):
        video[0, :, i, 2:4, i % 8] = 1.0  # the object: far from any background value
    return video


def _hold(video, sizes, plate_frames=17, given=0, fps=None):
    return torch.cat(list(hold_background(iter(video.split(sizes, dim=2)), plate_frames,
                                          given, fps=fps)), dim=2)


def test_hold_background_sets_the_still_background_to_its_plate_and_leaves_objects_alone():
    video = _drifting_clip()
    plate = video[:, :, :17].median(dim=2, keepdim=True).values
    video[0, :, 17:, 7, 7] = plate[0, :, 0, 7, 7, None] + 12 / 127.5  # a change after the plate
    out = _hold(video, [5, 12, 16])
    object_ = torch.zeros(1, 1, 33, 8, 8, dtype=torch.bool)
    for i in range(33):
        object_[0, 0, i, 2:4, i % 8] = True
    background = ~object_.expand_as(video)
    background[:, :, 17:, 7, 7] = False
    # the drifting background is the plate in every frame: it no longer changes at all
    assert torch.equal(out[background], plate.expand_as(video)[background])
    assert out[background].numel() > 0 and not torch.equal(video[background], out[background])
    assert torch.equal(out[object_.expand_as(video)], video[object_.expand_as(video)])
    # 12 grey levels off: between the levels (8, 16), so half way towards the plate
    torch.testing.assert_close(out[:, :, 17:, 7, 7],
                               (video[:, :, 17:, 7, 7] + plate[:, :, :, 7, 7]) / 2)
    # no pixel moves by more than the upper level, and the chunking does not matter
    assert (out - video).abs().max() * 127.5 <= 16 + 1e-3
    assert torch.equal(out, _hold(video, [33])) and torch.equal(out, _hold(video, [1] * 33))


def test_hold_background_holds_on_the_last_given_frame_and_short_streams_on_their_median():
    video = _drifting_clip(t=9)
    for given, plate in ((2, video[:, :, 1:2]), (0, video.median(dim=2, keepdim=True).values)):
        out = _hold(video, [3, 6], given=given)  # 9 frames: fewer than plate_frames
        assert torch.equal(out[:, :, :given], video[:, :, :given])
        near = (video - plate).abs().amax(dim=1, keepdim=True) * 127.5 < 8
        near = near.expand_as(video).clone()
        near[:, :, :given] = False
        assert near.any() and torch.equal(out[near], plate.expand_as(video)[near])


def test_a_camera_left_to_the_prompt_is_held_only_where_the_shot_reads_still():
    """With fps given (no camera asked for), the first plate_frames frames decide: world clips
    with a decoder-like drift of a grey level or so come out held under a still camera, and
    unchanged under every moving one (two scenes per camera motion)."""
    cfg, per = WorldConfig(p_camera_motion=7 / 8), Counter()
    g = torch.Generator().manual_seed(3)
    for seed in range(2000):
        scene = sample_scene(cfg, 7_000_000 + seed, heldout=None)
        if per[scene.camera] == 2:
            continue
        per[scene.camera] += 1
        clip = torch.from_numpy(render(scene, 32, 32, 25, 8.0)).permute(3, 0, 1, 2)[None]
        video = clip.float() / 127.5 - 1 + torch.randn(1, 1, 25, 32, 32, generator=g) / 127.5
        auto = _hold(video, [5, 20], fps=8.0)
        if scene.camera == "static":
            assert torch.equal(auto, _hold(video, [5, 20])) and not torch.equal(auto, video)
        else:
            assert torch.equal(auto, video), scene.camera
        if len(per) == len(CAMERAS) and min(per.values()) == 2:
            break
    assert sorted(per) == sorted(CAMERAS) and set(per.values()) == {2}
    short = _hold(video[:, :, :2], [2], fps=8.0)  # too few frames to read: left alone
    assert torch.equal(short, video[:, :, :2])


def test_a_still_camera_request_holds_the_background_and_other_cameras_do_not(components, image):
    still = replace(REQ, camera="static", frames=9)
    held = generate(components, still)
    free = generate(components, replace(still, hold_background=False))
    diff = np.abs(held.frames.astype(int) - free.frames.astype(int))
    assert diff.max() <= 17 and diff.any()  # at most 16 grey levels (+1 for rounding), some held
    assert np.array_equal(held.preview, held.frames)
    moving = generate(components, replace(still, camera="pan_left"))
    assert np.array_equal(moving.frames,
                          generate(components, replace(still, camera="pan_left",
                                                       hold_background=False)).frames)
    # no camera asked for: held exactly where the first window reads as a still camera
    free = generate(components, replace(still, camera=None, hold_background=False))
    auto = generate(components, replace(still, camera=None))
    assert np.array_equal(auto.frames, free.frames) != still_camera(free.preview, still.fps)
    # image-to-video: the given first frame is not held
    i2v = image_to_video(components, still, image)
    plain = image_to_video(components, replace(still, hold_background=False), image)
    assert np.array_equal(i2v.frames[0], plain.frames[0])
    assert not np.array_equal(i2v.frames, plain.frames)
    # extending: the given clip comes back as it was
    ext = extend(components, replace(still, frames=4), free.frames)
    assert np.array_equal(ext.frames[:9], free.frames)
    with pytest.raises(ValueError, match="hold_background"):
        replace(still, hold_background="yes")
