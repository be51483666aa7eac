"""`hf://datasets/ORG/REPO` roots: which snapshot folder of the local Hugging Face hub cache they mean.

The cache is the one huggingface_hub fills (`$HF_HUB_CACHE`, else `$HF_HOME/hub`, else
`~/.cache/huggingface/hub`; read when called, so a test or a caller can point it elsewhere): a dataset
repo lives in `datasets--ORG--REPO/`, `refs/<branch>` holds a commit hash and `snapshots/<commit>/`
the files. Nothing here touches the network unless the caller allows a download (`download=True`),
and never with `HF_HUB_OFFLINE` set: a repo that is not cached is one sentence saying how to fill the cache.
"""

from __future__ import annotations

import fnmatch
import os
import re
from dataclasses import dataclass
from pathlib import Path

from .common import DatasetError

HF_PREFIX = "hf://datasets/"
_ID = re.compile(r"[A-Za-z0-9_.\-*?\[\]]+")
_COMMIT = re.compile(r"[0-9a-f]{40}")


@dataclass(frozen=True)
class HubRepo:
    """One dataset repo resolved to a snapshot in the cache."""

    repo_id: str  # "bramtoula/vtab_cifar100"
    revision: str  # the commit hash of the snapshot
    path: str  # the snapshot folder (local; never recorded in a store)

    @property
    def name(self) -> str:
        """The repo's own name, without the org ("vtab_cifar100")."""
        return self.repo_id.rsplit("/", 1)[-1]


def is_hf_root(root: object) -> bool:
    return isinstance(root, str) and root.strip().startswith("hf://")


def hub_cache_dir() -> Path:
    """The hub cache huggingface_hub would use now (environment read at call time)."""
    cache = os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE")
    if cache:
        return Path(cache).expanduser()
    home = os.environ.get("HF_HOME")
    if home:
        return Path(home).expanduser() / "hub"
    return Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache").expanduser() / "huggingface" / "hub"


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in ("1", "ON", "YES", "TRUE")


def parse_hf_root(root: str) -> list[tuple[str, str | None]]:
    """(repo id or glob, revision or None) per comma-separated item of an hf:// root."""
    items = [item.strip() for item in str(root).split(",") if item.strip()]
    if not items:
        raise DatasetError(f"--root {root!r}: no repo given; use hf://datasets/ORG/REPO")
    out = []
    for item in items:
        if not item.startswith(HF_PREFIX):
            raise DatasetError(
                f"--root: {item!r} is not a Hugging Face dataset repo; write each item of the list as"
                " hf://datasets/ORG/REPO (models and spaces are not datasets)"
            )
        spec, _, revision = item[len(HF_PREFIX):].strip("/").partition("@")
        parts = spec.split("/")
        if not 1 <= len(parts) <= 2 or not all(_ID.fullmatch(p) for p in parts):
            raise DatasetError(
                f"--root: {item!r} is not hf://datasets/ORG/REPO[@REVISION] (a folder inside a repo cannot be given)"
            )
        out.append((spec, revision or None))
    return out


def _folder(repo_id: str) -> str:
    return "datasets--" + repo_id.replace("/", "--")


def cached_repos(cache: Path) -> list[str]:
    """Repo ids of the dataset repos in the cache, sorted."""
    try:
        names = sorted(e.name for e in os.scandir(cache) if e.is_dir() and e.name.startswith("datasets--"))
    except OSError:
        return []
    return [n[len("datasets--"):].replace("--", "/") for n in names]


def _fill_hint(repo_id: str, cache: Path) -> str:
    return (
        f"{repo_id} is not in the Hugging Face hub cache {cache}: on a machine with network run"
        f" `hf download --repo-type dataset {repo_id}`, copy its HF_HOME (or the"
        f" datasets--{repo_id.replace('/', '--')} folder of its hub cache) here and set HF_HOME and"
        " HF_HUB_OFFLINE=1, or rerun with --download to fetch it now"
    )


def _snapshot(repo_id: str, revision: str | None, cache: Path) -> HubRepo | None:
    """The cached snapshot of `repo_id` at `revision` (a branch, tag or commit; None: main)."""
    base = cache / _folder(repo_id)
    if not base.is_dir():
        return None
    ref = revision or "main"
    commit = None
    ref_file = base / "refs" / ref
    if ref_file.is_file():
        commit = ref_file.read_text().strip()
    elif _COMMIT.fullmatch(ref):
        commit = ref
    elif revision is None:
        snaps = sorted(p.name for p in (base / "snapshots").glob("*") if p.is_dir())
        if len(snaps) == 1:  # fetched by commit only: no refs/main, one snapshot
            commit = snaps[0]
    if commit is None:
        snaps = sorted(p.name for p in (base / "snapshots").glob("*") if p.is_dir())
        raise DatasetError(
            f"{repo_id}: the hub cache {cache} has no refs/{ref} for it (snapshots there: {', '.join(snaps) or 'none'});"
            f" name one as hf://datasets/{repo_id}@<commit>, or fill the cache again with"
            f" `hf download --repo-type dataset {repo_id}{' --revision ' + revision if revision else ''}`"
        )
    snap = base / "snapshots" / commit
    if not snap.is_dir():
        raise DatasetError(
            f"{repo_id}: refs/{ref} of the hub cache {cache} names commit {commit}, whose snapshot folder is"
            f" missing (an interrupted download?); fill the cache again with `hf download --repo-type dataset {repo_id}`"
        )
    return HubRepo(repo_id=repo_id, revision=commit, path=str(snap))


def _download(repo_id: str, revision: str | None, cache: Path) -> HubRepo:
    if _offline():
        raise DatasetError(
            f"{repo_id} is not in the Hugging Face hub cache {cache} and HF_HUB_OFFLINE is set, so --download"
            " cannot fetch it; unset HF_HUB_OFFLINE on a machine with network, or fill the cache there with"
            f" `hf download --repo-type dataset {repo_id}` and copy it here"
        )
    import huggingface_hub

    try:
        path = huggingface_hub.snapshot_download(repo_id, repo_type="dataset", revision=revision, cache_dir=str(cache))
    except Exception as err:  # noqa: BLE001 - network, auth and not-found errors all end the same way
        raise DatasetError(
            f"{repo_id}: cannot download it from the Hugging Face hub into {cache} ({type(err).__name__}: {err})"
        ) from None
    return HubRepo(repo_id=repo_id, revision=Path(path).name, path=str(path))


def resolve_hf_root(root: str, *, download: bool = False) -> list[HubRepo]:
    """The repos an hf:// root names (one, a comma-separated list, or globs over the cached repos), in the
    order given (a glob's matches sorted). A repo missing from the cache is downloaded only with
    `download` (and never offline); otherwise it is a `DatasetError` saying how to fill the cache."""
    cache = hub_cache_dir()
    repos: list[HubRepo] = []
    for spec, revision in parse_hf_root(root):
        if any(c in spec for c in "*?["):
            cached = cached_repos(cache)
            matches = [r for r in cached if fnmatch.fnmatchcase(r, spec)]
            if not matches:
                raise DatasetError(
                    f"--root hf://datasets/{spec} matches no dataset repo in the Hugging Face hub cache {cache}"
                    f" (it holds {', '.join(cached) if cached else 'none'}); a glob only sees cached repos: fill the"
                    " cache with `hf download --repo-type dataset ORG/REPO` on a machine with network and copy it here"
                )
            found = [_snapshot(r, revision, cache) for r in matches]
            repos.extend(r for r in found if r is not None)
            continue
        repo = _snapshot(spec, revision, cache)
        if repo is None:
            if not download:
                raise DatasetError(_fill_hint(spec, cache))
            repo = _download(spec, revision, cache)
        repos.append(repo)
    seen: dict[str, HubRepo] = {}
    for repo in repos:
        seen.setdefault(repo.repo_id, repo)
    return list(seen.values())


def repo_of_snapshot(path: str | os.PathLike) -> HubRepo | None:
    """The repo and commit of a folder that is a hub cache snapshot (…/datasets--ORG--REPO/snapshots/<commit>)."""
    p = Path(os.path.abspath(path))
    if p.parent.name == "snapshots" and p.parent.parent.name.startswith("datasets--") and _COMMIT.fullmatch(p.name):
        repo_id = p.parent.parent.name[len("datasets--"):].replace("--", "/")
        return HubRepo(repo_id=repo_id, revision=p.name, path=str(p))
    return None
