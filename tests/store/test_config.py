"""StoreConfig, SyncPolicy and RetentionPolicy: parsing, defaults, clear errors."""

from __future__ import annotations

import pytest

from quipu_logging import ConfigError, RetentionPolicy, StoreConfig, SyncPolicy
from quipu_logging.store._config import parse_duration_us, parse_size


class TestSyncPolicy:
    @pytest.mark.parametrize(
        ("text", "mode", "n", "ms"),
        [
            ("always", "always", 1, 20.0),
            ("os", "os", 1000, 20.0),
            ("group", "group", 1000, 20.0),
            ("group:1000:20", "group", 1000, 20.0),
            ("group:50:5", "group", 50, 5.0),
            ("every:64", "every", 64, 20.0),
            (" Every:8 ", "every", 8, 20.0),
        ],
    )
    def test_parse(self, text: str, mode: str, n: int, ms: float) -> None:
        """Each string form parses to its mode and bounds."""
        policy = SyncPolicy.parse(text)
        assert (policy.mode, policy.n, policy.ms) == (mode, n, ms)

    def test_default_is_group_1000_20(self) -> None:
        """The default policy is group commit with N=1000 and MS=20."""
        assert str(StoreConfig(root="x").sync) == "group:1000:20"

    @pytest.mark.parametrize(
        "text", ["", "sometimes", "every", "every:0", "every:x", "group:1:0", "group:1", "gruop"]
    )
    def test_typos_raise_config_error(self, text: str) -> None:
        """A typo is a ConfigError that quotes the value."""
        with pytest.raises(ConfigError, match="sync policy"):
            SyncPolicy.parse(text)

    def test_round_trip_str(self) -> None:
        """str() gives back the string form."""
        for text in ("always", "os", "every:3", "group:10:5"):
            assert str(SyncPolicy.parse(text)) == text


class TestSizesAndDurations:
    @pytest.mark.parametrize(
        ("text", "value"),
        [
            ("4096", 4096),
            (4096, 4096),
            ("64MiB", 64 * 2**20),
            ("10GiB", 10 * 2**30),
            ("500kB", 500_000),
            ("1.5KiB", 1536),
        ],
    )
    def test_sizes(self, text: str | int, value: int) -> None:
        """Sizes accept ints and SI/IEC suffixes."""
        assert parse_size(text) == value

    @pytest.mark.parametrize(
        ("text", "us"),
        [
            ("90d", 90 * 86_400_000_000),
            ("12h", 12 * 3_600_000_000),
            ("15m", 900_000_000),
            ("20ms", 20_000),
            (30, 30_000_000),
        ],
    )
    def test_durations(self, text: str | int, us: int) -> None:
        """Durations accept seconds and d/h/m/s/ms suffixes."""
        assert parse_duration_us(text) == us

    @pytest.mark.parametrize("bad", ["64MB!", "lots", -1, True, "9 parsecs"])
    def test_bad_sizes(self, bad: object) -> None:
        """A bad size is a ConfigError."""
        with pytest.raises(ConfigError):
            parse_size(bad)  # type: ignore[arg-type]

    def test_retention_parses_once(self) -> None:
        """RetentionPolicy parses its limits in __post_init__ and rejects typos."""
        policy = RetentionPolicy(max_age="90d", max_bytes="10GiB")
        assert policy.max_age_us == 90 * 86_400_000_000
        assert policy.max_bytes_int == 10 * 2**30
        assert RetentionPolicy().keeps_everything
        with pytest.raises(ConfigError, match="max_age"):
            RetentionPolicy(max_age="90 dayz")


class TestStoreConfig:
    def test_segment_limit_parsed(self) -> None:
        """max_segment_bytes accepts '64MiB' and refuses absurdly small values."""
        assert StoreConfig(root="r", max_segment_bytes="1MiB").segment_limit == 2**20
        with pytest.raises(ConfigError, match="max_segment_bytes"):
            StoreConfig(root="r", max_segment_bytes=10)

    def test_keyword_only(self) -> None:
        """The configuration takes keywords only."""
        with pytest.raises(TypeError):
            StoreConfig("root")  # type: ignore[misc]

    def test_bad_root(self) -> None:
        """A root that is not a path is a ConfigError."""
        with pytest.raises(ConfigError, match="root"):
            StoreConfig(root=42)  # type: ignore[arg-type]
