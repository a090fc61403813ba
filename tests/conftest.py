"""Shared test setup: Hypothesis profiles, proof that the installed package is under test, and
the small doubles several test modules use (a capturing handler, a hanging value, a hand clock)."""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

import quipu_logging

# "ci": reproducible (derandomized) and free of wall-clock deadlines on a loaded 2-core runner.
settings.register_profile("ci", deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("dev", deadline=None)
settings.load_profile("ci" if os.environ.get("CI") else os.environ.get("HYPOTHESIS_PROFILE", "dev"))

CHECKOUT = Path(__file__).resolve().parent.parent


def pytest_report_header(config: pytest.Config) -> str:
    return f"quipu_logging {quipu_logging.__version__} imported from {Path(quipu_logging.__file__).parent}"


@pytest.fixture(scope="session", autouse=True)
def _installed_package_under_test() -> None:
    """With QUIPU_EXPECT_INSTALLED=1 (make test, CI), the package must come from site-packages."""
    if os.environ.get("QUIPU_EXPECT_INSTALLED") == "1":
        where = Path(quipu_logging.__file__).resolve()
        assert CHECKOUT not in where.parents or "site-packages" in where.parts, (
            f"quipu_logging was imported from the checkout ({where}), not the installed wheel"
        )


@pytest.fixture
def ed25519_pem(tmp_path: Path) -> tuple[Path, bytes]:
    """A fresh Ed25519 key: ``(path of the private key PEM, the public key PEM bytes)``."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519

    key = ed25519.Ed25519PrivateKey.generate()
    private = tmp_path / "audit-key.pem"
    private.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    public = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return private, public


class Capture(logging.Handler):
    """A handler (a fallback, say) that keeps every record it is given."""

    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


class Hang:
    """A value whose ``repr`` blocks until released: the writer hangs while encoding it."""

    def __init__(self) -> None:
        self.entered = threading.Event()
        self.release = threading.Event()

    def __repr__(self) -> str:
        self.entered.set()
        self.release.wait(30)
        return "Hang()"


class FakeClock:
    """A monotonic clock the test moves by hand (a pipeline's ``_clock``: its stall measure)."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def capture() -> Capture:
    return Capture()


@pytest.fixture
def hang() -> Iterator[Hang]:
    """A fresh :class:`Hang`; released at teardown so no writer thread stays stuck in it."""
    value = Hang()
    yield value
    value.release.set()


@pytest.fixture
def fake_clock() -> FakeClock:
    return FakeClock()
