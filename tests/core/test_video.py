"""H.264 MP4 round trips through PyAV on world clips."""

from __future__ import annotations

import io

import numpy as np
import pytest

from cineray.video import DATASET_CRF, DATASET_PIX_FMT, psnr, read_mp4, write_mp4
from cineray.world import WorldConfig, render, sample_scene


def _clip(seed: int, size: int = 32, frames: int = 17, fps: float = 8.0) -> np.ndarray:
    return render(sample_scene(WorldConfig(), seed), size, size, frames, fps)


def _luma(x: np.ndarray) -> np.ndarray:
    return x.astype(np.float64) @ np.array([0.299, 0.587, 0.114])


@pytest.mark.parametrize("size", [32, 64])
def test_dataset_format_round_trip(size):
    clip = _clip(1, size)
    data = write_mp4(clip, 8.0, crf=DATASET_CRF, pix_fmt=DATASET_PIX_FMT)
    assert data[4:8] == b"ftyp"  # an MP4 container
    frames, fps = read_mp4(data)
    assert frames.shape == clip.shape and frames.dtype == np.uint8
    assert fps == 8.0
    assert psnr(clip, frames) > 38


def test_yuv420p_keeps_luma_and_loses_chroma_at_32px():
    """The measurement behind storing the dataset as yuv444p."""
    clip = _clip(2)
    d420 = read_mp4(write_mp4(clip, 8.0, crf=12))[0]
    d444 = read_mp4(write_mp4(clip, 8.0, crf=12, pix_fmt="yuv444p"))[0]
    mse = np.mean((_luma(clip) - _luma(d420)) ** 2)
    assert 10 * np.log10(255**2 / mse) > 35  # luma is kept at full resolution
    assert psnr(clip, d444) > psnr(clip, d420) + 5


def test_fps_frame_count_and_sources():
    clip = _clip(3, frames=33, fps=16.0)
    data = write_mp4(clip, 12.5)
    frames, fps = read_mp4(io.BytesIO(data))
    assert frames.shape == (33, 32, 32, 3) and fps == 12.5


def test_read_from_path(tmp_path):
    clip = _clip(4, frames=5)
    path = tmp_path / "clip.mp4"
    path.write_bytes(write_mp4(clip, 8.0))
    frames, fps = read_mp4(str(path))
    assert frames.shape == clip.shape and fps == 8.0


@pytest.mark.parametrize("pix_fmt", ["yuv444p", "yuv420p"])
def test_deterministic_bytes(pix_fmt):
    """Same frames, same bytes, however many encodes came before (x264's macroblock tree broke
    this at 32x32: the 2nd and 4th of six encodes in a process differed)."""
    a, b = _clip(1), _clip(5, frames=33, fps=16.0)
    out_a = {write_mp4(a, 8.0, crf=10, pix_fmt=pix_fmt) for _ in range(6)}
    out_b = {write_mp4(b, 16.0, crf=10, pix_fmt=pix_fmt) for _ in range(6)}
    assert len(out_a) == 1 and len(out_b) == 1


def test_single_frame():
    clip = _clip(6, frames=1)
    frames, _ = read_mp4(write_mp4(clip, 8.0))
    assert frames.shape == (1, 32, 32, 3)


@pytest.mark.parametrize(
    ("frames", "kwargs", "match"),
    [
        (np.zeros((4, 32, 32, 3), np.float32), {}, "uint8"),
        (np.zeros((32, 32, 3), np.uint8), {}, "uint8"),
        (np.zeros((4, 32, 32, 4), np.uint8), {}, "RGB"),
        (np.zeros((4, 31, 32, 3), np.uint8), {}, "even"),
        (np.zeros((4, 32, 32, 3), np.uint8), {"pix_fmt": "rgb24"}, "pix_fmt"),
        (np.zeros((4, 32, 32, 3), np.uint8), {"crf": 60}, "crf"),
        (np.zeros((4, 32, 32, 3), np.uint8), {"fps": 0}, "fps"),
    ],
)
def test_bad_input_is_named(frames, kwargs, match):
    args = {"fps": 8.0, **kwargs}
    with pytest.raises(ValueError, match=match):
        write_mp4(frames, **args)


def test_odd_size_works_in_yuv444p():
    clip = np.full((3, 31, 33, 3), 128, np.uint8)
    frames, _ = read_mp4(write_mp4(clip, 8.0, pix_fmt="yuv444p"))
    assert frames.shape == clip.shape


def test_garbage_is_a_clear_error():
    with pytest.raises(ValueError, match="MP4"):
        read_mp4(b"not a video at all")
