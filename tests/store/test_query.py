"""``AuditStore.query`` (DESIGN §3), cursors, and sidecars (DESIGN §4; issue 3 requirements 2, 3, 8).

Results are checked against an oracle written here from the contract (type-exact
``where``, ``since`` inclusive / ``until`` exclusive on ``ts``, ``levelno >=``,
dotted ``logger`` prefix, substring of ``message``). Sidecars are edited with
``orjson`` and ``zlib`` directly, independently of ``_format``.
"""

from __future__ import annotations

import base64
import os
import random
import shutil
import struct
import tempfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from quipu_logging import AuditStore, QueryError, RetentionPolicy, StoreConfig, StoredRecord
from quipu_logging.store import FileLayer

T0 = 1_700_000_000_000_000  # µs
FRAME = struct.Struct("<II")
STRIDE = 256  # the sidecar's sparse index holds one entry every STRIDE records (DESIGN §4)
LOGGERS = ["app", "app.db", "app.db.pool", "apple", "api", "app.web"]
WORDS = ["login", "logout", "update doc", "delete", "Update", "export report"]
ACTORS = ["alice", "bob", "carol", "dave"]


# ---------------------------------------------------------------------------- helpers


def event(i: int, rng: random.Random | None = None, *, ts: int | None = None) -> dict[str, Any]:
    """A log-shaped record; deterministic for a given ``i`` without ``rng``."""
    r = rng or random.Random(i)
    return {
        "actor": r.choice(ACTORS),
        "levelno": r.choice([10, 20, 30, 40, 50]),
        "logger": r.choice(LOGGERS),
        "message": f"{r.choice(WORDS)} #{i}",
        "ts": ts if ts is not None else T0 + r.randrange(0, 1_000_000_000),
        "i": i,
    }


def build(root: Path, events: list[dict[str, Any]], *, limit: int | str = 2048) -> None:
    """A closed store holding ``events``."""
    with AuditStore.open(StoreConfig(root=root, max_segment_bytes=limit, sync="os")) as store:
        if events:
            store.append_batch(events)


def segments(root: Path) -> list[Path]:
    """The segment files, oldest first."""
    return sorted((root / "log").glob("seg-*.log"))


def sidecars(root: Path) -> list[Path]:
    """The sidecar files, oldest first."""
    return sorted((root / "log").glob("seg-*.idx"))


def to_us(value: datetime | int | None) -> int | None:
    """An aware datetime or int µs, as int µs."""
    if isinstance(value, datetime):
        return round((value - datetime(1970, 1, 1, tzinfo=timezone.utc)) / timedelta(microseconds=1))
    return value


def oracle(payload: dict[str, Any], **f: Any) -> bool:
    """The contract's meaning of the query filters, written independently of ``_query``."""
    where = f.get("where") or {}
    for key, value in where.items():
        stored = "$" + key if key.startswith("$") else key
        if stored not in payload:
            return False
        got = payload[stored]
        if type(got) is not type(value) or got != value:
            return False
    since, until = to_us(f.get("since")), to_us(f.get("until"))
    ts = payload["ts"]
    if since is not None and ts < since:
        return False
    if until is not None and ts >= until:
        return False
    if f.get("min_levelno") is not None:
        lv = payload.get("levelno")
        if type(lv) is not int or lv < f["min_levelno"]:
            return False
    if f.get("logger_prefix") is not None:
        name, prefix = payload.get("logger"), f["logger_prefix"]
        if not isinstance(name, str) or not (name == prefix or name.startswith(prefix.rstrip(".") + ".")):
            return False
    if f.get("contains") is not None:
        msg = payload.get("message")
        if not isinstance(msg, str) or f["contains"] not in msg:
            return False
    return True


def all_pages(store: AuditStore, *, limit: int = 100, **kw: Any) -> list[StoredRecord]:
    """Every record of one query, page by page."""
    out: list[StoredRecord] = []
    cursor = None
    for _ in range(100_000):  # a bound: a broken cursor could loop forever
        page = store.query(limit=limit, cursor=cursor, **kw)
        assert len(page.records) <= limit
        out.extend(page.records)
        if page.next_cursor is None:
            return out
        assert len(page.records) == limit
        cursor = page.next_cursor
    raise AssertionError("paging did not end")


def seqs(records: list[StoredRecord]) -> list[int]:
    """The seqs of records, in order."""
    return [r.seq for r in records]


def expected(store: AuditStore, *, newest_first: bool = True, **f: Any) -> list[int]:
    """The seqs a query must return, from a full scan and the oracle."""
    got = [r.seq for r in store.scan() if oracle(r.payload, **f)]
    return got[::-1] if newest_first else got


def rewrite_sidecar(path: Path, change: Callable[[dict[str, Any]], object], *, fix_crc: bool = True) -> None:
    """Edits a sidecar's JSON and (optionally) recomputes its CRC the way DESIGN §4 defines it."""
    body = orjson.loads(path.read_bytes())
    body.pop("crc")
    change(body)
    if fix_crc:
        body["crc"] = zlib.crc32(orjson.dumps(body, option=orjson.OPT_SORT_KEYS))
    else:
        body["crc"] = 12345
    path.write_bytes(orjson.dumps(body, option=orjson.OPT_SORT_KEYS))


def frame_offsets(seg: Path) -> list[int]:
    """The offset of every frame of a segment."""
    data = seg.read_bytes()
    pos, out = 16, []
    while pos + 8 <= len(data):
        length, _ = FRAME.unpack_from(data, pos)
        out.append(pos)
        pos += 8 + length
    return out


class CountingLayer(FileLayer):
    """A file layer that counts the bytes read from segment files."""

    def __init__(self) -> None:
        self.paths: dict[int, str] = {}
        self.segment_bytes = 0
        self.segment_preads = 0

    def open(self, path: str, flags: int, mode: int = 0o644) -> int:
        fd = super().open(path, flags, mode)
        self.paths[fd] = path
        return fd

    def pread(self, fd: int, size: int, offset: int) -> bytes:
        data = super().pread(fd, size, offset)
        if self.paths.get(fd, "").endswith(".log"):
            self.segment_bytes += len(data)
            self.segment_preads += 1
        return data


# ---------------------------------------------------------------------------- filters


class TestWhere:
    """``where`` is type-exact equality on top-level fields."""

    @pytest.fixture
    def store(self, tmp_path: Path) -> Any:
        """A store whose ``n`` field takes values that compare equal across types."""
        values: list[Any] = [1, 1.0, True, "1", None, 0, False, [1], {"v": 1}]
        events = [{"n": v, "k": k, "ts": T0 + k} for k, v in enumerate(values)]
        events.append({"k": len(values), "ts": T0 + len(values)})  # no "n" at all
        events.append({"$n": 1, "k": 99, "ts": T0 + 99})  # a user key starting with "$"
        build(tmp_path / "s", events)
        s = AuditStore.open_reader(tmp_path / "s")
        yield s
        s.close()

    @pytest.mark.parametrize(
        ("value", "ks"),
        [(1, [0]), (1.0, [1]), (True, [2]), ("1", [3]), (None, [4]), (0, [5]), (False, [6])],
    )
    def test_type_exact(self, store: AuditStore, value: Any, ks: list[int]) -> None:
        """1, 1.0 and True are three different values; None matches an explicit null, not a missing key."""
        got = store.query(where={"n": value}, newest_first=False).records
        assert [r.payload["k"] for r in got] == ks

    def test_dollar_key_matches_user_spelling(self, store: AuditStore) -> None:
        """A ``$``-key in ``where`` is the user's key (stored escaped as ``$$n``)."""
        got = store.query(where={"$n": 1}).records
        assert [r.payload["k"] for r in got] == [99]
        assert got[0].payload["$$n"] == 1
        assert store.query(where={"$$n": 1}).records == []  # the escaped spelling is not the user's key

    def test_several_fields_all_must_match(self, store: AuditStore) -> None:
        """Several ``where`` fields form a conjunction."""
        assert [r.payload["k"] for r in store.query(where={"n": 1, "k": 0}).records] == [0]
        assert store.query(where={"n": 1, "k": 1}).records == []

    def test_missing_field_never_matches(self, store: AuditStore) -> None:
        """A field no record has matches nothing; an empty ``where`` matches everything."""
        assert store.query(where={"nope": 1}).records == []
        assert len(store.query(where={}).records) == 11

    def test_user_sys_key_is_not_a_system_record(self, tmp_path: Path) -> None:
        """``where={"$sys": ...}`` finds the user's ``$sys`` key, never the store's own system records."""
        root = tmp_path / "s"
        with AuditStore.open(StoreConfig(root=root, max_segment_bytes=600, sync="os")) as store:
            store.append_batch([{"i": i, "ts": T0 + i} for i in range(40)])
            store.append({"$sys": "retention", "removed_below": 10**9})
            assert store.apply_retention(RetentionPolicy(max_bytes=0)) > 0  # writes a real $sys record
            got = store.query(where={"$sys": "retention"}).records
            assert len(got) == 1 and got[0].payload["$$sys"] == "retention"
            assert sum(1 for r in store.scan() if r.payload.get("$sys") == "retention") == 1


class TestTimeRange:
    """``since`` is inclusive and ``until`` exclusive on ``ts``, as aware datetimes or int µs."""

    @pytest.fixture
    def store(self, tmp_path: Path) -> Any:
        """Ten records, one per second from T0."""
        build(tmp_path / "s", [{"k": k, "ts": T0 + k * 1_000_000} for k in range(10)])
        s = AuditStore.open_reader(tmp_path / "s")
        yield s
        s.close()

    @staticmethod
    def at(k: int, tz: timezone = timezone.utc) -> datetime:
        """The aware datetime of record ``k``'s ts."""
        return datetime.fromtimestamp((T0 + k * 1_000_000) / 1e6, tz=timezone.utc).astimezone(tz)

    def ks(self, store: AuditStore, **kw: Any) -> list[int]:
        """The ``k`` of each record returned, oldest first."""
        return [r.payload["k"] for r in store.query(newest_first=False, **kw).records]

    def test_int_bounds(self, store: AuditStore) -> None:
        """Integer µs: since inclusive, until exclusive."""
        assert self.ks(store, since=T0 + 2_000_000, until=T0 + 5_000_000) == [2, 3, 4]
        assert self.ks(store, since=T0 + 2_000_001, until=T0 + 5_000_001) == [3, 4, 5]
        assert self.ks(store, since=T0 + 9_000_000) == [9]
        assert self.ks(store, until=T0 + 1) == [0]
        assert self.ks(store, since=T0 + 3_000_000, until=T0 + 3_000_000) == []

    def test_datetime_bounds(self, store: AuditStore) -> None:
        """Aware datetimes in any zone mean the same instants as int µs."""
        plus2 = timezone(timedelta(hours=2))
        assert self.ks(store, since=self.at(2), until=self.at(5)) == [2, 3, 4]
        assert self.ks(store, since=self.at(2, plus2), until=self.at(5, plus2)) == [2, 3, 4]
        assert self.ks(store, since=self.at(7) + timedelta(microseconds=1)) == [8, 9]
        assert self.ks(store, since=self.at(1), until=T0 + 3_000_000) == [1, 2]

    def test_naive_datetime_refused(self, store: AuditStore) -> None:
        """A naive datetime is a QueryError that says so."""
        with pytest.raises(QueryError, match="naive"):
            store.query(since=datetime(2024, 1, 1))
        with pytest.raises(QueryError, match="until"):
            store.query(until=datetime(2024, 1, 1))

    @pytest.mark.parametrize("bad", [1.5, "2024-01-01", True])
    def test_other_types_refused(self, store: AuditStore, bad: Any) -> None:
        """A float, a string or a bool bound is a QueryError naming the argument."""
        with pytest.raises(QueryError, match="since"):
            store.query(since=bad)

    def test_since_after_until(self, store: AuditStore) -> None:
        """since after until is a QueryError, not an empty page."""
        with pytest.raises(QueryError, match="since"):
            store.query(since=T0 + 5, until=T0 + 4)
        with pytest.raises(QueryError, match="after"):
            store.query(since=self.at(5), until=self.at(4))


class TestTimeRangeAcrossSegments:
    """Time bounds that fall exactly on a segment's first or last ts (where skipping could go wrong)."""

    def test_bounds_at_every_segment_edge(self, tmp_path: Path) -> None:
        """since = a segment's max ts and until = its min ts + 1 still find those records, both orders."""
        rng = random.Random(5)
        events = [event(i, rng, ts=T0 + (i + rng.randrange(-4, 5)) * 1000) for i in range(400)]
        build(tmp_path / "s", events, limit=1500)
        with AuditStore.open_reader(tmp_path / "s") as store:
            bases = [struct.unpack_from("<Q", p.read_bytes(), 8)[0] for p in segments(tmp_path / "s")]
            assert len(bases) >= 10
            records = list(store.scan())
            edges: set[int] = set()
            for lo, hi in zip(bases, [*bases[1:], len(records)], strict=True):
                tss = [r.ts for r in records[lo:hi]]
                edges |= {min(tss), max(tss)}
            for t in sorted(edges):
                for bounds in ({"since": t}, {"until": t + 1}, {"since": t, "until": t + 1}, {"until": t}):
                    for newest_first in (True, False):
                        got = seqs(all_pages(store, limit=50, newest_first=newest_first, **bounds))
                        assert got == expected(store, newest_first=newest_first, **bounds), bounds


class TestOtherFilters:
    """``min_levelno``, ``logger_prefix`` and ``contains``."""

    @pytest.fixture
    def store(self, tmp_path: Path) -> Any:
        """Records with varied, and some ill-typed, level, logger and message fields."""
        events: list[dict[str, Any]] = []
        for k, (lv, name, msg) in enumerate(
            [
                (10, "app", "User alice logged in"),
                (20, "app.db", "update doc-42"),
                (30, "app.db.pool", "pool exhausted"),
                (40, "apple", "apple pie"),
                (50, "xapp", "UPDATE all"),
                ("40", "app.", "level as a string"),
                (True, "app.web", "level as a bool"),
                (45, 7, 8),
                (35, None, None),
            ]
        ):
            events.append({"k": k, "levelno": lv, "logger": name, "message": msg, "ts": T0 + k})
        events.append({"k": 9, "ts": T0 + 9})
        build(tmp_path / "s", events)
        s = AuditStore.open_reader(tmp_path / "s")
        yield s
        s.close()

    def ks(self, store: AuditStore, **kw: Any) -> list[int]:
        """The ``k`` of each record returned, oldest first."""
        return [r.payload["k"] for r in store.query(newest_first=False, **kw).records]

    def test_min_levelno(self, store: AuditStore) -> None:
        """levelno >= min_levelno; a string or bool level never matches."""
        assert self.ks(store, min_levelno=30) == [2, 3, 4, 7, 8]
        assert self.ks(store, min_levelno=0) == [0, 1, 2, 3, 4, 7, 8]

    def test_logger_prefix_is_hierarchical(self, store: AuditStore) -> None:
        """A prefix "app" matches app and its children, not "apple" or "xapp"."""
        assert self.ks(store, logger_prefix="app") == [0, 1, 2, 5, 6]
        assert self.ks(store, logger_prefix="app.db") == [1, 2]
        assert self.ks(store, logger_prefix="app.db.pool") == [2]
        assert self.ks(store, logger_prefix="ap") == []
        assert self.ks(store, logger_prefix="apple") == [3]

    def test_contains(self, store: AuditStore) -> None:
        """A case-sensitive substring of a string message."""
        assert self.ks(store, contains="update") == [1]
        assert self.ks(store, contains="UPDATE") == [4]
        assert self.ks(store, contains="") == [0, 1, 2, 3, 4, 5, 6]
        assert self.ks(store, contains="8") == []

    def test_combined(self, store: AuditStore) -> None:
        """Filters combine as a conjunction."""
        assert self.ks(store, logger_prefix="app", min_levelno=20, contains="o") == [1, 2]

    @pytest.mark.parametrize(
        ("kw", "name"),
        [
            ({"min_levelno": "20"}, "min_levelno"),
            ({"min_levelno": True}, "min_levelno"),
            ({"logger_prefix": 3}, "logger_prefix"),
            ({"contains": b"x"}, "contains"),
            ({"where": [("a", 1)]}, "where"),
            ({"where": {1: "a"}}, "where"),
        ],
    )
    def test_bad_argument_types(self, store: AuditStore, kw: dict[str, Any], name: str) -> None:
        """An argument of the wrong type is a QueryError naming it."""
        with pytest.raises(QueryError, match=name):
            store.query(**kw)

    @pytest.mark.parametrize(
        "value",
        [
            [1],
            {"a": 1},
            object(),
            b"bytes",
            {1, 2},
            (1,),
            1 + 2j,
            float("nan"),
            float("inf"),
            2**63,
            -(2**63) - 1,
        ],
    )
    def test_unmatchable_where_value(self, store: AuditStore, value: Any) -> None:
        """A ``where`` value that no stored field can equal is a QueryError: a list, dict, object...,
        and NaN, ±inf and huge ints, which the store keeps as strings."""
        with pytest.raises(QueryError, match=r"where\['actor'\]"):
            store.query(where={"actor": value})

    @pytest.mark.parametrize("limit", [0, -1, True, 1.0, "10", None])
    def test_bad_limit(self, store: AuditStore, limit: Any) -> None:
        """limit must be an int >= 1."""
        with pytest.raises(QueryError, match="limit"):
            store.query(limit=limit)


class TestOrderAndLimit:
    """newest-first / oldest-first by seq, and page sizes."""

    def test_order_and_limit(self, tmp_path: Path) -> None:
        """Pages are in descending (or ascending) seq, whatever the ts order, and at most ``limit`` long."""
        events = [event(i, ts=T0 - i) for i in range(300)]  # ts runs backwards
        build(tmp_path / "s", events, limit=1500)
        with AuditStore.open_reader(tmp_path / "s") as store:
            page = store.query(limit=7)
            assert seqs(page.records) == list(range(299, 292, -1)) and page.next_cursor
            page = store.query(limit=7, newest_first=False)
            assert seqs(page.records) == list(range(7))
            assert seqs(all_pages(store, limit=13)) == list(range(299, -1, -1))
            assert seqs(all_pages(store, limit=13, newest_first=False)) == list(range(300))
            page = store.query(limit=1000)
            assert len(page.records) == 300 and page.next_cursor is None
            assert store.query().records == page.records[:100]  # the default limit is 100

    def test_empty_store(self, tmp_path: Path) -> None:
        """An empty store gives an empty last page in both orders."""
        build(tmp_path / "s", [])
        with AuditStore.open_reader(tmp_path / "s") as store:
            for newest_first in (True, False):
                page = store.query(newest_first=newest_first)
                assert (page.records, page.next_cursor, page.resumed) == ([], None, False)

    def test_records_match_scan(self, tmp_path: Path) -> None:
        """A query returns exactly the records scan() returns: same seq, ts, leaf, raw bytes, payload."""
        build(tmp_path / "s", [event(i) for i in range(120)], limit=1024)
        with AuditStore.open_reader(tmp_path / "s") as store:
            by_seq = {r.seq: r for r in store.scan()}
            for r in all_pages(store, limit=9, where={"actor": "bob"}):
                assert r == by_seq[r.seq]

    def test_writer_and_reader_agree(self, tmp_path: Path) -> None:
        """The writer's query, with records not yet synced, equals a reader's."""
        root = tmp_path / "s"
        with AuditStore.open(StoreConfig(root=root, max_segment_bytes=1024, sync="os")) as w:
            w.append_batch([event(i) for i in range(150)])
            mine = all_pages(w, limit=11, min_levelno=30)
            with AuditStore.open_reader(root) as r:
                assert all_pages(r, limit=11, min_levelno=30) == mine
            assert seqs(mine) == expected(w, min_levelno=30)


# ---------------------------------------------------------------------------- paging


on_grid = st.builds(lambda k, d: T0 + k * 1000 + d, st.integers(-5, 300), st.sampled_from([-1, 0, 0, 1]))
filters_strategy = st.fixed_dictionaries(
    {},
    optional={
        "where": st.dictionaries(st.just("actor"), st.sampled_from(ACTORS), min_size=1),
        # on the records' ts grid (see paged_event), give or take 1 µs: boundaries are hit exactly
        "since": on_grid,
        "until": on_grid,
        "min_levelno": st.sampled_from([10, 25, 40, 50]),
        "logger_prefix": st.sampled_from(["app", "app.db", "api", "apple"]),
        "contains": st.sampled_from(["o", "update", "#1", "Update", "#"]),
    },
)


def paged_event(i: int, rng: random.Random) -> dict[str, Any]:
    """A record whose ts roughly follows its index (so segments cover narrow, overlapping spans)."""
    return event(i, rng, ts=T0 + (i + rng.randrange(-3, 4)) * 1000)


@dataclass
class PagingCase:
    """A drawn paging scenario."""

    seed: int
    n: int
    limit: int
    segment: int
    newest_first: bool
    use_reader: bool
    filters: dict[str, Any]
    appends: list[int]


paging_cases = st.builds(
    PagingCase,
    seed=st.integers(0, 2**32),
    n=st.integers(0, 260),
    limit=st.integers(1, 40),
    segment=st.sampled_from([256, 700, 2000, 64 * 1024]),
    newest_first=st.booleans(),
    use_reader=st.booleans(),
    filters=filters_strategy,
    appends=st.lists(st.integers(0, 30), max_size=12),
)


class TestPagingExactness:
    """Paging with the cursor returns every match exactly once, even while records are appended."""

    @settings(max_examples=120, suppress_health_check=[HealthCheck.too_slow])
    @given(case=paging_cases)
    def test_every_match_once(self, case: PagingCase) -> None:
        """newest-first: exactly the matches present at the first page; oldest-first: later appends too."""
        f = dict(case.filters)
        if "since" in f and "until" in f and f["since"] > f["until"]:
            f["since"], f["until"] = f["until"], f["since"]
        rng = random.Random(case.seed)
        with tempfile.TemporaryDirectory() as tmp:
            root = Path(tmp) / "s"
            config = StoreConfig(root=root, max_segment_bytes=case.segment, sync="os")
            with AuditStore.open(config) as writer:
                if case.n:
                    writer.append_batch([paged_event(i, rng) for i in range(case.n)])
                reader = AuditStore.open_reader(root)
                try:
                    store = reader if case.use_reader else writer
                    at_start = expected(writer, newest_first=case.newest_first, **f)
                    got: list[StoredRecord] = []
                    cursor = None
                    appends = list(case.appends)
                    i = case.n
                    for _ in range(case.n + sum(case.appends) + 2):  # a bound: a broken cursor could loop
                        page = store.query(
                            newest_first=case.newest_first, limit=case.limit, cursor=cursor, **f
                        )
                        assert not page.resumed
                        assert len(page.records) <= case.limit
                        got.extend(page.records)
                        if page.next_cursor is None:
                            break
                        assert len(page.records) == case.limit
                        cursor = page.next_cursor
                        if appends:  # new records arrive between pages
                            k = appends.pop()
                            writer.append_batch([paged_event(j, rng) for j in range(i, i + k)])
                            i += k
                    else:
                        raise AssertionError("paging did not end")
                    at_end = expected(writer, newest_first=case.newest_first, **f)
                finally:
                    reader.close()
        if case.newest_first:
            assert seqs(got) == at_start
        else:
            assert seqs(got) == at_end
        for r in got:
            assert oracle(r.payload, **f)


# ---------------------------------------------------------------------------- cursors


class TestCursorErrors:
    """A cursor from elsewhere or garbled is a QueryError with a clear message."""

    @pytest.fixture
    def store(self, tmp_path: Path) -> Any:
        """A reader of a 50-record store."""
        build(tmp_path / "s", [event(i) for i in range(50)])
        s = AuditStore.open_reader(tmp_path / "s")
        yield s
        s.close()

    def cursor(self, store: AuditStore, **kw: Any) -> str:
        """The next_cursor of a first page of 5."""
        c = store.query(limit=5, **kw).next_cursor
        assert c is not None
        return c

    def test_cursor_is_url_safe(self, store: AuditStore) -> None:
        """A cursor is an opaque, URL-safe string."""
        c = self.cursor(store)
        assert set(c) <= set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")

    @pytest.mark.parametrize(
        "garbled",
        [
            "",
            "not a cursor",
            "!!!!",
            "é",
            base64.urlsafe_b64encode(b"[1,2,3]").decode(),
            base64.urlsafe_b64encode(b'"just a string"').decode(),
            base64.urlsafe_b64encode(b'{"v":1}').decode(),
            base64.urlsafe_b64encode(b"\xff\xfe\x00").decode(),
        ],
    )
    def test_garbled(self, store: AuditStore, garbled: str) -> None:
        """Garbage is refused as a garbled cursor."""
        with pytest.raises(QueryError, match="cursor: garbled"):
            store.query(cursor=garbled)

    def test_truncated_and_flipped(self, store: AuditStore) -> None:
        """A real cursor cut short, or with a character changed, is refused (never silently misread)."""
        c = self.cursor(store)
        for bad in (c[: len(c) // 2], c[:-3], c + "A", c[::-1]):
            with pytest.raises(QueryError, match="cursor"):
                store.query(cursor=bad)

    def test_edited_fields(self, store: AuditStore) -> None:
        """A cursor re-encoded with edited fields is refused unless it is still this store's and query's."""
        body = orjson.loads(base64.urlsafe_b64decode(self.cursor(store) + "=="))
        for key, value in [("v", 2), ("d", "x"), ("l", -1), ("l", "x"), ("s", "0" * 16), ("f", "ff")]:
            edited = {**body, key: value}
            text = base64.urlsafe_b64encode(orjson.dumps(edited)).decode().rstrip("=")
            with pytest.raises(QueryError, match="cursor"):
                store.query(cursor=text)

    def test_non_string(self, store: AuditStore) -> None:
        """A cursor that is not a string is refused with its type."""
        with pytest.raises(QueryError, match="cursor"):
            store.query(cursor=12)  # type: ignore[arg-type]

    def test_other_store(self, store: AuditStore, tmp_path: Path) -> None:
        """A cursor made by another store (even with the same content) names that problem."""
        build(tmp_path / "other", [event(i) for i in range(50)])
        with AuditStore.open_reader(tmp_path / "other") as other:
            c = self.cursor(other)
        with pytest.raises(QueryError, match="another store"):
            store.query(cursor=c)

    def test_copied_store_accepts(self, store: AuditStore, tmp_path: Path) -> None:
        """A byte-for-byte copy of a store is the same store: its cursors keep working."""
        c = self.cursor(store)
        shutil.copytree(store.root, tmp_path / "copy")
        with AuditStore.open_reader(tmp_path / "copy") as copy:
            assert copy.query(limit=5, cursor=c).records == store.query(limit=5, cursor=c).records

    @pytest.mark.parametrize(
        ("made", "used"),
        [
            ({}, {"newest_first": False}),
            ({"newest_first": False}, {}),
            ({"where": {"actor": "bob"}}, {"where": {"actor": "alice"}}),
            ({"where": {"actor": "bob"}}, {}),
            ({}, {"since": T0}),
            ({"min_levelno": 10}, {"min_levelno": 20}),
            ({"logger_prefix": "app"}, {"logger_prefix": "api"}),
            ({"contains": "#"}, {"contains": "# "}),
            ({"where": {"n": 1}}, {"where": {"n": True}}),
            ({"where": {"n": 1}}, {"where": {"n": 1.0}}),
        ],
    )
    def test_other_query(self, tmp_path: Path, made: dict[str, Any], used: dict[str, Any]) -> None:
        """A cursor made for another filter or direction is refused."""
        build(tmp_path / "s", [{**event(i), "n": 1} for i in range(50)])
        with AuditStore.open_reader(tmp_path / "s") as store:
            c = store.query(limit=1, **made).next_cursor
            assert c is not None
            with pytest.raises(QueryError, match="different query"):
                store.query(cursor=c, **used)

    def test_same_query_other_spelling(self, store: AuditStore) -> None:
        """A datetime and the equal int µs are the same filter: the cursor is accepted."""
        since = datetime.fromtimestamp(T0 / 1e6, tz=timezone.utc)
        c = store.query(limit=3, since=since).next_cursor
        page = store.query(limit=3, since=T0, cursor=c)
        assert len(page.records) == 3


class TestRetentionAndCursor:
    """When retention removes the cursor's position: oldest-first resumes, newest-first ends."""

    def make(self, root: Path) -> AuditStore:
        """A writer with ten-ish small sealed segments of old records."""
        store = AuditStore.open(StoreConfig(root=root, max_segment_bytes=800, sync="os"))
        store.append_batch([{"i": i, "ts": T0 + i} for i in range(120)])
        return store

    def test_oldest_first_resumes(self, tmp_path: Path) -> None:
        """Oldest-first after its position was removed resumes at the oldest survivor with resumed=True."""
        with self.make(tmp_path / "s") as store:
            page = store.query(newest_first=False, limit=5)
            assert seqs(page.records) == [0, 1, 2, 3, 4]
            removed = store.apply_retention(RetentionPolicy(max_age="1d"))  # every sealed segment
            assert removed >= 2
            survivors = [r.seq for r in store.scan()]
            assert survivors[0] > 5
            nxt = store.query(newest_first=False, limit=2, cursor=page.next_cursor)
            assert nxt.resumed
            assert seqs(nxt.records) == survivors[:2]
            after = store.query(newest_first=False, limit=1000, cursor=nxt.next_cursor)
            assert not after.resumed and seqs(after.records) == survivors[2:]

    def test_oldest_first_position_exactly_removed(self, tmp_path: Path) -> None:
        """The cursor's own record removed (even when nothing after it was): resumed=True."""
        with self.make(tmp_path / "s") as store:
            first = seqs(store.query(newest_first=False, limit=200).records)
            seg0_end = _first_base_after(store, 0)
            page = store.query(newest_first=False, limit=seg0_end)  # ends at the last record of segment 0
            assert seqs(page.records) == first[:seg0_end]
            assert store.apply_retention(RetentionPolicy(max_bytes=_bytes_without_first(store))) == 1
            nxt = store.query(newest_first=False, limit=5, cursor=page.next_cursor)
            assert nxt.resumed and seqs(nxt.records) == list(range(seg0_end, seg0_end + 5))

    def test_oldest_first_unaffected(self, tmp_path: Path) -> None:
        """Retention below an oldest-first cursor's position changes nothing: resumed stays False."""
        with self.make(tmp_path / "s") as store:
            page = store.query(newest_first=False, limit=100)
            store.apply_retention(RetentionPolicy(max_bytes=_bytes_without_first(store)))
            nxt = store.query(newest_first=False, limit=5, cursor=page.next_cursor)
            assert not nxt.resumed and seqs(nxt.records) == [100, 101, 102, 103, 104]

    def test_newest_first_ends(self, tmp_path: Path) -> None:
        """Newest-first whose position was removed ends: no records, no cursor, resumed=True."""
        with self.make(tmp_path / "s") as store:
            page = store.query(limit=115)  # down to seq 5
            assert page.records[-1].seq == 5 and page.next_cursor
            assert store.apply_retention(RetentionPolicy(max_age="1d")) >= 2
            nxt = store.query(limit=5, cursor=page.next_cursor)
            assert (nxt.records, nxt.next_cursor, nxt.resumed) == ([], None, True)

    def test_newest_first_unaffected(self, tmp_path: Path) -> None:
        """Newest-first whose position survives keeps paging through the survivors, resumed=False."""
        with self.make(tmp_path / "s") as store:
            page = store.query(limit=10)
            store.apply_retention(RetentionPolicy(max_bytes=_bytes_without_first(store)))
            oldest = next(store.scan()).seq
            got: list[StoredRecord] = []
            cursor = page.next_cursor
            while cursor:
                nxt = store.query(limit=20, cursor=cursor)
                assert not nxt.resumed
                got.extend(nxt.records)
                cursor = nxt.next_cursor
            assert seqs(got) == list(range(109, oldest - 1, -1))


def _first_base_after(store: AuditStore, number: int) -> int:
    """The base seq of the segment after segment ``number``."""
    path = Path(store.root) / "log" / f"seg-{number + 1:010d}.log"
    return int(struct.unpack_from("<Q", path.read_bytes(), 8)[0])


def _bytes_without_first(store: AuditStore) -> int:
    """A max_bytes that makes retention remove exactly the first segment."""
    segs = segments(Path(store.root))
    return sum(p.stat().st_size for p in segs[1:])


# ---------------------------------------------------------------------------- sidecars


SKIP_N = 6000


@pytest.fixture(scope="module")
def skip_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A store of N records in ~100 segments, ts rising 1 ms per record with jitter."""
    rng = random.Random(7)
    root = tmp_path_factory.mktemp("skip") / "s"
    events = [event(i, rng, ts=T0 + i * 1000 + rng.randrange(-1500, 1500)) for i in range(SKIP_N)]
    build(root, events, limit=6000)
    assert len(segments(root)) >= 90
    return root


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A closed store of sealed segments with several sparse-index entries each."""
    rng = random.Random(11)
    root = tmp_path_factory.mktemp("pristine") / "s"
    events = [event(i, rng, ts=T0 + i * 1000 + rng.randrange(-3000, 3000)) for i in range(4000)]
    build(root, events, limit=80_000)
    assert len(sidecars(root)) >= 3
    for side in sidecars(root):
        assert len(orjson.loads(side.read_bytes())["index"]) >= 3
    return root


@pytest.fixture(scope="module")
def baseline(pristine: Path) -> dict[int, Any]:
    """Per victim segment (first or last sealed): its ts span and the untouched store's results."""
    out: dict[int, Any] = {}
    segs = segments(pristine)
    for victim in (0, -1):
        # [-1] is the active segment: use the last sealed one
        seg = segs[victim - 1 if victim < 0 else victim]
        with AuditStore.open_reader(pristine) as r:
            recs = [x for x in r.scan() if _base(seg) <= x.seq < _base(seg) + _count(pristine, seg)]
        span = (min(x.ts for x in recs), max(x.ts for x in recs) + 1)
        want, want_report, rebuilt = TestSidecarFalsification.results(pristine, span)
        assert want_report.ok and rebuilt == 0
        out[victim] = (seg, span, want, want_report)
    return out


class TestSidecarsSkipSegments:
    """Segments whose time span misses since/until are not opened (``segments_opened``)."""

    N = SKIP_N

    def needed(self, skip_root: Path, since: int, until: int) -> int:
        """How many segments hold a record in [since, until), from the records themselves."""
        with AuditStore.open_reader(skip_root) as r:
            by_seg: dict[int, list[int]] = {}
            bases = [struct.unpack_from("<Q", p.read_bytes(), 8)[0] for p in segments(skip_root)]
            for rec in r.scan():
                k = max(i for i, b in enumerate(bases) if b <= rec.seq)
                by_seg.setdefault(k, []).append(rec.ts)
        return sum(1 for tss in by_seg.values() if any(since <= t < until for t in tss))

    @pytest.mark.parametrize("newest_first", [True, False])
    def test_one_percent_range(self, skip_root: Path, newest_first: bool) -> None:
        """A range covering ~1% of the data opens at most 2 segments beyond those holding matches."""
        since, until = T0 + 3000 * 1000, T0 + 3060 * 1000
        need = self.needed(skip_root, since, until)
        with AuditStore.open_reader(skip_root) as r:
            r.query(since=T0 + 100 * 1000, until=T0 + 101 * 1000)  # warm: spans checked once per reader
            before = r.segments_opened
            page = r.query(since=since, until=until, limit=10_000, newest_first=newest_first)
            opened = r.segments_opened - before
            assert page.next_cursor is None
            assert len(page.records) == len(expected(r, since=since, until=until))
        assert need >= 1 and opened <= need + 2, (opened, need)

    def test_writer_skips_too(self, skip_root: Path, tmp_path: Path) -> None:
        """The writer's queries skip segments the same way."""
        copy = tmp_path / "w"
        shutil.copytree(skip_root, copy)
        since, until = T0 + 5000 * 1000, T0 + 5050 * 1000
        need = self.needed(copy, since, until)
        with AuditStore.open(StoreConfig(root=copy, max_segment_bytes=6000, sync="os")) as w:
            w.query(since=T0, until=T0 + 1)
            before = w.segments_opened
            page = w.query(since=since, until=until, limit=10_000)
            opened = w.segments_opened - before
            assert len(page.records) == len(expected(w, since=since, until=until))
            assert opened <= need + 2

    def test_out_of_range_opens_nothing(self, skip_root: Path) -> None:
        """A range before or after all data opens no segment once spans are known."""
        with AuditStore.open_reader(skip_root) as r:
            r.query(since=T0 - 10**9, until=T0 - 10**9 + 1)
            before = r.segments_opened
            assert r.query(since=T0 + 10**12).records == []
            assert r.query(until=T0 - 10**6).records == []
            assert r.segments_opened - before <= 1  # at most the active segment


class TestNewestPageReadsLastBlocks:
    """A newest-first page of 100 starts from the sparse index, not from a walk of the whole store."""

    def test_reads_little(self, tmp_path: Path) -> None:
        """On a store of big sealed segments, a newest-first page reads a small fraction of the bytes."""
        root = tmp_path / "s"
        rng = random.Random(3)
        big = 400_000
        with AuditStore.open(StoreConfig(root=root, max_segment_bytes=big, sync="os")) as w:
            i = 0
            while len(segments(root)) < 4:
                w.append_batch([event(j, rng) for j in range(i, i + 500)])
                i += 500
            total = i
        store_bytes = sum(p.stat().st_size for p in segments(root))
        layer = CountingLayer()
        with AuditStore.open_reader(root, file_layer=layer) as r:
            page = r.query(limit=100)
            assert seqs(page.records) == list(range(total - 1, total - 101, -1))
            assert r.segments_opened <= 2
            first = layer.segment_bytes
            page2 = r.query(limit=100, cursor=page.next_cursor)
            assert seqs(page2.records) == list(range(total - 101, total - 201, -1))
        active = segments(root)[-1].stat().st_size
        # the active segment is read once (a reader scans it), then a few index blocks
        assert first <= active + 4 * 256 * 400 + 4096, (first, store_bytes)
        assert first < store_bytes / 5

    def test_writer_page_reads_one_block(self, tmp_path: Path) -> None:
        """The writer knows its active segment's index: a page of 100 reads about one block."""
        root = tmp_path / "s"
        layer = CountingLayer()
        config = StoreConfig(root=root, max_segment_bytes=1_000_000, sync="os", file_layer=layer)
        with AuditStore.open(config) as w:
            w.append_batch([event(j) for j in range(3000)])
            layer.segment_bytes = 0
            page = w.query(limit=100)
            assert seqs(page.records) == list(range(2999, 2899, -1))
            assert w.segments_opened == 1
            assert layer.segment_bytes <= 2 * 256 * 200


@dataclass(frozen=True)
class Falsify:
    """One way of damaging a sidecar."""

    name: str
    apply: Callable[[Path, Path], object]  # (sidecar, its segment)


def _edit(
    change: Callable[[dict[str, Any], Path], object], fix_crc: bool = True
) -> Callable[[Path, Path], object]:
    def run(side: Path, seg: Path) -> None:
        rewrite_sidecar(side, lambda body: change(body, seg), fix_crc=fix_crc)

    return run


def _shift_offsets(body: dict[str, Any], seg: Path, by: int) -> None:
    offsets = frame_offsets(seg)
    for entry in body["index"][1:]:
        entry[1] = offsets[offsets.index(entry[1]) + by]


def _copy_other(side: Path, seg: Path) -> None:
    others = [p for p in sidecars(side.parent.parent) if p != side]
    side.write_bytes(others[0].read_bytes())


FALSIFICATIONS = [
    Falsify("deleted", lambda side, seg: side.unlink()),
    Falsify("empty", lambda side, seg: side.write_bytes(b"")),
    Falsify("truncated", lambda side, seg: side.write_bytes(side.read_bytes()[: side.stat().st_size // 2])),
    Falsify("garbage", lambda side, seg: side.write_bytes(os.urandom(200))),
    Falsify("not an object", lambda side, seg: side.write_bytes(b"[1, 2, 3]")),
    Falsify("count+1 bad crc", _edit(lambda b, s: b.update(count=b["count"] + 1), fix_crc=False)),
    Falsify("count-1", _edit(lambda b, s: b.update(count=b["count"] - 1))),
    Falsify("count+1", _edit(lambda b, s: b.update(count=b["count"] + 1))),
    Falsify("count-stride", _edit(lambda b, s: b.update(count=b["count"] - STRIDE, index=b["index"][:-1]))),
    Falsify("count 0", _edit(lambda b, s: b.update(count=0, index=[]))),
    Falsify("min_ts raised", _edit(lambda b, s: b.update(min_ts=b["max_ts"]))),
    Falsify("max_ts lowered", _edit(lambda b, s: b.update(max_ts=b["min_ts"]))),
    Falsify("span moved away", _edit(lambda b, s: b.update(min_ts=1, max_ts=2))),
    Falsify("span swapped", _edit(lambda b, s: b.update(min_ts=b["max_ts"], max_ts=b["min_ts"]))),
    Falsify("span none", _edit(lambda b, s: b.update(min_ts=None, max_ts=None))),
    Falsify("offsets +1 frame", _edit(lambda b, s: _shift_offsets(b, s, 1))),
    Falsify("offsets -1 frame", _edit(lambda b, s: _shift_offsets(b, s, -1))),
    Falsify("offset mid-frame", _edit(lambda b, s: b["index"][-1].__setitem__(1, b["index"][-1][1] + 3))),
    Falsify("index seqs shifted", _edit(lambda b, s: [e.__setitem__(0, e[0] + 1) for e in b["index"][1:]])),
    Falsify("index entry dropped", _edit(lambda b, s: b["index"].pop(1))),
    Falsify(
        "index entries swapped", _edit(lambda b, s: b.update(index=[b["index"][0], *b["index"][1:][::-1]]))
    ),
    Falsify("length", _edit(lambda b, s: b.update(length=b["length"] - 10))),
    Falsify("base_index", _edit(lambda b, s: b.update(base_index=b["base_index"] + 1))),
    Falsify("other segment's", _copy_other),
]

QUERIES: list[dict[str, Any]] = [
    {},
    {"newest_first": False},
    {"where": {"actor": "bob"}},
    {"where": {"actor": "carol"}, "newest_first": False},
    {"min_levelno": 40, "logger_prefix": "app"},
    {"contains": "update"},
]


class TestSidecarFalsification:
    """Deleting, truncating or falsifying a sidecar changes no query result and no verify result."""

    @staticmethod
    def results(root: Path, span: tuple[int, int]) -> Any:
        """Everything observable through a fresh reader: queries (with time ranges), pages, verify."""
        out: list[Any] = []
        with AuditStore.open_reader(root) as r:
            for q in QUERIES:
                out.append([(x.seq, x.raw) for x in all_pages(r, limit=97, **q)])
                out.append([(x.seq, x.raw) for x in r.query(limit=250, **q).records])
            for newest_first in (True, False):
                for since, until in [span, (span[0], span[0] + 40_000), (span[1] - 40_000, span[1])]:
                    got = all_pages(r, limit=50, since=since, until=until, newest_first=newest_first)
                    out.append([(x.seq, x.raw) for x in got])
            for start in (0, 1, 700, 1500, 3999):
                out.append([x.seq for x in r.scan(start)][:5])
                out.append([x.seq for x in r.scan(start, reverse=True)][:5])
            report = r.verify()
            rebuilt = r.sidecars_rebuilt
        return out, report, rebuilt

    @pytest.mark.parametrize("victim", [0, -1])
    @pytest.mark.parametrize("how", FALSIFICATIONS, ids=lambda f: f.name)
    def test_no_result_changes(
        self, pristine: Path, baseline: dict[int, Any], tmp_path: Path, how: Falsify, victim: int
    ) -> None:
        """A damaged or lying sidecar (first or last sealed segment) is rebuilt or ignored: same results."""
        seg, span, want, want_report = baseline[victim]
        root = tmp_path / "s"
        shutil.copytree(pristine, root)
        how.apply(root / "log" / seg.with_suffix(".idx").name, root / "log" / seg.name)
        got, report, rebuilt = self.results(root, span)
        assert got == want
        assert (report.ok, report.tree_size, report.root, report.problems, report.pending) == (
            want_report.ok,
            want_report.tree_size,
            want_report.root,
            want_report.problems,
            want_report.pending,
        )
        assert rebuilt >= 1, "the falsified sidecar was used without being noticed"

    def test_every_sidecar_deleted(self, pristine: Path, tmp_path: Path) -> None:
        """With no sidecar at all, results are the same and each sealed segment is rebuilt once per reader."""
        want, want_report, rebuilt0 = self.results(pristine, (T0, T0 + 10**9))
        assert rebuilt0 == 0
        root = tmp_path / "s"
        shutil.copytree(pristine, root)
        for side in sidecars(root):
            side.unlink()
        got, report, rebuilt = self.results(root, (T0, T0 + 10**9))
        assert got == want and report == want_report
        assert rebuilt == len(segments(root)) - 1

    def test_writer_ignores_lying_sidecar(self, pristine: Path, tmp_path: Path) -> None:
        """The writer's own queries are not fooled by a lying sidecar either."""
        root = tmp_path / "s"
        shutil.copytree(pristine, root)
        side = sidecars(root)[1]
        rewrite_sidecar(side, lambda b: b.update(min_ts=1, max_ts=2))
        body = orjson.loads(side.read_bytes())
        lo, hi = body["index"][0][0], body["index"][0][0] + body["count"]
        with AuditStore.open_reader(pristine) as r:
            want = [x.seq for x in r.scan() if lo <= x.seq < hi][:5]
            tss = sorted(x.ts for x in r.scan() if x.seq in want)
        with AuditStore.open(StoreConfig(root=root, max_segment_bytes=80_000, sync="os")) as w:
            got = w.query(since=tss[0], until=tss[-1] + 1, newest_first=False, limit=10_000).records
            assert set(want) <= {x.seq for x in got}


def _base(seg: Path) -> int:
    """A segment's base seq, from its header."""
    return int(struct.unpack_from("<Q", seg.read_bytes(), 8)[0])


def _count(root: Path, seg: Path) -> int:
    """How many records a sealed segment holds (the next segment's base minus its own)."""
    segs = segments(root)
    return _base(segs[segs.index(seg) + 1]) - _base(seg)
