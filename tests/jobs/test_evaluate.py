"""The evaluation job: a deterministic suite, sources judged by one evaluator, report files, CLI.

The `real` source must pass every bar (the suite and the evaluator agree with the world) and
random weights must score 0 valid; components here are tiny and random, sampled in 2 steps.
"""

from __future__ import annotations

import io
import json
import subprocess
import sys
from dataclasses import replace

import numpy as np
import pytest
import torch
import typer
from PIL import Image
from typer.testing import CliRunner

from cineray.cli import app
from cineray.jobs.eval_report import BARS, aggregate, check_bars, judge, markdown
from cineray.jobs.eval_sources import (
    PipelineSource,
    RealSource,
    check_checkpoint,
    make_sources,
    parse_sources,
)
from cineray.jobs.eval_suite import CASES, SuiteConfig, build_suite
from cineray.jobs.evaluate import DEFAULT_PER_CASE, DEFAULT_SOURCES, run_evaluation
from cineray.models.upscaler import UPSCALER_PRESETS
from cineray.models.video_vae import VAE_PRESETS
from cineray.pipelines.stages import random_component
from cineray.pipelines.weights import save_component
from cineray.pipelines.windows import WindowConfig
from cineray.world import CAMERAS, COLOURS, MOTIONS, SHAPES, WorldConfig, captions, render

runner = CliRunner()
WORLD = WorldConfig()


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models gain nothing from a second thread on a shared 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A folder with an exported (random) VAE and spatial upscaler, but no denoiser."""
    folder = tmp_path_factory.mktemp("ckpt")
    save_component("vae", random_component("vae", VAE_PRESETS["tiny"], 1), folder / "vae")
    up = random_component("upscaler_spatial", UPSCALER_PRESETS["tiny_spatial"], 2)
    save_component("upscaler_spatial", up, folder / "upscaler_spatial")
    return folder


def _words(text: str) -> set[str]:
    return set(text.replace(",", " ").split())


def test_suite_is_deterministic_and_covers_every_case():
    cfg = SuiteConfig(per_case=8, seed=5)
    a, b = build_suite(WORLD, cfg), build_suite(WORLD, cfg)
    assert [i.to_json() for i in a] == [i.to_json() for i in b]
    assert all(np.array_equal(x.image, y.image) for x, y in zip(a, b, strict=True)
               if x.image is not None)  # fmt: skip
    other = build_suite(WORLD, replace(cfg, seed=6))
    assert [i.prompt for i in other] != [i.prompt for i in a]
    by = {c: [i for i in a if i.case == c] for c in CASES}
    assert all(len(v) == 8 for v in by.values())
    held = set(WORLD.holdout)
    heldout_combos = {f"{i.scene.colour} {i.scene.shape} {i.scene.motion}" for i in by["heldout"]}
    assert heldout_combos == held and all(i.scene.camera == "static" for i in by["heldout"])
    # phrasings: no colour or shape word of the training captions; half held out
    train_words = set(COLOURS) | set(SHAPES) | {"ball", "disc", "box", "rhombus"}
    for item in by["phrasing"]:
        assert not (train_words & _words(item.prompt)), item.prompt
        assert item.prompt not in captions(item.scene, 0, "train")
    assert sum(f"{i.scene.colour} {i.scene.shape} {i.scene.motion}" in held
               for i in by["phrasing"]) == 4  # fmt: skip
    assert [i.scene.camera for i in by["camera"]] == list(CAMERAS)
    assert all("camera" in i.prompt for i in by["camera"] if i.scene.camera != "static")
    for item in by["i2v"]:
        assert np.array_equal(item.image, render(item.scene, 32, 32, 17, item.fps)[0])
    assert {i.scene.motion for i in by["i2v"]} == set(MOTIONS)
    for item in by["long"]:
        assert len(item.segments) >= 4 and item.frames == 65 and item.segments[-1][1] == 65
        assert all(1 <= b < item.frames for b in item.boundaries)


def test_long_clips_need_four_windows():
    with pytest.raises(ValueError, match="long clips need >= 4"):
        SuiteConfig(long_frames=33)
    with pytest.raises(ValueError, match="per_case"):
        SuiteConfig(per_case=0)


def test_real_clips_pass_every_bar():
    items = build_suite(WORLD, SuiteConfig(per_case=8, seed=1))
    expected = {i.id: i.expected for i in items}
    aggs = {"real": aggregate([judge(i, RealSource()(i)) for i in items], expected)}
    for case in ("heldout", "phrasing", "camera", "i2v", "long", "all"):
        for key in ("valid", "colour", "shape", "motion", "camera"):
            assert aggs["real"][case][key] >= 0.95, (case, key, aggs["real"][case])
    bars = check_bars(aggs)
    assert len(bars) == len(BARS)
    failed = [b for b in bars if b["sources"]["real"]["applies"]
              and not b["sources"]["real"]["pass"]]  # fmt: skip
    assert not failed, failed


def test_random_weights_score_zero_valid():
    items = build_suite(WORLD, SuiteConfig(per_case=2, seed=2))
    (source,) = make_sources(["random"], None, WindowConfig(), seed=3, steps=2)
    assert isinstance(source, PipelineSource)
    verdicts = [judge(i, source(i)) for i in items]
    aggs = {"random": aggregate(verdicts, {i.id: i.expected for i in items})}
    assert aggs["random"]["all"]["valid"] == 0.0
    (bar,) = [b for b in check_bars(aggs) if b["sources"]["random"]["applies"]]
    assert bar["metric"] == "valid" and bar["sources"]["random"]["pass"] is True
    i2v = [v for v in verdicts if v["case"] == "i2v"]
    assert all(v["psnr_first"] < 30 for v in i2v)  # a random VAE does not keep the image


def test_report_files_are_written_and_parse(checkpoint, tmp_path):
    out = tmp_path / "report"
    report = run_evaluation(checkpoint, str(out), "real,random,reconstruct,upscale_spatial",
                            per_case=1, seed=4, world=WORLD, steps=2)  # fmt: skip
    assert sorted(p.name for p in out.iterdir()) == [
        "contact_sheet.png", "report.json", "report.md"]
    data = json.loads((out / "report.json").read_text())
    assert data == json.loads(json.dumps(report))
    assert set(data["verdicts"]) == {"real", "random", "reconstruct", "upscale_spatial"}
    assert all(len(v) == len(CASES) for v in data["verdicts"].values())
    assert data["aggregates"]["real"]["all"]["valid"] == 1.0
    i2v = next(v for v in data["verdicts"]["upscale_spatial"] if v["case"] == "i2v")
    assert "psnr_first" in i2v  # compared with the scene re-rendered at 64 px
    md = (out / "report.md").read_text()
    assert md == markdown(data)
    for case in CASES:
        assert f"## {case}:" in md
    assert "| random weights score 0 valid | == 0 |" in md
    sheet = Image.open(io.BytesIO((out / "contact_sheet.png").read_bytes()))
    assert sheet.size[0] > 8 * 64 and sheet.size[1] > len(CASES) * 4 * 64


def test_report_goes_to_s3(s3_storage):
    uri = s3_storage.join("evals", "run1")
    run_evaluation(None, uri, "real", per_case=1, world=WORLD, storage=s3_storage)
    names = [u.rsplit("/", 1)[1] for u in s3_storage.ls(uri)]
    assert names == ["contact_sheet.png", "report.json", "report.md"]
    data = json.loads(s3_storage.read_bytes(s3_storage.join(uri, "report.json")))
    assert data["run"]["sources"] == ["real"]


def test_sources_and_checkpoint_are_checked(checkpoint, tmp_path):
    assert parse_sources("real, model,real") == ["real", "model"]
    with pytest.raises(ValueError, match="comma-separated list from model, real"):
        parse_sources("real,teacher")
    with pytest.raises(FileNotFoundError, match="source 'model' needs exported denoiser"):
        check_checkpoint(["reconstruct", "model"], checkpoint)
    with pytest.raises(FileNotFoundError, match="is not a folder"):
        check_checkpoint(["model"], tmp_path / "nothing")


def test_cli_help_and_missing_checkpoint(tmp_path):
    result = runner.invoke(app, ["evaluate", "--help"])
    assert result.exit_code == 0 and "--per-case" in result.output and "--sources" in result.output
    params = {p.name: p.default for p in typer.main.get_command(app).commands["evaluate"].params}
    assert params["per_case"] == DEFAULT_PER_CASE and params["sources"] == DEFAULT_SOURCES
    result = runner.invoke(app, ["evaluate", "--checkpoint", str(tmp_path / "none"),
                                 "--out", str(tmp_path / "out")])  # fmt: skip
    assert result.exit_code == 2, result.output
    assert result.stderr.startswith("error: --checkpoint") and result.stderr.count("\n") == 1
    assert not (tmp_path / "out").exists()


def test_module_entry_point_rejects_a_missing_checkpoint(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "cineray.jobs.evaluate", "--checkpoint",
                           str(tmp_path / "none"), "--out", str(tmp_path / "out")],
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("error: --checkpoint") and proc.stderr.count("\n") == 1
