"""Typed errors of the on-disk formats. All are `UserError`s: the CLI prints one line, exit 2."""

from configs import UserError


class StorageError(UserError):
    """Base of every storage problem."""


class StoreNotFound(StorageError):
    """No token store or logit cache at the given path (or it was never completed)."""


class ManifestMismatch(StorageError):
    """A store or cache was made for other inputs (tokenizer, token store, teacher, settings)."""


class CorruptData(StorageError):
    """A checksum failed, a file is truncated or missing, or a manifest is unreadable."""


class CacheBusy(StorageError):
    """Another process holds the write lock of a cache."""
