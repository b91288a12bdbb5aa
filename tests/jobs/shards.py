"""Small shard sets for the training-job tests, in the dataset format of jobs.make_dataset.

Real world scenes rendered by cineray.world and encoded as H.264 by cineray.video; the index has
the columns jobs.data reads. Renditions: base 32x32x17 @ 8 fps, plus (optionally) 64x64 @ 8 fps
and 32x32x33 @ 16 fps for the upscalers.
"""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq

from cineray.storage import Storage
from cineray.video import write_mp4
from cineray.world import WorldConfig, render, sample_scene

BASE = [(32, 32, 17, 8.0)]
ALL = [(32, 32, 17, 8.0), (64, 64, 17, 8.0), (32, 32, 33, 16.0)]


def write_shards(storage: Storage, out: str, n_clips: int, renditions=BASE) -> list[dict]:
    """Write ``n_clips`` clips x renditions under ``out``; returns the index rows."""
    world, rows = WorldConfig(), []
    for i in range(n_clips):
        scene = sample_scene(world, seed=i)
        clip_id = f"c{i:05d}"
        phrasings = [f"a {scene.colour} {scene.shape} {scene.motion}",
                     f"{scene.colour} {scene.shape}, {scene.motion}, camera {scene.camera}",
                     f"the {scene.shape} is {scene.colour} and moves {scene.motion}"]
        for w, h, t, fps in renditions:
            frames = render(scene, w, h, t, fps)
            uri = storage.join(out, "clips", "000", f"{clip_id}_{w}x{h}_{fps:g}fps.mp4")
            storage.write_bytes(uri, write_mp4(frames, fps, pix_fmt="yuv444p"))
            rows.append({
                "clip_id": clip_id, "seed": i, "uri": uri, "width": w, "height": h, "frames": t,
                "fps": fps, "caption": phrasings[0], "captions": phrasings,
                "shape": scene.shape, "colour": scene.colour, "motion": scene.motion,
                "camera": scene.camera, "camera_speed": scene.camera_speed,
                "focal_length_mm": scene.focal_length_mm, "n_objects": len(scene.things),
                "heldout": scene.heldout, "trajectory": [[0.5, 0.5]] * t})
    write_index(storage, out, rows)
    return rows


def write_index(storage: Storage, out: str, rows: list[dict]) -> None:
    schema = pa.schema([
        ("clip_id", pa.string()), ("seed", pa.int64()), ("uri", pa.string()),
        ("width", pa.int32()), ("height", pa.int32()), ("frames", pa.int32()),
        ("fps", pa.float32()), ("caption", pa.string()), ("captions", pa.list_(pa.string())),
        ("shape", pa.string()), ("colour", pa.string()), ("motion", pa.string()),
        ("camera", pa.string()), ("camera_speed", pa.float32()),
        ("focal_length_mm", pa.float32()), ("n_objects", pa.int32()), ("heldout", pa.bool_()),
        ("trajectory", pa.list_(pa.list_(pa.float32())))])
    fs, path = storage.pyarrow_fs(storage.join(out, "index.parquet"))
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), path, filesystem=fs)
