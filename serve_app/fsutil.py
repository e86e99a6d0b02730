"""File helpers shared by index builds, retrievers and trained models.

* Atomic directory installs: a directory is built in a temporary sibling (:func:`staging_dir`)
  and renamed into place (:func:`swap_into_place`): a reader sees the previous directory or the
  new one, never a half one, and a failed build leaves the previous one untouched.
* :func:`file_lock` serialises builders (several processes starting at once build once).
* :func:`sha256_file`: checksums of index files and of the checkpoints an export was made from.
* :func:`read_json`: a JSON file of an index, with ``IndexLoadError`` naming it when it is
  missing or not JSON.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Any, Iterator

from serve_app.errors import IndexLoadError


def sha256_file(path: Path) -> str:
    """Hex sha256 of the file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: Path) -> None:
    try:
        fsync_file(path)
    except OSError:  # some filesystems do not support fsync on directories
        pass


@contextlib.contextmanager
def staging_dir(out: Path) -> Iterator[Path]:
    """A fresh temporary sibling of ``out`` (``.NAME.building-*``) to build into; removed when
    the ``with`` block raises. The caller renames it into place with :func:`swap_into_place`."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.building-", dir=out.parent))
    try:
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; an index is an ordinary directory
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def swap_into_place(tmp: Path, out: Path) -> None:
    """Rename the finished directory ``tmp`` to ``out``, replacing a previous ``out``.

    The previous directory is first renamed away (``.NAME.old-*``) and deleted after the new one
    is in place; only a crash between the two renames leaves ``out`` missing, with the previous
    index complete under ``.NAME.old-*``.
    """
    if not out.exists():
        os.rename(tmp, out)
        fsync_dir(out.parent)
        return
    old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
    os.rename(out, old)
    try:
        os.rename(tmp, out)
    except BaseException:
        os.rename(old, out)
        raise
    fsync_dir(out.parent)
    shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """An exclusive advisory lock on ``path`` (created if needed), held for the ``with`` block."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def read_json(path: Path, what: str = "file") -> Any:
    """The JSON value in ``path``; ``IndexLoadError`` naming the file (and ``what`` it is) when
    it is missing, not UTF-8 or not JSON."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise IndexLoadError(f"{path}: missing {what}") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise IndexLoadError(f"{path}: not valid JSON ({exc})") from None
