"""One typed config, resolved once at the entry point: schema <- YAML preset <- dotlist overrides.

The schema is plain dataclasses (each owned by the module that uses it); OmegaConf only merges
and type-checks, and ``load_config`` hands back plain dataclass objects, never a DictConfig:

    cfg = load_config("tiny", ["world.frames=9", "storage.root=s3://bucket/run1"])

Presets live in ``configs/<name>.yaml`` and hold only keys of the schema. To pass a config across
a Ray boundary as plain data, use ``to_dict`` and ``from_dict`` (which re-validates).
"""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from omegaconf import OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError

from cineray.errors import ConfigError
from cineray.jobs.batch_config import BatchConfig
from cineray.jobs.train_config import TrainConfig
from cineray.models.dit import DiTConfig
from cineray.models.text_encoder import TextEncoderConfig
from cineray.models.upscaler import UpscalerConfig
from cineray.models.video_vae import VAEConfig
from cineray.pipelines.flow import FlowConfig
from cineray.pipelines.provenance import ProvenanceConfig
from cineray.pipelines.training import TaskConfig
from cineray.storage import StorageConfig
from cineray.world import WorldConfig

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
T = TypeVar("T")
__all__ = ["CinerayConfig", "ConfigError", "load_config", "to_dict", "from_dict", "to_yaml"]


@dataclass
class CinerayConfig:
    """Every section of cineray's configuration (each section's dataclass lives with its code)."""

    storage: StorageConfig = field(default_factory=StorageConfig)
    world: WorldConfig = field(default_factory=WorldConfig)  # the synthetic dataset's scenes
    text: TextEncoderConfig = field(default_factory=TextEncoderConfig)
    vae: VAEConfig = field(default_factory=VAEConfig)
    denoiser: DiTConfig = field(default_factory=DiTConfig)
    # Section names match the trainable components (vae, denoiser, upscaler_spatial, ...).
    upscaler_spatial: UpscalerConfig = field(default_factory=lambda: UpscalerConfig("spatial"))
    upscaler_temporal: UpscalerConfig = field(default_factory=lambda: UpscalerConfig("temporal"))
    flow: FlowConfig = field(default_factory=FlowConfig)  # training noise process
    task: TaskConfig = field(default_factory=TaskConfig)  # training losses and augmentation
    train: TrainConfig = field(default_factory=TrainConfig)  # the training job (jobs/train.py)
    # watermark key and C2PA signing material (a deployment sets its own secret key)
    provenance: ProvenanceConfig = field(default_factory=ProvenanceConfig)
    batch: BatchConfig = field(default_factory=BatchConfig)  # batch renders (jobs/batch_render.py)


def preset_names() -> list[str]:
    return sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))


def preset_path(preset: str) -> Path:
    """``tiny`` -> configs/tiny.yaml; a path to a .yaml file is used as is."""
    if preset.endswith((".yaml", ".yml")) or "/" in preset:
        path = Path(preset)
        if not path.is_file():
            raise ConfigError(f"config file {preset!r} does not exist")
        return path
    path = CONFIG_DIR / f"{preset}.yaml"
    if not path.is_file():
        raise ConfigError(
            f"unknown preset {preset!r}: use one of {', '.join(preset_names())} or a .yaml path"
        )
    return path


def load_config(
    preset: str | None = "tiny", overrides: Sequence[str] = (), schema: type[T] = CinerayConfig
) -> T:
    """Resolve ``schema`` <- preset YAML (None: schema defaults only) <- ``key=value`` overrides."""
    cfg = OmegaConf.structured(schema)
    if preset is not None:
        path = preset_path(preset)
        try:
            data = OmegaConf.load(path)
        except Exception as e:  # YAML syntax errors come in several types
            raise ConfigError(f"cannot parse {path}: {str(e).splitlines()[0]}") from None
        cfg = _merge(cfg, data, f"preset {path.name}")
    for item in overrides:
        if "=" not in item or not item.split("=", 1)[0].strip():
            raise ConfigError(f"override {item!r} must look like key=value, e.g. world.frames=9")
        cfg = _merge(cfg, OmegaConf.from_dotlist([item]), f"override {item!r}")
    return _to_object(cfg, "config")


def to_dict(cfg: Any) -> dict[str, Any]:
    """Plain nested dict (lists, str, numbers, None) of a config dataclass."""
    return OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)


def from_dict(cls: type[T], data: dict[str, Any]) -> T:
    """Rebuild (and re-validate) a config dataclass from ``to_dict`` output."""
    return _to_object(_merge(OmegaConf.structured(cls), data, "dict"), "dict")


def to_yaml(cfg: Any) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def _merge(cfg, data, source: str):
    try:
        return OmegaConf.merge(cfg, data)
    except OmegaConfBaseException as e:
        raise ConfigError(_explain(e, source)) from None


def _to_object(cfg, source: str):
    try:
        return OmegaConf.to_object(cfg)
    except OmegaConfBaseException as e:
        raise ConfigError(_explain(e, source)) from None
    except (ValueError, TypeError) as e:  # a section's own __post_init__ check
        raise ConfigError(f"{source}: {_failing_section(cfg)}{e}") from None


def _failing_section(cfg) -> str:
    """ "section 'world': " for the top-level section whose own checks fail, else ""."""
    for name in cfg:
        node = cfg[name]
        if OmegaConf.is_config(node):
            try:
                OmegaConf.to_object(node)
            except (ValueError, TypeError):
                return f"section '{name}': "
    return ""


def _explain(e: OmegaConfBaseException, source: str) -> str:
    """One line: where the value came from, the full key, what is wrong, and the fix."""
    key = getattr(e, "full_key", None) or "?"
    what = str(e).splitlines()[0]
    if isinstance(e, ConfigKeyError):
        valid = _valid_keys(getattr(e, "object_type", None))
        leaf = key.rsplit(".", 1)[-1]
        close = difflib.get_close_matches(leaf, valid, n=1)
        fix = f"did you mean '{close[0]}'? " if close else ""
        return f"{source}: unknown key '{key}'; {fix}valid keys here: {', '.join(valid)}"
    if isinstance(e, ValidationError):
        return f"{source}: bad value for '{key}': {what}"
    return f"{source}: '{key}': {what}"


def _valid_keys(cls) -> list[str]:
    if cls is not None and dataclasses.is_dataclass(cls):
        return [f.name for f in dataclasses.fields(cls)]
    return []
