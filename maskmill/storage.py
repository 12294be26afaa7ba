"""Where a run lives: a local folder, or any URL fsspec reaches (s3://, gs://, memory://, file://).

    check_output("s3://bucket/runs/shapes")        # one-line StorageError, before any work
    store = Store("s3://bucket/runs/shapes")        # or Store("outputs/shapes")
    store.write_bytes(store.root / "run.json", b"{}")   # whole object (local: atomic rename)
    store.upload("/tmp/x/00000.tar", store.root / "shards/00000.tar")
    store.url(store.root / "shards/00000.tar")     # "s3://bucket/runs/shapes/shards/00000.tar"

A local store's paths are `pathlib.Path`s and its writes are today's atomic renames (maskmill.atomic).
A remote store's paths are `PurePosixPath`s inside its filesystem (e.g. "bucket/runs/shapes/...") and
every write is one whole object: an object PUT (or a completed multipart upload) is atomic, so a
reader sees the old object, the new one, or none. Listings are never cached, so an object written
by another process is seen at once. Credentials and endpoints come from the environment the way
each backend reads them (for S3: AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY,
AWS_DEFAULT_REGION): never from a config.
"""
from __future__ import annotations

import hashlib
import os
import re
import shutil
import tempfile
import uuid
from pathlib import Path, PurePath, PurePosixPath
from urllib.parse import urlparse
from urllib.request import url2pathname

from .atomic import atomic_write_bytes

# pip extras that bring a protocol's fsspec backend (pyproject.toml's optional-dependencies)
EXTRAS = {"s3": "s3", "s3a": "s3"}
_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.\-]*://")
HASH_CHUNK = 1 << 20


class StorageError(ValueError):
    """An output location that cannot be used; one line, naming it."""


def is_url(location: str | os.PathLike) -> bool:
    """True for "proto://..." locations (file:// included); False for plain paths."""
    return isinstance(location, str) and bool(_URL.match(location))


def protocol_of(location: str | os.PathLike) -> str:
    return urlparse(location).scheme.lower() if is_url(location) else "file"


def _local_path(location: str | os.PathLike) -> Path:
    if is_url(location):  # file://...
        return Path(url2pathname(urlparse(location).path))
    return Path(location).expanduser()


def filesystem_class(location: str):
    """The fsspec class of the location's protocol; StorageError if unknown or not installed."""
    import fsspec

    proto = protocol_of(location)
    try:
        return fsspec.get_filesystem_class(proto)
    except ValueError:
        raise StorageError(f"output {location!r}: unknown storage protocol {proto}:// "
                           f"(use a folder, or an fsspec URL such as s3://, gs://, memory://, file://)") from None
    except ImportError as e:
        extra = EXTRAS.get(proto)
        how = f"pip install 'maskmill[{extra}]'" if extra else str(e).splitlines()[0]
        raise StorageError(f"output {location!r}: the {proto}:// backend is not installed ({how})") from None


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}".rstrip(": ")


class Store:
    """A run's files, local or remote, behind one small interface (see the module docstring)."""

    def __init__(self, location: str | os.PathLike) -> None:
        if is_url(location) and protocol_of(location) != "file":
            from fsspec.core import url_to_fs

            filesystem_class(str(location))  # a clear error for an unknown or missing backend
            # no listings cache: another process's objects (a fan-out child's shards) must be seen at once
            self.fs, root = url_to_fs(str(location), use_listings_cache=False, skip_instance_cache=False)
            self.remote = True
            self.root: PurePath = PurePosixPath(root.rstrip("/") or "/")
        else:
            from fsspec.implementations.local import LocalFileSystem

            self.fs = LocalFileSystem()
            self.remote = False
            self.root = _local_path(location)
        self.location = str(location)

    def __repr__(self) -> str:
        return f"Store({self.location!r})"

    # --- names ---------------------------------------------------------------------------
    def url(self, path: PurePath) -> str | Path:
        """What a user (or webdataset) opens: the full URL of a remote path; a local path as is."""
        return self.fs.unstrip_protocol(str(path)) if self.remote else Path(path)

    # --- reading ---------------------------------------------------------------------------
    def isfile(self, path: PurePath) -> bool:
        return Path(path).is_file() if not self.remote else self.fs.isfile(str(path))

    def isdir(self, path: PurePath) -> bool:
        """Local: a folder. Remote: anything stored under the prefix (object stores have no folders)."""
        if not self.remote:
            return Path(path).is_dir()
        return bool(self.listdir(path)) or self.fs.isdir(str(path))

    def size(self, path: PurePath) -> int:
        return Path(path).stat().st_size if not self.remote else int(self.fs.size(str(path)))

    def read_bytes(self, path: PurePath) -> bytes:
        return Path(path).read_bytes() if not self.remote else self.fs.cat_file(str(path))

    def read_text(self, path: PurePath) -> str:
        return self.read_bytes(path).decode()

    def open(self, path: PurePath, mode: str = "rb"):
        return open(path, mode) if not self.remote else self.fs.open(str(path), mode)

    def sha256(self, path: PurePath) -> str:
        h = hashlib.sha256()
        with self.open(path, "rb") as f:
            for chunk in iter(lambda: f.read(HASH_CHUNK), b""):
                h.update(chunk)
        return h.hexdigest()

    def listdir(self, folder: PurePath) -> dict[str, int]:
        """{file name: size} of the files directly in `folder`; {} if there is none."""
        if not self.remote:
            d = Path(folder)
            return {p.name: p.stat().st_size for p in d.iterdir() if p.is_file()} if d.is_dir() else {}
        try:
            entries = self.fs.ls(str(folder), detail=True)
        except FileNotFoundError:
            return {}
        return {e["name"].rstrip("/").rsplit("/", 1)[-1]: int(e.get("size") or 0)
                for e in entries if e.get("type") == "file"}

    # --- writing ---------------------------------------------------------------------------
    def makedirs(self, folder: PurePath) -> None:
        if not self.remote:  # object stores have no folders: a key's prefix is enough
            Path(folder).mkdir(parents=True, exist_ok=True)

    def write_bytes(self, path: PurePath, data: bytes, tmp: PurePath | None = None) -> None:
        """The whole file at once: local, a fsync'ed temporary renamed into place; remote, one PUT."""
        if self.remote:
            self.fs.pipe_file(str(path), data)
        else:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(path, data, tmp=tmp)

    def write_if_changed(self, path: PurePath, data: bytes) -> bool:
        """Write unless `path` already holds exactly `data`. True if it wrote."""
        if self.isfile(path) and self.read_bytes(path) == data:
            return False
        self.write_bytes(path, data)
        return True

    def upload(self, local: str | os.PathLike, path: PurePath) -> None:
        """Move a finished local file to `path`: a rename (local) or one whole upload (remote)."""
        if self.remote:
            self.fs.put_file(str(local), str(path))
        else:
            os.replace(local, path)

    def remove(self, path: PurePath) -> bool:
        """Remove a file if it is there. True if it was."""
        if not self.remote:
            try:
                Path(path).unlink()
                return True
            except FileNotFoundError:
                return False
        try:
            self.fs.rm_file(str(path))
        except FileNotFoundError:
            return False
        return True


def read_location(location: str | os.PathLike) -> bytes:
    """The bytes of one file named by a path or a URL."""
    if is_url(location) and protocol_of(location) != "file":
        import fsspec

        with fsspec.open(str(location), "rb") as f:
            return f.read()
    return _local_path(location).read_bytes()


def location_exists(location: str | os.PathLike) -> bool:
    """True if a file is at the path or URL."""
    if is_url(location) and protocol_of(location) != "file":
        from fsspec.core import url_to_fs

        fs, path = url_to_fs(str(location), use_listings_cache=False)
        return fs.isfile(path)
    return _local_path(location).is_file()


def join_location(root: str | os.PathLike, *parts: str) -> str | Path:
    """`root/part/...`: a Path for a folder, a string for a URL (which Path would mangle)."""
    if is_url(root) and protocol_of(root) != "file":
        return "/".join([str(root).rstrip("/"), *parts])
    return _local_path(root).joinpath(*parts)


def write_location(location: str | os.PathLike, data: bytes) -> str | Path:
    """Write one whole file named by a path or a URL (local: atomically, parents created)."""
    if is_url(location) and protocol_of(location) != "file":
        store = Store(str(location))
        store.write_bytes(store.root, data)
        return str(location)
    path = _local_path(location)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, data)
    return path


def check_output(location: str | os.PathLike) -> None:
    """Refuse in one line (StorageError) an output that cannot hold a run, before any work.

    URLs: the protocol must be known to fsspec and its backend installed, and a probe object
    is written and removed under the prefix (a missing bucket, bad credentials, no permission).
    Folders: a file, or a path under a file, is refused; otherwise a probe folder is made and
    removed in the output or its nearest existing parent (nothing is left behind).
    """
    if is_url(location) and protocol_of(location) != "file":
        store = Store(str(location))  # StorageError for an unknown or missing backend
        probe = store.root / f".maskmill-write-probe-{uuid.uuid4().hex}"
        try:
            store.fs.pipe_file(str(probe), b"")
            store.fs.rm_file(str(probe))
        except Exception as e:  # missing bucket, no credentials, access denied, no endpoint...
            raise StorageError(f"output {location}: cannot write there ({_one_line(e)})") from None
        return
    # Folders: ask the filesystem itself, by making (and at once removing) a folder in the output or
    # in its nearest existing parent, so permissions, read-only mounts and special filesystems
    # (/proc) all give their real answer, for root as for anyone else.
    path = _local_path(location).expanduser().resolve()
    existing = path
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        where = "is a file" if existing == path else f"lies under {existing}, which is a file"
        raise StorageError(f"output {str(location)!r} {where}, not a folder: choose another `output`")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".maskmill-probe-", dir=existing))
    except OSError as e:
        raise StorageError(f"output {str(location)!r} cannot be written: no folder can be made in {existing} "
                           f"({e.strerror or e})") from None


def local_scratch(prefix: str) -> Path:
    """A fresh local folder for files on their way to a remote store (the caller removes it)."""
    return Path(tempfile.mkdtemp(prefix=prefix))


def remove_scratch(folder: Path | None) -> None:
    if folder is not None:
        shutil.rmtree(folder, ignore_errors=True)
