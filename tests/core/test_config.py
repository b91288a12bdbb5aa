"""Config: schema <- preset YAML <- overrides, with errors that name the key and the fix."""

from __future__ import annotations

import dataclasses

import pytest

from cineray.config import (
    CinerayConfig,
    ConfigError,
    from_dict,
    load_config,
    preset_names,
    to_dict,
    to_yaml,
)
from cineray.models.dit import DIT_PRESETS, DiTConfig
from cineray.models.text_encoder import TEXT_PRESETS
from cineray.models.upscaler import UPSCALER_PRESETS
from cineray.models.video_vae import VAE_PRESETS, VAEConfig
from cineray.storage import StorageConfig
from cineray.world import WorldConfig


def test_presets_load_as_plain_dataclasses():
    assert {"tiny", "base"} <= set(preset_names())
    for name in preset_names():
        cfg = load_config(name)
        assert type(cfg) is CinerayConfig
        assert type(cfg.storage) is StorageConfig and type(cfg.denoiser) is DiTConfig
        assert type(cfg.vae.channels) is list  # not an OmegaConf ListConfig


@pytest.mark.parametrize("name", ["tiny", "base"])
def test_preset_model_sections_match_model_presets(name):
    cfg = load_config(name)
    assert cfg.text == TEXT_PRESETS[name]
    assert cfg.vae == VAE_PRESETS[name]
    assert cfg.denoiser == DIT_PRESETS[name]
    assert cfg.upscaler_spatial == UPSCALER_PRESETS[f"{name}_spatial"]
    assert cfg.upscaler_temporal == UPSCALER_PRESETS[f"{name}_temporal"]


def test_overrides_apply_in_order_and_convert_types():
    cfg = load_config(
        "tiny",
        [
            "denoiser.depth=3",
            "denoiser.depth=4",
            "vae.channels=[8,16,32]",
            "storage.root=s3://bucket/run",
            "storage.endpoint_url=http://127.0.0.1:9",
        ],
    )
    assert cfg.denoiser.depth == 4
    assert cfg.vae.channels == [8, 16, 32]
    assert cfg.storage.root == "s3://bucket/run"
    assert cfg.storage.endpoint_url == "http://127.0.0.1:9"
    assert load_config("tiny").denoiser.depth == DIT_PRESETS["tiny"].depth  # no leaks


def test_preset_from_a_yaml_path(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("denoiser:\n  heads: 2\n")
    cfg = load_config(str(path), ["denoiser.hidden=64"])
    assert (cfg.denoiser.heads, cfg.denoiser.hidden) == (2, 64)
    assert cfg.vae == VAEConfig()  # sections the file leaves out keep the schema defaults


def test_unknown_key_names_full_path_and_suggests_fix():
    with pytest.raises(ConfigError) as e:
        load_config("tiny", ["denoiser.dept=3"])
    msg = str(e.value)
    assert "denoiser.dept" in msg and "did you mean 'depth'" in msg
    assert "\n" not in msg and "denoiser.dept=3" in msg
    with pytest.raises(ConfigError, match="unknown key 'nosuch'.*storage"):
        load_config("tiny", ["nosuch.x=1"])


def test_unknown_key_in_preset_file_names_the_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("storage:\n  rooot: x\n")
    with pytest.raises(ConfigError, match=r"preset bad.yaml: unknown key 'storage.rooot'.*'root'"):
        load_config(str(path))


def test_wrong_type_names_the_key():
    with pytest.raises(ConfigError, match=r"'denoiser.depth'.*'abc'.*Integer"):
        load_config("tiny", ["denoiser.depth=abc"])
    with pytest.raises(ConfigError, match=r"'vae.channels\[1\]'"):
        load_config("tiny", ["vae.channels=[1,x]"])


def test_malformed_override_and_unknown_preset():
    with pytest.raises(ConfigError, match="key=value"):
        load_config("tiny", ["denoiser.depth"])
    with pytest.raises(ConfigError, match="unknown preset 'huge'.*base, tiny"):
        load_config("huge")
    with pytest.raises(ConfigError, match="does not exist"):
        load_config("/nonexistent/x.yaml")


def test_post_init_checks_become_config_errors():
    @dataclasses.dataclass
    class Checked:
        n: int = 1

        def __post_init__(self):
            if self.n < 0:
                raise ValueError(f"n must be >= 0, got {self.n}")

    assert load_config(None, ["n=2"], schema=Checked).n == 2
    with pytest.raises(ConfigError, match="n must be >= 0, got -1"):
        load_config(None, ["n=-1"], schema=Checked)
    with pytest.raises(ConfigError, match="section 'world': frames=10 must be 1 \\+ 4k"):
        load_config("tiny", ["world.frames=10"])


def test_world_section():
    cfg = load_config("tiny", ["world.object_size=[0.2,0.3]", "world.frames=9"])
    assert type(cfg.world) is WorldConfig
    assert cfg.world.object_size == (0.2, 0.3) and cfg.world.frames == 9
    tiny = load_config("tiny").world
    assert (tiny.width, tiny.height, tiny.frames, tiny.fps) == (32, 32, 17, 8.0)


def test_dict_round_trip_and_validation():
    cfg = load_config("base", ["denoiser.depth=2"])
    d = to_dict(cfg)
    assert type(d) is dict and type(d["vae"]["channels"]) is list
    assert from_dict(CinerayConfig, d) == cfg
    assert from_dict(DiTConfig, d["denoiser"]) == cfg.denoiser
    d["denoiser"]["hidden"] = "wide"
    with pytest.raises(ConfigError, match="denoiser.hidden"):
        from_dict(CinerayConfig, d)


def test_yaml_round_trip(tmp_path):
    cfg = load_config("tiny", ["denoiser.depth=5", "storage.region=eu-west-1"])
    path = tmp_path / "resolved.yaml"
    path.write_text(to_yaml(cfg))
    assert load_config(str(path)) == cfg
