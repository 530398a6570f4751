"""Atomic writes: a reader (or a resumed run) never sees a half-written file or folder."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write `text` to `path` through a temporary file in the same folder, then rename over it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes it 0600; the file gets what open() would have given it
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


@contextlib.contextmanager
def atomic_dir(final: str | os.PathLike, keep_existing: bool = False) -> Iterator[Path]:
    """Yield a temporary folder beside `final`; on success rename it to `final` (replacing an old one).

    With `keep_existing`, a `final` that appeared meanwhile (another process wrote the same deterministic
    content, e.g. every rank of a multi-process run training the same tokenizer) wins and ours is dropped.

    On an exception (or a kill) the temporary folder is removed or left under a dot-name that loaders ignore,
    so `final` is either absent, the previous complete version, or the new complete version.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent))
    try:
        yield tmp
        _follow_umask(tmp)
        if keep_existing:
            try:
                os.rename(tmp, final)  # fails if final exists and is not empty: then the other writer won
            except OSError:
                shutil.rmtree(tmp, ignore_errors=True)
        elif final.exists():
            old = final.with_name(f".{final.name}.old-{os.getpid()}")
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _follow_umask(folder: Path) -> None:
    """Give a finished folder and everything in it the modes mkdir() and open() would have: mkdtemp makes the folder
    0700, and libraries that write atomically themselves (transformers' save_pretrained) leave 0600 files."""
    mask = _umask()
    folder.chmod(0o777 & ~mask)
    for path in folder.rglob("*"):
        if not path.is_symlink():
            path.chmod((0o777 if path.is_dir() else 0o666) & ~mask)


def _umask() -> int:
    """The process's umask (read by setting it and putting it back: os has no getter)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def free_space(folder: str | os.PathLike) -> str:
    """Free space on the disk that holds `folder` (or its nearest existing parent), in words."""
    folder = Path(folder)
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    free = shutil.disk_usage(folder).free
    return f"{free / 2**30:.1f} GiB" if free >= 2**30 else f"{free / 2**20:.0f} MiB"


def stable_hash(obj: Any, length: int = 16) -> str:
    """A short content hash of a JSON-serialisable object (keys sorted), used as a cache key."""
    import hashlib

    blob = json.dumps(obj, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:length]


def cached_folder(root: Path, key: dict[str, Any], build: Callable[[Path], None]) -> Path:
    """root/<hash of key>: built once by `build(tmp)` under a file lock (a second process waits, then reads it),
    renamed into place atomically with cache_key.json beside what it built (core.shell.RunContext.cached)."""
    from filelock import FileLock

    final = root / stable_hash(key)
    done = final / "cache_key.json"
    if done.is_file():
        return final
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        from core.errors import ConfigError

        raise ConfigError(
            f"cannot write the cache folder {root} ({exc.strerror}); pass a writable --cache-dir"
        ) from exc
    with FileLock(str(final) + ".lock"):
        if done.is_file():  # another process built it while we waited
            return final
        with atomic_dir(final) as tmp:
            build(tmp)
            atomic_write_json(tmp / "cache_key.json", key)
    return final
