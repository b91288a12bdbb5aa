"""The training input pipeline on real Ray Data: shard selection, pairing, crops, bad shards."""

from __future__ import annotations

import logging
import os

import numpy as np
import pytest

from cineray.jobs.data import (
    BadShardError,
    ClipBatcher,
    Renditions,
    WorkerStream,
    build_dataset,
    read_index,
    select_rows,
)
from cineray.jobs.train_config import DataConfig
from tests.jobs.shards import ALL, BASE, write_index, write_shards

pytestmark = pytest.mark.ray

VAE = Renditions(32, 32, 17, 8.0)
# Temporal pairs with a shorter crop than the clips, so the alignment of random crops shows.
TEMPORAL = Renditions(32, 32, 9, 8.0, hr_width=32, hr_height=32, hr_frames=17, hr_fps=16.0)


@pytest.fixture(scope="module")
def shard_storage(tmp_path_factory):
    from cineray.storage import Storage, StorageConfig

    storage = Storage(StorageConfig(root=str(tmp_path_factory.mktemp("shards"))))
    rows = write_shards(storage, "all", 6, ALL)
    rows[-1]["heldout"] = True  # one held-out clip (all its renditions) must never be trained on
    rows[-2]["heldout"] = rows[-3]["heldout"] = True
    write_index(storage, "all", rows)
    return storage


def _stream(ds, total, ren, batch_size, max_bad=0.5):
    it = ds.iterator()
    return WorkerStream(lambda epoch: it.iter_batches(batch_size=batch_size, batch_format="numpy"),
                        ClipBatcher(ren, batch_size, seed=0), total, max_bad)


def test_rendition_selection_excludes_heldout_and_names_missing_renditions(shard_storage):
    index = read_index(shard_storage, "all")
    rows = select_rows(index, VAE, DataConfig())
    assert rows.num_rows == 5 and "c00005" not in rows["clip_id"].to_pylist()
    assert set(rows["width"].to_pylist()) == {32} and set(rows["fps"].to_pylist()) == {8.0}
    every_fps = select_rows(index, Renditions(32, 32, 17, None), DataConfig(include_heldout=True))
    assert sorted(set(every_fps["fps"].to_pylist())) == [8.0, 16.0]
    with pytest.raises(ValueError, match=r"no base rendition 48x48 .*\(32, 32, 8\.0\)"):
        select_rows(index, Renditions(48, 48, 17, 8.0), DataConfig())
    with pytest.raises(ValueError, match="fewer than 40 frames"):
        select_rows(index, Renditions(32, 32, 40, 8.0), DataConfig())


@pytest.mark.parametrize("cache", [True, False])
def test_paired_renditions_are_joined_and_cropped_in_step(ray_cluster, shard_storage, cache):
    ds, total = build_dataset(shard_storage, "all", TEMPORAL, DataConfig(cache=cache))
    assert total == 5
    stream = _stream(ds, total, TEMPORAL, batch_size=5)
    batch = stream.next()
    video, hr = batch["video"].numpy(), batch["video_hr"].numpy()
    assert video.shape == (5, 9, 32, 32, 3) and hr.shape == (5, 17, 32, 32, 3)
    # Frame i at 8 fps is frame 2i at 16 fps: the crops line up, up to H.264 noise...
    aligned = np.abs(hr[:, ::2].astype(float) - video).mean()
    # ...and pairing the wrong clips (or wrong crops) is far off.
    shifted = np.abs(np.roll(hr, 1, axis=0)[:, ::2].astype(float) - video).mean()
    assert aligned < 3.0 < shifted  # measured: 1.3 aligned, 6.0 crops off by s, 35 wrong clip
    index = {r["clip_id"]: r for r in read_index(shard_storage, "all").to_pylist()}
    for clip_id, caption in zip(batch["clip_id"], batch["caption"], strict=True):
        assert caption in index[clip_id]["captions"]
    assert batch["fps"].tolist() == [8.0] * 5


def test_crops_and_captions_are_redrawn_every_epoch(ray_cluster, shard_storage):
    ren = Renditions(32, 32, 5, 8.0)
    ds, total = build_dataset(shard_storage, "all", ren, DataConfig(cache=True))
    stream = _stream(ds, total, ren, batch_size=5)
    epochs = [stream.next() for _ in range(4)]
    assert stream.epoch == 3
    by_clip = [dict(zip(b["clip_id"], b["video"].numpy(), strict=True)) for b in epochs]
    differs = [not np.array_equal(by_clip[0][c], by_clip[e][c]) for e in (1, 2, 3) for c in by_clip[0]]
    assert sum(differs) >= len(differs) // 2  # 13 start frames to choose from per clip
    captions = {c for b in epochs for c in b["caption"]}
    assert len(captions) > 5  # several phrasings of the five clips


@pytest.fixture
def damaged(tmp_path):
    """Ten base clips; one MP4 truncated to half its bytes, one deleted."""
    from cineray.storage import Storage, StorageConfig

    storage = Storage(StorageConfig(root=str(tmp_path)))
    rows = write_shards(storage, "ds", 10, BASE)
    truncated, missing = rows[3]["uri"], rows[7]["uri"]
    data = open(truncated, "rb").read()
    open(truncated, "wb").write(data[: len(data) // 2])
    os.remove(missing)
    return storage, truncated, missing


@pytest.mark.parametrize("cache", [True, False])
def test_bad_shards_are_skipped_counted_and_named(ray_cluster, damaged, caplog, cache):
    storage, truncated, missing = damaged
    ds, total = build_dataset(storage, "ds", VAE, DataConfig(cache=cache, max_bad_fraction=0.2))
    stream = _stream(ds, total, VAE, batch_size=4, max_bad=0.2)
    with caplog.at_level(logging.WARNING, logger="cineray.jobs.data"):
        seen = [c for _ in range(2) for c in stream.next()["clip_id"]]
    assert stream.epoch == 0 and len(set(seen)) == 8  # the 8 good clips, nothing else
    assert "c00003" not in seen and "c00007" not in seen
    if not cache:  # counted by the consumer as it streams (cached: removed on the driver)
        assert stream.bad == 2
    logged = caplog.text
    assert truncated in logged and missing in logged


@pytest.mark.parametrize("cache", [True, False])
def test_too_many_bad_shards_fail_with_a_clear_error(ray_cluster, damaged, cache):
    storage, _, _ = damaged
    cfg = DataConfig(cache=cache, max_bad_fraction=0.1)
    with pytest.raises(BadShardError, match=r"2 of 10 clips failed to decode .*max_bad_fraction=0.1"):
        ds, total = build_dataset(storage, "ds", VAE, cfg)
        stream = _stream(ds, total, VAE, batch_size=4, max_bad=0.1)
        for _ in range(3):
            stream.next()


def test_missing_index_says_how_to_build_one(local_storage):
    with pytest.raises(FileNotFoundError, match="no dataset index at .*make_dataset"):
        read_index(local_storage, "nowhere")
