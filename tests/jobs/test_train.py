"""The training job on real Ray Train + DeepSpeed (gloo, 2 CPU workers) with the tiny components.

Slow by nature (each fit starts a worker group and DeepSpeed); sizes are the smallest that still
exercise sharding: 2 workers, batch 2, a handful of steps.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import threading
import time

import psutil
import pytest
import torch
from safetensors.torch import load_file

from cineray.config import load_config
from cineray.jobs import train_io
from cineray.jobs.make_dataset import make_dataset
from cineray.jobs.train import export, train
from cineray.storage import Storage, StorageConfig


def _cfg(root: str, run: str, *overrides: str, endpoint: str | None = None):
    common = [f"storage.root={root}", f"train.run_name={run}", "train.data_uri=ds",
              "train.num_workers=2", "train.cpus_per_worker=0.5", "train.batch_size=2",
              "train.checkpoint_every=2", "train.log_every=1", "train.warmup_steps=1",
              "train.data.decode_batch_size=4", "train.max_failures=0"]
    if endpoint:
        common.append(f"storage.endpoint_url={endpoint}")
    return load_config("tiny", [*common, *overrides])


def _rows(storage: Storage, run_uri: str) -> list[dict]:
    text = storage.read_bytes(storage.join(run_uri, "metrics.jsonl")).decode()
    return [json.loads(line) for line in text.splitlines()]


@pytest.mark.slow
@pytest.mark.ray
def test_vae_zero2_from_s3_resumes_by_name_and_exports(ray_cluster, s3_server, s3_bucket, tmp_path):
    storage = Storage(StorageConfig(root=s3_bucket, endpoint_url=s3_server))
    make_dataset("ds", 8, storage=storage, renditions="32x32@8")
    args = ("train.component=vae", "train.zero_stage=2", "train.grad_accum=2")
    first = train(_cfg(s3_bucket, "vae-z2", *args, "train.max_steps=2", endpoint=s3_server))
    assert first.metrics["step"] == 2
    saved = first.metrics["weights_digest"]

    # The same command with the same name (and a longer horizon) resumes from step 2.
    cfg = _cfg(s3_bucket, "vae-z2", *args, "train.max_steps=4", endpoint=s3_server)
    second = train(cfg)
    run_uri = storage.join("runs", "vae-z2")
    rows = _rows(storage, run_uri)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert rows[2]["resumed_digest"] == saved  # the weights loaded are the weights saved
    assert second.metrics["step"] == 4 and second.metrics["weights_digest"] != saved
    for key in ("loss", "lr", "clips_per_s", "data_wait_fraction", "bad_clips"):
        assert key in rows[-1]
    assert storage.read_bytes(storage.join(run_uri, "loss.png"))[:4] == b"\x89PNG"

    # Export: consolidated EMA + raw weights in the serving format.
    from cineray.pipelines.weights import load_component

    out = export(cfg, "vae-z2", str(tmp_path / "vae"))
    raw = load_file(os.path.join(out, "raw", "model.safetensors"))
    assert train_io.weights_digest(raw) == second.metrics["weights_digest"]
    ema = load_component(out)
    assert type(ema).__name__ == "VideoVAE"
    assert train_io.weights_digest(ema.state_dict()) != second.metrics["weights_digest"]

    # Warm start from the export: raw weights into the plain model, EMA carried over.
    from cineray.jobs.train import _warm_start
    from cineray.models.video_vae import VideoVAE

    model = VideoVAE(cfg.vae)
    warm = dataclasses.replace(cfg.train, init_from=out)
    ema_sd = _warm_start(model, Storage(cfg.storage), warm)
    assert train_io.weights_digest(model.state_dict()) == second.metrics["weights_digest"]
    assert train_io.weights_digest(ema_sd) == train_io.weights_digest(ema.state_dict())
    with pytest.raises(ValueError, match="holds a 'vae', not a 'denoiser'"):
        _warm_start(model, storage, dataclasses.replace(warm, component="denoiser"))
    # A decoder fine-tune freezes the encoder: it and the latent statistics come from the EMA
    # weights, the latent space the export's users (and a denoiser) saw; the decoder from raw.
    model = VideoVAE(cfg.vae)
    for name, p in model.named_parameters():
        p.requires_grad_(not name.startswith("enc_"))
    _warm_start(model, Storage(cfg.storage), warm)
    sd, ema_sd = model.state_dict(), ema.state_dict()
    for name in sd:
        want = ema_sd if name.startswith(("enc_", "latent_")) else raw
        assert torch.equal(sd[name], want[name].to(sd[name].dtype)), name
    assert not torch.equal(sd["dec_in.conv.weight"], ema_sd["dec_in.conv.weight"])

    # A bf16 export (what ships in the repository) is half the size and loads as fp32 weights
    # within bf16 rounding of the fp32 export.
    half = export(cfg, "vae-z2", str(tmp_path / "vae16"), dtype="bf16")
    size = os.path.getsize(os.path.join(half, "model.safetensors"))
    assert size < 0.6 * os.path.getsize(os.path.join(out, "model.safetensors"))
    for a, b in zip(load_component(half).state_dict().values(), ema.state_dict().values(),
                    strict=True):
        assert a.dtype == b.dtype
        torch.testing.assert_close(a, b, rtol=1e-2, atol=1e-2)


def _kill_a_worker_after_first_checkpoint(storage, run_uri, killed: list, timeout=300):
    """Background: once a complete checkpoint exists, SIGKILL one Ray Train worker process of
    this test's own Ray cluster (a descendant of this process)."""
    deadline = time.time() + timeout
    while time.time() < deadline and not killed:
        if train_io.latest_checkpoint(storage, run_uri):
            for p in psutil.Process().children(recursive=True):
                try:
                    if "RayTrainWorker" in " ".join(p.cmdline()):
                        os.kill(p.pid, signal.SIGKILL)
                        killed.append(p.pid)
                        return
                except psutil.Error:
                    continue
        time.sleep(0.2)


@pytest.mark.slow
@pytest.mark.ray
def test_denoiser_zero3_bf16_survives_a_killed_worker(ray_cluster, tmp_path):
    from cineray.models.video_vae import VideoVAE
    from cineray.pipelines.weights import save_component

    root = str(tmp_path / "data")
    storage = Storage(StorageConfig(root=root))
    make_dataset("ds", 8, storage=storage, renditions="32x32@8")
    cfg = _cfg(root, "dit-z3", "train.component=denoiser", "train.zero_stage=3",
               "train.precision=bf16", "train.max_steps=6", "train.max_failures=1",
               f"task.vae_weights={tmp_path / 'vae'}", "task.text_stats_captions=32")
    save_component("vae", VideoVAE(cfg.vae), tmp_path / "vae")  # a real (untrained) tiny VAE
    run_uri = storage.join("runs", "dit-z3")
    killed: list[int] = []
    killer = threading.Thread(target=_kill_a_worker_after_first_checkpoint,
                              args=(storage, run_uri, killed), daemon=True)
    killer.start()
    result = train(cfg)
    killer.join(timeout=1)
    assert killed, "no Ray Train worker was found to kill"
    assert result.metrics["step"] == 6

    rows = _rows(storage, run_uri)
    assert [r["step"] for r in rows] == list(range(1, 7))  # the counter continued, no gaps
    resumed = [i for i, r in enumerate(rows) if "resumed_digest" in r]
    assert len(resumed) == 1
    before = rows[resumed[0] - 1]  # the checkpoint the restarted workers loaded
    assert before["step"] % 2 == 0 and "weights_digest" in before
    assert rows[resumed[0]]["resumed_digest"] == before["weights_digest"]


def test_lr_warms_up_then_follows_a_cosine_or_a_flat_then_linear_decay_and_ema_warms_up():
    from cineray.cluster.deepspeed_setup import ema_decay_at, lr_lambda
    from cineray.jobs.train_config import TrainConfig

    tc = TrainConfig(warmup_steps=10, max_steps=110, min_lr_ratio=0.1)
    f = lr_lambda(tc)
    assert [round(f(s), 3) for s in (0, 4, 9)] == [0.1, 0.5, 1.0]
    assert f(60) == pytest.approx(0.55) and f(110) == pytest.approx(0.1)
    assert lr_lambda(dataclasses.replace(tc, cosine=False))(100) == 1.0
    wsd = lr_lambda(dataclasses.replace(tc, cosine=False, decay_steps=40))  # flat to 70, then down
    assert [round(wsd(s), 3) for s in (9, 70, 90, 110, 500)] == [1.0, 1.0, 0.55, 0.1, 0.1]
    with pytest.raises(ValueError, match="decay_steps"):
        TrainConfig(decay_steps=40)  # with the cosine on
    assert ema_decay_at(0.999, 0) == pytest.approx(0.1)
    assert ema_decay_at(0.999, 90) == pytest.approx(0.91)
    assert ema_decay_at(0.999, 100_000) == 0.999


def test_newest_checkpoint_skips_incomplete_ones(local_storage):
    run = local_storage.join("runs", "r")
    for step, ranks in ((2, [0, 1]), (4, [0, 1]), (6, [0])):  # step 6: rank 1 never finished
        ckpt = local_storage.join(run, train_io.checkpoint_name(step))
        local_storage.write_bytes(local_storage.join(ckpt, "train_state.json"),
                                  json.dumps({"step": step, "world_size": 2}).encode())
        for r in ranks:
            local_storage.write_bytes(local_storage.join(ckpt, f"rank_{r}.done"), b"")
    assert train_io.latest_checkpoint(local_storage, run).endswith("step_00000004")
    assert train_io.latest_checkpoint(local_storage, local_storage.join("runs", "none")) is None
    with pytest.raises(FileNotFoundError, match="no complete checkpoint"):
        train_io.export(local_storage, local_storage.join("runs", "none"), "out")


def test_relative_local_paths_are_made_absolute_for_the_workers(tmp_path, monkeypatch):
    """Workers run in their own working directories: the driver pins relative paths first."""
    from cineray.config import load_config
    from cineray.jobs.train import _absolute_paths

    monkeypatch.chdir(tmp_path)
    (tmp_path / "weights" / "denoiser").mkdir(parents=True)
    cfg = load_config("tiny", ["storage.root=data", "train.init_from=weights/denoiser",
                               "task.decoder_samples=weights/denoiser", "task.vae_weights=vae",
                               "task.teacher=weights/denoiser"])
    fixed = _absolute_paths(cfg)
    assert fixed.storage.root == str(tmp_path / "data")
    assert fixed.train.init_from == str(tmp_path / "weights" / "denoiser")
    assert fixed.task.decoder_samples == str(tmp_path / "weights" / "denoiser")
    assert fixed.task.teacher == str(tmp_path / "weights" / "denoiser")
    assert fixed.task.vae_weights == "vae"  # no such folder: left for the task to report
    s3 = load_config("tiny", ["storage.root=s3://bucket/x", "train.init_from=runs/a/export"])
    assert _absolute_paths(s3).storage.root == "s3://bucket/x"
    assert _absolute_paths(s3).train.init_from == "runs/a/export"  # not a local folder: unchanged


def test_average_writes_the_mean_of_exports_and_refuses_mismatched_ones(local_storage, tmp_path):
    from safetensors.torch import save_file

    def export_dir(name, w, raw_w, hidden=8):
        for sub, value in (("", w), ("raw", raw_w)):
            if value is None:
                continue
            d = tmp_path / name / sub
            d.mkdir(parents=True, exist_ok=True)
            save_file({"w": torch.full((2, 3), value, dtype=torch.bfloat16),
                       "n": torch.tensor([4])}, str(d / "model.safetensors"))
            (d / "config.json").write_text(json.dumps(
                {"component": "denoiser", "config": {"hidden": hidden}, "meta": {"step": name}}))
        return str(tmp_path / name)

    a, b = export_dir("a", 1.0, 0.0), export_dir("b", 3.0, 2.0)
    out = train_io.average(local_storage, [a, b], str(tmp_path / "soup"))
    ema, raw = load_file(f"{out}/model.safetensors"), load_file(f"{out}/raw/model.safetensors")
    assert ema["w"].dtype == torch.bfloat16
    assert torch.equal(ema["w"].float(), torch.full((2, 3), 2.0))
    assert torch.equal(raw["w"].float(), torch.ones(2, 3))
    assert torch.equal(ema["n"], torch.tensor([4]))
    info = json.loads((tmp_path / "soup" / "config.json").read_text())
    assert info["component"] == "denoiser"
    assert info["meta"] == {"average_of": [{"step": "a"}, {"step": "b"}]}

    no_raw = train_io.average(local_storage, [a, export_dir("c", 5.0, None)], str(tmp_path / "s2"))
    assert load_file(f"{no_raw}/model.safetensors")["w"].float().mean() == 3.0
    assert not os.path.exists(f"{no_raw}/raw")  # raw weights only where every export has them
    with pytest.raises(ValueError, match="another config"):
        d = export_dir("d", 1.0, 1.0, hidden=16)
        train_io.average(local_storage, [a, d], str(tmp_path / "x"))
    with pytest.raises(ValueError, match="two exports or more"):
        train_io.average(local_storage, [a], str(tmp_path / "x"))

    # the command line, with config overrides (e.g. an S3 endpoint) after --set
    from cineray.errors import ConfigError
    from cineray.jobs.train import main

    assert main(["average", "--set", "storage.region=eu-west-1", "--out", str(tmp_path / "cli"),
                 a, b]) == 0
    assert torch.equal(load_file(f"{tmp_path}/cli/model.safetensors")["w"], ema["w"])
    with pytest.raises(ConfigError, match="storage.nope"):
        main(["average", "--set", "storage.nope=1", "--out", str(tmp_path / "y"), a, b])


def test_a_denoiser_warm_starts_from_an_export_with_coarser_patches(local_storage, tmp_path):
    """train.init_from with patch [1, 2, 2] into a [1, 1, 1] model: converted (refine_patches),
    and only with the rope_scale that keeps token distances; the EMA is converted too."""
    from cineray.jobs.train import _warm_start
    from cineray.models.dit import DIT_PRESETS, DiT
    from cineray.pipelines.weights import save_component

    torch.manual_seed(0)
    coarse = DiT(DIT_PRESETS["tiny"])
    for sub in ("", "raw"):  # an export's layout: EMA weights, raw ones beside them
        save_component("denoiser", coarse, tmp_path / "coarse" / sub)
    tc = dataclasses.replace(load_config("tiny").train, component="denoiser",
                             init_from=str(tmp_path / "coarse"))
    cfg = dataclasses.replace(DIT_PRESETS["tiny"], patch=[1, 1, 1])
    with pytest.raises(ValueError, match=r"denoiser.rope_scale=\[1.0, 0.5, 0.5\]"):
        _warm_start(DiT(cfg), local_storage, tc)
    fine = DiT(dataclasses.replace(cfg, rope_scale=[1.0, 0.5, 0.5]))
    ema = _warm_start(fine, local_storage, tc)
    assert fine.patch_in.weight.shape == (192, 18) and ema["head.weight"].shape == (8, 192)
    assert torch.allclose(fine.patch_in.weight,
                          coarse.patch_in.weight.reshape(192, 18, 4).sum(-1))
    assert torch.equal(fine.blocks[0].attn.qkv.weight, coarse.blocks[0].attn.qkv.weight)


def test_fixed_noise_error_ranks_the_shipped_denoiser_above_random_weights(tmp_path, capsys):
    """`train val`: the same clips and noise for every export, so a trained denoiser scores far
    below random weights of the same shape, and a second call gives the same figures."""
    from cineray.jobs.train import main
    from cineray.jobs.train_val import fixed_noise_error
    from cineray.models.dit import DiT
    from cineray.pipelines.weights import DEFAULT_CHECKPOINT, load_component, save_component

    shipped = str(DEFAULT_CHECKPOINT / "denoiser")
    torch.manual_seed(0)
    save_component("denoiser", DiT(load_component(shipped).cfg), tmp_path / "random")
    cfg = load_config("tiny")
    got = fixed_noise_error(cfg, [shipped, str(tmp_path / "random")], clips=6, levels=(0.2, 0.6))
    for t in (0.2, 0.6):
        trained, rand = got[shipped][t], got[str(tmp_path / "random")][t]
        assert trained[0] < 0.5 * rand[0] and trained[1] < rand[1]
    assert got[shipped][0.2][0] < got[shipped][0.6][0]  # less noise, better estimate
    assert fixed_noise_error(cfg, [shipped], clips=6, levels=(0.2, 0.6)) == {shipped: got[shipped]}

    assert main(["val", shipped, "--clips", "2", "--levels", "0.5"]) == 0
    assert "| t = 0.5 |" in capsys.readouterr().out
    with pytest.raises(ValueError, match="--levels"):
        main(["val", shipped, "--levels", "half"])
    with pytest.raises(ValueError, match="not a denoiser export"):
        fixed_noise_error(cfg, [str(DEFAULT_CHECKPOINT / "vae")], clips=2)


@pytest.mark.slow
def test_a_compiled_model_trains_like_the_eager_one_under_the_same_names(monkeypatch):
    """train.compile=true: DeepSpeed steps a compiled forward to the same losses as the eager
    model's and leaves parameter names (so checkpoints and exports) unchanged; ZeRO-3 refuses."""
    import socket

    import deepspeed
    import torch.distributed as dist

    from cineray.cluster.deepspeed_setup import apply_deepspeed
    from cineray.jobs.train_config import TrainConfig
    from cineray.models.dit import DIT_PRESETS, DiT, empty_frames
    from cineray.models.text_encoder import TextEmbedding
    from cineray.pipelines.conditioning import UNSPECIFIED, build_conditioning

    with pytest.raises(ValueError, match="zero_stage <= 2"):
        TrainConfig(compile=True, zero_stage=3)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for k, v in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
                 "MASTER_PORT": str(port)}.items():
        monkeypatch.setenv(k, v)
    deepspeed.init_distributed(dist_backend="gloo")
    try:
        cfg = dataclasses.replace(DIT_PRESETS["tiny"], hidden=48, depth=1, heads=2)
        b, c = 2, cfg.latent_channels
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(b, c, 2, 8, 8, generator=gen)
        text = TextEmbedding(tokens=torch.randn(b, 4, cfg.text_dim, generator=gen),
                             mask=torch.ones(b, 4, dtype=torch.bool),
                             pooled=torch.randn(b, cfg.text_dim, generator=gen))
        cond = build_conditioning(text, [UNSPECIFIED] * b, [0.0] * b, [50.0] * b, [8.0] * b,
                                  empty_frames(b, c, 2, 8, 8))
        t = torch.tensor([0.3, 0.7])
        losses, names = {}, {}
        for compiled in (False, True):
            torch.manual_seed(0)
            tc = TrainConfig(zero_stage=0, batch_size=b, warmup_steps=1, compile=compiled)
            engine = apply_deepspeed(DiT(cfg), tc, 1)
            losses[compiled] = []
            for _ in range(3):
                loss = (engine(x, t, cond).float() - x).pow(2).mean()
                engine.backward(loss)
                engine.step()
                losses[compiled].append(loss.item())
            names[compiled] = list(engine.module.state_dict())
            assert (engine.module._compiled_call_impl is not None) == compiled
        assert losses[True] == pytest.approx(losses[False], rel=1e-4)
        assert losses[True][-1] < losses[True][0]
        assert names[True] == names[False]
    finally:
        dist.destroy_process_group()
