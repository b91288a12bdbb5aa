"""Exported component weights: one folder per component, `model.safetensors` + `config.json`.

    checkpoints/cineray-tiny/
        vae/ denoiser/ upscaler_spatial/ upscaler_temporal/
            model.safetensors   (EMA weights where training kept them)
            config.json         {"component": ..., "config": {...}, "meta": {...}}

This is what training exports and what every generation stage loads.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from cineray.models.dit import DiT, DiTConfig
from cineray.models.upscaler import Upscaler, UpscalerConfig
from cineray.models.video_vae import VAEConfig, VideoVAE

COMPONENTS = {
    "vae": (VideoVAE, VAEConfig),
    "denoiser": (DiT, DiTConfig),
    "upscaler_spatial": (Upscaler, UpscalerConfig),
    "upscaler_temporal": (Upscaler, UpscalerConfig),
}

DEFAULT_CHECKPOINT = Path(__file__).resolve().parent.parent / "checkpoints" / "cineray-tiny"


def build(component: str, cfg):
    if component not in COMPONENTS:
        raise ValueError(f"unknown component {component!r}; one of {sorted(COMPONENTS)}")
    cls, _ = COMPONENTS[component]
    return cls(cfg)


def save_component(component: str, model: torch.nn.Module, folder: str | os.PathLike,
                   state_dict: dict | None = None, meta: dict | None = None,
                   dtype: torch.dtype | None = None) -> Path:
    """Write model.safetensors + config.json atomically (temp names, then rename).

    state_dict: weights to save instead of the model's own (e.g. the EMA copy).
    dtype: cast floating tensors (bf16 halves the size of a shipped checkpoint)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    sd = state_dict if state_dict is not None else model.state_dict()
    sd = {k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v)
          .detach().cpu().contiguous() for k, v in sd.items()}
    info = {"component": component, "config": dataclasses.asdict(model.cfg), "meta": meta or {}}
    _atomic(folder / "model.safetensors", lambda p: save_file(sd, p))
    _atomic(folder / "config.json", lambda p: Path(p).write_text(json.dumps(info, indent=2)))
    return folder


def _atomic(path: Path, write) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def read_info(folder: str | os.PathLike) -> dict:
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"no exported component at {folder} (missing config.json)")
    return json.loads(path.read_text())


def load_component(folder: str | os.PathLike, device: str | torch.device = "cpu",
                   dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """Rebuild a component from its folder, weights loaded, in eval mode."""
    info = read_info(folder)
    component = info["component"]
    _, cfg_cls = COMPONENTS[component]
    cfg = cfg_cls(**info["config"])
    model = build(component, cfg)
    sd = load_file(str(Path(folder) / "model.safetensors"))
    model.load_state_dict({k: v.to(dtype) if v.is_floating_point() else v for k, v in sd.items()})
    return model.to(device).eval()
