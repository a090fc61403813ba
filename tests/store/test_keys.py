"""Bad key material: each case is a clear ConfigError naming what was wrong (issue 3, bad input)."""

from __future__ import annotations

from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

from quipu_logging import AuditStore, ConfigError, StoreConfig


def _pem_private(key: object) -> bytes:
    return key.private_bytes(  # type: ignore[attr-defined,no-any-return]
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _pem_public(key: object) -> bytes:
    return key.public_key().public_bytes(  # type: ignore[attr-defined,no-any-return]
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


class TestSigningKey:
    def test_missing_key_file(self, tmp_path: Path) -> None:
        """A signing key path that does not exist names the path, and no store is left locked."""
        missing = tmp_path / "nope.pem"
        with pytest.raises(ConfigError, match=r"nope\.pem"):
            AuditStore.open(StoreConfig(root=tmp_path / "s", signing_key=missing))
        AuditStore.open(tmp_path / "s").close()  # the failed open released the lock

    def test_not_a_pem(self, tmp_path: Path) -> None:
        """A file that is not a PEM private key says so."""
        bad = tmp_path / "key.pem"
        bad.write_text("hello")
        with pytest.raises(ConfigError, match="cannot load a PEM private key"):
            AuditStore.open(StoreConfig(root=tmp_path / "s", signing_key=bad))

    def test_wrong_key_type(self, tmp_path: Path) -> None:
        """An EC key instead of Ed25519 is refused, naming the requirement."""
        key = tmp_path / "ec.pem"
        key.write_bytes(_pem_private(ec.generate_private_key(ec.SECP256R1())))
        with pytest.raises(ConfigError, match="Ed25519"):
            AuditStore.open(StoreConfig(root=tmp_path / "s", signing_key=key))


class TestPublicKeys:
    def test_unreadable_public_key_path(self, tmp_path: Path) -> None:
        """verify() with a public key path that does not exist names it."""
        AuditStore.open(tmp_path / "s").close()
        with (
            AuditStore.open_reader(tmp_path / "s") as reader,
            pytest.raises(ConfigError, match=r"missing\.pub"),
        ):
            reader.verify(public_keys=[str(tmp_path / "missing.pub")])

    def test_wrong_public_key_type(self, tmp_path: Path) -> None:
        """An EC public key is refused with a message naming Ed25519."""
        AuditStore.open(tmp_path / "s").close()
        pem = _pem_public(ec.generate_private_key(ec.SECP256R1()))
        with AuditStore.open_reader(tmp_path / "s") as reader, pytest.raises(ConfigError, match="Ed25519"):
            reader.verify(public_keys=[pem])

    def test_garbled_public_key(self, tmp_path: Path) -> None:
        """PEM text that does not parse is a ConfigError, not a crash."""
        AuditStore.open(tmp_path / "s").close()
        with AuditStore.open_reader(tmp_path / "s") as reader, pytest.raises(ConfigError, match="PEM"):
            reader.verify(public_keys=[b"-----BEGIN PUBLIC KEY-----\ngarbage\n-----END PUBLIC KEY-----\n"])

    def test_good_key_still_verifies(self, tmp_path: Path) -> None:
        """With a matching Ed25519 key the same calls pass, so the checks above fail for their reason."""
        private = ed25519.Ed25519PrivateKey.generate()
        key = tmp_path / "k.pem"
        key.write_bytes(_pem_private(private))
        with AuditStore.open(StoreConfig(root=tmp_path / "s", signing_key=key)) as store:
            store.append({"x": 1})
        with AuditStore.open_reader(tmp_path / "s") as reader:
            assert reader.verify(public_keys=[_pem_public(private)]).ok
