"""quipu_logging: ordinary logging calls, kept as a tamper-evident audit trail.

Everything users need is importable from here; implementation lives in ``_*.py``
modules and in :mod:`quipu_logging.store`.
"""

from ._types import (
    ConsistencyProof,
    InclusionProof,
    Page,
    Problem,
    Receipt,
    StoredRecord,
    VerifyReport,
)
from ._version import __version__
from .context import AuditContextFilter
from .errors import (
    ConfigError,
    CorruptionError,
    FormatVersionError,
    MalformedError,
    NotAStoreError,
    PayloadTooLargeError,
    PermissionDeniedError,
    PipelineClosedError,
    QueryError,
    QueueFullError,
    QuipuError,
    ShardsBusyError,
    StoreBrokenError,
    StoreClosedError,
    StoreLockedError,
    UnsupportedFilesystemError,
)
from .formatter import AuditJsonFormatter
from .handler import AuditHandler
from .permissions import Action, PermissionPolicy, Role
from .pipeline import AuditHandle, AuditPipeline, PipelineConfig
from .store import (
    AuditStore,
    Checkpoint,
    RetentionPolicy,
    SetCheckpoint,
    StoreConfig,
    StoreSet,
    StoreSetReader,
    SyncPolicy,
)

__all__ = [
    "Action",
    "AuditContextFilter",
    "AuditHandle",
    "AuditHandler",
    "AuditJsonFormatter",
    "AuditPipeline",
    "AuditStore",
    "Checkpoint",
    "ConfigError",
    "ConsistencyProof",
    "CorruptionError",
    "FormatVersionError",
    "InclusionProof",
    "MalformedError",
    "NotAStoreError",
    "Page",
    "PayloadTooLargeError",
    "PermissionDeniedError",
    "PermissionPolicy",
    "PipelineClosedError",
    "PipelineConfig",
    "Problem",
    "QueryError",
    "QueueFullError",
    "QuipuError",
    "Receipt",
    "RetentionPolicy",
    "Role",
    "SetCheckpoint",
    "ShardsBusyError",
    "StoreBrokenError",
    "StoreClosedError",
    "StoreConfig",
    "StoreLockedError",
    "StoreSet",
    "StoreSetReader",
    "StoredRecord",
    "SyncPolicy",
    "UnsupportedFilesystemError",
    "VerifyReport",
    "__version__",
]
