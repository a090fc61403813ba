"""The public surface: ``__all__`` is pinned, sorted, and every name imports."""

from __future__ import annotations

import ast
from pathlib import Path

import quipu_logging
from quipu_logging import store

PACKAGE = Path(quipu_logging.__file__).resolve().parent

EXPECTED = [
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

# Which layer each module belongs to, and the layers it may import (DESIGN §2).
LAYER_OF = {
    "errors": "base",
    "_types": "base",
    "_version": "base",
    "store": "store",
    "cli": "front",
    "pipeline": "pipeline",
    "_dlq": "pipeline",
    "_sharded": "pipeline",
    "metrics": "pipeline",
    "permissions": "pipeline",
    "testing": "front",
}
MAY_IMPORT = {
    "base": {"base"},
    "store": {"store", "base"},
    "pipeline": {"pipeline", "store", "base"},
    "front": {"front", "pipeline", "store", "base"},
}
THIRD_PARTY = {
    "base": set(),
    "store": {"orjson", "cryptography"},
    "pipeline": set(),
    "front": {"pythonjsonlogger", "structlog", "orjson"},
}
# Optional imports a single module may make beyond its layer's (pytest: the fixture).
THIRD_PARTY_OF_MODULE = {"testing": {"pytest"}}
STDLIB_FORBIDDEN = {"store": {"logging"}, "pipeline": {"logging"}, "base": {"logging"}}


def _layer(module: str) -> str:
    first = module.split(".")[0]
    return LAYER_OF.get(first, "front")


def _modules() -> list[tuple[str, Path]]:
    out = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE).with_suffix("")
        name = ".".join(rel.parts)
        if name in ("__init__", "__main__"):
            continue
        out.append((name, path))
    return out


def _imports(path: Path, module: str) -> list[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    # "store._store" and "store.__init__" both live in the package "store".
    pkg_parts = module.split(".")[:-1]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.extend(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg_parts[: len(pkg_parts) - (node.level - 1)] if node.level > 1 else pkg_parts
                target = ".".join([*base, node.module] if node.module else base)
                found.append("quipu_logging." + target if target else "quipu_logging")
            elif node.module:
                found.append(node.module)
    return found


class TestExports:
    def test_all_is_pinned(self) -> None:
        """``quipu_logging.__all__`` is exactly the documented list."""
        assert quipu_logging.__all__ == EXPECTED

    def test_all_is_sorted_and_importable(self) -> None:
        """Every exported name exists, and the list is sorted."""
        assert quipu_logging.__all__ == sorted(quipu_logging.__all__)
        for name in quipu_logging.__all__:
            assert hasattr(quipu_logging, name), name

    def test_store_exports(self) -> None:
        """The store package exports its public names and the merkle module."""
        for name in store.__all__:
            assert hasattr(store, name), name
        assert store.merkle.leaf_hash(b"") == bytes.fromhex(
            "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d"
        )

    def test_errors_derive_from_builtins(self) -> None:
        """Every error is a QuipuError and also the matching built-in."""
        assert issubclass(quipu_logging.ConfigError, ValueError)
        assert issubclass(quipu_logging.CorruptionError, ValueError)
        assert issubclass(quipu_logging.PermissionDeniedError, PermissionError)
        for name in quipu_logging.__all__:
            obj = getattr(quipu_logging, name)
            if isinstance(obj, type) and issubclass(obj, Exception):
                assert issubclass(obj, quipu_logging.QuipuError), name


class TestLayers:
    def test_imports_point_downward(self) -> None:
        """Each module imports only its own layer, lower layers, the stdlib and its listed packages."""
        import sys

        stdlib = set(sys.stdlib_module_names)
        violations = []
        for module, path in _modules():
            layer = _layer(module)
            for imported in _imports(path, module):
                top = imported.split(".")[0]
                if imported.startswith("quipu_logging"):
                    rest = imported[len("quipu_logging.") :] if imported != "quipu_logging" else ""
                    target_layer = _layer(rest) if rest else "front"
                    if target_layer not in MAY_IMPORT[layer]:
                        violations.append(f"{module} ({layer}) imports {imported} ({target_layer})")
                elif top in stdlib:
                    if top in STDLIB_FORBIDDEN.get(layer, set()):
                        violations.append(f"{module} ({layer}) imports {top}")
                elif (
                    top not in THIRD_PARTY[layer] | THIRD_PARTY_OF_MODULE.get(module, set())
                    and top != "__future__"
                ):
                    violations.append(f"{module} ({layer}) imports third-party {top}")
        assert violations == []

    def test_layer_checker_catches_a_violation(self, tmp_path: Path) -> None:
        """The import reader sees a relative import that climbs to a higher layer."""
        bad = tmp_path / "x.py"
        bad.write_text("from ..cli import main\nimport logging\n")
        assert _imports(bad, "store.x") == ["quipu_logging.cli", "logging"]
