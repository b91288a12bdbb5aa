"""Batch renders as a Ray job: a list of prompts in, one MP4 per row and a manifest out.

    python -m cineray.jobs.batch_render --prompts s3://bucket/prompts.parquet \\
        --out s3://bucket/run1 [--config tiny] [--set batch.denoise.max=4 ...]

Layout under OUT:
    OUT/videos/<row_id>-<digest>.mp4   one watermarked, C2PA-signed MP4 per done row
    OUT/rows/<row_id>.json             the record of a done row (written after its MP4)
    OUT/manifest.parquet               one row per input row (batch_rows.MANIFEST_COLUMNS)

Ray Data streams the rows through the stages of batch_stages.py, each model stage an actor
pool that grows between batch.<stage>.min and .max while rows wait for it. Exactly once: a
row's MP4 key is fixed by the row and its settings, and the MP4's existence is its commit point.
A re-run of the same command skips rows whose MP4 exists, never rewrites one, renders the rest
and rebuilds the manifest from this run's rows and the records of earlier runs.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import os
import time
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.parquet as pq

from cineray.config import CinerayConfig, load_config
from cineray.jobs.batch_rows import MANIFEST_COLUMNS, ROW_SCHEMA, read_rows
from cineray.jobs.batch_stages import CheckRows, Decode, Denoise, Package, TextEncode, Upscale
from cineray.pipelines.provenance import SigningConfig
from cineray.storage import Storage

STAGES = (("text", TextEncode), ("denoise", Denoise), ("decode", Decode),
          ("upscale", Upscale), ("package", Package))
CHECK_CPUS = 0.1  # the row checker: validation, safety filter, image reads, exists()
INPUT_SCHEMA = pa.schema([("row_id", pa.string()), ("raw", pa.string()), ("error", pa.string())])


@dataclass
class BatchSummary:
    """What a run did: row counts, throughput and where the manifest is."""

    manifest: str
    rows: int
    done: int  # every row with an MP4, rendered now or earlier
    rendered: int  # rows rendered by this run
    blocked: int
    failed: int
    seconds: float  # wall time of the pipeline
    clips_per_minute: float  # rendered / minutes
    denoise_idle_fraction: float | None  # of the denoiser actors' time since they were ready
    denoise_actors: int
    steady_clips_per_minute: float = 0.0  # rendered / (last MP4 written - first row denoised)
    failures: dict[str, str] = field(default_factory=dict)  # row_id -> reason

    def line(self) -> str:
        idle = "-" if self.denoise_idle_fraction is None else f"{self.denoise_idle_fraction:.0%}"
        return (f"batch: {self.rows} rows: {self.done} done ({self.rendered} rendered now), "
                f"{self.blocked} blocked, {self.failed} failed; {self.clips_per_minute:.1f} "
                f"clips/min over {self.seconds:.1f} s; denoiser actors {self.denoise_actors}, "
                f"idle {idle}; manifest {self.manifest}")


def build_dataset(items: list[dict], config: CinerayConfig, out: str):
    """The streaming pipeline over `items` (INPUT_SCHEMA rows) -> a Dataset of ROW_SCHEMA rows.
    One row per block, so that every stage's pool can spread rows over its actors."""
    import ray

    # One table per row (not repartition(): its split tasks want a whole CPU, which the
    # actor pools may hold, and the job would wait forever).
    ds = ray.data.from_arrow([pa.Table.from_pylist([item], schema=INPUT_SCHEMA) for item in items])
    # An actor too (not tasks): once every pool's actors are placed, nothing in the stream
    # waits for CPUs the pools hold (tasks did, and the job hung).
    ds = ds.map_batches(CheckRows, fn_constructor_args=(config, out), batch_format="pyarrow",
                        batch_size=1, num_cpus=CHECK_CPUS,
                        compute=ray.data.ActorPoolStrategy(size=1))
    for name, stage in STAGES:
        pool = getattr(config.batch, name)
        ds = ds.map_batches(
            stage, fn_constructor_args=(config, out), batch_format="pyarrow",
            batch_size=config.batch.text_batch if name == "text" else 1,
            compute=ray.data.ActorPoolStrategy(min_size=pool.min, max_size=pool.max),
            num_cpus=pool.num_cpus, num_gpus=pool.num_gpus, max_restarts=-1,
            max_task_retries=-1)  # a lost actor's rows are retried; Package never rewrites
    return ds


def run_batch(prompts: str, out: str, config: CinerayConfig, log=print) -> BatchSummary:
    """Render every admissible row of `prompts` under `out` (needs a running Ray)."""
    import ray

    storage = Storage(config.storage)
    out = storage.resolve(out)
    config = _shared_signing(config)
    check_resources(config)
    rows = read_rows(storage, prompts)
    items = [{"row_id": r["row_id"], "raw": None if r["raw"] is None else json.dumps(r["raw"]),
              "error": r["error"]} for r in rows]
    log(f"batch: {len(items)} rows from {storage.resolve(prompts)} -> {out}")
    start = time.time()
    results = {}
    context = ray.data.DataContext.get_current()
    block_size, context.target_max_block_size = context.target_max_block_size, 1
    try:  # every output block holds one row: the text stage's batches are split again, else
        # one denoiser would get a whole batch (repartition() would, but wants a whole CPU)
        for batch in build_dataset(items, config, out).iter_batches(batch_format="pyarrow",
                                                                    batch_size=None):
            for row in batch.drop_columns(["state"]).to_pylist():
                results[row["row_id"]] = row
    finally:
        context.target_max_block_size = block_size
    seconds = time.time() - start
    ordered = [results[r["row_id"]] for r in rows]  # every input row comes out exactly once
    manifest = write_manifest(storage, out, ordered)
    return summarize(ordered, manifest, seconds)


def check_resources(config: CinerayConfig, log=print) -> None:
    """Every pool's `min` actors must fit the cluster's CPUs at once, else the stream stalls
    waiting for an actor that is never placed; pools grow towards `max` only into free CPUs."""
    import ray

    pools = [getattr(config.batch, name) for name, _ in STAGES]
    need = CHECK_CPUS + sum(p.min * p.num_cpus for p in pools)
    most = CHECK_CPUS + sum(p.max * p.num_cpus for p in pools)
    have = ray.cluster_resources().get("CPU", 0.0)
    if need > have:
        raise ValueError(f"the batch pools need {need:g} CPUs at their min sizes but the cluster "
                         f"has {have:g}; lower batch.<stage>.min or batch.<stage>.num_cpus")
    if most > have:
        log(f"batch: the pools at their max sizes would need {most:g} CPUs, the cluster has "
            f"{have:g}: they grow only as far as CPUs are free")


def _shared_signing(config: CinerayConfig) -> CinerayConfig:
    """Pin the local CA's folder to an absolute path, so every actor on this machine signs
    with the same certificate (a relative folder would follow each worker's directory)."""
    prov = config.provenance
    if prov.cert_chain is not None or prov.keys_dir is not None:
        return config
    keys = os.path.abspath(SigningConfig.from_env().keys_dir)
    return dataclasses.replace(config, provenance=dataclasses.replace(prov, keys_dir=keys))


def write_manifest(storage: Storage, out: str, rows: list[dict]) -> str:
    """OUT/manifest.parquet, written atomically (one row per input row, in input order)."""
    fields = [ROW_SCHEMA.field(name) for name in MANIFEST_COLUMNS]
    table = pa.Table.from_pylist([{k: r.get(k) for k in MANIFEST_COLUMNS} for r in rows],
                                 schema=pa.schema(fields))
    buf = io.BytesIO()
    pq.write_table(table, buf)
    return storage.write_bytes(storage.join(out, "manifest.parquet"), buf.getvalue())


def summarize(rows: list[dict], manifest: str, seconds: float) -> BatchSummary:
    count = {s: sum(r["status"] == s for r in rows) for s in ("done", "blocked", "failed")}
    rendered = sum(r["status"] == "done" and not r["resumed"] for r in rows)
    traces = [json.loads(r["trace"]) for r in rows if r.get("trace")]
    idle, actors = denoise_idle(traces)
    starts = [t["denoise"][2] for t in traces if "denoise" in t]
    ends = [t["package"][3] for t in traces if "package" in t]
    steady = (max(ends) - min(starts)) if starts and ends else 0.0
    return BatchSummary(
        manifest=manifest, rows=len(rows), done=count["done"], rendered=rendered,
        blocked=count["blocked"], failed=count["failed"], seconds=seconds,
        clips_per_minute=60.0 * rendered / max(seconds, 1e-9), denoise_idle_fraction=idle,
        denoise_actors=actors,
        steady_clips_per_minute=60.0 * rendered / steady if steady > 0 else 0.0,
        failures={r["row_id"]: r["reason"] for r in rows if r["status"] == "failed"})


def denoise_idle(traces: list[dict]) -> tuple[float | None, int]:
    """Idle fraction of the denoiser pool: 1 - busy / available, where each actor is
    available from the moment its models were loaded to the end of the pool's last row."""
    spans = [t["denoise"] for t in traces if "denoise" in t]  # [actor, ready, start, end]
    if not spans:
        return None, 0
    end = max(s[3] for s in spans)
    ready = {}
    for actor, t_ready, _, _ in spans:
        ready[actor] = t_ready
    busy = sum(s[3] - s[2] for s in spans)
    available = sum(end - t for t in ready.values())
    return max(0.0, 1.0 - busy / available) if available > 0 else 0.0, len(ready)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m cineray.jobs.batch_render", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prompts", required=True, help="Parquet or JSONL file (path or s3:// URI)")
    p.add_argument("--out", required=True, help="output folder (path or s3:// URI)")
    p.add_argument("--config", default="tiny", help="preset name or .yaml path")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="config override, e.g. batch.denoise.max=4 (repeatable)")
    return p


def main(argv: list[str] | None = None) -> BatchSummary:
    """Parse arguments, connect to Ray (the job's cluster, else a local one), run, print the
    summary line."""
    args = _parser().parse_args(argv)
    config = load_config(args.config, args.overrides)
    import ray

    if not ray.is_initialized():
        try:  # the cluster this job was submitted to (RAY_ADDRESS), or one on this machine ...
            ray.init(address="auto", logging_level="WARNING")
        except ConnectionError:  # ... else a local one
            ray.init(logging_level="WARNING")
    summary = run_batch(args.prompts, args.out, config)
    print(summary.line(), flush=True)
    return summary


if __name__ == "__main__":
    main()
