"""The evaluator judges clips from pixels alone. Clips here come from seeds far from any used to
tune it (tuning used seeds below 700,000)."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
from scipy import ndimage

from cineray.evaluator import ClipReport, evaluate_clip, score, seam_score, summarise
from cineray.video import DATASET_CRF, DATASET_PIX_FMT, read_mp4, write_mp4
from cineray.world import CAMERAS, MOTIONS, WorldConfig, render, sample_scene

# every camera equally likely (static included), so moving cameras are well represented
CFG = WorldConfig(p_camera_motion=7 / 8)


def _balanced(n: int, first_seed: int) -> list:
    """n scenes with motions and cameras in equal shares (colours and shapes drawn uniformly)."""
    per_motion, per_camera = -(-n // len(MOTIONS)), -(-n // len(CAMERAS))
    scenes, motions, cameras = [], Counter(), Counter()
    seed = first_seed
    while len(scenes) < n:
        s = sample_scene(CFG, seed, heldout=None)
        seed += 1
        if motions[s.motion] < per_motion and cameras[s.camera] < per_camera:
            scenes.append(s)
            motions[s.motion] += 1
            cameras[s.camera] += 1
    return scenes


def _mp4(clip: np.ndarray, fps: float) -> np.ndarray:
    return read_mp4(write_mp4(clip, fps, crf=DATASET_CRF, pix_fmt=DATASET_PIX_FMT))[0]


def _confusions(reports, scenes, key: str) -> Counter:
    return Counter((getattr(s, key), getattr(r, key)) for r, s in zip(reports, scenes, strict=True)
                   if getattr(r, key) != getattr(s, key))  # fmt: skip


@pytest.mark.slow
def test_attributes_at_least_98_percent_on_mp4_clips_at_32px():
    scenes = _balanced(240, first_seed=9_000_000)
    reports = [evaluate_clip(_mp4(render(s, 32, 32, 17, 8.0), 8.0), 8.0) for s in scenes]
    rates = summarise(reports, scenes)
    for key in ("valid", "colour", "shape", "motion", "camera", "gravity"):
        assert rates[key] >= 0.98, (key, rates, _confusions(reports, scenes, key))


@pytest.mark.slow
def test_works_at_64px_rendered_and_upscaled():
    scenes = _balanced(48, first_seed=9_100_000)
    native = [evaluate_clip(_mp4(render(s, 64, 64, 17, 8.0), 8.0), 8.0) for s in scenes]
    # a crude upscaler: bilinear 2x of the 32 px clip
    up = [ndimage.zoom(render(s, 32, 32, 17, 8.0), (1, 2, 2, 1), order=1) for s in scenes]
    upscaled = [evaluate_clip(_mp4(c, 8.0), 8.0) for c in up]
    for reports in (native, upscaled):
        rates = summarise(reports, scenes)
        for key in ("colour", "shape", "motion", "camera"):
            assert rates[key] >= 0.95, (key, rates, _confusions(reports, scenes, key))


def test_gravity_points_down_only_for_falls():
    for motion in ("fall", "static", "left", "right"):
        scenes = [s for s in _balanced(60, 9_200_000) if s.motion == motion][:5]
        for s in scenes:
            r = evaluate_clip(render(s, 32, 32, 17, 8.0), 8.0)
            assert r.valid, (s.seed, r.reason)
            if motion == "fall":
                assert r.gravity_down and 1.5 < r.gravity < 3.5, (s.seed, r.gravity)
            else:
                assert not r.gravity_down and abs(r.gravity) < 0.5, (s.seed, motion, r.gravity)


def test_track_follows_the_object():
    scene = sample_scene(CFG, 9_300_000)
    from cineray.world import trajectory

    r = evaluate_clip(render(scene, 32, 32, 17, 8.0), 8.0)
    assert r.track.shape == (17, 2)
    assert np.nanmax(np.abs(r.track - trajectory(scene, 17, 8.0))) < 0.03


def _blur_noise(rng, sigma) -> np.ndarray:
    x = ndimage.gaussian_filter(rng.random((17, 32, 32, 3)), sigma=(*sigma, 0))
    x = (x - x.min()) / (x.max() - x.min())
    return (x * 255).astype(np.uint8)


def test_noise_blank_and_blobs_are_invalid():
    rng = np.random.default_rng(0)
    clips = [rng.integers(0, 256, (17, 32, 32, 3), dtype=np.uint8)]
    clips += [np.full((17, 32, 32, 3), v, np.uint8) for v in (0, 128, 255)]
    clips += [np.broadcast_to(np.array([230, 20, 20], np.uint8), (17, 32, 32, 3)).copy()]
    clips += [_blur_noise(rng, s) for s in [(0, 2, 2), (1, 3, 3), (2, 4, 4), (3, 5, 5)] * 3]
    for i, clip in enumerate(clips):
        r = evaluate_clip(clip, 8.0)
        assert not r.valid and r.colour is None, (i, r)


def test_fragment_soup_and_flicker_are_invalid():
    rng = np.random.default_rng(1)
    soup = np.full((17, 32, 32, 3), 110, np.uint8)
    for frame in soup:  # a handful of saturated specks in new places every frame
        for _ in range(6):
            y, x = rng.integers(0, 29, 2)
            frame[y : y + 3, x : x + 3] = (230, 30, 30)
    assert not evaluate_clip(soup, 8.0).valid
    clip = render(sample_scene(CFG, 9_400_000), 32, 32, 17, 8.0).astype(np.int16)
    flicker = clip + rng.integers(-40, 40, (17, 1, 1, 1)) * (rng.random((17, 32, 32, 1)) < 0.6)
    r = evaluate_clip(np.clip(flicker, 0, 255).astype(np.uint8), 8.0)
    assert not r.valid and "flicker" in r.reason


def test_score_marks_invalid_clips_wrong_everywhere():
    scene = sample_scene(CFG, 9_500_000)
    good = evaluate_clip(render(scene, 32, 32, 17, 8.0), 8.0)
    assert all(score(good, scene).values())
    bad = ClipReport(False, "noise")
    labels = {"colour": scene.colour, "shape": scene.shape, "motion": scene.motion,
              "camera": scene.camera}  # fmt: skip
    assert score(bad, labels) == {"valid": False, "colour": False, "shape": False,
                                  "motion": False, "camera": False, "gravity": False}  # fmt: skip
    rates = summarise([good, bad], [scene, labels])
    assert rates["valid"] == 0.5 and rates["colour"] == 0.5 and rates["n"] == 2
    with pytest.raises(ValueError, match="2 reports but 1"):
        summarise([good, bad], [scene])


def test_seam_score_sees_a_jump_between_windows():
    a, b = sample_scene(CFG, 9_600_000), sample_scene(CFG, 9_600_001)
    smooth = render(a, 32, 32, 33, 16.0)
    assert seam_score(smooth, [16]) < 2.0
    jump = np.concatenate([smooth[:16], render(b, 32, 32, 33, 16.0)[16:]])
    assert seam_score(jump, [16]) > 5.0
    with pytest.raises(ValueError, match="boundary 40"):
        seam_score(smooth, [40])


def test_bad_input_is_named():
    with pytest.raises(ValueError, match="uint8"):
        evaluate_clip(np.zeros((17, 32, 32, 3), np.float32), 8.0)
    with pytest.raises(ValueError, match="fps"):
        evaluate_clip(np.zeros((17, 32, 32, 3), np.uint8), 0.0)
