"""What a training run leaves in storage, and how to read it back.

Layout under ``<storage_path>/<run_name>/`` (local or s3://):
    step_00000200/            one checkpoint (Ray Train merges every worker's upload here)
        ds/ ...               DeepSpeed shards: the exact resume state (optimizer included)
        rank_<r>.done         written by each worker after its upload: all present = complete
        train_state.json      step, epoch, world size, ZeRO stage, weights digest
        export/               EMA weights in the serving format (pipelines.weights)
        export/raw/           raw weights, same format
    metrics.jsonl, loss.png   progress, refreshed at every report

``export`` copies a checkpoint's ``export/`` folder out, so serving never needs DeepSpeed;
``average`` writes the mean of several such exports.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import posixpath
import re

import torch

from cineray.storage import Storage, is_s3

_STEP_DIR = re.compile(r"step_(\d+)$")


def checkpoint_name(step: int) -> str:
    return f"step_{step:08d}"


def checkpoint_step(uri: str) -> int:
    m = _STEP_DIR.search(uri.rstrip("/"))
    if not m:
        raise ValueError(f"{uri} is not a checkpoint directory (expected .../step_<N>)")
    return int(m.group(1))


def is_complete(storage: Storage, ckpt_uri: str) -> bool:
    """All workers finished writing: train_state.json names the world size; each rank's marker."""
    try:
        state = json.loads(storage.read_bytes(storage.join(ckpt_uri, "train_state.json")))
    except FileNotFoundError:
        return False
    names = {posixpath.basename(u) for u in storage.ls(ckpt_uri)}
    return all(f"rank_{r}.done" in names for r in range(state["world_size"]))


def latest_checkpoint(storage: Storage, run_uri: str) -> str | None:
    """URI of the newest complete checkpoint of a run (None if it has none yet)."""
    if not storage.exists(run_uri):
        return None
    steps = sorted((u for u in storage.ls(run_uri) if _STEP_DIR.search(u)), key=checkpoint_step)
    for uri in reversed(steps):
        if is_complete(storage, uri):
            return uri
    return None


def weights_digest(state_dict: dict[str, torch.Tensor]) -> str:
    """sha256 over names and fp32 bytes: equal digests mean equal weights."""
    h = hashlib.sha256()
    for name in sorted(state_dict):
        h.update(name.encode())
        h.update(state_dict[name].detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def download(storage: Storage, uri: str, local_dir: str) -> str:
    """Copy a directory (local or s3://) into ``local_dir``; returns local_dir."""
    fs, path = storage.fs_for(uri)
    fs.get(path.rstrip("/") + "/", local_dir.rstrip("/") + "/", recursive=True)
    return local_dir


def export(storage: Storage, run_or_checkpoint: str, out: str, dtype: str = "fp32") -> str:
    """Copy the serving weights of a run's newest checkpoint (or of one checkpoint) to ``out``.

    ``out`` then holds ``model.safetensors`` (EMA) + ``config.json``, and ``raw/`` (raw
    weights, same format); ``pipelines.weights.load_component(out)`` loads it. Returns ``out``.
    dtype "bf16" halves the size (for a checkpoint shipped in a repository); loading casts back.
    """
    if dtype not in ("fp32", "bf16"):
        raise ValueError(f"export dtype must be fp32 or bf16, got {dtype!r}")
    src = run_or_checkpoint
    if not _STEP_DIR.search(src.rstrip("/")):
        src = latest_checkpoint(storage, run_or_checkpoint)
        if src is None:
            raise FileNotFoundError(f"no complete checkpoint under {run_or_checkpoint}; "
                                    "train first (the run's storage_path/run_name)")
    for sub in ("", "raw"):  # Storage.join skips the empty part
        for name in ("model.safetensors", "config.json"):
            data = storage.read_bytes(storage.join(src, "export", sub, name))
            if dtype == "bf16" and name == "model.safetensors":
                data = _to_bf16(data)
            storage.write_bytes(storage.join(out, sub, name), data)
    return storage.resolve(out)


def average(storage: Storage, folders: list[str], out: str) -> str:
    """Write the element-wise mean of several exports of one component (a model soup, Wortsman
    et al. 2022) to ``out``: EMA weights, and raw weights where every export has them. Means are
    taken in fp32 and stored in the first export's dtypes; integer buffers must agree. Returns
    ``out``."""
    from safetensors.torch import load as load_bytes
    from safetensors.torch import save as save_bytes

    if len(folders) < 2:
        raise ValueError(f"average needs two exports or more, got {len(folders)}")
    infos = [json.loads(storage.read_bytes(storage.join(f, "config.json"))) for f in folders]
    for f, info in zip(folders[1:], infos[1:], strict=True):
        for key in ("component", "config"):
            if info.get(key) != infos[0].get(key):
                raise ValueError(f"{f} has another {key} than {folders[0]}; only exports of one "
                                 "component with one config can be averaged")
    subs = [""]
    if all(storage.exists(storage.join(f, "raw", "model.safetensors")) for f in folders):
        subs.append("raw")
    for sub in subs:
        sds = [load_bytes(storage.read_bytes(storage.join(f, sub, "model.safetensors")))
               for f in folders]
        mean = {}
        for k, v in sds[0].items():
            if any(k not in sd or sd[k].shape != v.shape for sd in sds[1:]):
                raise ValueError(f"tensor {k!r} is missing or shaped otherwise in another export")
            if v.is_floating_point():
                mean[k] = (sum(sd[k].float() for sd in sds) / len(sds)).to(v.dtype)
            elif all(torch.equal(sd[k], v) for sd in sds[1:]):
                mean[k] = v
            else:
                raise ValueError(f"integer tensor {k!r} differs between the exports")
        info = {**infos[0], "meta": {"average_of": [i.get("meta", {}) for i in infos]}}
        storage.write_bytes(storage.join(out, sub, "model.safetensors"), save_bytes(mean))
        storage.write_bytes(storage.join(out, sub, "config.json"),
                            json.dumps(info, indent=2).encode())
    return storage.resolve(out)


def _to_bf16(data: bytes) -> bytes:
    import torch
    from safetensors.torch import load as load_bytes
    from safetensors.torch import save as save_bytes

    sd = load_bytes(data)
    return save_bytes({k: v.to(torch.bfloat16) if v.is_floating_point() else v
                       for k, v in sd.items()})


def load_init_weights(storage: Storage, folder: str,
                      component: str) -> tuple[dict, dict | None, dict]:
    """(raw state dict, EMA state dict or None, model config) from an exported folder, for a
    warm start."""
    from safetensors.torch import load as load_bytes

    info = json.loads(storage.read_bytes(storage.join(folder, "config.json")))
    if info.get("component") != component:
        raise ValueError(f"train.init_from={folder} holds a {info.get('component')!r}, "
                         f"not a {component!r}")
    ema = load_bytes(storage.read_bytes(storage.join(folder, "model.safetensors")))
    raw_uri = storage.join(folder, "raw", "model.safetensors")
    raw = load_bytes(storage.read_bytes(raw_uri)) if storage.exists(raw_uri) else None
    config = info.get("config", {})
    return (raw, ema, config) if raw is not None else (ema, None, config)


class MetricsLog:
    """metrics.jsonl + loss.png beside the checkpoints (rank 0 only), rewritten atomically."""

    def __init__(self, storage: Storage, run_uri: str, resume_step: int):
        self.storage, self.run_uri = storage, run_uri
        self.rows: list[dict] = []
        uri = storage.join(run_uri, "metrics.jsonl")
        if resume_step and storage.exists(uri):
            old = [json.loads(x) for x in storage.read_bytes(uri).decode().splitlines() if x]
            # Rows after the checkpoint we resume from belong to work that was lost.
            self.rows = [r for r in old if r["step"] <= resume_step]

    def append(self, row: dict) -> None:
        self.rows.append(row)
        text = "".join(json.dumps(r) + "\n" for r in self.rows)
        self.storage.write_bytes(self.storage.join(self.run_uri, "metrics.jsonl"), text.encode())
        self.storage.write_bytes(self.storage.join(self.run_uri, "loss.png"), self._plot())

    def _plot(self) -> bytes:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
        ax.plot([r["step"] for r in self.rows], [r["loss"] for r in self.rows], lw=1)
        ax.set(xlabel="step", ylabel="loss", yscale="log", title=posixpath.basename(self.run_uri))
        ax.grid(alpha=0.3)
        buf = io.BytesIO()
        fig.savefig(buf, format="png", bbox_inches="tight")
        plt.close(fig)
        return buf.getvalue()


def ray_storage(storage: Storage, storage_path: str) -> tuple[str, object | None]:
    """(storage_path, storage_filesystem) for Ray Train's RunConfig."""
    uri = storage.resolve(storage_path)
    if not is_s3(uri):
        os.makedirs(uri, exist_ok=True)
        return uri, None
    fs, path = storage.pyarrow_fs(uri)
    return path, fs
