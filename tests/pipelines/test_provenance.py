"""Provenance on real MP4s: payload packing, the local CA, signed C2PA manifests, and a rendered
clip that verifies (watermark payload = the job's, manifest valid apart from the trust anchor),
still verifies after re-encoding, while an unwatermarked clip does not."""

from __future__ import annotations

import hashlib
import json
import stat
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from cineray.cli import app
from cineray.pipelines import provenance
from cineray.pipelines.generate import manifest_info, render_to_file
from cineray.pipelines.provenance import (
    DEFAULT_WATERMARK_KEY,
    DIGITAL_SOURCE_TYPE,
    ManifestInfo,
    Payload,
    ProvenanceConfig,
    SigningConfig,
    detect,
    detect_mp4,
    read_manifest,
    sign_mp4,
    signing_material,
)
from cineray.pipelines.stages import GenerationRequest, mux
from cineray.video import read_mp4, write_mp4
from cineray.world import WorldConfig, render, sample_scene

REQ = GenerationRequest("a red ball falling", frames=5, upscale="full")  # 64x64, 9 frames
INFO = ManifestInfo("cineray-test-model", "a red ball falling", "job-42",
                    Payload.for_job("cineray-test-model", "job-42"))


@pytest.fixture(autouse=True)
def keys(tmp_path, monkeypatch):
    """Each test gets its own local CA folder."""
    folder = tmp_path / "keys"
    monkeypatch.setenv("CINERAY_C2PA_DIR", str(folder))
    monkeypatch.delenv("CINERAY_C2PA_CERT", raising=False)
    monkeypatch.delenv("CINERAY_C2PA_KEY", raising=False)
    return folder


@pytest.fixture(scope="module")
def rendered(components, tmp_path_factory):
    """(MP4 bytes, ManifestInfo) of one rendered clip, signed by a module-wide local CA."""
    folder = tmp_path_factory.mktemp("render")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CINERAY_C2PA_DIR", str(folder / "keys"))
        from cineray.storage import Storage, StorageConfig

        uri, result = render_to_file(components, REQ, storage=Storage(StorageConfig(str(folder))))
        data = Path(uri).read_bytes()
    assert {"watermark", "mux", "sign"} <= set(result.timings)
    return data, manifest_info(components, REQ), folder / "keys"


def world_frames(seed: int = 1) -> np.ndarray:
    """(9, 64, 64, 3) uint8 world clip at 16 fps."""
    cfg = WorldConfig(width=64, height=64, frames=9, fps_choices=[16.0])
    return render(sample_scene(cfg, seed, heldout=None), 64, 64, 9, 16.0)


def world_mp4(seed: int = 1) -> bytes:
    return mux(world_frames(seed), 16.0)


def test_payload_packs_48_bits_and_back():
    p = Payload.for_job("model-a", "job-1")
    assert p == Payload.for_job("model-a", "job-1") != Payload.for_job("model-a", "job-2")
    bits = p.bits()
    assert bits.shape == (64,) and set(np.unique(bits)) <= {0, 1}  # 48 + CRC-16
    assert Payload.from_bits(bits) == p and str(p) == f"{p.model:04x}-{p.job:08x}"
    for i in (0, 20, 47, 50, 63):  # any single wrong bit fails the CRC
        wrong = bits.copy()
        wrong[i] ^= 1
        assert Payload.from_bits(wrong) is None
    with pytest.raises(ValueError, match="model 65536 \\(16 bits\\)"):
        Payload(2**16, 0)
    with pytest.raises(ValueError, match="ids must be non-empty strings"):
        Payload.for_job("", "job")


def test_local_ca_is_created_once_with_private_keys_0600(keys):
    chain, key, ca = signing_material()
    assert chain.count(b"BEGIN CERTIFICATE") == 2 and b"PRIVATE KEY" in key
    for name in ("ca.key", "signer.key"):
        assert stat.S_IMODE((keys / name).stat().st_mode) == 0o600
    assert stat.S_IMODE(keys.stat().st_mode) == 0o700
    assert signing_material() == (chain, key, ca)  # reused, not re-created


def test_signed_manifest_states_what_made_the_clip(keys):
    signed = sign_mp4(world_mp4(), INFO)
    report = read_manifest(signed)
    assert report.state == "Valid" and report.failures == ["signingCredential.untrusted"]
    assert report.valid_apart_from_trust and report.trusted_state == "Trusted"
    assertions = {a["label"]: a["data"] for a in report.manifest["assertions"]}
    created = assertions["c2pa.actions.v2"]["actions"][0]
    assert created["action"] == "c2pa.created"
    assert created["digitalSourceType"] == DIGITAL_SOURCE_TYPE
    gen = assertions[provenance.GENERATION_LABEL]
    assert gen["model_id"] == "cineray-test-model" and gen["model_version"]
    assert gen["prompt_sha256"] == hashlib.sha256(b"a red ball falling").hexdigest()
    assert "a red ball falling" not in json.dumps(report.manifest)  # only the prompt's hash
    assert read_mp4(signed)[0].shape == (9, 64, 64, 3)  # still a playable MP4


def test_tampered_and_unsigned_files(keys):
    signed = bytearray(sign_mp4(world_mp4(), INFO))
    mdat = signed.index(b"mdat") + 40  # flip a byte of the coded video
    signed[mdat] ^= 0xFF
    assert read_manifest(bytes(signed)).state == "Invalid"
    assert read_manifest(world_mp4()).state == "absent"


def test_a_cluster_signs_with_its_own_certificate(keys, tmp_path):
    chain, key, _ = signing_material()  # stands in for a certificate issued elsewhere
    (tmp_path / "chain.pem").write_bytes(chain)
    (tmp_path / "key.pem").write_bytes(key)
    own = SigningConfig(str(tmp_path / "chain.pem"), str(tmp_path / "key.pem"))
    report = read_manifest(sign_mp4(world_mp4(), INFO, own), own)
    assert report.valid_apart_from_trust and report.trusted_state is None
    with pytest.raises(ValueError, match="give both cert_chain and private_key"):
        signing_material(SigningConfig(cert_chain=str(tmp_path / "chain.pem")))


def test_a_rendered_clip_verifies(rendered, monkeypatch):
    data, info, keys = rendered
    monkeypatch.setenv("CINERAY_C2PA_DIR", str(keys))
    det = detect_mp4(data)
    assert det.watermarked and det.payload == info.payload and det.registration == ()
    assert info.job_id.startswith("render-") and info.model_id.startswith("cineray-")
    report = read_manifest(data)
    assert report.valid_apart_from_trust and report.trusted_state == "Trusted"
    gen = next(a["data"] for a in report.manifest["assertions"]
               if a["label"] == provenance.GENERATION_LABEL)
    assert gen["watermark_payload"] == str(det.payload) and gen["job_id"] == info.job_id


def test_a_reencoded_clip_still_verifies_its_watermark(rendered):
    data, info, _ = rendered
    frames, fps = read_mp4(data)
    reencoded = write_mp4(frames, fps, crf=23)  # what a re-upload does: the manifest is gone
    assert read_manifest(reencoded).state == "absent"
    det = detect_mp4(reencoded)
    assert det.watermarked and det.payload == info.payload


def test_an_unwatermarked_clip_does_not_verify():
    for seed in range(3):
        det = detect_mp4(world_mp4(seed))
        assert not det.watermarked and det.payload is None
        assert det.score < det.threshold


def test_cli_verify_prints_payload_confidence_and_manifest(rendered, tmp_path, monkeypatch):
    data, info, keys = rendered
    monkeypatch.setenv("CINERAY_C2PA_DIR", str(keys))
    (tmp_path / "clip.mp4").write_bytes(data)
    result = CliRunner().invoke(app, ["verify", str(tmp_path / "clip.mp4")])
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0].startswith("watermark: found (score ") and "confidence 1.00" in lines[0]
    assert lines[1] == f"payload: {info.payload}"
    assert lines[2] == ("c2pa: Valid (failures: signingCredential.untrusted); with the local CA "
                        "as trust anchor: Trusted")
    assert lines[3] == "payload matches manifest: yes" and lines[4] == "manifest: {"
    assert info.model_id in result.stdout

    (tmp_path / "plain.mp4").write_bytes(world_mp4())
    result = CliRunner().invoke(app, ["verify", str(tmp_path / "plain.mp4"), "--json"])
    assert result.exit_code == 1, result.output
    report = json.loads(result.stdout)
    assert report["watermark"]["watermarked"] is False and report["c2pa"]["state"] == "absent"

    result = CliRunner().invoke(app, ["verify", str(tmp_path / "missing.mp4")])
    assert result.exit_code == 2 and result.stderr.startswith("error: no such file")


def test_base_size_renders_are_marked_too(components, tmp_path):
    """32x32 output (no upscaler), one sampler step, no guidance: still watermarked and signed."""
    from cineray.storage import Storage, StorageConfig

    request = replace(REQ, upscale="none", negative_prompt="no watermark", guidance=1.0, steps=1)
    uri, result = render_to_file(components, request,
                                 storage=Storage(StorageConfig(str(tmp_path))))
    data = Path(uri).read_bytes()
    assert detect(read_mp4(data)[0]).payload == manifest_info(components, request).payload
    assert read_manifest(data).valid_apart_from_trust


def test_a_clip_marked_with_one_key_is_not_found_with_another(tmp_path, monkeypatch):
    key_a, key_b = ProvenanceConfig(watermark_key=1234567), ProvenanceConfig(watermark_key=7654321)
    data = provenance.package(world_frames(), 16.0, INFO, key_a)
    found = detect_mp4(data, key_a)
    assert found.watermarked and found.payload == INFO.payload
    for other in (key_b, None):  # None: the public default key
        missed = detect_mp4(data, other)
        assert not missed.watermarked and missed.payload is None
    assert provenance.describe(data, key_a)["payload_matches_manifest"] is True
    assert provenance.describe(data)["watermark"]["watermarked"] is False

    monkeypatch.setenv("CINERAY_WATERMARK_KEY", "1234567")  # what a deployment sets
    assert detect_mp4(data).payload == INFO.payload
    (tmp_path / "clip.mp4").write_bytes(data)
    result = CliRunner().invoke(app, ["verify", str(tmp_path / "clip.mp4"),
                                      "--set", "provenance.watermark_key=7654321"])
    assert result.exit_code == 1 and result.stdout.startswith("watermark: not found")
    monkeypatch.setenv("CINERAY_WATERMARK_KEY", "not-a-number")
    with pytest.raises(ValueError, match="CINERAY_WATERMARK_KEY='not-a-number' is not a non-neg"):
        detect_mp4(data)


def test_the_default_provenance_config_changes_nothing(keys, tmp_path):
    """Old call sites (no config, or a SigningConfig) embed with the public default key."""
    assert DEFAULT_WATERMARK_KEY == 0x5EED_C1E7
    frames = world_frames(2)
    plain = provenance.watermark(frames, INFO.payload)
    assert np.array_equal(plain, provenance.watermark(frames, INFO.payload, ProvenanceConfig()))
    for cfg in (None, SigningConfig.from_env(), ProvenanceConfig(keys_dir=str(keys))):
        data = provenance.package(frames, 16.0, INFO, cfg)
        assert np.array_equal(read_mp4(data)[0], read_mp4(mux(plain, 16.0))[0])
        assert read_manifest(data).trusted_state == "Trusted"  # signed by the same local CA
    other = ProvenanceConfig(keys_dir=str(tmp_path / "other-ca")).signing()
    assert other.keys_dir == str(tmp_path / "other-ca") and other.cert_chain is None
    with pytest.raises(ValueError, match="give both provenance.cert_chain and provenance.priv"):
        ProvenanceConfig(cert_chain="chain.pem")
