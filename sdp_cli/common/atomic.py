"""Files and directories that appear whole or not at all: written under a temporary sibling name
and renamed into place (checkpoints, exported weights, the tiny model, the server registry)."""

from __future__ import annotations

import os
import shutil
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

TMP_MARK = ".tmp-"
OLD_MARK = ".old-"


def temp_sibling(final: Path, mark: str = TMP_MARK) -> Path:
    # The pid keeps two processes writing the same directory (two runs sharing a model
    # cache) from deleting each other's half-written copy.
    return final.with_name(f"{final.name}{mark}{os.getpid()}")


def write_text_atomically(path: Path, text: str) -> None:
    """Replace `path` by a file holding `text` (flushed to disk), so a reader sees the old
    content or the new, never a half-written file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    # Unique per writer, so two threads never share a temporary file.
    tmp = path.with_name(f".{path.name}{TMP_MARK}{os.getpid()}-{threading.get_ident()}")
    try:
        with tmp.open("w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def is_leftover(path: Path) -> bool:
    """A temporary or moved-aside directory of a writer that was killed half-way."""
    return TMP_MARK in path.name or OLD_MARK in path.name


def published_or_free(target: Path, marker: str) -> bool:
    """Whether `target` holds a directory a writer published with the file `marker` in it
    (True) or is free for one: missing or empty (False). Raises FileExistsError for a
    directory of other content. A copy another process published between the checks
    counts as published, not as other content."""
    if (target / marker).is_file():
        return True
    if not target.exists() or not any(target.iterdir()):
        return False
    if (target / marker).is_file():
        return True
    raise FileExistsError(target)


def fsync_tree(directory: Path) -> None:
    """Flush file contents and the directory entries to disk before a rename publishes them
    (a crash of the machine, not just the process, must not leave a complete-looking
    directory of empty files)."""
    for item in directory.iterdir():
        if item.is_dir():
            fsync_tree(item)
            continue
        with open(item, "rb") as handle:
            os.fsync(handle.fileno())
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def atomic_dir(final: Path, *, fsync: bool = False, keep_existing: bool = False) -> Iterator[Path]:
    """Yield an empty temporary directory next to `final`; when the block finishes, rename it to
    `final`. If the block raises, the temporary directory is deleted and `final` is untouched.

    An existing `final` is replaced (moved aside, then deleted), since rename cannot replace a
    non-empty directory; with `keep_existing` the existing one wins and the new copy is
    discarded (for content that any writer produces identically). `fsync` flushes the files
    before the rename."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_sibling(final)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        if fsync:
            fsync_tree(tmp)
        _publish(tmp, final, keep_existing)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _publish(tmp: Path, final: Path, keep_existing: bool) -> None:
    try:
        tmp.rename(final)
        return
    except OSError:
        # Linux says ENOTEMPTY or EEXIST when `final` exists; anything else is a real error.
        if not final.exists():
            raise
    if keep_existing:
        return
    old = temp_sibling(final, OLD_MARK)
    shutil.rmtree(old, ignore_errors=True)
    final.rename(old)
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)
