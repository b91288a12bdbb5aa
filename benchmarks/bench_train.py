"""Training throughput of the tiny denoiser: data wait, and DeepSpeed ZeRO-2 against plain torch.

Goals: a worker waits on data for < 5% of its step time; 2 DeepSpeed ZeRO-2 workers (gloo, one
thread each) train >= 0.9x the clips per core of a plain single-process torch loop (one thread)
on the same model, task, batch size and optimizer.

  plain     one process, torch AdamW, batches collated from clips decoded in memory (no Ray):
            the compute ceiling of one core.
  deepspeed the training job itself (jobs.train): Ray Data with data.cache=true, TorchTrainer,
            2 workers x 1 CPU, ZeRO stage 2, the metrics it writes to metrics.jsonl.
Per-core throughput is compared two ways: clips per CPU-second of the training process (the
headline: on a shared machine wall time mostly measures the other programs' load) and wall
clips/s per worker, recorded with the 1-minute load average of each measurement so a reader can
tell when it means little. Warm-up steps are excluded.

    python benchmarks/bench_train.py [--steps 40] [--batch 8] [--clips 96]
writes benchmarks/results/train.json and train.png.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
WARMUP = 10


def config(root: str, steps: int, batch: int):
    from cineray.config import load_config

    return load_config("tiny", [
        f"storage.root={root}", "train.component=denoiser", "train.run_name=bench",
        "train.data_uri=ds", "train.num_workers=2", "train.cpus_per_worker=1",
        "train.threads_per_worker=1", "train.zero_stage=2", f"train.batch_size={batch}",
        f"train.max_steps={steps}", f"train.checkpoint_every={steps}", "train.log_every=5",
        "train.warmup_steps=5", "train.max_failures=0", f"task.vae_weights={root}/vae",
        "task.text_stats_captions=64"])


def plain_loop(cfg, steps: int) -> dict:
    """Single process, one thread: the same task and optimizer, no DeepSpeed, no Ray."""
    import numpy as np
    import torch

    from cineray.cluster.deepspeed_setup import lr_lambda
    from cineray.jobs.data import ClipBatcher, Renditions, decode_rows, read_index, select_rows
    from cineray.pipelines.training import make_task, spec_for
    from cineray.storage import Storage

    torch.set_num_threads(1)
    tc, storage = cfg.train, Storage(cfg.storage)
    spec = spec_for("denoiser", cfg.world)
    ren = Renditions.from_spec(spec)
    table = decode_rows(select_rows(read_index(storage, "ds"), ren, tc.data), storage.cfg)
    rows = {c: table[c].to_numpy(zero_copy_only=False) for c in table.column_names}
    rows["video"] = table["video"].combine_chunks().to_numpy_ndarray()  # (N, T, H, W, 3)
    task = make_task("denoiser", cfg, spec)
    model = task.build_model()
    opt = torch.optim.AdamW(model.parameters(), lr=tc.lr, betas=tuple(tc.betas),
                            weight_decay=tc.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(tc))
    batcher, n = ClipBatcher(ren, tc.batch_size, seed=0), len(rows["clip_id"])
    for step in range(steps):
        if step == WARMUP:
            t0, c0 = time.perf_counter(), time.process_time()
        idx = np.random.default_rng(step).choice(n, tc.batch_size, replace=False)
        loss, _ = task.loss(model, batcher.collate({k: v[idx] for k, v in rows.items()}), step)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        sched.step()
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    clips = (steps - WARMUP) * tc.batch_size
    return {"clips_per_s": clips / wall, "clips_per_cpu_s": clips / cpu, "steps": steps - WARMUP,
            "load_avg_1m": os.getloadavg()[0]}


def deepspeed_run(cfg, clips: int) -> dict:
    """Render ``clips`` base clips (jobs.make_dataset), then run the training job on a local
    2-CPU Ray; figures from its metrics.jsonl."""
    import ray

    from cineray.jobs.make_dataset import make_dataset
    from cineray.jobs.train import train
    from cineray.storage import Storage

    ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING")
    try:
        make_dataset("ds", clips, storage=Storage(cfg.storage), renditions="32x32@8")
        t0 = time.perf_counter()
        train(cfg)
        total, load = time.perf_counter() - t0, os.getloadavg()[0]
    finally:
        ray.shutdown()
    storage = Storage(cfg.storage)
    text = storage.read_bytes(storage.join("runs", "bench", "metrics.jsonl")).decode()
    rows = [json.loads(x) for x in text.splitlines()]
    kept = [r for r in rows if r["step"] > WARMUP]
    mean = lambda k: sum(r[k] for r in kept) / len(kept)  # noqa: E731 (rows cover equal steps)
    return {"clips_per_s": mean("clips_per_s"), "clips_per_cpu_s": mean("clips_per_cpu_s"),
            "data_wait_fraction": mean("data_wait_fraction"), "rows": rows,
            "load_avg_1m": load,
            "wall_s_including_startup": total}


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    p, d = result["plain"], result["deepspeed"]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.6))
    labels = ["wall clips/s per core", "clips per CPU-second"]
    x = range(len(labels))
    a.bar([i - 0.2 for i in x], [p["clips_per_s"], p["clips_per_cpu_s"]], 0.4, label="plain torch")
    a.bar([i + 0.2 for i in x], [d["clips_per_s"] / 2, d["clips_per_cpu_s"]], 0.4,
          label="DeepSpeed ZeRO-2, per worker")
    a.set_xticks(list(x), labels)
    a.set_title(f"per core: {result['ratio_wall']:.2f}x wall, {result['ratio_cpu']:.2f}x CPU")
    a.legend()
    rows = d["rows"]
    b.plot([r["step"] for r in rows], [100 * r["data_wait_fraction"] for r in rows], marker="o")
    b.axhline(5, color="red", ls="--", lw=1, label="goal < 5%")
    b.axvline(WARMUP, color="grey", ls=":", lw=1, label="warm-up")
    b.set(xlabel="step", ylabel="data wait, % of step time", title="worker data wait")
    b.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--clips", type=int, default=96)
    a = ap.parse_args()
    from cineray.models.video_vae import VideoVAE
    from cineray.pipelines.weights import save_component

    with tempfile.TemporaryDirectory() as root:
        cfg = config(root, a.steps, a.batch)
        save_component("vae", VideoVAE(cfg.vae), os.path.join(root, "vae"))  # frozen, random
        ds = deepspeed_run(cfg, a.clips)  # renders the dataset on the same Ray first
        plain = plain_loop(cfg, a.steps)
    result = {
        "machine": f"{os.cpu_count()} CPUs (shared), torch threads 1 per process",
        "model": "tiny denoiser (configs/tiny.yaml)", "batch_per_worker": a.batch,
        "steps_measured": a.steps - WARMUP, "plain": plain, "deepspeed": ds,
        "ratio_wall": ds["clips_per_s"] / 2 / plain["clips_per_s"],
        "ratio_cpu": ds["clips_per_cpu_s"] / plain["clips_per_cpu_s"],
        "data_wait_fraction": ds["data_wait_fraction"],
        "goals": {"data_wait_fraction": "< 0.05", "ratio_per_core": ">= 0.9"},
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "train.json").write_text(json.dumps(result, indent=1))
    plot(result, RESULTS / "train.png")
    print(json.dumps({k: v for k, v in result.items() if k not in ("plain", "deepspeed")},
                     indent=1))
    print(f"plain {plain['clips_per_s']:.1f} clips/s; deepspeed {ds['clips_per_s']:.1f} clips/s "
          f"on 2 workers")


if __name__ == "__main__":
    main()
