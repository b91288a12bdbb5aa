"""The image's weights path: infra/docker/entrypoint.sh with CINERAY_WEIGHTS_URI=s3://... fetches
the exported components into CINERAY_WEIGHTS_DIR (real S3 endpoint: moto on loopback), once,
and the result loads as serving components."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
ENTRYPOINT = ROOT / "infra" / "docker" / "entrypoint.sh"
SHIPPED = ROOT / "checkpoints" / "cineray-tiny"
FILES = ["vae/config.json", "vae/model.safetensors"]


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _entrypoint(env: dict, *cmd: str) -> subprocess.CompletedProcess:
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"  # the venv's python
    return subprocess.run(["bash", str(ENTRYPOINT), *cmd], capture_output=True, text=True,
                          timeout=120, env={**os.environ, **env, "PATH": path})


def test_entrypoint_fetches_weights_from_s3_once(s3_storage, s3_bucket, tmp_path):
    for rel in FILES:
        s3_storage.write_bytes(f"weights/{rel}", (SHIPPED / rel).read_bytes())
    dest = tmp_path / "models" / "cineray-tiny"
    env = {"CINERAY_WEIGHTS_URI": f"{s3_bucket}/weights", "CINERAY_WEIGHTS_DIR": str(dest)}

    r = _entrypoint(env, "echo", "then-the-command")
    assert r.returncode == 0, r.stderr
    assert "2 files from" in r.stdout and r.stdout.rstrip().endswith("then-the-command")
    for rel in FILES:
        assert _digest(dest / rel) == _digest(SHIPPED / rel)

    r = _entrypoint(env)  # a restarted pod: the complete copy stays, nothing is downloaded
    assert r.returncode == 0 and "already complete" in r.stdout, r.stderr
    assert not [p for p in dest.parent.iterdir() if p.name.startswith(".")]  # no temp folders

    from cineray.pipelines.weights import load_component

    vae = load_component(dest / "vae", "cpu")
    assert sum(p.numel() for p in vae.parameters()) > 0


def test_entrypoint_without_uri_keeps_baked_weights(tmp_path):
    r = _entrypoint({"CINERAY_WEIGHTS_URI": "", "CINERAY_WEIGHTS_DIR": str(tmp_path / "m")},
                    "true")
    assert r.returncode == 0 and not (tmp_path / "m").exists(), r.stderr


def test_fetch_from_a_prefix_without_components_fails_clearly(s3_storage, s3_bucket, tmp_path):
    s3_storage.write_bytes("empty/readme.txt", b"not weights")
    env = {"CINERAY_WEIGHTS_URI": f"{s3_bucket}/empty",
           "CINERAY_WEIGHTS_DIR": str(tmp_path / "dest")}
    r = _entrypoint(env, "echo", "must-not-run")
    assert r.returncode != 0 and "must-not-run" not in r.stdout
    assert "no exported component" in r.stderr and f"{s3_bucket}/empty" in r.stderr
    assert not (tmp_path / "dest").exists()

