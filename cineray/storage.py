"""One storage layer for every output: a local folder by default, or s3:// in a cluster.

URIs are either absolute local paths, ``file://`` URLs, ``s3://bucket/key``, or paths relative to
the storage root (``cineray-data/`` in the current directory unless configured). Relative paths
are resolved against the root when the Storage is built, so a Storage shipped to a Ray worker
(whose current directory may differ) still points at the same place.

Writes are atomic: a reader never sees a half-written file under its final name.
- local: write a temp file in the same directory, fsync, then ``os.replace`` (atomic on POSIX
  within one filesystem, which the same directory guarantees).
- S3: the whole object is uploaded in one ``PutObject`` (or a multipart upload for large data).
  S3 creates the object only when that request (or ``CompleteMultipartUpload``) succeeds, so a
  writer that fails or is killed leaves nothing under the final key. A temp key + copy + delete
  would double the traffic and leave orphan temp keys behind a killed writer.
"""

from __future__ import annotations

import contextlib
import os
import posixpath
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from typing import IO, Any

import fsspec

# In-flight local temp files carry this prefix; ls() hides them.
_TMP_PREFIX = ".cineray-tmp-"


@dataclass
class StorageConfig:
    """Where cineray reads and writes.

    root: local directory (relative to the current directory, or absolute) or ``s3://bucket/prefix``.
    endpoint_url, key, secret, region: S3 settings; each falls back to the usual AWS_* variables
    (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_DEFAULT_REGION).
    """

    root: str = "cineray-data"
    endpoint_url: str | None = None
    key: str | None = None
    secret: str | None = None
    region: str | None = None


def is_s3(uri: str) -> bool:
    return uri.startswith(("s3://", "s3a://"))


def _strip_file_scheme(uri: str) -> str:
    return uri[len("file://") :] if uri.startswith("file://") else uri


def _check_scheme(uri: str) -> None:
    scheme = uri.split("://", 1)[0] if "://" in uri else ""
    if scheme not in ("", "file", "s3", "s3a"):
        raise ValueError(
            f"unsupported storage URI {uri!r}: use a local path, file://, or s3://bucket/prefix"
        )


class Storage:
    """fsspec-backed storage rooted at ``cfg.root``. Picklable (holds only its config)."""

    def __init__(self, cfg: StorageConfig | None = None):
        self.cfg = cfg or StorageConfig()
        root = self.cfg.root
        _check_scheme(root)
        self.root = root.rstrip("/") if is_s3(root) else os.path.abspath(_strip_file_scheme(root))

    # URIs --------------------------------------------------------------------------------------
    def resolve(self, uri: str) -> str:
        """Absolute URI: s3:// and absolute paths unchanged, relative paths under the root."""
        uri = os.fspath(uri)
        _check_scheme(uri)
        if is_s3(uri):
            return "s3://" + uri.split("://", 1)[1]
        uri = _strip_file_scheme(uri)
        if os.path.isabs(uri):
            return os.path.normpath(uri)
        if is_s3(self.root):
            return posixpath.join(self.root, posixpath.normpath(uri)) if uri else self.root
        return os.path.normpath(os.path.join(self.root, uri))

    def join(self, *parts: str) -> str:
        """Join path parts onto the first (a URI, or a path relative to the root); absolute URI."""
        if not parts:
            return self.root
        head = self.resolve(parts[0])
        tail = [str(p).strip("/") for p in parts[1:] if str(p).strip("/")]
        return posixpath.join(head, *tail) if is_s3(head) else os.path.join(head, *tail)

    def fs_for(self, uri: str) -> tuple[fsspec.AbstractFileSystem, str]:
        """The fsspec filesystem serving ``uri`` and the path inside it (``bucket/key`` for S3)."""
        uri = self.resolve(uri)
        if is_s3(uri):
            return self._s3fs(), uri.split("://", 1)[1]
        return fsspec.filesystem("file"), uri

    def _s3_options(self) -> dict[str, Any]:
        env = os.environ
        c = self.cfg
        endpoint = c.endpoint_url or env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL")
        region = c.region or env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION")
        opts: dict[str, Any] = {"use_listings_cache": False}  # other processes write here too
        if c.key or c.secret:
            opts.update(key=c.key, secret=c.secret)
        if endpoint:
            opts["endpoint_url"] = endpoint
        if region:
            opts["client_kwargs"] = {"region_name": region}
        return opts

    def _s3fs(self) -> fsspec.AbstractFileSystem:
        # fsspec caches instances by their arguments, so this is cheap after the first call.
        return fsspec.filesystem("s3", **self._s3_options())

    def pyarrow_fs(self, uri: str):
        """``(pyarrow.fs.FileSystem, path)`` for Ray Data's read_parquet/write_parquet(filesystem=)."""
        import pyarrow.fs as pafs

        fs, path = self.fs_for(uri)
        if isinstance(fs, fsspec.implementations.local.LocalFileSystem):
            return pafs.LocalFileSystem(), path
        # Wrapping the same s3fs instance keeps one set of endpoint/credential rules.
        return pafs.PyFileSystem(pafs.FSSpecHandler(fs)), path

    # Reads -------------------------------------------------------------------------------------
    def read_bytes(self, uri: str) -> bytes:
        fs, path = self.fs_for(uri)
        try:
            return fs.cat_file(path)
        except FileNotFoundError:
            raise FileNotFoundError(f"no such file: {self.resolve(uri)}") from None

    def exists(self, uri: str) -> bool:
        fs, path = self.fs_for(uri)
        return fs.exists(path)

    def ls(self, uri: str) -> list[str]:
        """Sorted absolute URIs of the entries directly under ``uri``."""
        fs, path = self.fs_for(uri)
        try:
            names = fs.ls(path, detail=False)
        except FileNotFoundError:
            raise FileNotFoundError(f"no such directory: {self.resolve(uri)}") from None
        names = [n for n in names if not posixpath.basename(n.rstrip("/")).startswith(_TMP_PREFIX)]
        prefix = "s3://" if is_s3(self.resolve(uri)) else ""
        return sorted(prefix + n.rstrip("/") for n in names)

    def rm(self, uri: str, recursive: bool = False) -> None:
        fs, path = self.fs_for(uri)
        fs.rm(path, recursive=recursive)

    # Writes ------------------------------------------------------------------------------------
    def write_bytes(self, uri: str, data: bytes) -> str:
        """Atomically write ``data`` to ``uri``; returns the absolute URI."""
        uri = self.resolve(uri)
        fs, path = self.fs_for(uri)
        if is_s3(uri):
            fs.pipe_file(path, bytes(data))  # one PUT / one multipart upload: atomic
            return uri
        with _local_atomic(path) as f:
            f.write(data)
        return uri

    def open(self, uri: str, mode: str = "rb") -> IO:
        """Open for reading, or for atomic writing (``"wb"``/``"w"``): the file appears under its
        final name only when the ``with`` block exits cleanly; an exception discards it."""
        if "r" in mode:
            fs, path = self.fs_for(uri)
            try:
                return fs.open(path, mode)
            except FileNotFoundError:
                raise FileNotFoundError(f"no such file: {self.resolve(uri)}") from None
        if mode not in ("wb", "w"):
            raise ValueError(f"unsupported mode {mode!r}: use 'rb', 'r', 'wb' or 'w'")
        return _AtomicWriter(self, self.resolve(uri), mode)


@contextlib.contextmanager
def _local_atomic(path: str, mode: str = "wb") -> Iterator[IO]:
    """Temp file in the target's directory, fsync, os.replace; the temp file goes on error."""
    parent = os.path.dirname(path) or "."
    os.makedirs(parent, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=_TMP_PREFIX, dir=parent)
    try:
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; published files are world-readable
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


class _AtomicWriter:
    """File-like writer that commits on a clean close and discards on an exception.

    Local targets stream into a temp file beside the target; S3 targets spool into a local temp
    file and are uploaded in one request on commit (see the module docstring for why)."""

    def __init__(self, storage: Storage, uri: str, mode: str):
        self._storage, self._uri = storage, uri
        if is_s3(uri):
            self._ctx = None
            self._file = tempfile.NamedTemporaryFile(mode=mode, prefix=_TMP_PREFIX)
        else:
            self._ctx = _local_atomic(uri, mode)
            self._file = self._ctx.__enter__()
        self.closed = False

    def write(self, data) -> int:
        return self._file.write(data)

    def __getattr__(self, name: str):  # flush, tell, seekable, ... from the temp file
        return getattr(self._file, name)

    def close(self) -> None:
        """Commit: the data appears under the final name."""
        if self.closed:
            return
        self.closed = True
        if self._ctx is not None:
            self._ctx.__exit__(None, None, None)
            return
        fs, path = self._storage.fs_for(self._uri)
        with self._file:
            self._file.flush()
            fs.put_file(self._file.name, path)  # one PUT / one multipart upload: atomic

    def discard(self) -> None:
        """Abort: nothing appears under the final name."""
        if self.closed:
            return
        self.closed = True
        if self._ctx is not None:
            err = RuntimeError("write discarded")
            with contextlib.suppress(RuntimeError):
                self._ctx.__exit__(RuntimeError, err, None)
        else:
            self._file.close()

    def __enter__(self) -> _AtomicWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.discard()
