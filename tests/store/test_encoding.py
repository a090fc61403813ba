"""Tests of quipu_logging.store._encode: event normalisation and the exact payload bytes.

The vectors below are the format's encoding test vectors (DESIGN §4): each input event,
encoded with ``seq=7`` and ``now_us=1000``, must give exactly the bytes written next to
it. Changing any of them changes the on-disk format.
"""

from __future__ import annotations

import collections
import copy
import datetime
import decimal
import enum
import math
import pathlib
import sys
import types
import uuid
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from quipu_logging.store._encode import encode_event, encode_system, normalise

MARKERS = frozenset(
    {
        "$bytes",
        "$cycle",
        "$depth",
        "$displaced",
        "$lossy",
        "$naive",
        "$repr",
        "$sys",
        "$truncated",
        "$unrepresentable",
    }
)
TYPICAL: dict[str, Any] = {
    "action": "update",
    "actor": "alice",
    "level": "INFO",
    "levelno": 20,
    "logger": "app.audit",
    "message": "user alice updated doc",
    "process": 4242,
    "source": {"file": "app.py", "func": "save", "line": 88},
    "target": "doc-42",
    "thread": "MainThread",
    "ts": 1764779926123456,
}

# ------------------------------------------------------------------ helper types


class Thing:
    """An object with a plain repr."""

    def __repr__(self) -> str:
        return "<Thing>"


class BadRepr:
    """An object whose repr raises."""

    def __repr__(self) -> str:
        raise ValueError("no repr")


class BaseBoom(BaseException):
    """A BaseException that is neither KeyboardInterrupt nor SystemExit."""


class BaseBadRepr:
    """An object whose repr raises a BaseException."""

    def __repr__(self) -> str:
        raise BaseBoom


class Holder:
    """Namespace for a nested class (its qualname has a dot)."""

    class Inner:
        """Nested class whose repr raises."""

        def __repr__(self) -> str:
            raise RuntimeError("no")


class Named:
    """An object whose repr is given text (used as a key)."""

    def __init__(self, text: str) -> None:
        self.text = text

    def __repr__(self) -> str:
        return self.text


class Liar:
    """An object claiming to be a dict through ``__class__``."""

    @property  # type: ignore[misc]
    def __class__(self) -> type:
        return dict

    def __repr__(self) -> str:
        return "Liar()"


class Sub(str):
    """A str subclass."""


class FloatSub(float):
    """A float subclass."""


class Level(enum.IntEnum):
    """An int enum."""

    WARN = 30


class Colour(enum.Enum):
    """A plain enum with assorted values."""

    RED = "red"
    PAIR = (1, 2)
    WHEN = datetime.date(2026, 1, 2)


class Mode(str, enum.Enum):
    """A str-mixin enum."""

    FAST = "fast"


class Perm(enum.Flag):
    """A non-int flag."""

    R = 4
    W = 2


class ItemsRaise(Mapping[str, Any]):
    """A Mapping whose items() raises."""

    def __getitem__(self, key: str) -> Any:
        return 1

    def __iter__(self) -> Iterator[str]:
        return iter(["a"])

    def __len__(self) -> int:
        return 1

    def items(self) -> Any:
        raise OSError("items")

    def __repr__(self) -> str:
        return "ItemsRaise()"


class Touchy:
    """Hashable, but comparing it in any way raises."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __hash__(self) -> int:
        return self.n

    def __eq__(self, other: object) -> bool:
        raise TypeError("no ==")

    def __lt__(self, other: object) -> bool:
        raise TypeError("no <")

    def __repr__(self) -> str:
        return f"Touchy({self.n})"


class IterRaiseSet(set[Any]):
    """A set subclass whose iteration raises."""

    def __iter__(self) -> Iterator[Any]:
        raise RuntimeError("no iter")

    def __repr__(self) -> str:
        return "IterRaiseSet()"


class DupItems(Mapping[str, Any]):
    """A Mapping whose items() yields the same key twice."""

    def __getitem__(self, key: str) -> Any:
        return 1

    def __iter__(self) -> Iterator[str]:
        return iter(["a"])

    def __len__(self) -> int:
        return 1

    def items(self) -> Any:
        return [("a", 1), ("a", 2), ("ts", 3), ("ts", 4)]


Point = collections.namedtuple("Point", "x y")
UTC = datetime.timezone.utc
IST = datetime.timezone(datetime.timedelta(hours=5, minutes=30))


def in_lists(levels: int, inner: Any) -> Any:
    """``inner`` wrapped in ``levels`` lists."""
    for _ in range(levels):
        inner = [inner]
    return inner


def in_dicts(levels: int, inner: Any) -> Any:
    """``inner`` wrapped in ``levels`` dicts ``{"d": ...}``."""
    for _ in range(levels):
        inner = {"d": inner}
    return inner


def self_list() -> list[Any]:
    """A list that contains itself."""
    value: list[Any] = []
    value.append(value)
    return value


def self_event() -> dict[str, Any]:
    """An event that contains itself."""
    event: dict[str, Any] = {"a": 1}
    event["self"] = event
    return event


def deep_cycle() -> dict[str, Any]:
    """A cycle two levels down: d -> [x] -> d."""
    d: dict[str, Any] = {"k": 1}
    d["l"] = [d]
    return {"d": d}


def shared() -> dict[str, Any]:
    """The same list reached three times without a cycle."""
    s = [1, {"k": "v"}]
    return {"a": s, "b": [s, s]}


# (id, builder of the event, expected payload) with seq=7 and now_us=1000.
VECTORS: list[tuple[str, Callable[[], Mapping[Any, Any]], bytes | None]] = [
    # typical
    (
        "typical_audit_record",
        lambda: dict(TYPICAL),
        b'{"action":"update","actor":"alice","level":"INFO","levelno":20,"logger":"app.audit",'
        b'"message":"user alice updated doc","process":4242,"seq":7,'
        b'"source":{"file":"app.py","func":"save","line":88},"target":"doc-42","thread":"MainThread",'
        b'"ts":1764779926123456}',
    ),
    ("empty_event", dict, b'{"seq":7,"ts":1000}'),
    # keys
    ("key_int", lambda: {1: "a", -5: "b"}, b'{"-5":"b","1":"a","seq":7,"ts":1000}'),
    ("key_bool", lambda: {True: "t", False: "f"}, b'{"false":"f","seq":7,"true":"t","ts":1000}'),
    ("key_none", lambda: {None: 1}, b'{"null":1,"seq":7,"ts":1000}'),
    (
        "key_float",
        lambda: {1.5: 1, -0.0: 2, 1e100: 3, FloatSub(2.0): 4},
        b'{"-0.0":2,"1.5":1,"1e+100":3,"2.0":4,"seq":7,"ts":1000}',
    ),
    (
        "key_float_nonfinite",
        lambda: {math.nan: 1, math.inf: 2, -math.inf: 3},
        b'{"-Infinity":3,"Infinity":2,"NaN":1,"seq":7,"ts":1000}',
    ),
    (
        "key_big_int",
        lambda: {2**70: 1, -(2**70): 2},
        b'{"-1180591620717411303424":2,"1180591620717411303424":1,"seq":7,"ts":1000}',
    ),
    ("key_int_enum", lambda: {Level.WARN: "w"}, b'{"30":"w","seq":7,"ts":1000}'),
    ("key_str_subclass", lambda: {Sub("k"): 1}, b'{"k":1,"seq":7,"ts":1000}'),
    ("key_tuple_repr", lambda: {(1, "a"): 1}, b'{"(1, \'a\')":1,"seq":7,"ts":1000}'),
    ("key_bytes_repr", lambda: {b"k": 1}, b'{"b\'k\'":1,"seq":7,"ts":1000}'),
    ("key_object_repr", lambda: {Thing(): 1}, b'{"<Thing>":1,"seq":7,"ts":1000}'),
    (
        "key_repr_raises",
        lambda: {BadRepr(): 1, Holder.Inner(): 2},
        b'{"BadRepr":1,"Holder.Inner":2,"seq":7,"ts":1000}',
    ),
    ("key_collision_int_then_str", lambda: {1: "a", "1": "b"}, b'{"1":"a","1#2":"b","seq":7,"ts":1000}'),
    ("key_collision_str_then_int", lambda: {"1": "b", 1: "a"}, b'{"1":"b","1#2":"a","seq":7,"ts":1000}'),
    (
        "key_collision_three_way",
        lambda: {1: "a", "1": "b", Named("1"): "c"},
        b'{"1":"a","1#2":"b","1#3":"c","seq":7,"ts":1000}',
    ),
    (
        "key_collision_first_free_suffix",
        lambda: {"1#2": "x", 1: "a", "1": "b"},
        b'{"1":"a","1#2":"x","1#3":"b","seq":7,"ts":1000}',
    ),
    (
        "key_collision_suffix_taken_later",
        lambda: {1: "a", "1": "b", "1#2": "c"},
        b'{"1":"a","1#2":"b","1#2#2":"c","seq":7,"ts":1000}',
    ),
    (
        "key_collision_nested",
        lambda: {"n": {None: 1, "null": 2}},
        b'{"n":{"null":1,"null#2":2},"seq":7,"ts":1000}',
    ),
    (
        "key_text_ts_seq_is_not_the_timestamp",
        lambda: {Named("ts"): 1, Named("seq"): 2},
        b'{"seq":7,"seq#2":2,"ts":1000,"ts#2":1}',
    ),
    # reserved $
    (
        "dollar_keys_top",
        lambda: {"$x": 1, "$$x": 2, "$": 3, "a$": 4},
        b'{"$$":3,"$$$x":2,"$$x":1,"a$":4,"seq":7,"ts":1000}',
    ),
    (
        "dollar_marker_names_are_escaped",
        lambda: {"$sys": "x", "$lossy": 1, "$displaced": 2, "$bytes": 3},
        b'{"$$bytes":3,"$$displaced":2,"$$lossy":1,"$$sys":"x","seq":7,"ts":1000}',
    ),
    (
        "dollar_keys_at_depth",
        lambda: {"a": [{"$x": {"$y": [{"$sys": 1}]}}]},
        b'{"a":[{"$$x":{"$$y":[{"$$sys":1}]}}],"seq":7,"ts":1000}',
    ),
    ("dollar_key_from_repr", lambda: {Named("$sys"): 1}, b'{"$$sys":1,"seq":7,"ts":1000}'),
    ("dollar_collision", lambda: {"$x": 1, Named("$x"): 2}, b'{"$$x":1,"$$x#2":2,"seq":7,"ts":1000}'),
    # surrogates
    (
        "surrogate_in_value",
        lambda: {"s": "a\ud800b"},
        b'{"$lossy":true,"s":"a\xef\xbf\xbdb","seq":7,"ts":1000}',
    ),
    ("surrogate_in_key", lambda: {"\udc80k": 1}, b'{"$lossy":true,"seq":7,"ts":1000,"\xef\xbf\xbdk":1}'),
    (
        "surrogate_deep_value",
        lambda: {"l": [[{"k": "\udfff"}]]},
        b'{"$lossy":true,"l":[[{"k":"\xef\xbf\xbd"}]],"seq":7,"ts":1000}',
    ),
    (
        "surrogate_pair_code_units",
        lambda: {"s": "\ud83d\ude00"},
        b'{"$lossy":true,"s":"\xef\xbf\xbd\xef\xbf\xbd","seq":7,"ts":1000}',
    ),
    (
        "surrogate_key_collision",
        lambda: {"a\ud800": 1, "a\udfff": 2},  # noqa: F601 (distinct keys; ruff conflates surrogates)
        b'{"$lossy":true,"a\xef\xbf\xbd":1,"a\xef\xbf\xbd#2":2,"seq":7,"ts":1000}',
    ),
    (
        "surrogate_in_repr",
        lambda: {"o": Named("x\ud800")},
        b'{"$lossy":true,"o":{"$repr":"x\xef\xbf\xbd"},"seq":7,"ts":1000}',
    ),
    (
        "non_ascii_is_not_lossy",
        lambda: {"h\u00e9": "\u20ac \U0001d11e \u4e2d"},
        b'{"h\xc3\xa9":"\xe2\x82\xac \xf0\x9d\x84\x9e \xe4\xb8\xad","seq":7,"ts":1000}',
    ),
    ("str_subclass_value", lambda: {"s": Sub("plain")}, b'{"s":"plain","seq":7,"ts":1000}'),
    # ints
    (
        "int_boundaries",
        lambda: {"a": 2**63 - 1, "b": 2**63, "c": -(2**63), "d": -(2**63) - 1},
        b'{"a":9223372036854775807,"b":"9223372036854775808","c":-9223372036854775808,"d":"-9223372036854775809","seq":7,"ts":1000}',
    ),
    (
        "int_enum_and_bool",
        lambda: {"e": Level.WARN, "t": True, "f": False, "n": None},
        b'{"e":30,"f":false,"n":null,"seq":7,"t":true,"ts":1000}',
    ),
    ("int_huge", lambda: {"big": 10**4300}, b'{"big":{"$unrepresentable":"int"},"seq":7,"ts":1000}'),
    # floats
    (
        "float_nonfinite",
        lambda: {"nan": math.nan, "inf": math.inf, "ninf": -math.inf},
        b'{"inf":"Infinity","nan":"NaN","ninf":"-Infinity","seq":7,"ts":1000}',
    ),
    (
        "float_plain",
        lambda: {"a": 1.5, "b": -0.0, "c": 1e300, "d": FloatSub(0.25)},
        b'{"a":1.5,"b":-0.0,"c":1e+300,"d":0.25,"seq":7,"ts":1000}',
    ),
    (
        "float_wide_same_on_every_orjson",
        lambda: {"s": {1e16, 1e-7, 2.0}, "t": (-1.5e300, 9999999999999998.0, 1.2345678901234568e17)},
        b'{"s":[1e+16,1e-7,2.0],"seq":7,"t":[-1.5e+300,9999999999999998.0,1.2345678901234568e+17],"ts":1000}',
    ),
    # bytes
    (
        "bytes_like",
        lambda: {"b": b"\x00\xff\xfe", "e": b"", "ba": bytearray(b"a"), "mv": memoryview(b"ab")},
        b'{"b":{"$bytes":"AP/+"},"ba":{"$bytes":"YQ=="},"e":{"$bytes":""},"mv":{"$bytes":"YWI="},"seq":7,"ts":1000}',
    ),
    # containers
    (
        "tuple_and_namedtuple",
        lambda: {"t": (1, (2, 3)), "p": Point(1, 2)},
        b'{"p":[1,2],"seq":7,"t":[1,[2,3]],"ts":1000}',
    ),
    (
        "mappings",
        lambda: {"o": collections.OrderedDict(b=1, a=2), "m": types.MappingProxyType({"x": [1]})},
        b'{"m":{"x":[1]},"o":{"a":2,"b":1},"seq":7,"ts":1000}',
    ),
    ("set_of_ints", lambda: {"s": {10, 9, 1}}, b'{"s":[1,10,9],"seq":7,"ts":1000}'),
    (
        "set_mixed_types",
        lambda: {"s": {None, "x", 10, 9, 2.5, (1, 2), frozenset({"z"}), b"q", Level.WARN}},
        # sorted by each item's own bytes: '"' < '1' < '2' < '3' < '9' < '[' < 'n' < '{'
        b'{"s":["x",10,2.5,30,9,["z"],[1,2],null,{"$bytes":"cQ=="}],"seq":7,"ts":1000}',
    ),
    (
        "set_items_never_compared",
        lambda: {"s": {Touchy(2), Touchy(1), "a"}, Touchy(3): 1},
        b'{"Touchy(3)":1,"s":["a",{"$repr":"Touchy(1)"},{"$repr":"Touchy(2)"}],"seq":7,"ts":1000}',
    ),
    (
        "set_iteration_raises",
        lambda: {"s": IterRaiseSet([1])},
        b'{"s":{"$repr":"IterRaiseSet()"},"seq":7,"ts":1000}',
    ),
    ("frozenset_empty", lambda: {"s": frozenset()}, b'{"s":[],"seq":7,"ts":1000}'),
    # dates and other leaves
    (
        "datetime_aware_utc",
        lambda: {"t": datetime.datetime(2026, 12, 3, 18, 22, 50, 123456, tzinfo=UTC)},
        b'{"seq":7,"t":"2026-12-03T18:22:50.123456Z","ts":1000}',
    ),
    (
        "datetime_aware_offset",
        lambda: {"t": datetime.datetime(2026, 12, 4, 0, 0, 0, tzinfo=IST)},
        b'{"seq":7,"t":"2026-12-03T18:30:00.000000Z","ts":1000}',
    ),
    (
        "datetime_naive",
        lambda: {"t": datetime.datetime(2026, 12, 3, 18, 22, 50, 123456)},
        b'{"seq":7,"t":{"$naive":"2026-12-03T18:22:50.123456"},"ts":1000}',
    ),
    (
        "date_and_time",
        lambda: {
            "d": datetime.date(33, 1, 2),
            "t": datetime.time(1, 2, 3),
            "tz": datetime.time(1, 2, 3, 4, tzinfo=UTC),
        },
        b'{"d":"0033-01-02","seq":7,"t":"01:02:03","ts":1000,"tz":"01:02:03.000004+00:00"}',
    ),
    (
        "uuid_decimal_path",
        lambda: {
            "u": uuid.UUID(int=255),
            "d": decimal.Decimal("1.10"),
            "n": decimal.Decimal("-NaN"),
            "p": pathlib.PurePosixPath("/var/log/a b"),
        },
        b'{"d":"1.10","n":"-NaN","p":"/var/log/a b","seq":7,"ts":1000,'
        b'"u":"00000000-0000-0000-0000-0000000000ff"}',
    ),
    (
        "enums",
        lambda: {"c": Colour.RED, "p": Colour.PAIR, "w": Colour.WHEN, "m": Mode.FAST, "f": Perm.R | Perm.W},
        b'{"c":"red","f":6,"m":"fast","p":[1,2],"seq":7,"ts":1000,"w":"2026-01-02"}',
    ),
    # depth
    (
        "depth_64_kept",
        lambda: {"v": in_lists(63, [])},
        b'{"seq":7,"ts":1000,"v":' + b"[" * 64 + b"]" * 64 + b"}",
    ),
    (
        "depth_65_marked",
        lambda: {"v": in_lists(64, [])},
        b'{"seq":7,"ts":1000,"v":' + b"[" * 64 + b'{"$depth":"list"}' + b"]" * 64 + b"}",
    ),
    (
        "depth_dicts_64_kept",
        lambda: in_dicts(65, 1),
        b'{"d":' * 65 + b"1" + b"}" * 64 + b',"seq":7,"ts":1000}',
    ),
    (
        "depth_dicts_65_marked",
        lambda: in_dicts(66, 1),
        b'{"d":' * 65 + b'{"$depth":"dict"}' + b"}" * 64 + b',"seq":7,"ts":1000}',
    ),
    (
        "depth_marker_names_type",
        lambda: {"v": in_lists(64, collections.OrderedDict(a=1))},
        b'{"seq":7,"ts":1000,"v":' + b"[" * 64 + b'{"$depth":"OrderedDict"}' + b"]" * 64 + b"}",
    ),
    (
        "depth_leaf_markers_not_limited",
        lambda: {"v": in_lists(64, b"x")},
        b'{"seq":7,"ts":1000,"v":' + b"[" * 64 + b'{"$bytes":"eA=="}' + b"]" * 64 + b"}",
    ),
    # cycles
    ("cycle_self_list", lambda: {"l": self_list()}, b'{"l":[{"$cycle":true}],"seq":7,"ts":1000}'),
    ("cycle_event_contains_itself", self_event, b'{"a":1,"self":{"$cycle":true},"seq":7,"ts":1000}'),
    ("cycle_two_levels", deep_cycle, b'{"d":{"k":1,"l":[{"$cycle":true}]},"seq":7,"ts":1000}'),
    (
        "shared_reference_rendered_twice",
        shared,
        b'{"a":[1,{"k":"v"}],"b":[[1,{"k":"v"}],[1,{"k":"v"}]],"seq":7,"ts":1000}',
    ),
    # other objects
    ("repr_object", lambda: {"o": Thing()}, b'{"o":{"$repr":"<Thing>"},"seq":7,"ts":1000}'),
    (
        "repr_raises",
        lambda: {"o": BadRepr(), "b": BaseBadRepr(), "n": Holder.Inner()},
        b'{"b":{"$unrepresentable":"BaseBadRepr"},"n":{"$unrepresentable":"Holder.Inner"},"o":{"$unrepresentable":"BadRepr"},"seq":7,"ts":1000}',
    ),
    ("lying_class_is_repr", lambda: {"o": Liar()}, b'{"o":{"$repr":"Liar()"},"seq":7,"ts":1000}'),
    ("mapping_items_raise", lambda: {"m": ItemsRaise()}, b'{"m":{"$repr":"ItemsRaise()"},"seq":7,"ts":1000}'),
    ("top_mapping_items_raise", ItemsRaise, b'{"$repr":"ItemsRaise()","seq":7,"ts":1000}'),
    (
        "top_mapping_proxy",
        lambda: types.MappingProxyType({"ts": 5, "$x": [1]}),
        b'{"$$x":[1],"seq":7,"ts":5}',
    ),
    ("top_mapping_duplicate_keys", DupItems, b'{"a":1,"a#2":2,"seq":7,"ts":3,"ts#2":4}'),
    # ts and seq
    ("ts_int_used", lambda: {"ts": 1764779926123456}, b'{"seq":7,"ts":1764779926123456}'),
    ("ts_zero_used", lambda: {"ts": 0}, b'{"seq":7,"ts":0}'),
    ("ts_int_enum_used", lambda: {"ts": Level.WARN}, b'{"seq":7,"ts":30}'),
    (
        "ts_aware_datetime_used",
        lambda: {"ts": datetime.datetime(2026, 1, 1, tzinfo=UTC)},
        b'{"seq":7,"ts":1767225600000000}',
    ),
    ("ts_str_displaced", lambda: {"ts": "yesterday"}, b'{"$displaced":{"ts":"yesterday"},"seq":7,"ts":1000}'),
    ("ts_bool_displaced", lambda: {"ts": True}, b'{"$displaced":{"ts":true},"seq":7,"ts":1000}'),
    ("ts_float_displaced", lambda: {"ts": 1.5}, b'{"$displaced":{"ts":1.5},"seq":7,"ts":1000}'),
    ("ts_negative_displaced", lambda: {"ts": -1}, b'{"$displaced":{"ts":-1},"seq":7,"ts":1000}'),
    (
        "ts_too_big_displaced",
        lambda: {"ts": 2**63},
        b'{"$displaced":{"ts":"9223372036854775808"},"seq":7,"ts":1000}',
    ),
    (
        "ts_naive_displaced",
        lambda: {"ts": datetime.datetime(2026, 1, 1)},
        b'{"$displaced":{"ts":{"$naive":"2026-01-01T00:00:00.000000"}},"seq":7,"ts":1000}',
    ),
    (
        "ts_pre_epoch_displaced",
        lambda: {"ts": datetime.datetime(1969, 12, 31, 23, 59, 59, tzinfo=UTC)},
        b'{"$displaced":{"ts":"1969-12-31T23:59:59.000000Z"},"seq":7,"ts":1000}',
    ),
    ("ts_none_displaced", lambda: {"ts": None}, b'{"$displaced":{"ts":null},"seq":7,"ts":1000}'),
    (
        "ts_container_displaced",
        lambda: {"ts": [1, {"$x": 2}]},
        b'{"$displaced":{"ts":[1,{"$$x":2}]},"seq":7,"ts":1000}',
    ),
    ("seq_displaced", lambda: {"seq": 99}, b'{"$displaced":{"seq":99},"seq":7,"ts":1000}'),
    (
        "ts_and_seq_displaced",
        lambda: {"seq": "x", "ts": "y", "v": 1},
        b'{"$displaced":{"seq":"x","ts":"y"},"seq":7,"ts":1000,"v":1}',
    ),
    ("ts_subclass_key", lambda: {Sub("ts"): 5, Sub("seq"): 6}, b'{"$displaced":{"seq":6},"seq":7,"ts":5}'),
]


def encode(event: Mapping[Any, Any], seq: int = 7, now_us: int = 1000) -> bytes:
    """The payload of ``event``."""
    return encode_event(event, seq=seq, now_us=now_us)[0]


def dict_keys_everywhere(value: Any) -> Iterator[tuple[int, str]]:
    """Every dict key in a decoded payload with its depth, walked without recursion."""
    stack: list[tuple[Any, int]] = [(value, 0)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, dict):
            for key, child in node.items():
                yield depth, key
                stack.append((child, depth + 1))
        elif isinstance(node, list):
            stack.extend((child, depth + 1) for child in node)


# ---------------------------------------------------------------- strategies

odd_text = st.text(
    alphabet=st.sampled_from(["a", "$", "#", "1", "\ud800", "\udfff", "\u00e9", "\U0001d11e", "\x00"])
    | st.characters(exclude_categories=()),
    max_size=8,
) | st.sampled_from(["ts", "seq", "$sys", "$lossy", "$$x", "1", "1#2", "null", "true"])
leaf_objects = st.one_of(
    [st.builds(cls) for cls in (Thing, BadRepr, BaseBadRepr, Liar, ItemsRaise, Holder.Inner)]
)
hashable_leaves = st.one_of(
    odd_text,
    st.integers(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.booleans(),
    st.none(),
    st.floats(allow_nan=True, allow_infinity=True),
    st.binary(max_size=6),
    st.dates(),
    st.datetimes(timezones=st.none() | st.just(UTC) | st.just(IST)),
    st.times(),
    st.uuids(),
    st.decimals(allow_nan=False),
    st.sampled_from([Level.WARN, Colour.RED, Colour.PAIR, Colour.WHEN, Mode.FAST, Perm.R]),
    st.builds(Thing),
    st.builds(BadRepr),
    st.builds(Named, odd_text),
    st.tuples(odd_text, st.integers()),
)
odd_keys = st.one_of(
    odd_text,
    st.integers(min_value=-(2**80), max_value=2**80),
    st.booleans(),
    st.none(),
    st.floats(allow_nan=True),
    st.binary(max_size=3),
    st.builds(Named, odd_text),
    st.builds(BadRepr),
    st.tuples(st.integers(0, 3), odd_text),
)
values = st.recursive(
    st.one_of(hashable_leaves, leaf_objects, st.builds(bytearray, st.binary(max_size=4)), st.decimals()),
    lambda children: st.one_of(
        st.lists(children, max_size=4),
        st.lists(children, max_size=4).map(tuple),
        st.dictionaries(odd_keys, children, max_size=4),
        st.dictionaries(odd_text, children, max_size=4).map(collections.OrderedDict),
        st.frozensets(hashable_leaves, max_size=4),
        st.sets(hashable_leaves, max_size=4),
    ),
    max_leaves=30,
)
events = st.dictionaries(odd_keys, values, max_size=8)
plain_keys = st.text(alphabet=st.characters(codec="utf-8"), max_size=6)


# ------------------------------------------------------------------- tests


class TestEncodingVectors:
    """encode_event against the fixed vectors."""

    @pytest.mark.parametrize(("build", "expected"), [v[1:] for v in VECTORS], ids=[v[0] for v in VECTORS])
    def test_vector(self, build: Callable[[], Mapping[Any, Any]], expected: bytes) -> None:
        """The event encodes to exactly the vector's bytes."""
        assert encode(build()) == expected

    def test_vector_ids_are_unique(self) -> None:
        """Every vector has its own name."""
        names = [v[0] for v in VECTORS]
        assert len(names) == len(set(names))

    def test_returned_ts_is_the_stored_ts(self) -> None:
        """encode_event returns the ts the payload carries."""
        for _name, build, _expected in VECTORS:
            payload, ts = encode_event(build(), seq=7, now_us=1000)
            assert orjson.loads(payload)["ts"] == ts

    def test_int_of_4300_digits_is_kept(self) -> None:
        """An int of exactly 4300 digits is stored as its decimal text; 4301 is not."""
        assert encode({"v": 10**4300 - 1}) == b'{"seq":7,"ts":1000,"v":"' + b"9" * 4300 + b'"}'
        assert encode({"v": -(10**4300) + 1}) == b'{"seq":7,"ts":1000,"v":"-' + b"9" * 4300 + b'"}'
        assert encode({"v": 10**4300}) == b'{"seq":7,"ts":1000,"v":{"$unrepresentable":"int"}}'

    @pytest.mark.skipif(not hasattr(sys, "set_int_max_str_digits"), reason="no int digit limit")
    def test_big_int_ignores_process_digit_limit(self) -> None:
        """The process's int-to-str limit does not change the bytes."""
        value = {"v": 7 * 10**1000 + 3, 10**700: 1}
        expected = encode(value)
        old = sys.get_int_max_str_digits()
        sys.set_int_max_str_digits(640)
        try:
            assert encode(value) == expected
        finally:
            sys.set_int_max_str_digits(old)
        assert orjson.loads(expected)["v"] == str(7 * 10**1000 + 3)


class TestEncodeSystem:
    """encode_system: the only producer of $sys records."""

    def test_retention_record(self) -> None:
        """A retention record has the documented shape and sorted keys."""
        payload = encode_system("retention", {"removed_below": 5}, seq=10, ts=99)
        assert payload == b'{"$sys":"retention","removed_below":5,"seq":10,"ts":99}'

    def test_gap_record(self) -> None:
        """Field values are normalised; field keys are not escaped."""
        payload = encode_system(
            "gap", {"count": 3, "reason": "crash", "range": (4, 6), "detail": {"$x": math.nan}}, seq=1, ts=2
        )
        assert payload == (
            b'{"$sys":"gap","count":3,"detail":{"$$x":"NaN"},"range":[4,6],"reason":"crash","seq":1,"ts":2}'
        )

    def test_lossy_field(self) -> None:
        """A surrogate in a field value marks the system record lossy."""
        payload = encode_system("gap", {"reason": "\ud800"}, seq=1, ts=2)
        assert payload == b'{"$lossy":true,"$sys":"gap","reason":"\xef\xbf\xbd","seq":1,"ts":2}'

    @pytest.mark.parametrize("key", ["$sys", "seq", "ts"])
    def test_reserved_field_refused(self, key: str) -> None:
        """Fields may not override $sys, seq or ts."""
        with pytest.raises(ValueError, match="reserved"):
            encode_system("gap", {key: 1}, seq=1, ts=2)

    def test_non_str_kind_or_key_refused(self) -> None:
        """A kind or field name that is not a str is a programming error."""
        with pytest.raises(TypeError):
            encode_system(1, {}, seq=1, ts=2)  # type: ignore[arg-type]
        with pytest.raises(TypeError):
            encode_system("gap", {1: 1}, seq=1, ts=2)  # type: ignore[dict-item]

    def test_user_event_cannot_forge_it(self) -> None:
        """The same content as a user event keeps its $sys key escaped."""
        payload = encode({"$sys": "retention", "removed_below": 5}, seq=10, now_us=99)
        assert payload == b'{"$$sys":"retention","removed_below":5,"seq":10,"ts":99}'


class TestNormalise:
    """normalise used on its own."""

    def test_scalars(self) -> None:
        """Plain JSON scalars come back as themselves, not lossy."""
        for value in ["x", 1, 1.5, True, None]:
            assert normalise(value) == (value, False)

    def test_top_level_is_depth_zero(self) -> None:
        """A list passed alone is the top level: 64 more levels fit, the 65th is marked."""
        assert normalise(in_lists(64, []))[0] == in_lists(64, [])
        assert normalise(in_lists(65, []))[0] == in_lists(65, {"$depth": "list"})

    def test_lossy_flag(self) -> None:
        """The flag says whether a surrogate was replaced."""
        assert normalise({"k": ["\udc80"]}) == ({"k": ["\ufffd"]}, True)
        assert normalise({"k": ["\u00e9"]}) == ({"k": ["\u00e9"]}, False)

    def test_keys_escaped(self) -> None:
        """Keys are stringified and escaped as in an event; there is no ts/seq handling."""
        assert normalise({"$a": 1, 2: 3, "ts": "x", "seq": None}) == (
            {"$$a": 1, "2": 3, "ts": "x", "seq": None},
            False,
        )

    def test_result_is_plain(self) -> None:
        """Every node of the result is one of the seven plain JSON types, exactly."""
        result, _ = normalise([TYPICAL, {Thing(): {1, 2}, "d": datetime.date(2020, 1, 1)}, Colour.PAIR])
        stack = [result]
        while stack:
            node = stack.pop()
            assert type(node) in (dict, list, str, int, float, bool, type(None))
            if type(node) is dict:
                assert all(type(k) is str for k in node)
                stack.extend(node.values())
            elif type(node) is list:
                stack.extend(node)


class TestEncodeEvent:
    """encode_event's contract outside the vectors."""

    def test_non_mapping_refused(self) -> None:
        """Only a non-mapping event raises, with TypeError."""
        for bad in [[("a", 1)], "abc", None, 5, Liar()]:
            with pytest.raises(TypeError):
                encode_event(bad, seq=1, now_us=2)  # type: ignore[arg-type]

    def test_event_not_modified(self) -> None:
        """The caller's event is left exactly as it was."""
        event = {"ts": "bad", "seq": 3, "$x": {"$y": [b"b", {1, 2}]}, 1: "one", "s": "\ud800"}
        before = copy.deepcopy(event)
        encode(event)
        assert event == before

    def test_plain_nested_ts_key_does_not_leak_to_top(self) -> None:
        """A "ts" seen first in a nested dict is still the timestamp at the top level."""
        assert encode({"n": {"ts": 1, "seq": 2}}) == b'{"n":{"seq":2,"ts":1},"seq":7,"ts":1000}'
        assert encode({"ts": "bad"}) == b'{"$displaced":{"ts":"bad"},"seq":7,"ts":1000}'

    def test_many_distinct_keys(self) -> None:
        """More distinct keys than the plain-key cache holds still encode exactly."""
        event = {f"k{i}": i for i in range(10_000)}
        assert orjson.loads(encode(event)) == {**event, "seq": 7, "ts": 1000}
        again = {f"k{i}": {f"k{i}": i} for i in range(5_000)}
        assert orjson.loads(encode(again)) == {**again, "seq": 7, "ts": 1000}

    def test_many_colliding_keys(self) -> None:
        """Many keys with the same text take consecutive suffixes."""
        event = {Named("k"): i for i in range(2_000)}
        decoded = orjson.loads(encode(event))
        assert decoded["k"] == 0
        assert decoded["k#2000"] == 1999

    def test_event_mutated_while_encoding(self) -> None:
        """A value whose repr adds keys to the event being encoded does not break it."""
        event: dict[str, Any] = {}

        class Grower:
            def __repr__(self) -> str:
                event["added"] = 1
                return "Grower"

        event["g"] = Grower()
        event["z"] = 2
        assert encode(event) == b'{"added":1,"g":{"$repr":"Grower"},"seq":7,"ts":1000,"z":2}'

    def test_keyboard_interrupt_propagates(self) -> None:
        """KeyboardInterrupt raised by a repr is not swallowed."""

        class Interrupt:
            def __repr__(self) -> str:
                raise KeyboardInterrupt

        with pytest.raises(KeyboardInterrupt):
            encode({"v": Interrupt()})

    def test_released_memoryview(self) -> None:
        """A released memoryview is an object like any other, rendered by repr."""
        view = memoryview(b"abc")
        view.release()
        decoded = orjson.loads(encode({"v": view}))
        assert decoded["v"]["$repr"].startswith("<released memory")

    def test_datetime_out_of_range_after_offset(self) -> None:
        """An aware datetime whose UTC time is before year 1 falls back to repr."""
        early = datetime.datetime(1, 1, 1, tzinfo=IST)
        decoded = orjson.loads(encode({"v": early, "ts": early}))
        assert decoded["v"] == {"$repr": repr(early)}
        assert decoded["$displaced"] == {"ts": {"$repr": repr(early)}}


class TestDeepNesting:
    """Nesting far deeper than Python's recursion limit."""

    @pytest.mark.parametrize(
        "wrap",
        [
            lambda x: [x],
            lambda x: (x,),
            lambda x: {"k": x},
            lambda x: frozenset([x]),
            lambda x: collections.OrderedDict(k=x),
            lambda x: types.MappingProxyType({"k": x}),
        ],
        ids=["list", "tuple", "dict", "frozenset", "ordereddict", "mappingproxy"],
    )
    def test_ten_thousand_levels(self, wrap: Callable[[Any], Any]) -> None:
        """A 10,000-deep value encodes, cut off with a $depth marker at depth 65."""
        value: Any = 0
        for _ in range(10_000):
            value = wrap(value)
        decoded = orjson.loads(encode({"v": value}))
        node, depth = decoded["v"], 1
        while not (isinstance(node, dict) and "$depth" in node):
            node = node["k"] if isinstance(node, dict) else node[0]
            depth += 1
        assert depth == 65

    def test_ten_thousand_levels_as_event(self) -> None:
        """The event itself may be 10,000 dicts deep."""
        event: dict[str, Any] = {}
        for _ in range(10_000):
            event = {"k": event}
        payload = encode(event)
        assert payload.count(b'"$depth":"dict"') == 1

    def test_ten_thousand_levels_in_key_and_ts(self) -> None:
        """A 10,000-deep tuple as a key (repr fails) and as ts (displaced) encodes."""
        deep: Any = ()
        for _ in range(10_000):
            deep = (deep,)
        decoded = orjson.loads(encode({deep: 1, "ts": deep}))
        assert "ts" in decoded and "$displaced" in decoded

    def test_ten_thousand_cycles_wide(self) -> None:
        """A wide list of self-referencing lists is all cycles, no recursion."""
        loops = []
        for _ in range(10_000):
            loop: list[Any] = []
            loop.append(loop)
            loops.append(loop)
        decoded = orjson.loads(encode({"v": loops}))
        assert decoded["v"] == [[{"$cycle": True}]] * 10_000


class TestEncodingProperties:
    """Invariants over arbitrary events (Hypothesis)."""

    @settings(max_examples=200)
    @given(event=events, seq=st.integers(0, 2**63 - 1), now_us=st.integers(0, 2**63 - 1))
    def test_never_raises_and_is_valid_json(self, event: dict[Any, Any], seq: int, now_us: int) -> None:
        """Any event encodes to a JSON object carrying the given seq and an int ts."""
        payload, ts = encode_event(event, seq=seq, now_us=now_us)
        decoded = orjson.loads(payload)
        assert type(decoded) is dict
        assert decoded["seq"] == seq
        assert decoded["ts"] == ts
        assert type(ts) is int and 0 <= ts < 2**63

    @settings(max_examples=200)
    @given(event=events)
    def test_deterministic(self, event: dict[Any, Any]) -> None:
        """The same event, or a deep copy of it, gives the same bytes every time."""
        first = encode(event)
        assert encode(event) == first
        assert encode(copy.deepcopy(event)) == first

    @settings(max_examples=200)
    @given(data=st.data(), items=st.dictionaries(plain_keys, values, max_size=8))
    def test_insertion_order_irrelevant_for_str_keys(
        self, data: st.DataObject, items: dict[str, Any]
    ) -> None:
        """With string keys, reordering the event's keys changes nothing."""
        shuffled = data.draw(st.permutations(list(items.items())))
        assert encode(dict(shuffled)) == encode(items)

    @settings(max_examples=200)
    @given(event=events)
    def test_only_markers_are_unescaped(self, event: dict[Any, Any]) -> None:
        """A user event never yields an unescaped $ key but the markers, and never $sys."""
        for _depth, key in dict_keys_everywhere(orjson.loads(encode(event))):
            if key.startswith("$") and not key.startswith("$$"):
                assert key in MARKERS
                assert key != "$sys"

    @settings(max_examples=200)
    @given(event=events)
    def test_lossy_iff_surrogates_replaced(self, event: dict[Any, Any]) -> None:
        """$lossy appears exactly when normalise reports a surrogate replaced."""
        decoded = orjson.loads(encode(event))
        _, lossy = normalise(event)
        assert ("$lossy" in decoded) == lossy

    @settings(max_examples=200)
    @given(value=values)
    def test_normalise_output_is_what_is_stored(self, value: Any) -> None:
        """normalise gives the tree that, under key "v", the payload holds."""
        normalised, _ = normalise(value)
        decoded = orjson.loads(encode({"v": value}))
        assert orjson.dumps(decoded["v"], option=orjson.OPT_SORT_KEYS) == orjson.dumps(
            normalised, option=orjson.OPT_SORT_KEYS
        )


class TestLibraryMarkers:
    def test_marker_key_is_stored_unescaped_and_user_key_is_escaped(self) -> None:
        """Only a library Marker key is written as '$truncated'; the user's own '$truncated' is escaped."""
        from quipu_logging.store._encode import Marker

        payload, _ = encode_event({Marker("$truncated"): {"f": 9}, "x": {"$truncated": 1}}, seq=0, now_us=5)
        assert payload == b'{"$truncated":{"f":9},"seq":0,"ts":5,"x":{"$$truncated":1}}'
        user, _ = encode_event({"$truncated": 1}, seq=0, now_us=5)
        assert user == b'{"$$truncated":1,"seq":0,"ts":5}'

    def test_marker_refuses_sys_and_plain_names(self) -> None:
        """A Marker must start with '$' and can never be '$sys'."""
        from quipu_logging.store._encode import Marker

        for bad in ("$sys", "truncated", ""):
            with pytest.raises(ValueError, match="not a library marker"):
                Marker(bad)
