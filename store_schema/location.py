"""Where a store lives: a local folder, a zip file, or an fsspec URL (s3://, http(s)://, ...).

Zarr reads the arrays through its own store classes; the few plain files next to them
(the Parquet sample table, the checksum manifest) are read through the same fsspec
filesystem, so one `Location` serves every backend.
"""

from __future__ import annotations

import os
import posixpath
import re
import tempfile
import zipfile
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import fsspec
import zarr
import zarr.storage

from .errors import StoreError, StoreNotFoundError

STORE_ROOT_ENV = "COMBO_STORE_ROOT"


def _process_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


# Files combo writes itself get the modes any other program's would (0666 less the umask): mkstemp's
# 0600 would lock teammates on a shared file system, and a web server, out of the store.
FILE_MODE = 0o666 & ~_process_umask()
DEFAULT_STORE_ROOT = "stores"


def is_url(path: str | os.PathLike) -> bool:
    """True for 'scheme://...' strings (but not Windows drive letters)."""
    text = str(path)
    return "://" in text and len(text.split("://", 1)[0]) > 1


def default_store_root() -> str:
    """The store root: $COMBO_STORE_ROOT when set (a path or a URL), else ./stores."""
    return os.environ.get(STORE_ROOT_ENV) or DEFAULT_STORE_ROOT


def store_path(root: str | os.PathLike, backbone: str, dataset: str) -> str:
    """Conventional location of one (backbone, dataset) store under a store root."""
    root = str(root)
    name = f"{dataset}.zarr"
    if is_url(root):
        return f"{root.rstrip('/')}/{backbone}/{name}"
    return str(Path(root) / backbone / name)


def parse_storage_options(items: list[str] | None) -> dict[str, Any]:
    """Turn ['endpoint_url=http://...', 'anon=true'] into fsspec storage options.

    Values 'true'/'false' become booleans and integers become ints; `client_kwargs.x=y`
    nests. Secrets belong in the environment, not here, so nothing here is ever recorded.
    """
    options: dict[str, Any] = {}
    for item in items or []:
        if "=" not in item:
            raise ValueError(f"--storage-option {item!r}: expected KEY=VALUE")
        key, raw = item.split("=", 1)
        value: Any = raw
        if raw.lower() in ("true", "false"):
            value = raw.lower() == "true"
        elif raw.isdigit():
            value = int(raw)
        target = options
        *parents, leaf = key.strip().split(".")
        for parent in parents:
            target = target.setdefault(parent, {})
        target[leaf] = value
    return options


# Storage-option names that carry credentials (s3fs, gcsfs, adlfs, aiohttp). The CLI refuses them:
# credentials come from the environment or the usual config files, never a command line.
SECRET_OPTION_NAMES = frozenset(
    {
        "key", "secret", "token", "password", "passwd", "auth", "session_token", "security_token",
        "aws_access_key_id", "aws_secret_access_key", "aws_session_token", "account_key", "sas_token",
        "client_secret", "connection_string", "credentials",
    }
)
# Environment variables whose values must never be echoed (redact() masks them wherever they appear).
SECRET_ENV_NAMES = (
    "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN", "AZURE_STORAGE_KEY",
    "AZURE_STORAGE_SAS_TOKEN", "AZURE_CLIENT_SECRET", "GOOGLE_APPLICATION_CREDENTIALS_JSON",
)


def secret_option_paths(options: dict[str, Any], _prefix: str = "") -> list[str]:
    """Dotted names of the credential-bearing entries of (nested) storage options."""
    found: list[str] = []
    for name, value in options.items():
        path = f"{_prefix}{name}"
        if isinstance(value, dict):
            found += secret_option_paths(value, f"{path}.")
        elif name.lower() in SECRET_OPTION_NAMES:
            found.append(path)
    return found


def _secret_values(options: dict[str, Any] | None) -> list[str]:
    values: list[str] = []

    def walk(opts: dict[str, Any]) -> None:
        for name, value in opts.items():
            if isinstance(value, dict):
                walk(value)
            elif name.lower() in SECRET_OPTION_NAMES and value not in (None, "", True, False):
                values.append(str(value))

    walk(options or {})
    values += [os.environ[n] for n in SECRET_ENV_NAMES if len(os.environ.get(n, "")) >= 4]
    return values


_USERINFO = re.compile(r"(?P<scheme>[a-zA-Z][a-zA-Z0-9+.-]*://)(?P<user>[^/@:\s]*)(?::[^/@\s]*)?@")


def redact(text: str, storage_options: dict[str, Any] | None = None) -> str:
    """`text` with URL passwords, secret storage options and secret env values masked (for output and logs)."""
    text = _USERINFO.sub(lambda m: f"{m['scheme']}{m['user']}:***@" if m["user"] else f"{m['scheme']}***@", str(text))
    for value in sorted(set(_secret_values(storage_options)), key=len, reverse=True):
        text = text.replace(value, "***")
    return text


def url_has_password(url: str) -> bool:
    match = _USERINFO.match(str(url))
    return bool(match and ":" in match.group(0)[len(match["scheme"]):])


def nearest_existing(path: str | os.PathLike) -> Path:
    """`path` itself when it exists, else its closest existing parent: the folder (or file in the way) that
    decides whether `path` can be created."""
    path = Path(path)
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def write_file_atomic(target: str | os.PathLike, data: bytes | Iterable[bytes]) -> None:
    """Write a local file so readers see the old one or the new one, never half of it (a crash or a full disk
    mid-write leaves the old one): a temp file in the same folder (0666 less the umask), fsynced, renamed over
    `target`, the folder fsynced. `data` may come in pieces (written as they come, e.g. while later ones are
    still being encoded)."""
    target = Path(target)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            for piece in (data,) if isinstance(data, (bytes, bytearray, memoryview)) else data:
                handle.write(piece)
            handle.flush()
            os.fchmod(handle.fileno(), FILE_MODE)
            os.fsync(handle.fileno())
        os.replace(tmp, target)
        fsync_dir(target.parent)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def connection_problem(err: BaseException) -> str | None:
    """What stopped a connection to a server, in words ("connection refused", "host name not found",
    "timed out"), or None when `err` is not a connection failure (a missing object, a bad file)."""
    import errno as errno_codes
    import socket

    seen: list[BaseException] = []
    todo: list[BaseException | None] = [err]
    while todo:
        e = todo.pop()
        if e is None or any(e is s for s in seen):
            continue
        seen.append(e)
        todo += [getattr(e, "os_error", None), e.__cause__, e.__context__]
    names = {type(e).__name__ for e in seen}
    for e in seen:
        code = getattr(e, "errno", None)
        if isinstance(e, ConnectionRefusedError) or code == errno_codes.ECONNREFUSED:
            return "connection refused (nothing is listening there)"
        if isinstance(e, socket.gaierror) or "ClientConnectorDNSError" in names:
            return "host name not found"
        if code in (errno_codes.EHOSTUNREACH, errno_codes.ENETUNREACH):
            return "host unreachable"
        if isinstance(e, ConnectionResetError):
            return "connection reset by the server"
    if "EndpointConnectionError" in names or "ConnectTimeoutError" in names:
        return f"cannot connect to the endpoint ({err})"
    for e in seen:
        if isinstance(e, (TimeoutError, ConnectionError)) or "ServerTimeoutError" in names:
            return f"{'timed out' if isinstance(e, TimeoutError) else 'connection failed'} ({e})"
        if type(e).__name__ in ("ClientConnectorError", "ClientConnectionError", "ServerDisconnectedError"):
            return f"connection failed ({e})"
    return None


def unreachable_error(url: str, err: BaseException) -> StoreError | None:
    """`cannot reach URL: connection refused` for a connection failure, else None."""
    reason = connection_problem(err)
    return None if reason is None else StoreError(f"cannot reach {redact(url)}: {reason}")


@dataclass
class Location:
    """A resolved store location: fsspec filesystem + path, and how to open it with zarr."""

    url: str
    fs: fsspec.AbstractFileSystem
    root: str
    kind: str  # "local" | "zip" | "remote"
    storage_options: dict[str, Any] = field(default_factory=dict, repr=False)

    # -- plain files beside the arrays -------------------------------------------------
    def key_path(self, key: str) -> str:
        return posixpath.join(self.root, key) if self.root else key

    def exists(self, key: str) -> bool:
        return bool(self.fs.exists(self.key_path(key)))

    def read_bytes(self, key: str) -> bytes:
        try:
            return self.fs.cat_file(self.key_path(key))
        except FileNotFoundError as err:
            raise StoreNotFoundError(f"{self.url}: missing {key}") from err
        except zipfile.BadZipFile as err:  # a damaged entry (CRC) or archive
            raise StoreError(f"{self.url}: {key} cannot be read from the zip ({err}); "
                             f"run `combo store validate {self.url}`") from err
        except Exception as err:  # noqa: BLE001 - a server that cannot be reached says so; the rest as it is
            unreachable = unreachable_error(self.url, err) if self.kind == "remote" else None
            if unreachable is not None:
                raise unreachable from err
            raise

    @property
    def is_s3(self) -> bool:
        protocol = self.fs.protocol
        return any(p in ("s3", "s3a") for p in (protocol if isinstance(protocol, (tuple, list)) else (protocol,)))

    def write_bytes(self, key: str, data: bytes, *, sha256: str | None = None) -> None:
        """Write a file; atomically (temp + rename) on local disk so readers never see half.

        On S3 a known `sha256` goes into the object's metadata (x-amz-meta-sha256), so a resumed
        push can tell an object is already there from a HEAD request, without downloading it."""
        if self.kind == "zip":
            raise StoreError(f"{self.url}: zip stores are read-only")
        if self.kind == "local":
            target = Path(self.key_path(key))
            target.parent.mkdir(parents=True, exist_ok=True)
            write_file_atomic(target, data)
        elif sha256 is not None and self.is_s3:
            self.fs.pipe_file(self.key_path(key), data, Metadata={"sha256": sha256})
        else:
            self.fs.pipe_file(self.key_path(key), data)

    def recorded_sha256(self, key: str) -> str | None:
        """The sha256 stored with an object by `write_bytes` (S3 metadata), without reading it; else None."""
        if not self.is_s3:
            return None
        try:
            return (self.fs.metadata(self.key_path(key)) or {}).get("sha256")
        except Exception:  # noqa: BLE001 - no such object, or metadata not readable
            return None

    def size(self, key: str) -> int:
        return int(self.fs.size(self.key_path(key)))

    def listdir(self, key: str = "") -> list[str]:
        """Names directly under `key` (no path prefix)."""
        path = self.key_path(key).rstrip("/") if key else self.root
        try:
            entries = self.fs.ls(path, detail=False)
        except FileNotFoundError:
            return []
        return sorted({posixpath.basename(str(e).rstrip("/")) for e in entries})

    # -- zarr --------------------------------------------------------------------------
    def zarr_store(self, *, read_only: bool = True) -> zarr.abc.store.Store:
        if self.kind == "local":
            return zarr.storage.LocalStore(self.root, read_only=read_only)
        if self.kind == "zip":
            if not read_only:
                raise StoreError(f"{self.url}: zip stores are read-only; write a folder and `combo store pack` it")
            return zarr.storage.ZipStore(self.url, mode="r")
        return zarr.storage.FsspecStore.from_url(
            self.url, storage_options=self.storage_options or None, read_only=read_only
        )

    def local_path(self) -> Path | None:
        return Path(self.root) if self.kind == "local" else None


# -- listing ------------------------------------------------------------------------------------


def can_list(location: Location) -> bool:
    """False for plain web servers: HTTP has no listing, so keys must come from the metadata."""
    protocol = location.fs.protocol
    protocols = protocol if isinstance(protocol, (tuple, list)) else (protocol,)
    return not any(p in ("http", "https") for p in protocols)


def list_sizes(location: Location, *, prefix: str = "") -> dict[str, int] | None:
    """Every object under the location (or under `prefix` in it, e.g. "task/") as store key -> size,
    or None where listing is impossible (HTTP)."""
    if not can_list(location):
        return None
    root = location.root.rstrip("/")
    base = location.key_path(prefix.rstrip("/")) if prefix else root
    try:
        found = location.fs.find(base, detail=True) if base else location.fs.find("", detail=True)
    except FileNotFoundError:
        return {}
    prefix = root + "/" if root else ""
    out: dict[str, int] = {}
    for path, info in found.items():
        path = str(path)
        if info.get("type") == "directory":
            continue
        if prefix:
            if not path.startswith(prefix):
                continue  # a sibling that only shares the name prefix (s3 'x.zarr2' next to 'x.zarr')
            key = path[len(prefix):]
        else:
            key = path.lstrip("/")
        if key:
            out[key] = int(info.get("size") or 0)
    return out


def is_hidden(key: str) -> bool:
    """Lock file, journal and temp files: names starting with '.' (and zarr's `*.partial` temp
    files) are private to a writer."""
    return any(part.startswith(".") for part in key.split("/")) or key.endswith(".partial")


def fsync_dir(path: str | os.PathLike) -> None:
    """Make a rename or a new file in `path` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def resolve(location: str | os.PathLike, *, storage_options: dict[str, Any] | None = None) -> Location:
    """Resolve a path, a `.zip` file or a URL into a `Location`. Touches nothing."""
    text = str(location)
    options = dict(storage_options or {})
    if is_url(text) and not text.startswith("file://"):
        fs, root = fsspec.core.url_to_fs(text, **options)
        return Location(url=text.rstrip("/"), fs=fs, root=root.rstrip("/"), kind="remote", storage_options=options)
    if text.startswith("file://"):
        text = text[len("file://"):]
    path = Path(text).expanduser()
    if path.suffix == ".zip":
        if not path.is_file():
            raise StoreNotFoundError(f"no zip store at {path}")
        # no instance cache: a zip rewritten in place (pack --overwrite) must not be read from a stale index
        try:
            fs = fsspec.filesystem("zip", fo=str(path), skip_instance_cache=True)
        except zipfile.BadZipFile as err:  # cut short (an interrupted download) or not a zip at all
            raise StoreError(f"{path} is not a readable zip file ({err}: truncated or corrupt, e.g. an interrupted "
                             "copy); copy it again, or pack the store again with `combo store pack`") from None
        return Location(url=str(path), fs=fs, root="", kind="zip")
    return Location(url=str(path), fs=fsspec.filesystem("file"), root=str(path.resolve()), kind="local")
