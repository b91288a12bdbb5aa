"""Copy exported components (vae/, denoiser/, upscaler_*/ with config.json + model.safetensors)
from storage (s3:// or a folder) into a local folder, atomically and at most once.

    python infra/docker/fetch_weights.py s3://bucket/cineray-tiny /models/cineray-tiny

The files land in a temp folder beside DEST, which is renamed into place only when every file
has arrived; DEST/.source records the URI, so a restarted pod with a complete copy of the same
URI skips the download. Credentials and endpoint: the AWS_* variables (cineray.storage).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from pathlib import Path

from cineray.storage import Storage, StorageConfig

MARKER = ".source"


def fetch(uri: str, dest: str | os.PathLike) -> list[str]:
    """Copy every file under ``uri`` into ``dest``; returns the relative paths copied ([] when
    ``dest`` already holds a complete copy of ``uri``)."""
    dest = Path(dest)
    if (dest / MARKER).is_file() and (dest / MARKER).read_text() == uri:
        return []
    storage = Storage(StorageConfig(root=uri))
    fs, root = storage.fs_for(uri)
    files = sorted(fs.find(root))
    rel = [f[len(root):].lstrip("/") for f in files]
    if not any(r.endswith("/config.json") for r in rel):
        raise FileNotFoundError(f"no exported component (*/config.json) under {uri}: export one "
                                f"with `python -m cineray.jobs.train export --out {uri}/vae`")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}-", dir=dest.parent))
    try:
        for src, r in zip(files, rel, strict=True):
            (tmp / r).parent.mkdir(parents=True, exist_ok=True)
            fs.get_file(src, str(tmp / r))
        (tmp / MARKER).write_text(uri)
        if dest.exists():  # an older or partial copy: replace it whole
            shutil.rmtree(dest)
        os.replace(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return rel


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("uri", help="s3://bucket/prefix (or a folder) holding the exported components")
    p.add_argument("dest", help="local folder the Serve config's `checkpoint` arg names")
    a = p.parse_args(argv)
    copied = fetch(a.uri, a.dest)
    print(f"{a.dest}: " + (f"{len(copied)} files from {a.uri}" if copied else "already complete"))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
