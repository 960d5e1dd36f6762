"""Files the stages read and folders they create, with the faults a user's filesystem can put
on the way said as one line: missing, a folder or a pipe where a file belongs (refused before it
is opened, so nothing blocks), a symlink loop, no permission, a file where a folder belongs."""

from __future__ import annotations

import os
import stat
from pathlib import Path

from configs import writing
from storage.errors import StorageError


class FolderBlocked(StorageError):
    """A folder cannot be created where the run needs it."""


def file_problem(path: Path) -> tuple[str, str] | None:
    """(kind, what is wrong) when `path` is not an existing regular file, else None. kind:
    'missing' (a broken link too), 'unreadable' (a symlink loop, a file on the way, no
    permission to look), 'not_a_file' (a folder, pipe or device)."""
    try:
        info = os.stat(path)
    except FileNotFoundError:
        return "missing", "is missing"
    except OSError as exc:
        return "unreadable", f"cannot be read ({exc.strerror})"
    if not stat.S_ISREG(info.st_mode):
        return "not_a_file", "is not a regular file"
    return None


def write_atomic(path: Path, text: str) -> None:
    """`text` into `path`, written beside it and renamed into place: a reader never sees half
    of it, and a crash leaves the old file. A write that fails names `path`."""
    partial = path.with_name(path.name + ".partial")
    with writing(path):
        partial.write_text(text, encoding="utf-8")
        os.replace(partial, path)


def make_folder(path: Path) -> Path:
    """`path` and its parents as folders (existing ones kept); FolderBlocked naming the path
    when something that is not a folder stands on the way."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except (FileNotFoundError, FileExistsError, NotADirectoryError) as exc:
        raise FolderBlocked(f"cannot create the folder {path}: {exc.strerror} (a broken link, or "
                            "a file where a folder belongs, on its way)") from None
    return path
