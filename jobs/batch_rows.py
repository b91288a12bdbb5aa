"""Batch render rows: reading the prompt list, checking each row, the row and manifest schemas.

Input: Parquet or JSON Lines, one clip per row. `prompt` is required; every other field is
optional (missing or null: the default): id, seed, frames, fps, camera, camera_speed,
focal_length_mm, hold_background, camera_guidance, negative_prompt, image (URI of a PNG/JPEG
first frame), upscale, steps, guidance, sampler. A row that cannot be rendered is reported in
the manifest (status "failed" and the reason, naming the field), never fatal to the job.

Row ids: the `id` column when given (letters, digits, '.', '_', '-'; unique), else the row's
position in the file ("r000042"). The output key of a row is videos/<row_id>-<digest>.mp4, the
digest covering every request field (seed included), so the same command maps the same row to
the same key on every run.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import re
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from cineray.jobs.batch_config import BatchConfig
from cineray.pipelines.generate import request_digest
from cineray.pipelines.safety import check_prompt
from cineray.pipelines.stages import GenerationRequest, derive_seed, load_image
from cineray.storage import Storage

FIELDS = ("prompt", "seed", "frames", "fps", "camera", "camera_speed", "focal_length_mm",
          "hold_background", "camera_guidance", "negative_prompt", "image", "upscale", "steps",
          "guidance", "sampler")
INT_FIELDS = ("seed", "frames", "steps")
ID_PATTERN = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
STATUSES = ("pending", "done", "blocked", "failed")

# Columns every stage reads and returns (Ray Data blocks); `state` is the pickled work in flight.
ROW_SCHEMA = pa.schema([
    ("row_id", pa.string()), ("status", pa.string()), ("reason", pa.string()),
    ("prompt", pa.string()), ("uri", pa.string()), ("seed", pa.int64()),
    ("frames", pa.int32()), ("fps", pa.float64()), ("job_id", pa.string()),
    ("watermark_payload", pa.string()), ("resumed", pa.bool_()), ("timings", pa.string()),
    ("trace", pa.string()), ("state", pa.binary()),
])  # fmt: skip
# The manifest: one row per input row (timings: JSON {stage: seconds}).
MANIFEST_COLUMNS = ("row_id", "status", "reason", "prompt", "uri", "seed", "frames", "fps",
                    "job_id", "watermark_payload", "resumed", "timings")


def read_rows(storage: Storage, uri: str) -> list[dict[str, Any]]:
    """The input file as [{"row_id", "raw": dict | None, "error": str | None}], in file order.
    A JSONL line that is not a JSON object becomes a row with an error, not an exception."""
    data = storage.read_bytes(uri)
    name = uri.lower().rsplit("/", 1)[-1]
    if name.endswith((".parquet", ".pq")):
        raws = [(r, None) for r in pq.read_table(io.BytesIO(data)).to_pylist()]
    elif name.endswith((".jsonl", ".ndjson", ".json")):
        raws = [_json_line(line, n) for n, line in enumerate(data.decode().splitlines(), 1)
                if line.strip()]
    else:
        raise ValueError(f"--prompts {uri!r}: use a .parquet or .jsonl file")
    if not raws:
        raise ValueError(f"--prompts {uri!r} holds no rows")
    rows, seen = [], set()
    for i, (raw, error) in enumerate(raws):
        row_id, id_error = _row_id(raw, i, seen)
        rows.append({"row_id": row_id, "raw": raw, "error": error or id_error})
    return rows


def _json_line(line: str, n: int) -> tuple[dict | None, str | None]:
    try:
        value = json.loads(line)
    except json.JSONDecodeError as e:
        return None, f"line {n} is not valid JSON ({e.msg}); write one JSON object per line"
    if not isinstance(value, dict):
        return None, f"line {n} must be a JSON object like {{\"prompt\": \"...\"}}"
    return value, None


def _row_id(raw: dict | None, index: int, seen: set[str]) -> tuple[str, str | None]:
    """The row's id and an error when the given id is unusable (the row then keeps its
    position id, so it still appears in the manifest)."""
    fallback = f"r{index:06d}"
    given = None if raw is None else raw.get("id")
    if given is None:
        seen.add(fallback)
        return fallback, None
    given = str(given)
    if not ID_PATTERN.match(given):
        return fallback, (f"id {given!r} must be 1-64 letters, digits, '.', '_' or '-' "
                          f"(it names the output file)")
    if given in seen:
        return fallback, f"id {given!r} appears twice; give every row its own id"
    seen.add(given)
    return given, None


def parse_request(raw: dict[str, Any], row_id: str, cfg: BatchConfig) -> tuple[GenerationRequest,
                                                                              str | None]:
    """A row's GenerationRequest (image not loaded yet) and its image URI; raises ValueError
    naming the field. Rows without a seed get one derived from batch.seed and the row id."""
    unknown = sorted(set(raw) - {*FIELDS, "id"})
    if unknown:
        raise ValueError(f"unknown field {unknown[0]!r}; known fields: {', '.join(FIELDS)}")
    given = {k: _clean(k, v) for k, v in raw.items() if k in FIELDS}
    given = {k: v for k, v in given.items() if v is not None}
    if not isinstance(given.get("prompt"), str) or not given["prompt"].strip():
        raise ValueError("prompt is missing or empty; every row needs a prompt")
    image = given.pop("image", None)
    if image is not None and not isinstance(image, str):
        raise ValueError(f"image must be a URI string (PNG/JPEG), got {image!r}")
    given.setdefault("seed", derive_seed(cfg.seed, "batch", row_id))
    if cfg.steps is not None:
        given.setdefault("steps", cfg.steps)
    return GenerationRequest(width=cfg.width, height=cfg.height, **given), image


def _clean(name: str, value):
    """Nulls (None, NaN) mean "not given"; integral floats become ints for integer fields
    (Parquet files written from pandas store optional integer columns as floats)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    if name in INT_FIELDS and isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def check_row(row: dict[str, Any], cfg: BatchConfig, storage: Storage,
              out: str) -> tuple[dict[str, Any], GenerationRequest | None]:
    """One input row -> (a ROW_SCHEMA row without state, its request or None). Status:
    "blocked" (safety filter; reason = category), "failed" (invalid row; reason names the
    field), "done" (its MP4 already exists: a resumed run renders it no more) or "pending"."""
    out_row = {"row_id": row["row_id"], "status": "pending", "reason": None, "resumed": False,
               "prompt": (row["raw"] or {}).get("prompt") if row["raw"] else None}
    if not isinstance(out_row["prompt"], str):
        out_row["prompt"] = None
    if row["error"]:
        return {**out_row, "status": "failed", "reason": row["error"]}, None
    try:
        request, image_uri = parse_request(row["raw"], row["row_id"], cfg)
    except ValueError as e:
        return {**out_row, "status": "failed", "reason": str(e)}, None
    verdict = check_prompt(request.prompt)
    if not verdict.allowed:
        return {**out_row, "status": "blocked", "reason": verdict.category}, None
    if image_uri is not None:
        try:
            with storage.open(image_uri) as f:
                request.image = load_image(f, (request.width, request.height))
        except (OSError, ValueError) as e:
            return {**out_row, "status": "failed", "reason": f"image {image_uri!r}: {e}"}, None
    uri = storage.join(out, "videos", f"{row['row_id']}-{request_digest(request)}.mp4")
    out_row.update(uri=uri, seed=request.seed, frames=request.frames, fps=float(request.fps),
                   job_id=job_id(out, row["row_id"]))
    if storage.exists(uri):
        return {**out_row, "status": "done", "resumed": True}, None
    return out_row, request


def job_id(out: str, row_id: str) -> str:
    """The watermark's job id of a row: stable for the same output folder and row."""
    digest = hashlib.blake2b(out.encode(), digest_size=4).hexdigest()
    return f"batch-{digest}-{row_id}"


def marker_uri(storage: Storage, out: str, row_id: str) -> str:
    """rows/<row_id>.json: the record of a finished row (written after its MP4)."""
    return storage.join(out, "rows", f"{row_id}.json")


def to_table(rows: list[dict[str, Any]]) -> pa.Table:
    cols = {name: [r.get(name) for r in rows] for name in ROW_SCHEMA.names}
    return pa.Table.from_pydict(cols, schema=ROW_SCHEMA)
