"""Training input pipeline: Parquet index -> Ray Data decode (PyAV) -> per-worker batches.

Flow (driver, then each Ray Train worker):
  1. read the index (pyarrow, local or s3://) and pick the task's rendition(s) by width/fps;
     upscaler tasks join the base rendition with the higher one on clip_id, so one row holds both.
  2. Ray Data `map_batches(decode_rows)` on a task pool decodes the MP4s with PyAV. A clip that
     cannot be read (missing object, truncated MP4, wrong shape) becomes a row with `error` set,
     so one bad shard never fails a decode task.
  3. `data.cache`: the decoded dataset is materialized once in the object store and bad rows are
     counted and removed on the driver; otherwise each worker drops and counts them as they stream.
  4. On the worker, `ClipBatcher` turns decoded rows into training batches: random temporal crop
     to the task's frame count and a random caption among the phrasings, drawn afresh every epoch.

The index is metadata only (~100 bytes a rendition), so selection and the rendition join run in
pyarrow on the driver: cheaper and simpler than a distributed hash join on a small cluster.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from cineray.jobs.train_config import DataConfig
from cineray.storage import Storage, StorageConfig

log = logging.getLogger(__name__)

# Columns the batches carry besides the decoded video (see the batch contract in ClipBatcher).
_META = ["clip_id", "uri", "captions", "camera", "camera_speed", "focal_length_mm", "fps",
         "shape", "colour", "motion", "frames", "width", "height"]
_HR = ["uri", "frames", "width", "height", "fps"]


@dataclass
class Renditions:
    """Which renditions a task reads: the base one (fps None = every frame rate) and, for
    upscalers, the higher one of the same clip. Built from a pipelines.training.DataSpec."""

    width: int
    height: int
    frames: int
    fps: float | None
    hr_width: int | None = None
    hr_height: int | None = None
    hr_frames: int | None = None
    hr_fps: float | None = None

    @classmethod
    def from_spec(cls, spec) -> Renditions:
        return cls(**{f: getattr(spec, f) for f in cls.__dataclass_fields__})

    @property
    def paired(self) -> bool:
        return self.hr_width is not None


class BadShardError(RuntimeError):
    """Too many clips failed to decode: the dataset is damaged, not one unlucky shard."""


def check_bad_budget(bad: int, total: int, max_fraction: float, example: str = "") -> None:
    """Raise BadShardError when more than ``max_fraction`` of ``total`` clips are bad."""
    if total and bad > max_fraction * total:
        raise BadShardError(
            f"{bad} of {total} clips failed to decode ({bad / total:.1%}), more than "
            f"data.max_bad_fraction={max_fraction}{'; e.g. ' + example if example else ''}. "
            "Regenerate the damaged shards (jobs.make_dataset) or raise data.max_bad_fraction.")


# 1. index ---------------------------------------------------------------------------------------
def read_index(storage: Storage, data_uri: str) -> pa.Table:
    """The dataset's index table; ``data_uri`` is the dataset root or the index.parquet itself."""
    uri = data_uri if data_uri.endswith(".parquet") else storage.join(data_uri, "index.parquet")
    fs, path = storage.pyarrow_fs(uri)
    try:
        return pq.read_table(path, filesystem=fs)
    except (FileNotFoundError, OSError) as e:
        raise FileNotFoundError(
            f"no dataset index at {storage.resolve(uri)} (train.data_uri={data_uri!r}); "
            "build one with `python -m cineray.jobs.make_dataset`") from e


def _rendition(index: pa.Table, width: int, height: int, fps: float | None, frames: int,
               role: str) -> pa.Table:
    mask = pc.and_(pc.equal(index["width"], width), pc.equal(index["height"], height))
    if fps is not None:
        close = pc.less(pc.abs(pc.subtract(index["fps"].cast(pa.float64()), fps)), 1e-3)
        mask = pc.and_(mask, close)
    rows = index.filter(mask)
    if rows.num_rows == 0:
        have = sorted({(w, h, round(f, 3)) for w, h, f in zip(
            index["width"].to_pylist(), index["height"].to_pylist(), index["fps"].to_pylist(),
            strict=True)})
        raise ValueError(f"the dataset has no {role} rendition {width}x{height} @ "
                         f"{fps or 'any'} fps; it has (width, height, fps) = {have}. Render it "
                         "with jobs.make_dataset or change the task's data spec")
    short = rows.filter(pc.less(rows["frames"], frames))
    if short.num_rows:
        raise ValueError(f"{short.num_rows} {role} clips have fewer than {frames} frames "
                         f"(e.g. {short['uri'][0]}); the task needs {frames}")
    return rows


def select_rows(index: pa.Table, ren: Renditions, cfg: DataConfig) -> pa.Table:
    """Rows to train on: the base rendition(s) (+ ``hr_*`` columns of the paired one), held-out
    combinations excluded unless ``cfg.include_heldout``; sorted by clip_id for determinism."""
    if not cfg.include_heldout and "heldout" in index.column_names:
        index = index.filter(pc.invert(index["heldout"]))
    base = _rendition(index, ren.width, ren.height, ren.fps, ren.frames, "base").select(_META)
    if ren.paired:
        hr = _rendition(index, ren.hr_width, ren.hr_height, ren.hr_fps, ren.hr_frames, "higher")
        # A join by hand: pyarrow's hash join cannot carry the list-typed captions column.
        at = pc.index_in(base["clip_id"], value_set=hr["clip_id"])
        base = base.filter(pc.is_valid(at))
        hr = hr.take(pc.drop_null(at))
        for c in _HR:
            base = base.append_column("hr_" + c, hr[c])
        if base.num_rows == 0:
            raise ValueError("no clip_id has both renditions the upscaler task needs")
    base = base.sort_by("clip_id")
    return base.slice(0, cfg.limit) if cfg.limit else base


# 2. decode --------------------------------------------------------------------------------------
def _decode_one(storage: Storage, uri: str, shape: tuple[int, ...]) -> tuple[np.ndarray, str]:
    """(frames uint8 (T,H,W,3), "") or (zeros of the index's shape, error text)."""
    from cineray.video import read_mp4

    try:
        frames, _ = read_mp4(storage.read_bytes(uri))
        if frames.shape != shape:
            raise ValueError(f"decoded shape {frames.shape} != index shape {shape}")
        return frames, ""
    except Exception as e:  # noqa: BLE001 - any unreadable clip is a bad shard, counted later
        log.warning("bad shard %s: %s: %s", uri, type(e).__name__, e)
        return np.zeros(shape, np.uint8), f"{uri}: {type(e).__name__}: {e}"


def decode_rows(batch: pa.Table, storage_cfg: StorageConfig) -> pa.Table:
    """Ray Data map_batches fn (pyarrow batches): adds ``video`` (uint8 (T,H,W,3) per row, a
    tensor column), ``video_hr`` for paired rows, and ``error`` (str, "" when the row decoded)."""
    from ray.data.extensions import ArrowTensorArray

    storage = Storage(storage_cfg)
    cols = {c: batch[c].to_pylist() for c in batch.column_names
            if c.endswith(("uri", "frames", "height", "width"))}
    errors = [""] * batch.num_rows
    for key, prefix in (("video", ""), ("video_hr", "hr_")):
        if prefix + "uri" not in cols:
            continue
        clips = []
        for i, uri in enumerate(cols[prefix + "uri"]):
            shape = tuple(cols[prefix + k][i] for k in ("frames", "height", "width")) + (3,)
            frames, err = _decode_one(storage, uri, shape)
            clips.append(frames)
            errors[i] = errors[i] or err
        batch = batch.append_column(key, ArrowTensorArray.from_numpy(_column(clips)))
    return batch.append_column("error", pa.array(errors, pa.string()))


def build_dataset(storage: Storage, data_uri: str, ren: Renditions, cfg: DataConfig):
    """Ray Dataset of decoded rows, and the number of selected clips (for the bad-shard budget).

    With ``cfg.cache`` the dataset is materialized and bad rows are already removed (and counted
    against ``cfg.max_bad_fraction`` here, on the driver)."""
    import ray.data

    rows = select_rows(read_index(storage, data_uri), ren, cfg)
    step = max(1, cfg.decode_batch_size)
    # One block per decode batch so decoding fans out over tasks from the start.
    blocks = [rows.slice(i, step) for i in range(0, rows.num_rows, step)]
    ds = ray.data.from_arrow(blocks).map_batches(
        decode_rows, fn_kwargs={"storage_cfg": storage.cfg}, batch_size=step,
        batch_format="pyarrow", num_cpus=cfg.decode_cpus)
    if cfg.cache:
        ds = _drop_bad_cached(ds.materialize(), rows.num_rows, cfg.max_bad_fraction)
    return ds, rows.num_rows


def _drop_bad_cached(ds, total: int, max_fraction: float):
    from ray.data.expressions import col

    bad = ds.select_columns(["error"]).filter(expr=col("error") != "").take_all()
    for r in bad:
        log.warning("skipping bad shard %s", r["error"])
    if not bad:
        return ds
    check_bad_budget(len(bad), total, max_fraction, bad[0]["error"])
    log.warning("skipped %d of %d clips that failed to decode", len(bad), total)
    return ds.filter(expr=col("error") == "").materialize()


# 4. worker-side batches --------------------------------------------------------------------------
class ClipBatcher:
    """Re-batches decoded rows into training batches of exactly ``batch_size`` good rows.

    Batch contract (pipelines.training): "video" uint8 tensor (B,T,H,W,3) at the base rendition,
    "video_hr" for paired tasks (same clip, temporally aligned crop), "caption"/"camera"/"shape"/
    "colour"/"motion"/"clip_id": list[str], "start": list[int] (crop start),
    "camera_speed"/"focal_length_mm"/"fps": float32 (B,).
    Bad rows are dropped here and counted in ``self.bad`` (with a log line naming the URI).
    """

    def __init__(self, ren: Renditions, batch_size: int, seed: int):
        self.ren, self.batch_size, self.bad = ren, batch_size, 0
        self.rng = np.random.default_rng(seed)
        self._pending: list[dict[str, np.ndarray]] = []

    def batches(self, stream: Iterable[dict[str, np.ndarray]]) -> Iterator[dict]:
        """One epoch: yields full batches; a final partial batch is dropped (kept for next time
        would mix epochs)."""
        self._pending, have = [], 0
        for chunk in stream:
            chunk = self._drop_bad(chunk)
            self._pending.append(chunk)
            have += len(chunk["clip_id"])
            while have >= self.batch_size:
                rows = _take(self._pending, self.batch_size)
                have -= self.batch_size
                yield self.collate(rows)

    def _drop_bad(self, chunk: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        errors = chunk.get("error")
        if errors is None:
            return chunk
        ok = np.array([not e for e in errors], dtype=bool)
        for e in errors[~ok]:
            log.warning("skipping bad shard %s", e)
        self.bad += int((~ok).sum())
        return chunk if ok.all() else {k: v[ok] for k, v in chunk.items()}

    def collate(self, rows: dict[str, np.ndarray]) -> dict:
        import torch

        ren = self.ren
        starts = [int(self.rng.integers(0, int(f) - ren.frames + 1)) for f in rows["frames"]]
        video = np.stack([v[s:s + ren.frames] for v, s in zip(rows["video"], starts, strict=True)])
        batch = {
            "video": torch.from_numpy(video),  # (B,T,H,W,3) uint8
            "caption": [str(c[self.rng.integers(len(c))]) for c in rows["captions"]],
            **{k: [str(x) for x in rows[k]] for k in ("camera", "shape", "colour", "motion",
                                                      "clip_id")},
            "start": starts,  # first frame of the crop: with clip_id, names the frames
            **{k: torch.tensor(np.asarray(rows[k], np.float32)) for k in
               ("camera_speed", "focal_length_mm", "fps")},
        }
        if ren.paired:
            # The higher rendition starts at the same instant: frame s at fps f is s*hr_fps/f.
            ratio = ren.hr_fps / ren.fps
            hr = [v[round(s * ratio):round(s * ratio) + ren.hr_frames]
                  for v, s in zip(rows["video_hr"], starts, strict=True)]
            batch["video_hr"] = torch.from_numpy(np.stack(hr))
        return batch


class WorkerStream:
    """Endless training batches for one worker, epoch after epoch, in lockstep with its peers.

    Workers must run the same number of steps (every step is a collective), but dropping bad rows
    can leave one worker a batch short. So before each batch the workers sum two numbers over
    the process group: "I have no batch left" and "bad rows this epoch". If any worker is out,
    all of them drain their epoch and start the next together; the bad-row sum is checked
    against the budget on every rank, so all ranks fail together with the same clear error.
    """

    def __init__(self, make_epoch, batcher: ClipBatcher, total_rows: int, max_bad_fraction: float):
        self.make_epoch, self.batcher = make_epoch, batcher  # make_epoch(epoch) -> numpy chunks
        self.total_rows, self.max_bad_fraction = total_rows, max_bad_fraction
        self.epoch, self.wait_s, self.bad, self._gen, self._in_epoch = 0, 0.0, 0, None, 0

    def next(self) -> dict:
        while True:
            t0 = time.perf_counter()
            if self._gen is None:
                self.batcher.bad, self._in_epoch = 0, 0
                self._gen = self.batcher.batches(self.make_epoch(self.epoch))
            batch = next(self._gen, None)
            self.wait_s += time.perf_counter() - t0
            missing, bad = _sum_over_workers([batch is None, self.batcher.bad])
            self.bad = max(self.bad, bad)
            check_bad_budget(bad, self.total_rows, self.max_bad_fraction)
            if not missing:
                self._in_epoch += 1
                return batch
            if self._in_epoch == 0:
                raise ValueError(f"an epoch of {self.total_rows} clips gives no full batch of "
                                 f"{self.batcher.batch_size} to every worker: lower "
                                 "train.batch_size or train.num_workers, or add clips")
            for _ in self._gen:  # finish this epoch's split so the next one starts cleanly
                pass
            self._gen, self.epoch = None, self.epoch + 1


def _sum_over_workers(values: list[int]) -> list[int]:
    import torch
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return [int(v) for v in values]
    t = torch.tensor([int(v) for v in values], dtype=torch.int64)
    dist.all_reduce(t)
    return t.tolist()


def _take(pending: list[dict[str, np.ndarray]], n: int) -> dict[str, np.ndarray]:
    """Pop the first ``n`` rows off a list of column chunks (in place)."""
    out: list[dict[str, np.ndarray]] = []
    while n:
        head = pending[0]
        k = min(n, len(head["clip_id"]))
        out.append({c: v[:k] for c, v in head.items()})
        rest = {c: v[k:] for c, v in head.items()}
        if len(rest["clip_id"]):
            pending[0] = rest
        else:
            pending.pop(0)
        n -= k
    return {c: _concat([o[c] for o in out]) for c in out[0]}


def _concat(parts: list[np.ndarray]) -> np.ndarray:
    try:
        return np.concatenate(parts)
    except ValueError:  # clip arrays of different frame counts
        return _column([x for p in parts for x in p])


def _column(items: list) -> np.ndarray:
    """Rows -> one column: stacked when the shapes agree, else an object array of arrays (clips
    at several frame rates have different frame counts)."""
    if all(isinstance(x, np.ndarray) for x in items) and len({x.shape for x in items}) == 1:
        return np.stack(items)
    col = np.empty(len(items), dtype=object)
    for i, x in enumerate(items):
        col[i] = x
    return col
