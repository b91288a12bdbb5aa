"""Training job: Ray Data shards -> Ray Train TorchTrainer workers -> DeepSpeed -> checkpoints.

    python -m cineray.jobs.train --config tiny train.component=vae train.max_steps=500
    python -m cineray.jobs.train export --run tiny-vae --out checkpoints/cineray-tiny/vae
    python -m cineray.jobs.train average --out soup/denoiser exportA/denoiser exportB/denoiser
    python -m cineray.jobs.train val exportA/denoiser exportB/denoiser   (jobs/train_val.py)

One job trains any component (train.component: vae, denoiser, upscaler_spatial,
upscaler_temporal) through its pipelines.training task. Each worker wraps the plain model in
DeepSpeed (cluster.deepspeed_setup), keeps EMA weights, and every `checkpoint_every` steps saves
its shard and reports it to Ray Train under `<storage_path>/<run_name>/step_<N>/`. A worker
failure restarts the group from the newest checkpoint (FailureConfig); running the same command
again with the same run_name resumes too. Layout of a run: jobs/train_io.py.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import tempfile
import time
import warnings

import torch

from cineray.cluster.deepspeed_setup import (
    EMA,
    apply_deepspeed,
    full_state_dict,
    load_shards,
    save_shards,
)
from cineray.jobs import train_io
from cineray.jobs.data import ClipBatcher, Renditions, WorkerStream, build_dataset
from cineray.jobs.train_config import DataConfig, TrainConfig
from cineray.pipelines.training import make_task, native_bf16, spec_for
from cineray.pipelines.weights import save_component
from cineray.storage import Storage

__all__ = ["TrainConfig", "DataConfig", "train", "export", "average"]


def _spec(cfg):
    """The component's renditions (pipelines.training.spec_for) and their pipeline view."""
    spec = spec_for(cfg.train.component, cfg.world)
    return spec, Renditions.from_spec(spec)


# Driver ------------------------------------------------------------------------------------------
def train(cfg):
    """Run (or resume) the training run ``cfg.train`` describes; returns Ray Train's Result.

    ``cfg`` is the resolved root config (cineray.config.CinerayConfig with a ``train`` section).
    Needs a connected Ray (entry points call ray.init, this function does not)."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    cfg = _absolute_paths(cfg)
    tc: TrainConfig = cfg.train
    _check_cpus(tc)
    storage = Storage(cfg.storage)
    _, ren = _spec(cfg)
    dataset, total = build_dataset(storage, tc.data_uri, ren, tc.data)
    run_uri = storage.join(tc.storage_path, tc.run_name)
    path, fs = train_io.ray_storage(storage, tc.storage_path)
    trainer = TorchTrainer(
        _worker,
        train_loop_config={"cfg": cfg, "total_rows": total, "run_uri": run_uri},
        scaling_config=ScalingConfig(num_workers=tc.num_workers, use_gpu=tc.use_gpu,
                                     resources_per_worker={"CPU": tc.cpus_per_worker}),
        run_config=RunConfig(
            name=tc.run_name, storage_path=path, storage_filesystem=fs,
            failure_config=FailureConfig(max_failures=tc.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=tc.keep_checkpoints)),
        datasets={"train": dataset},
        torch_config=TorchConfig(backend="nccl" if tc.use_gpu else "gloo"),
    )
    return trainer.fit()


def _absolute_paths(cfg):
    """Workers run in their own working directories: a relative local storage root, or an
    init_from, or a task.vae_weights, task.decoder_samples or task.teacher folder given
    relative to where the command runs, must be made absolute here."""
    root = cfg.storage.root
    if "://" not in root and not os.path.isabs(root):
        cfg = dataclasses.replace(cfg, storage=dataclasses.replace(
            cfg.storage, root=os.path.abspath(root)))
    init = cfg.train.init_from
    if init and "://" not in init and not os.path.isabs(init) and os.path.isdir(init):
        cfg = dataclasses.replace(cfg, train=dataclasses.replace(
            cfg.train, init_from=os.path.abspath(init)))
    folders = {k: os.path.abspath(v) for k in ("vae_weights", "decoder_samples", "teacher")
               if (v := getattr(cfg.task, k)) and not os.path.isabs(v) and os.path.isdir(v)}
    if folders:
        cfg = dataclasses.replace(cfg, task=dataclasses.replace(cfg.task, **folders))
    return cfg


def _check_cpus(tc: TrainConfig) -> None:
    """Streaming decode runs beside the workers: without a spare CPU it would wait forever."""
    import ray

    spare = ray.cluster_resources().get("CPU", 0) - tc.num_workers * tc.cpus_per_worker
    if not tc.data.cache and spare < tc.data.decode_cpus:
        raise ValueError(
            f"train.data.cache=false decodes while training, but {tc.num_workers} workers x "
            f"train.cpus_per_worker={tc.cpus_per_worker} leave {spare:g} of the cluster's CPUs "
            f"for decoding (train.data.decode_cpus={tc.data.decode_cpus}); lower "
            "train.cpus_per_worker or set train.data.cache=true")


def export(cfg, run: str, out: str, dtype: str = "fp32") -> str:
    """Write the serving weights of ``run`` (a run name under train.storage_path, a run URI or a
    step_<N> checkpoint URI) to ``out``; returns the absolute ``out``."""
    storage = Storage(cfg.storage)
    if "/" not in run and "://" not in run:
        run = storage.join(cfg.train.storage_path, run)
    return train_io.export(storage, run, _from_cwd(out), dtype)


def average(cfg, folders: list[str], out: str) -> str:
    """Write the mean of several exported folders (EMA and raw weights) to ``out``."""
    return train_io.average(Storage(cfg.storage), [_from_cwd(f) for f in folders], _from_cwd(out))


def _from_cwd(path: str) -> str:
    """A local path as typed on the command line (relative to the working directory, where
    Storage would put it under its root); URIs unchanged."""
    return path if "://" in path else os.path.abspath(path)


# Worker ------------------------------------------------------------------------------------------
def _worker(args: dict) -> None:
    """One Ray Train worker: the training loop. Every step is a collective, so all ranks run
    the same number of steps and reports."""
    import ray.train

    cfg = args["cfg"]
    tc: TrainConfig = cfg.train
    torch.set_num_threads(tc.threads_per_worker)
    if tc.precision == "bf16" and not native_bf16("cuda" if torch.cuda.is_available() else "cpu"):
        warnings.warn("train.precision=bf16 on a CPU without native bf16 (AVX512-BF16 or AMX): "
                      "torch emulates it, hundreds of times slower than fp32; set "
                      "train.precision=fp32", stacklevel=1)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    storage = Storage(cfg.storage)

    # 1. model: identical initial weights on every rank, then DeepSpeed from outside.
    torch.manual_seed(tc.seed)
    spec, ren = _spec(cfg)
    # Per-rank task seed: each rank draws its own noise levels and crops.
    task_cfg = dataclasses.replace(cfg.task, seed=cfg.task.seed + 1000 * rank)
    task = make_task(tc.component, dataclasses.replace(cfg, task=task_cfg), spec)
    model = task.build_model()
    init_ema = _warm_start(model, storage, tc)
    engine = apply_deepspeed(model, tc, world)
    ema = EMA(engine.module, tc.ema_decay, tc.zero_stage, rank)
    if init_ema is not None and rank == 0:
        ema.shadow = {k: v.float() if v.is_floating_point() else v for k, v in init_ema.items()}
    torch.manual_seed(tc.seed + 1000 * rank + 1)  # per-rank noise from here on

    # 2. resume: weights, optimizer, LR schedule, EMA and the step counter.
    state = _resume(engine, ema, storage, args["run_uri"], rank, world, tc)
    step = state["step"]

    # 3. data: this worker's split of the dataset, re-batched, in lockstep with the others.
    shard, dc = ray.train.get_dataset_shard("train"), tc.data

    def epoch_batches(epoch: int):
        return shard.iter_batches(
            batch_size=tc.batch_size, batch_format="numpy", prefetch_batches=dc.prefetch_batches,
            local_shuffle_buffer_size=dc.shuffle_buffer or None,
            local_shuffle_seed=tc.seed + 7919 * epoch + rank if dc.shuffle_buffer else None)

    batcher = ClipBatcher(ren, tc.batch_size, seed=tc.seed + 1000 * rank + step)
    stream = WorkerStream(epoch_batches, batcher, args["total_rows"], dc.max_bad_fraction)
    stream.epoch = state.get("epoch", 0)
    log = train_io.MetricsLog(storage, args["run_uri"], step) if rank == 0 else None
    meter = _Meter(resumed=state.get("resumed_digest"))

    # 4. loop: grad_accum micro-batches per optimizer step; DeepSpeed steps at the boundary.
    while step < tc.max_steps:
        t0, cpu0, wait0 = time.perf_counter(), time.process_time(), stream.wait_s
        for _ in range(tc.grad_accum):
            loss, parts = task.loss(engine, stream.next(), step)
            engine.backward(loss)
            engine.step()
        step += 1
        ema.update(engine.module, step)
        meter.add(loss.item(), parts, time.perf_counter() - t0, time.process_time() - cpu0,
                  stream.wait_s - wait0)
        if step % tc.log_every == 0 or step % tc.checkpoint_every == 0 or step == tc.max_steps:
            metrics = meter.pop(step, stream, engine, ema, tc, world)
            _report(engine, ema, task, metrics, tc, rank, world, stream.epoch, log,
                    storage, args["run_uri"])


def _warm_start(model: torch.nn.Module, storage: Storage, tc: TrainConfig) -> dict | None:
    """Load train.init_from (exported weights) into the plain model; returns its EMA or None.

    When the task freezes part of the model (a decoder fine-tuned on a fixed encoder), the frozen
    parameters and the buffers come from the EMA weights: those are what users of the export,
    and models trained on its outputs, ran on; the raw weights differ a little."""
    if not tc.init_from:
        return None
    raw, ema, config = train_io.load_init_weights(storage, tc.init_from, tc.component)
    if tc.component == "denoiser" and list(config.get("patch", model.cfg.patch)) != model.cfg.patch:
        raw, ema = (_refine(sd, config, model.cfg) if sd is not None else None for sd in (raw, ema))
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    if frozen and ema is not None:
        fixed = frozen | {n for n, _ in model.named_buffers()}
        raw = {k: ema[k] if k in fixed else v for k, v in raw.items()}
    model.load_state_dict(raw)
    return ema


def _refine(state: dict, old, new) -> dict:
    """A denoiser state dict saved with coarser patches, converted to the model's finer ones."""
    from cineray.models.dit import refine_patches

    want = [r * n / o for r, n, o in zip(old.get("rope_scale", [1.0] * 3), new.patch,
                                         old["patch"], strict=True)]
    if list(new.rope_scale) != want:
        raise ValueError(f"train.init_from has patch {old['patch']}, the model {new.patch}: "
                         f"set denoiser.rope_scale={want} so token distances keep their meaning")
    return refine_patches(state, old["patch"], new.patch)


def _resume(engine, ema: EMA, storage, run_uri: str, rank, world, tc) -> dict:
    """Load the newest checkpoint: Ray's, or a newer complete one found in storage (a worker
    killed after its upload but before Ray registered it; a run whose Ray state was lost)."""
    import ray.train
    import torch.distributed as dist

    found = []
    if (ckpt := ray.train.get_checkpoint()) is not None:
        found.append((train_io.checkpoint_step(ckpt.path), ckpt))
    scanned = [train_io.latest_checkpoint(storage, run_uri) if rank == 0 else None]
    dist.broadcast_object_list(scanned, src=0)  # every rank must load the same one
    if scanned[0]:
        found.append((train_io.checkpoint_step(scanned[0]), scanned[0]))
    if not found:
        return {"step": 0, "epoch": 0}
    _, src = max(found, key=lambda x: x[0])
    with tempfile.TemporaryDirectory() as d:
        if isinstance(src, str):
            train_io.download(storage, src, d)
        else:
            src.to_directory(d)
        with open(os.path.join(d, "train_state.json")) as f:
            state = json.load(f)
        if (state["world_size"], state["zero_stage"]) != (world, tc.zero_stage):
            raise ValueError(
                f"checkpoint {src} was written by {state['world_size']} workers at ZeRO stage "
                f"{state['zero_stage']}; resume with the same train.num_workers/zero_stage, or "
                "export it and start a new run with train.init_from")
        load_shards(engine, d)
        if rank == 0:
            from safetensors.torch import load_file

            ema.shadow = load_file(os.path.join(d, "export", "model.safetensors"))
    raw = full_state_dict(engine.module, tc.zero_stage, rank)
    state["resumed_digest"] = train_io.weights_digest(raw) if rank == 0 else None
    return state


def _report(engine, ema: EMA, task, metrics: dict, tc: TrainConfig, rank, world, epoch,
            log: train_io.MetricsLog | None, storage: Storage, run_uri: str) -> None:
    """ray.train.report, with a checkpoint every ``checkpoint_every`` steps (all ranks call).

    Rank 0 logs the row before reporting: a run killed after its checkpoint upload then still
    has the row (rows past the checkpoint a restart resumes from are dropped again)."""
    import ray.train
    from ray.train import Checkpoint

    step = metrics["step"]
    if step % tc.checkpoint_every and step != tc.max_steps:
        if log is not None:
            log.append(metrics)
        ray.train.report(metrics)
        return
    with tempfile.TemporaryDirectory() as d:
        state = {"step": step, "epoch": epoch, "world_size": world, "zero_stage": tc.zero_stage,
                 "component": tc.component}
        save_shards(engine, d, state)
        raw = full_state_dict(engine.module, tc.zero_stage, rank)
        if rank == 0:
            metrics["weights_digest"] = state["weights_digest"] = train_io.weights_digest(raw)
            meta = {"step": step, "run": tc.run_name, "ema_decay": ema.decay_at(step)}
            save_component(task.name, engine.module, os.path.join(d, "export"), ema.shadow, meta)
            save_component(task.name, engine.module, os.path.join(d, "export", "raw"), raw, meta)
            with open(os.path.join(d, "train_state.json"), "w") as f:
                json.dump(state, f, indent=1)
        if log is not None:
            log.append(metrics)
        name = train_io.checkpoint_name(step)
        ray.train.report(metrics, checkpoint=Checkpoint.from_directory(d),
                         checkpoint_dir_name=name)
    # The marker goes up only after report() has uploaded this rank's files: Ray copies a
    # directory's files in no fixed order, so a marker inside it could land before a shard
    # that a killed worker never finished writing.
    storage.write_bytes(storage.join(run_uri, name, f"rank_{rank}.done"), b"")


class _Meter:
    """Sums since the last report; ``pop`` turns them into one metrics row (averaged over
    workers, so the row describes the whole group)."""

    def __init__(self, resumed: str | None = None):
        self.resumed = resumed
        self._reset()

    def _reset(self):
        self.n, self.loss, self.step_s, self.cpu_s, self.wait_s, self.parts = 0, 0.0, 0.0, 0.0, 0.0, {}

    def add(self, loss: float, parts: dict, step_s: float, cpu_s: float, wait_s: float) -> None:
        self.n += 1
        self.loss += loss
        self.step_s, self.cpu_s, self.wait_s = self.step_s + step_s, self.cpu_s + cpu_s, self.wait_s + wait_s
        for k, v in parts.items():
            self.parts[k] = self.parts.get(k, 0.0) + float(v)

    def pop(self, step: int, stream: WorkerStream, engine, ema: EMA, tc: TrainConfig,
            world: int) -> dict:
        keys = sorted(self.parts)
        local = [self.loss, self.step_s, self.cpu_s, self.wait_s, *(self.parts[k] for k in keys)]
        loss, step_s, cpu_s, wait_s, *parts = (v / self.n for v in _mean_over_workers(local))
        clips = tc.batch_size * tc.grad_accum  # per worker per step
        row = {"step": step, "epoch": stream.epoch, "loss": loss,
               "lr": float(engine.get_lr()[0]), "ema_decay": ema.decay_at(step),
               "clips_per_s": clips * world / step_s, "step_s": step_s,
               # CPU seconds of a worker process per clip: on a shared machine the fair
               # per-core figure (wall time also counts other programs' load).
               "clips_per_cpu_s": clips / max(cpu_s, 1e-9),
               "data_wait_fraction": wait_s / step_s,
               "bad_clips": stream.bad, "time": time.time(), **dict(zip(keys, parts, strict=True))}
        if self.resumed:
            row["resumed_digest"], self.resumed = self.resumed, None
        self._reset()
        return row


def _mean_over_workers(values: list[float]) -> list[float]:
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t)
        t /= dist.get_world_size()
    return t.tolist()


# Entry point -------------------------------------------------------------------------------------
def main(argv: list[str]) -> int:
    import argparse

    from cineray.cli import start_ray
    from cineray.config import load_config

    if argv[:1] == ["export"]:
        p = argparse.ArgumentParser(prog="python -m cineray.jobs.train export")
        p.add_argument("--run", required=True, help="run name, run URI or step_<N> URI")
        p.add_argument("--out", required=True, help="output folder (local or s3://)")
        p.add_argument("--config", default="tiny")
        p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"],
                       help="bf16 halves the files (shipped checkpoints)")
        p.add_argument("overrides", nargs="*", help="key=value config overrides")
        a = p.parse_args(argv[1:])
        print(export(load_config(a.config, a.overrides), a.run, a.out, a.dtype))
        return 0
    if argv[:1] == ["average"]:
        p = argparse.ArgumentParser(prog="python -m cineray.jobs.train average")
        p.add_argument("--out", required=True, help="output folder (local or s3://)")
        p.add_argument("--config", default="tiny")
        p.add_argument("--set", dest="overrides", action="append", default=[],
                       metavar="KEY=VALUE", help="config override, e.g. storage.endpoint_url=...")
        p.add_argument("folders", nargs="+", help="two exported folders or more")
        a = p.parse_args(argv[1:])
        print(average(load_config(a.config, a.overrides), a.folders, a.out))
        return 0
    if argv[:1] == ["val"]:
        from cineray.jobs.train_val import DEFAULT_SEED, fixed_noise_error, markdown

        p = argparse.ArgumentParser(prog="python -m cineray.jobs.train val",
                                    description="fixed-noise error of denoiser exports on fresh "
                                                "world clips (jobs/train_val.py)")
        p.add_argument("folders", nargs="+", help="denoiser export folders")
        p.add_argument("--clips", type=int, default=128)
        p.add_argument("--seed", type=int, default=DEFAULT_SEED, help="first scene seed")
        p.add_argument("--levels", default="0.1,0.2,0.4,0.6,0.8", help="noise levels t")
        p.add_argument("--config", default="tiny")
        p.add_argument("--set", dest="overrides", action="append", default=[],
                       metavar="KEY=VALUE", help="config override, e.g. task.vae_weights=...")
        a = p.parse_args(argv[1:])
        try:
            levels = tuple(float(t) for t in a.levels.split(","))
        except ValueError:
            raise ValueError(
                f"--levels takes numbers separated by commas, got {a.levels!r}") from None
        cfg = load_config(a.config, a.overrides)
        print(markdown(fixed_noise_error(cfg, a.folders, a.clips, a.seed, levels)))
        return 0
    p = argparse.ArgumentParser(prog="python -m cineray.jobs.train")
    p.add_argument("--config", default="tiny", help="preset name or .yaml path")
    p.add_argument("overrides", nargs="*", help="key=value config overrides, e.g. train.lr=1e-3")
    a = p.parse_args(argv)
    cfg = load_config(a.config, a.overrides)
    start_ray()
    result = train(cfg)
    print(json.dumps({"checkpoint": result.checkpoint and result.checkpoint.path,
                      "metrics": result.metrics}, indent=1, default=str))
    return 0


if __name__ == "__main__":
    from cineray.cli import USER_ERRORS

    try:
        sys.exit(main(sys.argv[1:]))
    except USER_ERRORS as e:  # bad input: one line, like the cineray CLI
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
