"""`cineray render`: writes an MP4 and prints its path; bad input is one line, exit code 2."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from cineray.cli import app
from cineray.pipelines.provenance import ProvenanceConfig, detect_mp4
from cineray.video import read_mp4

runner = CliRunner()


def test_render_writes_the_mp4_and_prints_its_path(components, tmp_path, image):
    Image.fromarray(np.repeat(np.repeat(image, 2, 0), 3, 1)).save(tmp_path / "card.png")  # 64x96
    out = tmp_path / "out" / "clip.mp4"
    result = runner.invoke(app, [
        "render", "a red ball falling", "--frames", "5", "--fps", "8", "--seed", "3",
        "--camera", "pan_left", "--focal-length", "35", "--negative-prompt", "blur",
        "--image", str(tmp_path / "card.png"), "--steps", "1", "--checkpoint", str(tmp_path),
        "--out", str(out), "--in-process", "--set", "provenance.watermark_key=4242"])
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == str(out)
    frames, fps = read_mp4(out.read_bytes())
    assert frames.shape == (5, 32, 32, 3) and fps == 8.0
    # marked with the configured key, which the default key does not read
    assert detect_mp4(out.read_bytes(), ProvenanceConfig(watermark_key=4242)).payload is not None
    assert not detect_mp4(out.read_bytes()).watermarked
    assert [p.name for p in out.parent.iterdir()] == ["clip.mp4"]  # no temp file left behind


@pytest.mark.parametrize(("args", "message"), [
    (["--camera", "spin"], "camera 'spin' is unknown; use one of static, pan_left"),
    (["--frames", "0"], "frames must be an integer >= 1, got 0"),
    (["--image", "missing.png"], "cannot read image 'missing.png'"),
    (["--upscale", "x4"], "upscale must be one of none, spatial, full"),
    (["--checkpoint", "no/such/dir"], "--checkpoint 'no/such/dir' is not a folder"),
])
def test_bad_input_is_one_line_and_exit_2(args, message):
    result = runner.invoke(app, ["render", "a red ball", *args])
    assert result.exit_code == 2, result.output
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1
    assert message in result.stderr and "Traceback" not in result.output
