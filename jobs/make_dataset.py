"""Render the synthetic physics world into dataset shards: H.264 MP4 clips + a Parquet index.

    python -m cineray.jobs.make_dataset --out s3://bucket/world --clips 10000 \\
        [--seed 0] [--renditions 32x32@8,64x64@8,32x32@16] [--shard-size 256] \\
        [--heldout-fraction 0]

Layout under OUT (see the dataset section of the interfaces):
    OUT/clips/<shard>/<clip_id>_<W>x<H>_<fps>fps.mp4    one MP4 per clip and rendition
    OUT/index.parquet                                    one row per rendition (INDEX_SCHEMA)
    OUT/world.json                                       the WorldConfig used

A Ray Data job: range(clips) -> map_batches tasks (0.5 CPU each: an actor pool with whole CPUs
starved a 2-CPU cluster) that render every rendition of a clip, encode it and write it through
Storage (atomic), returning index rows; the driver gathers the rows and writes the index last,
so a reader never sees an index that names a missing clip. Everything follows from the seed:
the same seed gives the same index and the same MP4 bytes.

Renditions "WxH@F": F is relative to the world's base fps (WorldConfig.fps, 8). A rendition at
another rate spans the same seconds, frames = (base_frames - 1) * F / base_fps + 1, and a clip
sampled at another fps (WorldConfig.fps_choices) keeps the same ratio.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from cineray.storage import Storage, StorageConfig
from cineray.video import DATASET_CRF, DATASET_PIX_FMT, write_mp4
from cineray.world import WorldConfig, captions, render, sample_scene, trajectory

INDEX_SCHEMA = pa.schema([
    ("clip_id", pa.string()), ("seed", pa.int64()), ("uri", pa.string()),
    ("width", pa.int32()), ("height", pa.int32()), ("frames", pa.int32()), ("fps", pa.float32()),
    ("caption", pa.string()), ("captions", pa.list_(pa.string())),
    ("shape", pa.string()), ("colour", pa.string()), ("motion", pa.string()),
    ("camera", pa.string()), ("camera_speed", pa.float32()), ("focal_length_mm", pa.float32()),
    ("n_objects", pa.int32()), ("heldout", pa.bool_()),
    ("trajectory", pa.list_(pa.list_(pa.float32()))),
])  # fmt: skip
DEFAULT_RENDITIONS = "32x32@8,64x64@8,32x32@16"
CLIPS_PER_TASK = 8


@dataclass(frozen=True)
class Rendition:
    """One size and frame rate of every clip; fps relative to WorldConfig.fps."""

    width: int
    height: int
    fps: float

    def frames_for(self, world: WorldConfig) -> int:
        return int(round((world.frames - 1) * self.fps / world.fps)) + 1


def parse_renditions(spec: str, world: WorldConfig) -> list[Rendition]:
    """'32x32@8,64x64@8,32x32@16' -> renditions, checked against the world's aspect and frames."""
    out = []
    for item in (s.strip() for s in spec.split(",") if s.strip()):
        try:
            size, fps = item.split("@")
            w, h = (int(v) for v in size.lower().split("x"))
            ren = Rendition(w, h, float(fps))
        except ValueError:
            msg = f"rendition {item!r} must look like WIDTHxHEIGHT@FPS, e.g. 64x64@8"
            raise ValueError(msg) from None
        if w < 4 or h < 4 or ren.fps <= 0:
            raise ValueError(f"rendition {item!r}: size must be >= 4 px and fps > 0")
        if w * world.height != h * world.width:
            raise ValueError(f"rendition {item!r} must keep the world's aspect "
                             f"{world.width}x{world.height}")  # fmt: skip
        exact = (world.frames - 1) * ren.fps / world.fps
        if abs(exact - round(exact)) > 1e-6:
            raise ValueError(f"rendition {item!r}: (frames - 1) * fps / {world.fps:g} = {exact:g} "
                             f"is not a whole number of frames; pick fps as a multiple of "
                             f"{world.fps / (world.frames - 1):g}")  # fmt: skip
        out.append(ren)
    if not out:
        raise ValueError("renditions is empty; e.g. --renditions 32x32@8")
    return out


def clip_seed(seed: int, index: int) -> int:
    """The scene seed of clip `index` in a dataset made with `seed` (a non-negative int63)."""
    return int(np.random.SeedSequence([seed, index]).generate_state(1, np.uint64)[0] >> 1)


def render_clip(
    index: int, out: str, seed: int, renditions: list[Rendition], world: WorldConfig,
    storage: Storage, shard_size: int, heldout_fraction: float,
) -> list[dict]:  # fmt: skip
    """Render, encode and write every rendition of clip `index`; its index rows."""
    s = clip_seed(seed, index)
    heldout = bool(np.random.default_rng(s).random() < heldout_fraction)
    scene = sample_scene(world, s, heldout=heldout)
    phrasings = captions(scene, s, style="train")
    clip_id, shard = f"c{index:07d}", f"{index // shard_size:05d}"
    rows = []
    for ren in renditions:
        fps = scene.fps * ren.fps / world.fps
        frames = ren.frames_for(world)
        video = render(scene, ren.width, ren.height, frames, fps)
        name = f"{clip_id}_{ren.width}x{ren.height}_{fps:g}fps.mp4"
        data = write_mp4(video, fps, crf=DATASET_CRF, pix_fmt=DATASET_PIX_FMT)
        uri = storage.write_bytes(storage.join(out, "clips", shard, name), data)
        rows.append({
            "clip_id": clip_id, "seed": s, "uri": uri, "width": ren.width, "height": ren.height,
            "frames": frames, "fps": fps, "caption": phrasings[0], "captions": phrasings,
            "shape": scene.shape, "colour": scene.colour, "motion": scene.motion,
            "camera": scene.camera, "camera_speed": scene.camera_speed,
            "focal_length_mm": scene.focal_length_mm, "n_objects": scene.n_objects,
            "heldout": scene.heldout, "trajectory": trajectory(scene, frames, fps).tolist(),
        })  # fmt: skip
    return rows


def _render_batch(batch: dict[str, np.ndarray], **kwargs) -> pa.Table:
    rows = [row for i in batch["id"] for row in render_clip(int(i), **kwargs)]
    return pa.Table.from_pylist(rows, schema=INDEX_SCHEMA)


def make_dataset(out: str, clips: int, seed: int = 0,
                 renditions: str | list[Rendition] = DEFAULT_RENDITIONS,
                 world_cfg: WorldConfig | None = None, storage: Storage | None = None,
                 shard_size: int = 256, heldout_fraction: float = 0.0) -> str:  # fmt: skip
    """Render `clips` clips x renditions under `out` with Ray Data; returns the index URI.

    Needs a running Ray (the entry point starts one). heldout_fraction of the clips show
    held-out (colour, shape, motion) combinations, flagged in the index.
    """
    import ray

    world = world_cfg or WorldConfig()
    storage = storage or Storage()
    rens = parse_renditions(renditions, world) if isinstance(renditions, str) else renditions
    if clips < 1 or shard_size < 1:
        raise ValueError(f"clips ({clips}) and shard_size ({shard_size}) must be >= 1")
    if not 0.0 <= heldout_fraction <= 1.0:
        raise ValueError(f"heldout_fraction={heldout_fraction} must be in [0, 1]")
    out = storage.resolve(out)
    kwargs = dict(out=out, seed=seed, renditions=rens, world=world, storage=storage,
                  shard_size=shard_size, heldout_fraction=heldout_fraction)  # fmt: skip
    ds = ray.data.range(clips, override_num_blocks=max(1, -(-clips // CLIPS_PER_TASK)))
    ds = ds.map_batches(_render_batch, fn_kwargs=kwargs, batch_size=CLIPS_PER_TASK,
                        batch_format="numpy", num_cpus=0.5)  # fmt: skip
    tables = [ray.get(ref) for ref in ds.to_arrow_refs()]
    index = pa.concat_tables(tables).cast(INDEX_SCHEMA)
    index = index.sort_by([("clip_id", "ascending"), ("width", "ascending"), ("fps", "ascending")])
    storage.write_bytes(storage.join(out, "world.json"),
                        json.dumps(dataclasses.asdict(world), indent=2).encode())  # fmt: skip
    buf = io.BytesIO()
    pq.write_table(index, buf)
    return storage.write_bytes(storage.join(out, "index.parquet"), buf.getvalue())


def load_world(storage: Storage, out: str) -> WorldConfig:
    """The WorldConfig a dataset was made with (OUT/world.json)."""
    data = json.loads(storage.read_bytes(storage.join(out, "world.json")))
    for f in dataclasses.fields(WorldConfig):  # JSON has no tuples
        if isinstance(f.default, tuple) and isinstance(data.get(f.name), list):
            data[f.name] = tuple(data[f.name])
    return WorldConfig(**data)


def dataset(out: str, clips: int, seed: int = 0, renditions: str = DEFAULT_RENDITIONS,
            shard_size: int = 256, heldout_fraction: float = 0.0,
            world_cfg: WorldConfig | None = None,
            storage_cfg: StorageConfig | None = None) -> str:  # fmt: skip
    """What `cineray dataset` runs (with Ray already started): plain arguments -> index URI."""
    return make_dataset(out, clips, seed, renditions, world_cfg, Storage(storage_cfg),
                        shard_size, heldout_fraction)  # fmt: skip


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m cineray.jobs.make_dataset", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--out", required=True, help="dataset root: a local path or s3://bucket/prefix")
    p.add_argument("--clips", type=int, required=True, help="number of clips")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--renditions", default=DEFAULT_RENDITIONS, help="WxH@FPS,...")
    p.add_argument("--shard-size", type=int, default=256, help="clips per clips/<shard>/ folder")
    p.add_argument("--heldout-fraction", type=float, default=0.0,
                   help="fraction of clips showing held-out combinations")  # fmt: skip
    return p


def main(argv: list[str] | None = None) -> str:
    """Parse arguments, make sure Ray runs, make the dataset; prints and returns the index URI."""
    args = _parser().parse_args(argv)
    import ray

    if not ray.is_initialized():
        try:  # an existing cluster (RAY_ADDRESS or one started on this machine) ...
            ray.init(address="auto", logging_level="WARNING")
        except ConnectionError:  # ... else a local one
            ray.init(logging_level="WARNING")
    uri = dataset(args.out, args.clips, args.seed, args.renditions, args.shard_size,
                  args.heldout_fraction)  # fmt: skip
    print(uri)
    return uri


if __name__ == "__main__":
    main()
