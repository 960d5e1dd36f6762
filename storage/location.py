"""Where a token store or logit cache lives: a local folder (a `Path`) or a folder in object
storage (a `Remote`: an fsspec URL such as s3://bucket/prefix or gs://bucket/prefix).

`locate` turns a setting into one or the other; `file://` URLs are local folders. Local folders
keep their own code (storage.paths, storage.chunks: fsync, renames, flock). A `Remote` reaches
its objects through fsspec with the operations the stores need: whole objects, byte ranges
(HTTP range requests, several at once), sizes, listings, deletes, and the two conditional writes
a shard's lease needs (create if absent, replace if unchanged: S3's If-None-Match and If-Match).
Object stores have no rename and no append: a PUT lands whole or not at all, which is what the
stores need from a rename.

Credentials and endpoints come the ecosystem's usual way, the environment (AWS_ACCESS_KEY_ID,
AWS_SECRET_ACCESS_KEY, AWS_ENDPOINT_URL, GOOGLE_APPLICATION_CREDENTIALS, ...) or the fsspec
`storage_options` given as `storage.options`; a `Remote` prints as its URL alone, so neither
reaches a manifest, a log or a message. A fault on the way (no connection, a timeout, access
denied) is `RemoteUnavailable`, one line; a missing object is FileNotFoundError, as for a file.
"""

from __future__ import annotations

import contextlib
import os
import posixpath
from pathlib import Path, PurePosixPath
from typing import Iterator, Mapping

from storage.errors import StorageError

CLOUD_EXTRA = "pip install 'babylm-kd[cloud]'"


class RemoteUnavailable(StorageError):
    """Object storage cannot be reached or refuses access (connection, timeout, credentials)."""


def is_url(where: str | Path) -> bool:
    return "://" in str(where)


def locate(where: "str | Path | Remote", options: Mapping | None = None) -> "Path | Remote":
    """A store's place: a `Remote` for a URL (reached with fsspec `options`), else a local Path
    (file:// URLs included)."""
    if isinstance(where, (Path, Remote)):
        return where
    if where.startswith("file://"):
        return Path(where[len("file://"):])
    return Remote(where, options) if is_url(where) else Path(where)


def file_exists(file: "Path | Remote") -> bool:
    """Whether a file is there (a local broken link counts: reading it says what is wrong)."""
    return file.exists() if isinstance(file, Remote) else file.exists() or file.is_symlink()


@contextlib.contextmanager
def reaching(url: str) -> Iterator[None]:
    """Faults of the object store behind `url` as RemoteUnavailable (one line); a missing object
    stays FileNotFoundError and a refused conditional write FileExistsError, for the caller."""
    try:
        yield
    except (FileNotFoundError, FileExistsError):
        raise
    except PermissionError as exc:
        raise RemoteUnavailable(f"{url}: access denied ({_reason(exc)}); check the credentials "
                                "(environment, or storage.options)") from None
    except Exception as exc:  # noqa: BLE001 -- the fsspec backends raise their own types
        if type(exc).__name__ == "NoCredentialsError":  # botocore's, before any connection
            raise RemoteUnavailable(f"{url}: no credentials found; set them in the environment "
                                    "(AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY) or "
                                    "storage.options") from None
        if not _is_transport_error(exc):
            raise
        raise RemoteUnavailable(f"cannot reach {url} ({_reason(exc)}); nothing unfinished was "
                                "marked done: rerun when it is reachable") from None


def _is_transport_error(exc: BaseException) -> bool:
    """OSError (aiohttp's connection errors are ones) and the botocore/aiohttp errors that are
    not: anything raised on the way to the object store rather than by our own code."""
    if isinstance(exc, (OSError, TimeoutError)):
        return True
    module = type(exc).__module__.split(".")[0]
    return module in ("botocore", "aiobotocore", "aiohttp", "s3fs", "gcsfs", "google")


def _reason(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= 160 else text[:157] + "..."


class Remote:
    """A file or folder in object storage: its URL and the fsspec options that reach it. Joins
    with `/` like a Path; prints as the URL only (options hold credentials)."""

    def __init__(self, url: str, options: Mapping | None = None, *, _fs=None):
        self.url = url.rstrip("/")
        self.options = dict(options or {})
        self._fs = _fs

    # -- naming ---------------------------------------------------------------------------------

    def __truediv__(self, name: str) -> "Remote":
        return Remote(posixpath.join(self.url, str(name)), self.options, _fs=self._fs)

    def joinpath(self, *parts: str) -> "Remote":
        return Remote(posixpath.join(self.url, *map(str, parts)), self.options, _fs=self._fs)

    @property
    def name(self) -> str:
        return posixpath.basename(self.url)

    @property
    def stem(self) -> str:
        return PurePosixPath(self.name).stem

    @property
    def parent(self) -> "Remote":
        return Remote(posixpath.dirname(self.url), self.options, _fs=self._fs)

    def relative_to(self, base: "Remote") -> PurePosixPath:
        return PurePosixPath(self.url).relative_to(PurePosixPath(base.url))

    def __str__(self) -> str:
        return self.url

    def __repr__(self) -> str:
        return f"Remote({self.url!r})"

    def __eq__(self, other) -> bool:
        return isinstance(other, Remote) and other.url == self.url

    def __hash__(self) -> int:
        return hash(self.url)

    # -- the filesystem -------------------------------------------------------------------------

    @property
    def protocol(self) -> str:
        return self.url.split("://", 1)[0]

    @property
    def fs(self):
        """The fsspec filesystem of this URL, made once per (protocol, options) by fsspec."""
        if self._fs is None:
            self._fs = _filesystem(self.protocol, self.options)
        return self._fs

    @property
    def key(self) -> str:
        """The object's path as the filesystem names it (bucket/key, no protocol)."""
        return self.fs._strip_protocol(self.url)

    # -- reads ----------------------------------------------------------------------------------

    def exists(self) -> bool:
        with reaching(self.url):
            return self.fs.exists(self.key)

    def size(self) -> int:
        with reaching(self.url):
            return int(self.fs.size(self.key))

    def read(self, offset: int = 0, length: int = -1) -> bytes:
        """`length` bytes from `offset` (a range request), or the whole object from it."""
        end = None if length < 0 else offset + length
        with reaching(self.url):
            return self.fs.cat_file(self.key, start=offset or None, end=end)

    def folders(self) -> list["Remote"]:
        """The folders directly under this one, sorted."""
        with reaching(self.url):
            found = self.fs.ls(self.key, detail=True) if self.fs.exists(self.key) else []
        return sorted((self / posixpath.basename(info["name"].rstrip("/")) for info in found
                       if info.get("type") == "directory"), key=str)

    def files(self) -> dict["Remote", int]:
        """Every object under this folder with its size."""
        with reaching(self.url):
            found = self.fs.find(self.key, detail=True)
        root = self.key
        return {self.joinpath(posixpath.relpath(key, root)): int(info.get("size") or 0)
                for key, info in found.items() if info.get("type", "file") == "file"}

    # -- writes ---------------------------------------------------------------------------------

    def write(self, data: bytes) -> None:
        """Put the whole object: it appears complete or not at all."""
        with reaching(self.url):
            self.fs.pipe_file(self.key, data)

    def delete(self) -> None:
        """Remove the object; a missing one is fine."""
        with reaching(self.url), contextlib.suppress(FileNotFoundError):
            self.fs.rm_file(self.key)

    def create(self, data: bytes) -> str | None:
        """Put the object only if there is none (If-None-Match: *): its ETag, or None when one
        exists. Object storage's one atomic test-and-set."""
        self.need_conditional_writes()
        with reaching(self.url):
            try:
                return self.fs.pipe_file(self.key, data, mode="create")["ETag"]
            except FileExistsError:
                return None

    def replace(self, data: bytes, *, etag: str) -> str | None:
        """Put the object only if it is still the version `etag` names (If-Match): its new ETag,
        or None when someone else changed it first (compare-and-swap)."""
        self.need_conditional_writes()
        with reaching(self.url):
            try:
                return self.fs.pipe_file(self.key, data, IfMatch=etag)["ETag"]
            except FileNotFoundError:
                return None
            except OSError as exc:
                if _precondition_failed(exc):
                    return None
                raise

    def read_versioned(self) -> tuple[bytes, str] | None:
        """(bytes, ETag) of the object, None when it does not exist. The ETag is read first: if
        the object changes in between, a `replace` with it fails, which is the safe way round."""
        with reaching(self.url):
            try:
                etag = self.fs.info(self.key, refresh=True)["ETag"]
                return self.fs.cat_file(self.key), etag
            except FileNotFoundError:
                return None

    def need_conditional_writes(self) -> None:
        """Refuse (StorageError) a store whose protocol this tool cannot write conditionally."""
        if self.protocol not in ("s3", "s3a"):
            raise StorageError(f"{self.url}: writing a logit cache needs conditional writes "
                               "(a shard's lease), which this tool does through the S3 API only; "
                               "use an s3:// URL (any S3-compatible endpoint), or write the cache "
                               "locally and copy it")


def _precondition_failed(exc: OSError) -> bool:
    cause = getattr(exc, "__cause__", None)
    response = getattr(cause, "response", None) or {}
    return response.get("Error", {}).get("Code") in ("PreconditionFailed", "412")


def _filesystem(protocol: str, options: Mapping):
    """fsspec's filesystem for `protocol` (fsspec keeps one instance per protocol and options)."""
    import fsspec

    try:
        fsspec.get_filesystem_class(protocol)
    except ImportError as exc:
        raise StorageError(f"{protocol}:// needs an fsspec filesystem that is not installed "
                           f"({_reason(exc)}): {CLOUD_EXTRA}") from None
    except ValueError:
        raise StorageError(f"{protocol}:// is not a storage protocol fsspec knows") from None
    # listings cached by s3fs would hide the done marks and leases other writers add
    defaults = {"use_listings_cache": False} if protocol in ("s3", "s3a") else {}
    return fsspec.filesystem(protocol, **{**defaults, **options})


def read_ranges(requests: list[tuple["Remote", int, int]]) -> list[bytes | Exception]:
    """Byte ranges (file, offset, length; length -1: to the end) of one filesystem, fetched
    concurrently: one round trip for all of them rather than one each. A missing file's entry is
    its FileNotFoundError."""
    if not requests:
        return []
    first = requests[0][0]
    with reaching(first.url):
        found = first.fs.cat_ranges([file.key for file, _, _ in requests],
                                    [offset for _, offset, _ in requests],
                                    [None if length < 0 else offset + length
                                     for _, offset, length in requests],
                                    on_error="return")
    for result in found:
        if isinstance(result, Exception) and not isinstance(result, FileNotFoundError):
            with reaching(first.url):
                raise result
    return found


def upload_folder(local: Path, remote: Remote, *, last: str = "zarr.json") -> None:
    """Every file under `local` put at the same place under `remote`, the root `last` file
    after all others: a reader who finds it finds everything it describes."""
    files = sorted(p for p in local.rglob("*") if p.is_file())
    root = local / last
    for file in [f for f in files if f != root] + ([root] if root in files else []):
        remote.joinpath(*file.relative_to(local).parts).write(file.read_bytes())


def download_folder(remote: Remote, local: Path) -> None:
    """Every object under `remote` copied to the same place under `local` (written beside and
    renamed in)."""
    for file in remote.files():
        target = local.joinpath(*file.relative_to(remote).parts)
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_name(target.name + ".partial")
        partial.write_bytes(file.read())
        os.replace(partial, target)
