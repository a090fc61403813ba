"""The audit store: single-writer, append-only segments with a Merkle tree and checkpoints.

It knows nothing of ``logging``: it takes any mapping. See ``_format.py`` for the
on-disk format and :mod:`quipu_logging.store.merkle` for the RFC 6962 functions.
"""

from . import merkle
from ._checkpoint import Checkpoint
from ._config import RetentionPolicy, StoreConfig, SyncPolicy
from ._fileio import FileLayer, PowerLossFileLayer
from ._set import SetCheckpoint, ShardState, StoreSet
from ._setread import StoreSetReader
from ._store import AuditStore

__all__ = [
    "AuditStore",
    "Checkpoint",
    "FileLayer",
    "PowerLossFileLayer",
    "RetentionPolicy",
    "SetCheckpoint",
    "ShardState",
    "StoreConfig",
    "StoreSet",
    "StoreSetReader",
    "SyncPolicy",
    "merkle",
]
