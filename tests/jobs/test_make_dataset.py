"""The dataset job on real Ray Data, to a real S3 endpoint (moto) and to a local folder."""

from __future__ import annotations

import io
import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from cineray.jobs.make_dataset import (
    INDEX_SCHEMA,
    Rendition,
    clip_seed,
    load_world,
    main,
    make_dataset,
    parse_renditions,
)
from cineray.video import psnr, read_mp4
from cineray.world import WorldConfig, captions, render, sample_scene, trajectory

pytestmark = pytest.mark.ray


def _index(storage, uri):
    return pq.read_table(io.BytesIO(storage.read_bytes(uri)))


def test_64_clips_to_s3_read_back_labels_and_frames(ray_cluster, s3_storage, s3_bucket):
    """The foundation bar: readable MP4 shards and a Parquet index on an S3 endpoint."""
    out = f"{s3_bucket}/x"
    uri = make_dataset(out, clips=64, seed=3, storage=s3_storage, shard_size=32)
    assert uri == f"{out}/index.parquet"
    index = _index(s3_storage, uri)
    assert index.schema.equals(INDEX_SCHEMA)
    assert index.num_rows == 64 * 3
    rows = index.to_pylist()
    assert len({r["clip_id"] for r in rows}) == 64
    world = load_world(s3_storage, out)
    assert world == WorldConfig()
    shards = {uri.split("/")[-2] for uri in index["uri"].to_pylist()}
    assert shards == {"00000", "00001"}
    for row in rows[::7]:  # read back a spread of renditions
        assert row["uri"].startswith(f"{out}/clips/")
        assert row["uri"].endswith(f"_{row['width']}x{row['height']}_{row['fps']:g}fps.mp4")
        frames, fps = read_mp4(s3_storage.read_bytes(row["uri"]))
        assert frames.shape == (row["frames"], row["height"], row["width"], 3)
        assert fps == pytest.approx(row["fps"])
        scene = sample_scene(world, row["seed"], heldout=row["heldout"])
        for key in ("shape", "colour", "motion", "camera", "n_objects"):
            assert row[key] == getattr(scene, key)
        assert row["captions"] == captions(scene, row["seed"]) and row["caption"] in row["captions"]
        expected = render(scene, row["width"], row["height"], row["frames"], row["fps"])
        assert psnr(expected, frames) > 38
        track = trajectory(scene, row["frames"], row["fps"])
        np.testing.assert_allclose(np.asarray(row["trajectory"]), track, atol=1e-6)
    by_clip = {}
    for row in rows:
        by_clip.setdefault(row["clip_id"], []).append(row)
    for renditions in by_clip.values():
        got = {(r["width"], r["height"], r["fps"], r["frames"]) for r in renditions}
        assert got == {(32, 32, 8.0, 17), (64, 64, 8.0, 17), (32, 32, 16.0, 33)}
        assert len({r["seed"] for r in renditions}) == 1  # one scene, three renditions
    assert not any(index["heldout"].to_pylist())


def test_local_run_is_deterministic(ray_cluster, local_storage, tmp_path):
    def make(out, seed):
        uri = make_dataset(str(tmp_path / out), clips=6, seed=seed, renditions="32x32@8,32x32@16",
                           storage=local_storage, heldout_fraction=0.5)  # fmt: skip
        return _index(local_storage, uri)

    a, b, c = make("a", 1), make("b", 1), make("c", 2)
    strip = ["uri"]
    assert a.drop_columns(strip).equals(b.drop_columns(strip))
    for ua, ub in zip(a["uri"].to_pylist(), b["uri"].to_pylist(), strict=True):
        assert local_storage.read_bytes(ua) == local_storage.read_bytes(ub)
    assert a["seed"].to_pylist() != c["seed"].to_pylist()
    held = a.filter(a["heldout"]).to_pylist()
    assert 0 < len(held) < a.num_rows  # about half the clips are held-out combinations
    holdout = set(WorldConfig().holdout)
    for row in a.to_pylist():
        assert (f"{row['colour']} {row['shape']} {row['motion']}" in holdout) == row["heldout"]
    assert json.loads(local_storage.read_bytes(str(tmp_path / "a" / "world.json")))["frames"] == 17


def test_entry_point_arguments(ray_cluster, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    uri = main(["--out", "cli-data", "--clips", "2", "--renditions", "32x32@4", "--seed", "5"])
    assert capsys.readouterr().out.strip() == uri
    index = pq.read_table(uri)
    assert index["frames"].to_pylist() == [9, 9] and index["fps"].to_pylist() == [4.0, 4.0]
    assert index["seed"].to_pylist() == [clip_seed(5, 0), clip_seed(5, 1)]


def test_bad_renditions_are_named():
    world = WorldConfig()
    assert parse_renditions("32x32@8, 64x64@8", world) == [Rendition(32, 32, 8.0),
                                                          Rendition(64, 64, 8.0)]  # fmt: skip
    with pytest.raises(ValueError, match="'64x64' must look like WIDTHxHEIGHT@FPS"):
        parse_renditions("64x64", world)
    with pytest.raises(ValueError, match="aspect"):
        parse_renditions("64x32@8", world)
    with pytest.raises(ValueError, match="whole number of frames"):
        parse_renditions("32x32@7.3", world)
    with pytest.raises(ValueError, match="empty"):
        parse_renditions(" , ", world)
