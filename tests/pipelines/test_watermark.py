"""The watermark model on world clips at the shipped output size: error-correcting code, quality
budget, payload after H.264 / crop / frame drops, silence on unwatermarked clips."""

from __future__ import annotations

import numpy as np
import pytest

from cineray.models.watermark import (
    Watermark,
    WatermarkConfig,
    coded_length,
    conv_encode,
    viterbi,
)
from cineray.pipelines.provenance import Payload, decide, detect, watermark
from cineray.video import psnr, read_mp4, write_mp4
from cineray.world import WorldConfig, render, sample_scene

BITS = Payload(0xBEEF, 0x12345678).bits()  # 48 bits + CRC-16


def world_clip(seed: int, size: int = 64, frames: int = 17, fps: float = 8.0) -> np.ndarray:
    cfg = WorldConfig(width=size, height=size, frames=frames, fps_choices=[fps])
    return render(sample_scene(cfg, seed, heldout=None), size, size, frames, fps)


def h264(frames: np.ndarray, crf: int, fps: float = 8.0) -> np.ndarray:
    return read_mp4(write_mp4(np.ascontiguousarray(frames), fps, crf=crf))[0]


@pytest.fixture(scope="module")
def wm():
    return Watermark()


@pytest.fixture(scope="module")
def marked(wm):
    """(original, watermarked) 64x64x33 world clips at 16 fps with a moving camera and object."""
    clip = world_clip(3, frames=33, fps=16.0)
    return clip, wm.embed(clip, BITS)


def test_code_corrects_errors_and_decodes_soft_values():
    rng = np.random.default_rng(0)
    code = conv_encode(BITS)
    assert len(code) == coded_length(64) == 210
    soft = (2.0 * code - 1) * rng.uniform(0.2, 1.0, len(code))
    flip = rng.choice(len(code), 15, replace=False)  # 7% hard errors, spread out
    soft[flip] *= -1
    assert np.array_equal(viterbi(soft, 64), BITS)
    assert not np.array_equal(viterbi(-soft, 64), BITS)


def test_embedding_meets_its_quality_budget_and_is_deterministic(wm, marked):
    clip, out = marked
    assert out.dtype == np.uint8 and out.shape == clip.shape
    assert 38.0 <= psnr(out, clip) <= 39.0  # target 38.5 dB, less what clipping at 0/255 drops
    assert np.array_equal(out, wm.embed(clip, BITS))
    chroma = out.astype(int) - clip  # luma only: the same change on R, G and B
    inside = (out > 0).all(-1) & (out < 255).all(-1)
    assert (np.ptp(chroma, axis=-1)[inside] <= 1).all()


@pytest.mark.parametrize("crf", [12, 23, 28])
def test_payload_survives_h264(wm, marked, crf):
    reading = wm.read(h264(marked[1], crf))
    assert np.array_equal(reading.bits, BITS) and reading.agreement > 0.9
    assert decide(reading, searched=False).payload == Payload(0xBEEF, 0x12345678)


def test_payload_survives_half_size_and_a_new_frame_rate(wm, marked):
    half = marked[1].reshape(33, 32, 2, 32, 2, 3).mean((2, 4)).round().astype(np.uint8)
    for frames in (half, marked[1][::2]):  # 64 -> 32 px; 16 -> 8 fps
        reading = wm.read(h264(frames, 23))
        assert np.array_equal(reading.bits, BITS) and decide(reading, False).watermarked


def test_dropped_frames_are_retimed(wm, marked):
    keep = np.sort(np.random.default_rng(1).choice(33, 25, replace=False))  # 25% dropped
    seen = h264(marked[1][keep], 23)
    assert not np.array_equal(wm.read(seen).bits, BITS)  # misaligned in time as received...
    segments = wm.retime(seen)  # ...re-timed from the pilot
    assert np.mean(segments == wm.segment_of(33)[keep]) > 0.9
    reading = wm.search(seen)
    assert np.array_equal(reading.bits, BITS) and decide(reading, True).watermarked


@pytest.mark.parametrize(("y0", "x0"), [(3, 3), (0, 6)])
def test_a_cropped_clip_is_reregistered(wm, marked, y0, x0):
    cropped = h264(marked[1][:, y0 : y0 + 58, x0 : x0 + 58], 23, 16.0)  # 10% of a side gone
    reading = wm.register(cropped)  # cell size, sub-cell phase and cell shift searched
    assert np.array_equal(reading.bits, BITS) and decide(reading, True).watermarked
    assert reading.registration and reading.pilot_z > 5


def test_unwatermarked_clips_score_below_the_thresholds(wm):
    for seed in range(4):
        clip = h264(world_clip(100 + seed), 23)
        assert not decide(wm.read(clip), False).watermarked
        assert not decide(wm.search(clip), True).watermarked


def test_other_sizes_and_lengths():
    """Clips shorter than the default watermark's 16 segments get the short one; detect()
    tries both."""
    payload = Payload(0xBEEF, 0x12345678)
    for size, frames in ((32, 5), (48, 9), (128, 1), (32, 17), (96, 25)):
        clip = world_clip(7, size, max(frames, 5))[:frames]
        out = watermark(clip, payload)
        assert out.shape == clip.shape and psnr(out, clip) > 37.5
        assert detect(out).payload == payload


def test_a_different_key_reads_nothing(marked):
    other = Watermark(WatermarkConfig(key=1))
    assert not decide(other.read(marked[1]), False).watermarked


def test_bad_input_is_a_clear_error(wm, marked):
    with pytest.raises(ValueError, match="payload must be 64 bits of 0/1"):
        wm.embed(marked[0], BITS[:40])
    with pytest.raises(ValueError, match=r"frames must be a uint8 array \(T>=1, H, W, 3\)"):
        wm.embed(marked[0].astype(np.float32), BITS)
    with pytest.raises(ValueError, match="raise grid or layouts, or lower payload_bits"):
        Watermark(WatermarkConfig(grid=8, segments=4, layouts=2))
    with pytest.raises(ValueError, match="layouts must divide segments"):
        WatermarkConfig(segments=6, layouts=4)
