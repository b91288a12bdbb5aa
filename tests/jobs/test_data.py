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
from cineray.jobs.make_dataset import make_dataset
from cineray.jobs.train_config import DataConfig

pytestmark = pytest.mark.ray

VAE = Renditions(32, 32, 17, 8.0)
# Temporal pairs with a shorter crop than the clips, so the alignment of random crops shows.
TEMPORAL = Renditions(32, 32, 9, 8.0, hr_width=32, hr_height=32, hr_frames=17, hr_fps=16.0)


@pytest.fixture(scope="module")
def shard_storage(ray_cluster, tmp_path_factory):
    """Seven clips in three renditions (32x32 @ 8 and 16 fps, 64x64 @ 8); two held out."""
    from cineray.storage import Storage, StorageConfig

    storage = Storage(StorageConfig(root=str(tmp_path_factory.mktemp("shards"))))
    make_dataset("all", 7, seed=7, storage=storage, heldout_fraction=0.3,
                 renditions="32x32@8,64x64@8,32x32@16")
    return storage


def _clips(storage, heldout: bool) -> set[str]:
    return {r["clip_id"] for r in read_index(storage, "all").to_pylist()
            if r["heldout"] == heldout}


def _stream(ds, total, ren, batch_size, max_bad=0.5):
    it = ds.iterator()
    return WorkerStream(lambda epoch: it.iter_batches(batch_size=batch_size, batch_format="numpy"),
                        ClipBatcher(ren, batch_size, seed=0), total, max_bad)


def test_rendition_selection_excludes_heldout_and_names_missing_renditions(shard_storage):
    index = read_index(shard_storage, "all")
    train, heldout = _clips(shard_storage, False), _clips(shard_storage, True)
    assert len(train) == 5 and len(heldout) == 2  # what seed 7 draws; the test needs both kinds
    rows = select_rows(index, VAE, DataConfig())
    assert set(rows["clip_id"].to_pylist()) == train and rows.num_rows == 5
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
def damaged(ray_cluster, tmp_path):
    """Ten base clips; one MP4 truncated to half its bytes, one deleted."""
    from cineray.storage import Storage, StorageConfig

    storage = Storage(StorageConfig(root=str(tmp_path)))
    make_dataset("ds", 10, storage=storage, renditions="32x32@8")
    rows = read_index(storage, "ds").to_pylist()
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
    assert not {os.path.basename(truncated)[:8], os.path.basename(missing)[:8]} & set(seen)
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
