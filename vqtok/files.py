"""Atomic file writes: nothing is ever left half-written where a reader would take it for complete."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def staged(path: str | Path) -> Iterator[str]:
    """A temporary path beside `path`, fsynced and renamed onto it when the block (and any enclosing one) succeeds,
    removed when it fails."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp (and some writers) make 0600 files; others should read it too
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    os.replace(tmp, path)


@contextmanager
def staged_folder(path: str | Path) -> Iterator[Path]:
    """A temporary folder beside `path` (which must not exist, or be empty), renamed onto it when the block succeeds,
    removed when it fails: a reader never sees a half-written folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    try:
        yield tmp
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700 folders
        if path.exists():
            path.rmdir()  # an empty folder only: rmdir refuses anything else
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_text_atomically(path: str | Path, text: str) -> None:
    """Write `text` to `path` through `staged`: a reader sees the old file or the whole new one."""
    with staged(path) as tmp:
        Path(tmp).write_text(text)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
