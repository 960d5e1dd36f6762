"""Typed errors of the on-disk formats. All are `UserError`s: the CLI prints one line, exit 2.

`Problem` is one defect `verify` or a read found, with its fields: callers act on `kind`,
`shard` and `file`, and print the problem as it is.
"""

from __future__ import annotations

from configs import UserError


class Problem(str):
    """One defect of a store: the line that says it, plus what it is and where.

    kind: 'manifest' (unreadable, edited, or another format), 'shape' (an array disagrees with
    the manifest), 'done_mark' (a shard's done flag is unreadable), 'not_done' (a shard was never
    finished), 'missing', 'truncated' or 'checksum' (a data file, from `ChunkError.kind`).
    shard: the shard's index, None for the whole store; file: the file relative to the store.
    """

    kind: str
    shard: int | None
    file: str | None

    def __new__(cls, message: str, *, kind: str, shard: int | None = None,
                file: str | None = None) -> "Problem":
        problem = super().__new__(cls, message)
        problem.kind, problem.shard, problem.file = kind, shard, file
        return problem


class StorageError(UserError):
    """Base of every storage problem."""


class StoreNotFound(StorageError):
    """No token store or logit cache at the given path (or it was never completed)."""


class ManifestMismatch(StorageError):
    """A store or cache was made for other inputs (tokenizer, token store, teacher, settings)."""


class CorruptData(StorageError):
    """A checksum failed, a file is truncated or missing, or a manifest is unreadable.
    `problem` says which shard and file when a read located the damage."""

    def __init__(self, message: str, *, problem: Problem | None = None):
        super().__init__(message)
        self.problem = problem


class CacheBusy(StorageError):
    """Another process holds the write lock of a cache."""
