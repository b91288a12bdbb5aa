"""The cineray command line: help everywhere, one-line user errors, config show."""

from __future__ import annotations

import io
import os
import subprocess
import sys

import pyarrow.parquet as pq
import pytest
import typer
from typer.testing import CliRunner

from cineray.cli import app
from cineray.config import ConfigError, load_config

runner = CliRunner()


def _command_paths(cmd, prefix=()):
    """Every command and group in the CLI tree, as argument lists."""
    yield list(prefix)
    for name, sub in getattr(cmd, "commands", {}).items():
        yield from _command_paths(sub, (*prefix, name))


ALL_COMMANDS = list(_command_paths(typer.main.get_command(app)))


@pytest.mark.parametrize("path", ALL_COMMANDS, ids=lambda p: " ".join(p) or "cineray")
def test_help_on_every_command(path):
    result = runner.invoke(app, [*path, "--help"])
    assert result.exit_code == 0, result.output
    assert "Usage" in result.output and "Traceback" not in result.output


def test_expected_commands_exist():
    assert ["config", "show"] in ALL_COMMANDS


def test_config_show_prints_the_resolved_config(tmp_path):
    result = runner.invoke(app, ["config", "show", "-c", "base", "--set", "denoiser.depth=3"])
    assert result.exit_code == 0, result.output
    path = tmp_path / "shown.yaml"
    path.write_text(result.stdout)
    assert load_config(str(path)) == load_config("base", ["denoiser.depth=3"])


def test_bad_override_is_one_line_exit_2():
    result = runner.invoke(app, ["config", "show", "--set", "denoiser.dept=3"])
    assert result.exit_code == 2
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1
    assert "denoiser.dept" in result.stderr and "did you mean 'depth'" in result.stderr
    assert "Traceback" not in result.output


def test_unknown_preset_lists_the_presets():
    result = runner.invoke(app, ["config", "show", "-c", "huge"])
    assert result.exit_code == 2
    assert "unknown preset 'huge'" in result.stderr and "tiny" in result.stderr


def test_debug_flag_keeps_the_traceback():
    result = runner.invoke(app, ["--debug", "config", "show", "--set", "denoiser.dept=3"])
    assert isinstance(result.exception, ConfigError)


def test_installed_entry_point_reports_errors_without_traceback():
    """The real `cineray` script, as a user runs it."""
    exe = os.path.join(os.path.dirname(sys.executable), "cineray")
    proc = subprocess.run(
        [exe, "config", "show", "--set", "vae.channels=[1,x]"], capture_output=True, text=True
    )
    assert proc.returncode == 2
    assert "vae.channels[1]" in proc.stderr and "Traceback" not in proc.stderr
    version = subprocess.run([exe, "--version"], capture_output=True, text=True)
    assert version.returncode == 0 and version.stdout.startswith("cineray ")


@pytest.mark.ray
def test_dataset_command_writes_local_shards(ray_cluster, tmp_path):
    root = tmp_path / "data"
    args = ["dataset", "--clips", "2", "--renditions", "32x32@8,16x16@8"]
    sets = ["--set", f"storage.root={root}", "--set", "world.frames=9"]
    result = runner.invoke(app, [*args, *sets])
    assert result.exit_code == 0, result.output
    index = result.stdout.strip().splitlines()[-1]
    assert index == str(root / "dataset" / "index.parquet")  # relative --out: under storage.root
    table = pq.read_table(index)
    assert table.num_rows == 4 and set(table["frames"].to_pylist()) == {9}
    assert sorted(set(table["width"].to_pylist())) == [16, 32]
    assert all(os.path.isfile(uri) for uri in table["uri"].to_pylist())


@pytest.mark.ray
def test_dataset_command_writes_to_s3(ray_cluster, s3_storage):
    out = s3_storage.join("worlds", "w1")
    result = runner.invoke(
        app, ["dataset", "--out", out, "--clips", "1", "--renditions", "32x32@8"]
    )
    assert result.exit_code == 0, result.output
    assert result.stdout.strip().splitlines()[-1] == f"{out}/index.parquet"
    table = pq.read_table(io.BytesIO(s3_storage.read_bytes(f"{out}/index.parquet")))
    assert table.num_rows == 1 and s3_storage.exists(table["uri"][0].as_py())


@pytest.mark.ray
def test_dataset_command_bad_rendition_is_one_line(ray_cluster, tmp_path):
    sets = ["--set", f"storage.root={tmp_path}"]
    result = runner.invoke(app, ["dataset", "--clips", "1", "--renditions", "32by32", *sets])
    assert result.exit_code == 2
    assert (
        result.stderr.startswith("error: rendition '32by32'") and "Traceback" not in result.output
    )
