"""On-disk formats: the token store and the teacher-logit cache (see docs/architecture.md)."""

from storage.cache import (CacheWriter, LogitCache, TeacherBlock, create_cache,
                           decode_values, encode_values, open_cache)
from storage.errors import CacheBusy, CorruptData, ManifestMismatch, StorageError, StoreNotFound
from storage.reader import Batch, batches_per_epoch, epoch_order, stream_batches
from storage.tokens import TokenStore, open_token_store, token_dtype, write_token_store

__all__ = [
    "TokenStore", "open_token_store", "write_token_store", "token_dtype",
    "create_cache", "open_cache", "CacheWriter", "LogitCache", "TeacherBlock",
    "encode_values", "decode_values",
    "Batch", "stream_batches", "batches_per_epoch", "epoch_order",
    "StorageError", "StoreNotFound", "ManifestMismatch", "CorruptData", "CacheBusy",
]
