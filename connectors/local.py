"""A directory on a local or mounted filesystem as a store (`file:///path`).

An object is a regular file at `<root>/<key>`. A put writes a temporary file under
`<root>/.partial/`, fsyncs it, then hard-links it into place: `link(2)` fails if the name
exists, which makes the write create-only and atomic (a reader sees the whole object or
nothing), unlike `rename(2)`, which replaces. The directory holding the new name is fsynced
afterwards, and so is every directory the put had to create, so an acknowledged object
survives a power loss. Keys may therefore not start with `.partial/`.

Metadata is kept in `user.wedsync.<name>` extended attributes of the file, set before the
link so an object never appears without it. Copy such a folder with `cp -a` or `rsync -aX`,
which keep extended attributes. A filesystem without them can hold objects without metadata
only (a put with metadata raises `Fatal` there).

The root directory must exist: a missing root is usually an unmounted volume, and writing
the archive onto the wrong disk would be worse than stopping (`Fatal`, like a missing bucket).
All filesystem calls run in worker threads.
"""

from __future__ import annotations

import asyncio
import builtins
import errno
import os
import stat
import uuid
from collections.abc import AsyncIterator, Iterable, Mapping
from pathlib import Path

from connectors.base import ObjectInfo, ObjectStore, check_key, check_metadata, check_range
from connectors.errors import (
    AlreadyExists,
    Fatal,
    NotFound,
    Retriable,
    StoreError,
    describe,
    translated,
)

__all__ = ["LocalStore"]

_PARTIAL = ".partial"
_XATTR = "user.wedsync."
# Conditions that can clear by themselves (a full disk after retention ran, an NFS hiccup).
_RETRIABLE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.EAGAIN,
                               errno.EINTR, errno.ESTALE, errno.ETIMEDOUT, errno.EBUSY})
_NO_XATTR_ERRNOS = frozenset({errno.ENOTSUP, errno.EOPNOTSUPP})


class LocalStore(ObjectStore):
    """Objects as files under *root*, an existing directory."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self._root = Path(root).absolute()
        self.url = self._root.as_uri()
        self._closed = False

    async def put(self, key: str, data: bytes, *,
                  metadata: Mapping[str, str] | None = None) -> ObjectInfo:
        path = self._path(key)
        if key == _PARTIAL or key.startswith(_PARTIAL + "/"):
            raise ValueError(f"object key {key!r} is reserved on a local store")
        meta = check_metadata(metadata)
        with translated(lambda exc: self._error(exc, key)):
            return await asyncio.to_thread(self._put, key, path, bytes(data), meta)

    async def get(self, key: str, *, start: int = 0, end: int | None = None) -> bytes:
        path = self._path(key)
        check_range(start, end)
        with translated(lambda exc: self._error(exc, key)):
            return await asyncio.to_thread(_read, path, start, end)

    async def stat(self, key: str) -> ObjectInfo:
        path = self._path(key)
        with translated(lambda exc: self._error(exc, key)):
            return await asyncio.to_thread(_info, key, path)

    async def list(self, prefix: str = "", *,
                   after: str | None = None) -> AsyncIterator[ObjectInfo]:
        self._check_open()
        with translated(lambda exc: self._error(exc, None)):
            infos = await asyncio.to_thread(self._scan, prefix, after)
        for info in infos:
            yield info

    async def delete(self, keys: Iterable[str]) -> None:
        paths = {key: self._path(key) for key in keys}
        with translated(lambda exc: self._error(exc, None)):
            await asyncio.to_thread(self._delete, paths)

    async def close(self) -> None:
        self._closed = True

    # --- in worker threads ----------------------------------------------------------------

    def _put(self, key: str, path: Path, data: bytes, meta: dict[str, str]) -> ObjectInfo:
        self._require_root()
        partial = self._root / _PARTIAL
        self._make_dirs(partial)
        temp = partial / f"{uuid.uuid4().hex}.tmp"
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        try:
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view):]
                for name, value in meta.items():
                    os.setxattr(fd, _XATTR + name, value.encode("ascii"))
                os.fsync(fd)
            finally:
                os.close(fd)
            self._make_dirs(path.parent)
            if path.is_dir():
                raise Fatal("a directory of other objects has this name; the key cannot be "
                            "stored on a local filesystem", url=self.url, key=key)
            try:
                os.link(temp, path)
            except FileExistsError:
                raise AlreadyExists("object already exists", url=self.url, key=key) from None
            _fsync_dir(path.parent)
            st = os.stat(path)
        finally:
            temp.unlink(missing_ok=True)
        return ObjectInfo(key, st.st_size, meta, _etag(st))

    def _scan(self, prefix: str, after: str | None) -> builtins.list[ObjectInfo]:
        self._require_root()
        # Start in the deepest directory the prefix names; a segment no valid key can have
        # ('..' among them) means nothing matches, and the walk never leaves the root.
        base = prefix.rpartition("/")[0]
        if base and any(seg in ("", ".", "..") for seg in base.split("/")):
            return []
        found: builtins.list[ObjectInfo] = []
        stack = [(self._root / base if base else self._root, base + "/" if base else "")]
        while stack:
            directory, rel = stack.pop()
            try:
                entries = list(os.scandir(directory))
            except (FileNotFoundError, NotADirectoryError):
                continue
            for entry in entries:
                name = rel + entry.name
                if entry.is_dir(follow_symlinks=False):
                    if name == _PARTIAL:
                        continue
                    if (name + "/").startswith(prefix) or prefix.startswith(name + "/"):
                        stack.append((Path(entry.path), name + "/"))
                elif (entry.is_file(follow_symlinks=False) and name.startswith(prefix)
                      and (after is None or name > after)):
                    st = entry.stat(follow_symlinks=False)
                    found.append(ObjectInfo(name, st.st_size, {}, _etag(st)))
        # Directory order is not key order ('a-b' < 'a/b' as keys), so sort the whole result.
        found.sort(key=lambda info: info.key)
        return found

    def _delete(self, paths: Mapping[str, Path]) -> None:
        self._require_root()
        touched: set[Path] = set()
        for path in paths.values():
            try:
                path.unlink()
            except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
                continue
            touched.add(path.parent)
        for directory in touched:
            _fsync_dir(directory)

    def _make_dirs(self, directory: Path) -> None:
        """Create *directory* and its missing parents, fsyncing each new entry's parent."""
        missing: list[Path] = []
        while not directory.is_dir():
            missing.append(directory)
            directory = directory.parent
        for new in reversed(missing):
            try:
                new.mkdir()
            except FileExistsError:
                if not new.is_dir():
                    raise
                continue
            _fsync_dir(new.parent)

    def _require_root(self) -> None:
        self._check_open()
        if not self._root.is_dir():
            raise Fatal("the root directory does not exist (is the volume mounted?); create it "
                        "to use this store", url=self.url)

    # --- helpers --------------------------------------------------------------------------

    def _path(self, key: str) -> Path:
        self._check_open()
        return self._root.joinpath(*check_key(key).split("/"))

    def _check_open(self) -> None:
        if self._closed:
            raise Fatal("store is closed", url=self.url)

    def _error(self, exc: Exception, key: str | None) -> StoreError:
        if isinstance(exc, (FileNotFoundError, NotADirectoryError, IsADirectoryError)):
            if not self._root.is_dir():
                return Fatal("the root directory does not exist", url=self.url, key=key)
            return NotFound("object does not exist", url=self.url, key=key)
        if isinstance(exc, OSError) and exc.errno in _NO_XATTR_ERRNOS:
            return Fatal("this filesystem does not support user extended attributes, which "
                         "hold object metadata", url=self.url, key=key)
        if isinstance(exc, OSError) and exc.errno in _RETRIABLE_ERRNOS:
            return Retriable(describe(exc), url=self.url, key=key)
        return Fatal(describe(exc), url=self.url, key=key)


def _read(path: Path, start: int, end: int | None) -> bytes:
    with path.open("rb") as file:
        file.seek(start)
        return file.read() if end is None else file.read(end - start)


def _info(key: str, path: Path) -> ObjectInfo:
    st = os.stat(path)
    if not stat.S_ISREG(st.st_mode):
        raise FileNotFoundError(errno.ENOENT, "not a regular file", str(path))
    meta: dict[str, str] = {}
    try:
        names = os.listxattr(path)
    except OSError as exc:
        if exc.errno not in _NO_XATTR_ERRNOS:
            raise
        names = []
    for name in names:
        if name.startswith(_XATTR):
            meta[name[len(_XATTR):]] = os.getxattr(path, name).decode("ascii")
    return ObjectInfo(key, st.st_size, meta, _etag(st))


def _etag(st: os.stat_result) -> str:
    return f"{st.st_ino:x}.{st.st_mtime_ns:x}"


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
