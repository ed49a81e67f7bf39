"""The cache folder: where it is, what transferctl keeps in it, and holding it under a size limit. No torch here.

It holds the frozen backbones' features (`features-<key>.npy` and its `.json` description), the facts
`transferctl backbones` learnt (`backbones.json`) and, while a run writes one, an unfinished
`*.tmp-<pid>` file; past `$TRANSFERCTL_CACHE_MAX_MB` the least recently used features go, and a
description whose features were deleted by hand goes with the next save. The cache names
every file in its own manifest (`transferctl-cache-files.txt`) before writing it and touches only those,
because `$TRANSFERCTL_CACHE` may point at a folder of the user's own files. The rules, and which files
from before the manifest still count as the cache's: docs/performance.md (Speed, Feature cache).
"""

from __future__ import annotations

import contextlib
import os
import re
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from transferctl.errors import ConfigError, Problem
from transferctl.runs.rundir import atomic_write_json, atomic_write_text, read_json_mapping

CACHE_ENV = "TRANSFERCTL_CACHE"
LIMIT_ENV = "TRANSFERCTL_CACHE_MAX_MB"
DEFAULT_LIMIT_MB = 10240
FACTS_FILE = "backbones.json"
MANIFEST = "transferctl-cache-files.txt"
MANIFEST_HEADER = "# The files transferctl's cache wrote into this folder, one a line: `transferctl cache --clear` removes only these.\n"
FEATURES = re.compile(r"features-[0-9a-f]{32}\.npy")  # features_path's names: a 32-digit key
DESCRIPTION = re.compile(r"features-[0-9a-f]{32}\.json")
UNFINISHED = re.compile(r"(features-.+\.npy)\.tmp-\d+")  # <the features file it becomes>.tmp-<pid>
NPY_MAGIC = b"\x93NUMPY"
UNFINISHED_GRACE_SECONDS = 600  # an unfinished file this recently written may belong to a run on another machine


def cache_folder() -> Path:
    """$TRANSFERCTL_CACHE, else $XDG_CACHE_HOME/transferctl, else ~/.cache/transferctl."""
    explicit = os.environ.get(CACHE_ENV)
    if explicit:
        return Path(explicit).expanduser()
    base = os.environ.get("XDG_CACHE_HOME")
    return (Path(base) if base else Path.home() / ".cache") / "transferctl"


def limit_bytes() -> int | None:
    """The folder's size limit from $TRANSFERCTL_CACHE_MAX_MB: megabytes, or `none` for no limit."""
    text = os.environ.get(LIMIT_ENV, "").strip()
    if not text:
        return DEFAULT_LIMIT_MB * 2**20
    if text.lower() == "none":
        return None
    if not text.isdigit():
        raise ConfigError(Problem(LIMIT_ENV, f"'{text}' is not a size in megabytes", "set a whole number such as 10240, or none for no limit"))
    return int(text) * 2**20


def features_path(key: str) -> Path:
    return cache_folder() / f"features-{key}.npy"


def about_path(features: Path) -> Path:
    """The small JSON beside a features file that says what the features are of."""
    return features.with_suffix(".json")


@dataclass(frozen=True)
class CacheEntry:
    path: Path
    kind: str  # features | backbone facts | unfinished | stray description
    size: int  # bytes, its description file included
    last_used: float  # seconds since the epoch: a reuse touches the file
    about: dict[str, Any]  # features: backbone, images, views, data; empty for the others

    def to_dict(self) -> dict[str, Any]:
        used = datetime.fromtimestamp(self.last_used).isoformat(timespec="seconds")
        return {"path": str(self.path), "kind": self.kind, "megabytes": round(self.size / 2**20, 2), "last_used": used, **self.about}


def entries(folder: Path | None = None) -> list[CacheEntry]:
    """What transferctl keeps in the folder, least recently used first; nothing when there is no folder."""
    folder = cache_folder() if folder is None else folder
    listed = _listed(folder) or set()
    found = [entry for entry in (_entry(path) for path in _contents(folder) if is_ours(path, listed)) if entry is not None]
    return sorted(found, key=lambda entry: entry.last_used)


def others(folder: Path | None = None) -> list[Path]:
    """What the folder holds that the cache did not write, by name: never listed, counted or removed."""
    folder = cache_folder() if folder is None else folder
    listed = _listed(folder) or set()
    return sorted(path for path in _contents(folder) if path.name != MANIFEST and not is_ours(path, listed))


def _contents(folder: Path) -> list[Path]:
    try:
        return list(folder.iterdir())
    except OSError:
        return []


def is_ours(path: Path, listed: set[str]) -> bool:
    """Written by the cache: named in the folder's manifest, or in the exact shape of a cache file from before it."""
    unfinished = UNFINISHED.fullmatch(path.name)
    if unfinished:  # a run's features being written (named once they are described)
        return unfinished.group(1) in listed or FEATURES.fullmatch(unfinished.group(1)) is not None
    return path.name in listed or _in_cache_format(path)


def _in_cache_format(path: Path) -> bool:
    try:
        if FEATURES.fullmatch(path.name):
            with path.open("rb") as handle:
                return handle.read(len(NPY_MAGIC)) == NPY_MAGIC
        if DESCRIPTION.fullmatch(path.name):
            return read_json_mapping(path) is not None
        if path.name == FACTS_FILE:
            facts = read_json_mapping(path)
            return facts is not None and facts.keys() == {"key", "facts"} and isinstance(facts["key"], str) and isinstance(facts["facts"], dict)
    except OSError:
        return False
    return False


def _listed(folder: Path) -> set[str] | None:
    """The names the folder's manifest holds; None when there is none, or a file of its name is not one."""
    try:
        text = (folder / MANIFEST).read_text(encoding="utf-8")
    except (OSError, ValueError):
        return None
    if not text.startswith(MANIFEST_HEADER):
        return None
    return {line for line in text.splitlines() if line and not line.startswith("#")}


def record(path: Path) -> None:
    """Name a file in its folder's manifest before the cache writes it. Appended in one write, so runs that
    record at once do not lose each other's names; a header written twice by such runs is a comment line."""
    folder, manifest = path.parent, path.parent / MANIFEST
    listed = _listed(folder)
    if (listed is not None and path.name in listed) or (listed is None and _exists(manifest)):
        return  # named already, or the user's file of the manifest's name: the cache never writes into it
    with contextlib.suppress(OSError):
        folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(manifest, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
        try:
            line = f"{path.name}\n"
            os.write(fd, ((MANIFEST_HEADER if os.fstat(fd).st_size == 0 else "") + line).encode("utf-8"))
        finally:
            os.close(fd)


def _forget_removed(folder: Path) -> None:
    """Drop removed files' names from the manifest, and the manifest with the last of them. A name another
    run appends meanwhile may be dropped too: its file then counts as the cache's by its shape alone."""
    listed = _listed(folder)
    if not listed:
        return
    present = sorted(name for name in listed if _exists(folder / name))
    with contextlib.suppress(OSError):
        if present:
            atomic_write_text(folder / MANIFEST, MANIFEST_HEADER + "".join(f"{name}\n" for name in present))
        else:
            (folder / MANIFEST).unlink()


def _exists(path: Path) -> bool:
    return path.exists() or path.is_symlink()


def _entry(path: Path) -> CacheEntry | None:
    name = path.name
    try:
        stat = path.stat()
        if name.startswith("features-") and name.endswith(".npy"):
            about = _read_about(about_path(path))
            size = stat.st_size + (about_path(path).stat().st_size if about else 0)
            return CacheEntry(path, "features", size, stat.st_mtime, about)
        if name == FACTS_FILE:
            return CacheEntry(path, "backbone facts", stat.st_size, stat.st_mtime, {})
        if name.startswith("features-") and ".npy.tmp-" in name:
            return CacheEntry(path, "unfinished", stat.st_size, stat.st_mtime, {})
        if name.startswith("features-") and name.endswith(".json") and not path.with_suffix(".npy").exists():
            return CacheEntry(path, "stray description", stat.st_size, stat.st_mtime, {})  # its features were deleted by hand
    except OSError:
        return None  # removed meanwhile by another run
    return None


def _read_about(path: Path) -> dict[str, Any]:
    return read_json_mapping(path) or {}


def save_json(path: Path, data: Any) -> None:
    """Write a cache file whole or not at all; a read-only or full cache folder is no error, it only costs
    the next run the work the file would have saved. So is a file of that name the cache did not write: kept."""
    if _exists(path) and not is_ours(path, _listed(path.parent) or set()):
        return
    record(path)
    with contextlib.suppress(OSError):
        atomic_write_json(path, data)


def describe(features: Path, about: dict[str, Any]) -> None:
    """Name a features file the cache wrote in the manifest, and write what it holds beside it (the cache works without it)."""
    record(features)
    save_json(about_path(features), about)


def mark_used(path: Path) -> None:
    """Reusing an entry makes it the most recently used: the limit removes others first."""
    with contextlib.suppress(OSError):
        os.utime(path)


def is_abandoned(entry: CacheEntry, now: float | None = None) -> bool:
    """An unfinished file whose run is gone: its process no longer exists here, and it has not grown lately."""
    if entry.kind != "unfinished":
        return False
    if (now if now is not None else time.time()) - entry.last_used < UNFINISHED_GRACE_SECONDS:
        return False
    pid = entry.path.name.rpartition(".tmp-")[2]
    return not (pid.isdigit() and _process_exists(int(pid)))


def _process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True  # someone else's process, or a platform that cannot tell: keep the file
    return True


def remove(entry: CacheEntry) -> bool:
    """Delete an entry (and its description); False when it was gone already or cannot be deleted."""
    try:
        entry.path.unlink()
    except OSError:
        return False
    if entry.kind == "features":
        with contextlib.suppress(OSError):
            about_path(entry.path).unlink(missing_ok=True)
    return True


def is_leftover(entry: CacheEntry) -> bool:
    """What nothing will use again: an abandoned unfinished file, or the description of deleted features."""
    return entry.kind == "stray description" or is_abandoned(entry)


def keep_under_limit(limit: int | None, keep: set[Path], folder: Path | None = None) -> list[CacheEntry]:
    """Remove leftovers, then the least recently used features until the folder fits `limit` (bytes; None:
    no limit); `keep` (the features this run uses) stays even when over. Returns what was removed."""
    folder = cache_folder() if folder is None else folder
    present = entries(folder)
    removed = [entry for entry in present if is_leftover(entry) and remove(entry)]
    if limit is not None:
        removed += _fit(limit, [entry for entry in present if entry not in removed], keep)
    if removed:
        _forget_removed(folder)
    return removed


def _fit(limit: int, present: list[CacheEntry], keep: set[Path]) -> list[CacheEntry]:
    """Remove the least recently used features (`present` is in that order) until the rest fit `limit`."""
    total = sum(entry.size for entry in present)
    removed = []
    for entry in present:
        if total <= limit:
            break
        if entry.kind == "features" and entry.path not in keep and remove(entry):
            removed.append(entry)
            total -= entry.size
    return removed


def clear(older_than_days: float | None = None, folder: Path | None = None) -> list[CacheEntry]:
    """Remove every entry (or those last used more than `older_than_days` ago), except unfinished files of
    runs still writing them; what the cache did not write stays (`others`). Returns what was removed."""
    folder = cache_folder() if folder is None else folder
    now = time.time()
    cutoff = now - older_than_days * 86400 if older_than_days is not None else None
    removed = []
    for entry in entries(folder):
        if entry.kind == "unfinished" and not is_abandoned(entry, now):
            continue
        if cutoff is not None and entry.last_used > cutoff:
            continue
        if remove(entry):
            removed.append(entry)
    if removed:
        _forget_removed(folder)
    return removed
