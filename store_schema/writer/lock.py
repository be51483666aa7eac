"""The store's write lock: one writer per store, whether its writers share a machine or only a bucket.

* Local folder: an flock on `.combo-write.lock`. The OS releases it even on SIGKILL, so a dead writer never
  blocks the next one; the file names its holder for the refusal message.
* Remote store: the same name as an object *in the store*, so that every machine writing the store sees it.
  It is created only if absent (S3: a conditional put, `If-None-Match: *`, atomic on the server), names its
  holder and carries a heartbeat that a daemon thread rewrites (S3: `If-Match` on the ETag this writer last
  wrote, so only a lock still this writer's is refreshed or removed). A lock whose heartbeat is older than the
  stale age belongs to a dead writer and is taken over, by the same compare-and-swap; `break_lock` takes it
  over at once. A writer that finds its lock taken over stops before it writes any more metadata.
  Other fsspec protocols get the same steps without the atomic create (best effort: see store_schema/README.md).

A remote store is also flocked in its staging folder (two processes of one machine share that folder).
"""

from __future__ import annotations

import fcntl
import getpass
import hashlib
import json
import os
import secrets
import threading
from dataclasses import dataclass
from datetime import datetime, timezone
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import IO, Any, Protocol

from ..errors import StoreError, StoreLockedError
from ..location import Location
from .keys import LOCK_NAME

HEARTBEAT_ENV = "COMBO_LOCK_HEARTBEAT"
STALE_ENV = "COMBO_LOCK_STALE_AFTER"
DEFAULT_HEARTBEAT_S = 30.0
DEFAULT_STALE_AFTER_S = 600.0
MISSED_BEATS = 3  # a lock is never stale before its holder missed this many of its own heartbeats
RECORD_KIND = "combo-write-lock"


@dataclass(frozen=True)
class LockPolicy:
    """How often a remote lock's holder refreshes it, and how old its heartbeat must be to be taken over."""

    heartbeat_s: float = DEFAULT_HEARTBEAT_S
    stale_after_s: float = DEFAULT_STALE_AFTER_S

    def __post_init__(self) -> None:
        if not self.heartbeat_s > 0:
            raise StoreError(f"the lock heartbeat interval must be > 0 s (${HEARTBEAT_ENV}), not {self.heartbeat_s}")
        if self.stale_after_s < MISSED_BEATS * self.heartbeat_s:
            raise StoreError(f"the stale age of a lock (${STALE_ENV}, {self.stale_after_s:g} s) must be at least "
                             f"{MISSED_BEATS} heartbeats (${HEARTBEAT_ENV}, {self.heartbeat_s:g} s): a live writer's "
                             "lock would be taken over")

    @classmethod
    def from_env(cls) -> "LockPolicy":
        """$COMBO_LOCK_HEARTBEAT and $COMBO_LOCK_STALE_AFTER (seconds), else 30 s and 10 min."""
        def seconds(name: str, default: float) -> float:
            text = os.environ.get(name, "").strip()
            if not text:
                return default
            try:
                return float(text)
            except ValueError:
                raise StoreError(f"${name}={text!r}: expected a number of seconds") from None

        return cls(seconds(HEARTBEAT_ENV, DEFAULT_HEARTBEAT_S), seconds(STALE_ENV, DEFAULT_STALE_AFTER_S))


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def _user() -> str | None:
    try:
        return getpass.getuser()
    except Exception:  # noqa: BLE001 - no user name (a container without one): the lock says nothing
        return None


def span(seconds: float) -> str:
    """'12 s', '4 min', '2.5 h'."""
    seconds = max(0.0, seconds)
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def ago(seconds: float | None) -> str:
    """A heartbeat's age in words: '12 s old', or 'of unknown age'."""
    return "of unknown age" if seconds is None else f"{span(seconds)} old"


@dataclass(frozen=True)
class Holder:
    """Who holds a lock, as its record says (every field None when the record is unreadable)."""

    host: str | None = None
    pid: int | None = None
    user: str | None = None
    token: str | None = None
    started: str | None = None
    heartbeat: str | None = None
    heartbeat_s: float | None = None
    raw: str = ""

    @classmethod
    def parse(cls, data: bytes) -> "Holder":
        text = data.decode("utf-8", "replace").strip()
        try:
            doc = json.loads(text)
        except ValueError:
            doc = None
        if not isinstance(doc, dict):
            return cls(raw=text)  # an older combo's "pid N on host", or damage

        def get(name: str, kind: Any) -> Any:
            value = doc.get(name)
            return value if isinstance(value, kind) and not isinstance(value, bool) else None

        beat = get("heartbeat_s", (int, float))
        return cls(host=get("host", str), pid=get("pid", int), user=get("user", str), token=get("token", str),
                   started=get("started", str), heartbeat=get("heartbeat", str),
                   heartbeat_s=float(beat) if beat is not None else None, raw=text)

    def who(self) -> str:
        if self.pid is None and self.host is None:
            return self.raw[:80] if self.raw else "another process"  # an older combo's "pid N on host", or damage
        user = f", user {self.user}" if self.user else ""
        return f"pid {self.pid} on host {self.host}{user}"

    def heartbeat_age(self) -> float | None:
        """Seconds since the recorded heartbeat, by this machine's clock (None when there is none)."""
        try:
            then = datetime.fromisoformat(str(self.heartbeat))
        except ValueError:
            return None
        if then.tzinfo is None:
            then = then.replace(tzinfo=timezone.utc)
        return (datetime.now(timezone.utc) - then).total_seconds()


class Owner:
    """This writer's identity and the record it writes into its lock."""

    def __init__(self, policy: LockPolicy | None = None):
        self.host = os.uname().nodename
        self.pid = os.getpid()
        self.user = _user()
        self.token = secrets.token_hex(16)
        self.started = _now()
        self.policy = policy

    def record(self) -> bytes:
        doc: dict[str, Any] = {"lock": RECORD_KIND, "host": self.host, "pid": self.pid, "user": self.user,
                               "token": self.token, "started": self.started, "heartbeat": _now()}
        if self.policy is not None:
            doc["heartbeat_s"] = self.policy.heartbeat_s
        return (json.dumps(doc, indent=1) + "\n").encode()


# -- local: an flock ------------------------------------------------------------------------------------


def flock_folder(folder: Path, owner: Owner, *, where: str) -> IO[str]:
    """Take the flock on `folder`/.combo-write.lock and write the owner into it; refused when it is held."""
    lock_path = folder / LOCK_NAME
    while True:
        handle = open(lock_path, "a+")
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = Holder.parse(handle.read().encode())
            handle.close()
            raise StoreLockedError(
                f"store {where} is being written by {holder.who()}; wait for it to finish (two extractions into "
                "one store would corrupt it; the lock is released by itself when that process dies)"
            ) from None
        # The lock file is removed on release: if a finishing writer removed it after we opened it,
        # we locked a file nobody else can see, so take the one now on disk instead.
        try:
            same = os.stat(lock_path).st_ino == os.fstat(handle.fileno()).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        handle.close()
    handle.seek(0)
    handle.truncate()
    handle.write(owner.record().decode())
    handle.flush()
    return handle


def unflock_folder(folder: Path, handle: IO[str]) -> None:
    (folder / LOCK_NAME).unlink(missing_ok=True)  # no lock file left behind
    fcntl.flock(handle.fileno(), fcntl.LOCK_UN)
    handle.close()


# -- remote: an object in the store ---------------------------------------------------------------------


@dataclass(frozen=True)
class Seen:
    """The lock object as read: its bytes, its version (S3 ETag, else a hash of the bytes) and its age."""

    data: bytes
    version: str
    age_s: float | None  # since it was last written, by the server's clock; None where the server does not say


class LockObjects(Protocol):
    atomic: bool

    def create(self, data: bytes) -> str | None: ...  # the new version, or None when the object exists
    def read(self) -> Seen | None: ...
    def replace(self, data: bytes, version: str) -> str | None: ...  # None when it is no longer `version`
    def delete(self, version: str) -> bool: ...


def _s3_code(err: BaseException) -> str | None:
    """The S3 error code behind an s3fs exception (it keeps botocore's ClientError as the cause)."""
    seen: BaseException | None = err
    for _ in range(4):
        if seen is None:
            return None
        response = getattr(seen, "response", None)
        if isinstance(response, dict):
            return str((response.get("Error") or {}).get("Code") or "") or None
        seen = seen.__cause__
    return None


# 412: the condition failed; 409: another conditional write to the key was in flight (AWS asks to retry)
_LOST_RACE = {"PreconditionFailed", "ConditionalRequestConflict"}


class ConditionalWritesUnsupported(OSError):
    """An S3-compatible server that refuses If-None-Match / If-Match (older MinIO or Ceph, some gateways)."""


class S3LockObjects:
    """The lock object on S3 through s3fs's botocore client: create-if-absent and compare-and-swap on the ETag."""

    atomic = True

    def __init__(self, remote: Location):
        self.fs = remote.fs
        self.bucket, self.key, _ = self.fs.split_path(remote.key_path(LOCK_NAME))

    def create(self, data: bytes) -> str | None:
        try:
            return str(self.fs.call_s3("put_object", Bucket=self.bucket, Key=self.key, Body=data, IfNoneMatch="*",
                                       ContentType="application/json")["ETag"])
        except FileExistsError:
            return None
        except OSError as err:
            code = _s3_code(err)
            if code in _LOST_RACE:
                return None
            if code == "NotImplemented":
                raise ConditionalWritesUnsupported(str(err)) from err
            raise

    def read(self) -> Seen | None:
        import fsspec.asyn

        async def get() -> Seen:
            resp = await self.fs._call_s3("get_object", Bucket=self.bucket, Key=self.key)
            try:
                data = await resp["Body"].read()
            finally:
                resp["Body"].close()
            return Seen(data, str(resp["ETag"]), _server_age(resp))

        try:
            return fsspec.asyn.sync(self.fs.loop, get)
        except FileNotFoundError:
            return None

    def replace(self, data: bytes, version: str) -> str | None:
        try:
            return str(self.fs.call_s3("put_object", Bucket=self.bucket, Key=self.key, Body=data, IfMatch=version,
                                       ContentType="application/json")["ETag"])
        except FileNotFoundError:
            return None
        except OSError as err:
            if _s3_code(err) in _LOST_RACE:
                return None
            raise

    def delete(self, version: str) -> bool:
        try:
            self.fs.call_s3("delete_object", Bucket=self.bucket, Key=self.key, IfMatch=version)
            return True
        except FileNotFoundError:
            return False
        except OSError as err:
            if _s3_code(err) in _LOST_RACE:
                return False
            raise


def _server_age(resp: dict[str, Any]) -> float | None:
    """Seconds since the object was written, from the response's Date and the object's LastModified: both the
    server's clock, so the machines' clocks do not matter (1 s resolution)."""
    modified = resp.get("LastModified")
    date = ((resp.get("ResponseMetadata") or {}).get("HTTPHeaders") or {}).get("date")
    if not isinstance(modified, datetime):
        return None
    try:
        now = parsedate_to_datetime(date) if date else datetime.now(timezone.utc)
    except (TypeError, ValueError):
        now = datetime.now(timezone.utc)
    return (now - modified).total_seconds()


class FsspecLockObjects:
    """The lock object on a filesystem without conditional writes: look, write, read back. Not atomic: two
    writers starting within the same moment can both believe they hold it (README: "best effort")."""

    atomic = False

    def __init__(self, remote: Location):
        self.fs = remote.fs
        self.path = remote.key_path(LOCK_NAME)

    def _fresh(self) -> None:
        invalidate = getattr(self.fs, "invalidate_cache", None)
        if invalidate is not None:
            invalidate(self.path)

    def create(self, data: bytes) -> str | None:
        if self.read() is not None:
            return None
        self.fs.pipe_file(self.path, data)
        seen = self.read()
        return seen.version if seen is not None and seen.data == data else None

    def read(self) -> Seen | None:
        self._fresh()
        try:
            data = self.fs.cat_file(self.path)
        except FileNotFoundError:
            return None
        return Seen(data, hashlib.sha256(data).hexdigest(), None)

    def replace(self, data: bytes, version: str) -> str | None:
        seen = self.read()
        if seen is None or seen.version != version:
            return None
        self.fs.pipe_file(self.path, data)
        return hashlib.sha256(data).hexdigest()

    def delete(self, version: str) -> bool:
        seen = self.read()
        if seen is None or seen.version != version:
            return False
        self.fs.rm_file(self.path)
        return True


def lock_objects(remote: Location) -> LockObjects:
    return S3LockObjects(remote) if remote.is_s3 else FsspecLockObjects(remote)


class RemoteLock:
    """This writer's lock object in a remote store, kept fresh by a heartbeat thread until released."""

    def __init__(self, remote: Location, owner: Owner, policy: LockPolicy, *, where: str,
                 objects: LockObjects | None = None):
        self.remote, self.owner, self.policy, self.where = remote, owner, policy, where
        self.objects = objects or lock_objects(remote)
        self.version: str | None = None
        self.taken_over: tuple[Holder, float | None] | None = None  # the dead (or broken) holder and its age
        self.lost: Holder | None = None
        self.broke = False  # taken over with break_lock before it was stale
        self._mutex = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- taking it --------------------------------------------------------------------------------
    def acquire(self, *, break_lock: bool = False) -> "RemoteLock":
        """Create the lock object, or take over a stale one (any one with `break_lock`); refused otherwise."""
        for _ in range(10):  # each round loses only to a writer that changed the lock meanwhile
            try:
                version = self.objects.create(self.owner.record())
            except ConditionalWritesUnsupported:
                self.objects = FsspecLockObjects(self.remote)  # the same steps, not atomic: best effort
                continue
            if version is not None:
                self.version = version
                break
            seen = self.objects.read()
            if seen is None:
                continue  # released between our create and our read: try to create it again
            holder, age = self._judge(seen)
            if not (break_lock or self._stale(holder, age)):
                raise StoreLockedError(self._refusal(holder, age))
            version = self.objects.replace(self.owner.record(), seen.version)
            if version is not None:
                self.version, self.taken_over = version, (holder, age)
                self.broke = break_lock and not self._stale(holder, age)
                break
        else:
            raise StoreLockedError(f"store {self.where}: its write lock kept changing while this writer tried to take "
                                   "it; another writer is starting there, so wait for it to finish")
        self._thread = threading.Thread(target=self._beat, name=f"combo lock heartbeat {self.where}", daemon=True)
        self._thread.start()
        return self

    def refuse_if_held(self) -> None:
        """Refuse now when a live writer holds the lock, without taking it (a cheap look before slow work)."""
        seen = self.objects.read()
        if seen is not None:
            holder, age = self._judge(seen)
            if not self._stale(holder, age):
                raise StoreLockedError(self._refusal(holder, age))

    @staticmethod
    def _judge(seen: Seen) -> tuple[Holder, float | None]:
        holder = Holder.parse(seen.data)
        return holder, seen.age_s if seen.age_s is not None else holder.heartbeat_age()

    def stale_after(self, holder: Holder) -> float:
        """This writer's stale age, but never under MISSED_BEATS of the holder's own heartbeat interval."""
        return max(self.policy.stale_after_s, MISSED_BEATS * (holder.heartbeat_s or 0.0))

    def _stale(self, holder: Holder, age: float | None) -> bool:
        return age is not None and age > self.stale_after(holder)

    def _refusal(self, holder: Holder, age: float | None) -> str:
        return (f"store {self.where} is being written by {holder.who()} (its lock's heartbeat is {ago(age)}); wait "
                "for it to finish, or, if that process is dead, rerun with --break-lock to take the lock over (it is "
                f"taken over by itself once its heartbeat is more than {span(self.stale_after(holder))} old)")

    # -- keeping it -------------------------------------------------------------------------------
    def _beat(self) -> None:
        while not self._stop.wait(self.policy.heartbeat_s):
            with self._mutex:
                if self.version is None or self.lost is not None:
                    return
                try:
                    version = self.objects.replace(self.owner.record(), self.version)
                except Exception:  # noqa: BLE001 - a network hiccup: the next beat tries again
                    continue
                if version is None:
                    try:
                        self._recheck()
                    except Exception:  # noqa: BLE001 - unreadable now: look again at the next beat
                        continue
                    if self.lost is not None:
                        return
                else:
                    self.version = version

    def _recheck(self) -> None:
        """After a refused conditional write: the lock is still ours when it holds our token (a write whose
        reply was lost moved its version on), else it was taken over. Called with the mutex held."""
        seen = self.objects.read()
        holder = Holder.parse(seen.data) if seen is not None else None
        if seen is not None and holder is not None and holder.token == self.owner.token:
            self.version = seen.version
        else:
            self.lost = holder or Holder(raw="nobody (the lock was deleted)")

    def check(self) -> None:
        """Refuse to go on when the lock is no longer this writer's (taken over as stale, or with --break-lock)."""
        with self._mutex:
            if self.lost is None and self.version is not None:
                self._recheck()
            lost = self.lost
        if lost is not None:
            raise StoreLockedError(
                f"store {self.where}: this writer's lock was taken over by {lost.who()} (as stale, or with "
                "--break-lock), so it stopped before writing more of the store's metadata; let that writer "
                "finish, then rerun this command")

    def release(self) -> None:
        """Stop the heartbeat and remove the lock object, only if it is still this writer's."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=max(5.0, self.policy.heartbeat_s))
        with self._mutex:
            version, self.version = self.version, None
            if version is not None and self.lost is None:
                try:
                    if not self.objects.delete(version):
                        self.version = version
                        self._recheck()  # our own write moved the version on: delete that one
                        if self.lost is None and self.version is not None:
                            self.objects.delete(self.version)
                except Exception:  # noqa: BLE001 - unreachable now: the lock goes stale and is taken over later
                    pass
                self.version = None


def refuse_if_locked(remote: Location, *, where: str, policy: LockPolicy | None = None) -> None:
    """Refuse when a live writer holds the remote store's lock: lets a run stop before it loads a model or hashes
    a dataset. Takes nothing; the writer takes the lock itself (and may still be refused then)."""
    RemoteLock(remote, Owner(), policy or LockPolicy.from_env(), where=where).refuse_if_held()


# -- what a StoreWriter holds --------------------------------------------------------------------------


class WriteLock:
    """The flock on the writer's folder (the store, or a remote store's staging folder) and, for a remote store,
    the lock object in the store."""

    def __init__(self, folder: Path, remote: Location | None = None, *, where: str, break_lock: bool = False,
                 policy: LockPolicy | None = None):
        self.folder = folder
        if remote is not None and policy is None:
            policy = LockPolicy.from_env()
        self.owner = Owner(policy if remote is not None else None)
        self.handle: IO[str] | None = flock_folder(folder, self.owner, where=where)
        self.remote: RemoteLock | None = None
        if remote is not None:
            assert policy is not None
            try:
                self.remote = RemoteLock(remote, self.owner, policy, where=where)
                self.remote.acquire(break_lock=break_lock)
            except BaseException:
                self.release()
                raise

    def notes(self) -> list[str]:
        """What the user should hear about this lock: a lock taken over, a lock that is only best effort."""
        remote = self.remote
        if remote is None:
            return []
        out = []
        if remote.taken_over is not None:
            holder, age = remote.taken_over
            why = "--break-lock" if remote.broke else f"stale: older than {span(remote.stale_after(holder))}"
            out.append(f"took over the write lock of {remote.where} from {holder.who()} (its heartbeat was {ago(age)}; "
                       f"{why})")
        if not remote.objects.atomic:
            out.append(f"{remote.where}: this storage cannot create an object only if it is absent, so the write lock "
                       "is best effort: two writers starting at the same moment could both take it")
        return out

    def check(self) -> None:
        if self.remote is not None:
            self.remote.check()

    def release(self) -> None:
        remote, self.remote = self.remote, None
        handle, self.handle = self.handle, None
        try:
            if remote is not None:
                remote.release()
        finally:
            if handle is not None:
                unflock_folder(self.folder, handle)
