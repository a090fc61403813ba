#!/usr/bin/env python3
"""Read-side benchmark of quipu_logging: queries, checkpoints, verification, retention.

    python bench/read.py [--records N] [--repeat R] [--quick] [--check] [--json FILE] [--dir PARENT]

(``python bench/store.py --read ...`` runs the same thing.) One command, one markdown
table. It builds one store of ``--records`` records (default 1,000,000) with 1 MiB
segments and an Ed25519 signing key (``append_batch`` of 10,000 under ``sync=os``; not
timed), about 50 actors, and ``ts`` spread evenly over a known range with a little
jitter (so neighbouring segments overlap in time, as they do when threads log
concurrently). Then, ``--repeat`` times, round-robin with the order rotating:

* one actor's records, every page (``query(where={"actor": ...})``, pages of 100,
  newest first), without and with a time range covering 1% of the data;
* a newest-first page of 100 with no filter: on a reader opened just before (the first
  query pays for reading the segment descriptions) and again on that warm reader;
* a time range covering 1% of the data in one page, on a reader opened just before and
  again on that reader: ``store.segments_opened`` against the segments whose
  ``[min_ts, max_ts]`` overlaps the range, computed here from the records' known ``ts``
  and the segment files' headers (not from the store's sidecars);
* ``checkpoint()`` with the signing key (sign, append, fsync), 20 per repetition;
* ``verify(public_keys=[...])`` of the whole store (every record, every signed
  checkpoint), and the signature checks of the checkpoint chain alone.

Last, on the same store, ``apply_retention(RetentionPolicy(max_bytes=...))`` with a size
chosen to remove exactly 10 segments, ``--repeat`` times (each removes the next 10
oldest), then one ``verify`` that must pass.

Goals (PASS/FAIL; ``--check`` exits 1 when one fails): the unfiltered newest-first page of
100 under 50 ms (on a reader opened just before); the 1% time range opens at most 2
segments beyond those it needs.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import struct
import sys
import tempfile
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import import_package, load_average, log, machine_info, print_table

import_package()

from quipu_logging import AuditStore, RetentionPolicy, StoreConfig  # noqa: E402
from quipu_logging.store._checkpoint import check_signature, load_public_keys, parse_checkpoint_lines  # noqa: E402

BUILD_BATCH = 10_000
SEGMENT = "1MiB"
ACTORS = [f"user-{k:02d}" for k in range(50)]
T0 = 1_735_689_600_000_000  # 2025-01-01T00:00:00Z, µs
STEP = 100_000  # 0.1 s between records on average
JITTER = 2_000_000  # +-2 s: records arrive slightly out of order
PAGE = 100
CHECKPOINTS_PER_REP = 20
RETAIN_SEGMENTS = 10
GOAL_PAGE_MS = 50.0
GOAL_EXTRA_SEGMENTS = 2
_perf = time.perf_counter


def plural(k: int, word: str) -> str:
    return f"{k:,} {word}" + ("" if k == 1 else "s")


def make_record(i: int, ts: int) -> dict[str, Any]:
    actor = ACTORS[i % len(ACTORS)]
    return {
        "actor": actor,
        "action": "update",
        "target": f"doc-{i}",
        "level": "INFO",
        "levelno": 20,
        "logger": "app.audit",
        "message": f"{actor} updated doc-{i}",
        "process": 4242,
        "thread": "MainThread",
        "source": {"file": "app.py", "func": "save", "line": 88},
        "ts": ts,
    }


def write_keys(directory: str) -> tuple[str, bytes]:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    key = Ed25519PrivateKey.generate()
    private_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    public_pem = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    path = os.path.join(directory, "signing-key.pem")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(private_pem)
    return path, public_pem


def segment_bases(root: str) -> list[tuple[str, int]]:
    """(file name, base seq) of every segment, oldest first, read from the files' own headers."""
    log_dir = os.path.join(root, "log")
    out = []
    for name in sorted(x for x in os.listdir(log_dir) if x.endswith(".log")):
        with open(os.path.join(log_dir, name), "rb") as f:
            header = f.read(16)
        magic, _version, _pad, base = struct.unpack("<4sB3sQ", header)
        if magic != b"QLOG":
            raise SystemExit(f"{name}: not a segment")
        out.append((name, base))
    return out


def segment_spans(root: str, ts_of: list[int], size: int) -> list[tuple[int, int]]:
    """[min_ts, max_ts] of every segment, from the known ts of each seq."""
    bases = [b for _, b in segment_bases(root)]
    spans = []
    for k, base in enumerate(bases):
        end = bases[k + 1] if k + 1 < len(bases) else size
        if end > base:
            chunk = ts_of[base:end]
            spans.append((min(chunk), max(chunk)))
    return spans


def all_pages(store: AuditStore, **kw: Any) -> tuple[int, int]:
    """Pages through a query; returns (records, pages)."""
    n = pages = 0
    cursor = None
    while True:
        page = store.query(cursor=cursor, limit=PAGE, **kw)
        n += len(page.records)
        pages += 1
        cursor = page.next_cursor
        if cursor is None:
            return n, pages


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="quipu_logging read-side benchmark: prints one markdown table.")
    p.add_argument(
        "--records", type=int, default=None, help="records in the store (default 1,000,000; --quick 100,000)"
    )
    p.add_argument("--repeat", type=int, default=5, help="repetitions per figure (default 5)")
    p.add_argument("--quick", action="store_true", help="small sizes for a fast smoke run")
    p.add_argument(
        "--dir", default=None, help="parent directory of the temporary store (default: the current directory)"
    )
    p.add_argument("--json", default=None, help="also write every sample to this file")
    p.add_argument("--check", action="store_true", help="exit with status 1 when a goal fails")
    args = p.parse_args(argv)
    if args.records is None:
        args.records = 100_000 if args.quick else 1_000_000
    if args.records < 50_000 or args.repeat < 1:
        p.error("--records must be >= 50,000 (retention needs 11 segments) and --repeat >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = _perf()
    parent = os.path.abspath(args.dir or os.getcwd())
    os.makedirs(parent, exist_ok=True)
    work = tempfile.mkdtemp(prefix="quipu-bench-read-", dir=parent)
    try:
        import cryptography

        info = machine_info(parent, {"cryptography": cryptography.__version__})
        return _main(args, work, info, started)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _main(args: argparse.Namespace, work: str, info: dict[str, str], started: float) -> int:
    n = args.records
    reps = args.repeat
    med = statistics.median
    key_path, public_pem = write_keys(work)
    keys = [public_pem]
    root = os.path.join(work, "store")

    # ---- build (not timed as a row)
    rng = random.Random(20240601)
    ts_of = [T0 + i * STEP + rng.randint(-JITTER, JITTER) for i in range(n)]
    log(f"building the store: {n:,} records, {SEGMENT} segments, signed checkpoints ...")
    t0 = _perf()
    config = StoreConfig(root=root, sync="os", max_segment_bytes=SEGMENT, signing_key=key_path)
    store = AuditStore.open(config)
    for start in range(0, n, BUILD_BATCH):
        store.append_batch([make_record(i, ts_of[i]) for i in range(start, min(n, start + BUILD_BATCH))])
    store.close()
    build_s = _perf() - t0
    segs = segment_bases(root)
    seg_bytes = sum(os.path.getsize(os.path.join(root, "log", name)) for name, _ in segs)
    spans = segment_spans(root, ts_of, n)
    span_lo, span_hi = T0, T0 + n * STEP
    # 1% of the data, in the middle of the range.
    since = T0 + (n // 2) * STEP
    until = since + (n // 100) * STEP
    needed = sum(1 for lo, hi in spans if hi >= since and lo < until)
    in_range = sum(1 for t in ts_of if since <= t < until)
    actor = ACTORS[7]
    actor_total = sum(1 for i in range(n) if i % len(ACTORS) == 7)
    actor_in_range = sum(1 for i in range(n) if i % len(ACTORS) == 7 and since <= ts_of[i] < until)
    log(f"built in {build_s:.1f} s: {len(segs)} segments; 1% range needs {needed} segments")

    samples: dict[str, list[float]] = {
        k: []
        for k in (
            "actor_all",
            "actor_range",
            "open_reader",
            "page_first",
            "page_warm",
            "range_page",
            "range_again",
            "checkpoint",
            "verify",
            "signatures",
        )
    }
    opened: dict[str, list[int]] = {
        k: [] for k in ("actor_all", "actor_range", "range_page", "range_again", "page_first")
    }
    pages: dict[str, int] = {}
    checkpoints_seen: list[int] = []

    def run_actor_all() -> None:
        r = AuditStore.open_reader(root)
        try:
            r.query(limit=1)  # the segment descriptions: measured in the page rows
            before = r.segments_opened
            t = _perf()
            got, npages = all_pages(r, where={"actor": actor})
            samples["actor_all"].append(_perf() - t)
            opened["actor_all"].append(r.segments_opened - before)
        finally:
            r.close()
        if got != actor_total:
            raise SystemExit(f"actor query returned {got}, expected {actor_total}")
        pages["actor_all"] = npages

    def run_actor_range() -> None:
        r = AuditStore.open_reader(root)
        try:
            r.query(limit=1)
            before = r.segments_opened
            t = _perf()
            got, npages = all_pages(r, where={"actor": actor}, since=since, until=until)
            samples["actor_range"].append(_perf() - t)
            opened["actor_range"].append(r.segments_opened - before)
        finally:
            r.close()
        if got != actor_in_range:
            raise SystemExit(f"actor + range query returned {got}, expected {actor_in_range}")
        pages["actor_range"] = npages

    def run_page() -> None:
        t = _perf()
        r = AuditStore.open_reader(root)
        t1 = _perf()
        try:
            page = r.query(limit=PAGE)
            t2 = _perf()
            opened["page_first"].append(r.segments_opened)
            warm = []
            for _ in range(5):
                t3 = _perf()
                again = r.query(limit=PAGE)
                warm.append(_perf() - t3)
        finally:
            r.close()
        if len(page.records) != PAGE or page.records[0].seq != n - 1 or again.records[0].seq != n - 1:
            raise SystemExit("newest-first page: wrong records")
        samples["open_reader"].append(t1 - t)
        samples["page_first"].append(t2 - t1)
        samples["page_warm"].append(med(warm))

    def run_range_page() -> None:
        r = AuditStore.open_reader(root)
        try:
            r.query(limit=1)
            for key in ("range_page", "range_again"):  # a fresh reader, then the same reader again
                before = r.segments_opened
                t = _perf()
                page = r.query(since=since, until=until, limit=n)
                samples[key].append(_perf() - t)
                opened[key].append(r.segments_opened - before)
                if len(page.records) != in_range or page.next_cursor is not None:
                    raise SystemExit(f"1% range returned {len(page.records)}, expected {in_range}")
        finally:
            r.close()

    def run_checkpoints() -> None:
        s = AuditStore.open(config)
        try:
            for _ in range(CHECKPOINTS_PER_REP):
                t = _perf()
                cp = s.checkpoint()
                samples["checkpoint"].append(_perf() - t)
                if not cp.signed:
                    raise SystemExit("checkpoint is not signed")
        finally:
            s.close()

    def run_verify() -> None:
        r = AuditStore.open_reader(root)
        try:
            t = _perf()
            report = r.verify(public_keys=keys)
            samples["verify"].append(_perf() - t)
        finally:
            r.close()
        if not report.ok or report.records_checked != n:
            raise SystemExit(
                f"verify: ok={report.ok}, {report.records_checked} records, {report.problems[:3]}"
            )
        # The checkpoint chain alone: parse every line, check every signature.
        with open(os.path.join(root, "checkpoints.jsonl"), "rb") as f:
            data = f.read()
        t = _perf()
        loaded = load_public_keys(keys)
        lines = parse_checkpoint_lines(data)[0]
        bad = [why for _, cp, _ in lines if cp is None or (why := check_signature(cp, loaded)) is not None]
        samples["signatures"].append(_perf() - t)
        if bad:
            raise SystemExit(f"checkpoint signatures: {bad[:3]}")
        checkpoints_seen.append(len(lines))

    jobs = [run_actor_all, run_actor_range, run_page, run_range_page, run_checkpoints, run_verify]
    for rep in range(reps):
        k = rep % len(jobs)
        for job in jobs[k:] + jobs[:k]:
            log(f"rep {rep + 1}/{reps}: {job.__name__[4:]} ...")
            job()

    # ---- retention: each repetition removes the next 10 oldest segments
    retention_s: list[float] = []
    removed_total = 0
    s = AuditStore.open(config)
    try:
        for rep in range(reps):
            names = [name for name, _ in segment_bases(root)]
            sizes = [os.path.getsize(os.path.join(root, "log", x)) for x in names]
            if len(sizes) <= RETAIN_SEGMENTS + 1:
                log(f"retention: only {len(sizes)} segments left, stopping after {rep} repetitions")
                break
            max_bytes = sum(sizes) - sum(sizes[:RETAIN_SEGMENTS])
            log(f"rep {rep + 1}/{reps}: retention of {RETAIN_SEGMENTS} segments ...")
            t = _perf()
            removed = s.apply_retention(RetentionPolicy(max_bytes=max_bytes))
            retention_s.append(_perf() - t)
            if removed != RETAIN_SEGMENTS:
                raise SystemExit(f"retention removed {removed} segments, expected {RETAIN_SEGMENTS}")
            removed_total += removed
    finally:
        s.close()
    r = AuditStore.open_reader(root)
    try:
        after = r.verify(public_keys=keys)
    finally:
        r.close()
    if not after.ok:
        raise SystemExit(f"verify after retention failed: {after.problems[:3]}")

    # ---- the table
    header = ["measurement", "records", "median", "unit", "min to max", "segments opened", "note"]
    rows: list[list[str]] = []

    def ms_row(label: str, records: str, note: str, seg: str = "", *, key: str, unit: str = "ms") -> None:
        vals = samples[key] if unit != "ms" else [x * 1000 for x in samples[key]]
        rows.append(
            [
                label,
                records,
                f"{med(vals):,.3f}" if unit != "s" else f"{med(vals):,.2f}",
                unit,
                f"{min(vals):,.3f} to {max(vals):,.3f}" if len(vals) > 1 else "",
                seg,
                note,
            ]
        )

    actor_rate = med(actor_total / x for x in samples["actor_all"])
    ms_row(
        f"one actor's records, all pages of {PAGE}, newest first",
        f"{actor_total:,}",
        f"{plural(pages['actor_all'], 'page')} (segments counted once per page that reads them); "
        f"{actor_rate:,.0f} matches/s, "
        f"{med(n / x for x in samples['actor_all']):,.0f} records scanned/s",
        f"{med(opened['actor_all']):,.0f}",
        unit="s",
        key="actor_all",
    )
    ms_row(
        f"one actor's records in a 1% time range, all pages of {PAGE}",
        f"{actor_in_range:,}",
        f"{plural(pages['actor_range'], 'page')}; the range needs {plural(needed, 'segment')}",
        f"{med(opened['actor_range']):,.0f}",
        key="actor_range",
    )
    ms_row(
        f"newest-first page of {PAGE}, no filter, reader opened just before",
        f"{PAGE}",
        f"the first query reads every segment's description; open_reader() itself "
        f"{med(samples['open_reader']) * 1000:.1f} ms (not included)",
        f"{med(opened['page_first']):,.0f}",
        key="page_first",
    )
    ms_row(
        f"newest-first page of {PAGE}, no filter, warm reader",
        f"{PAGE}",
        "median of 5 queries per repetition",
        key="page_warm",
    )
    ms_row(
        "1% time range (since/until), one page, reader opened just before",
        f"{in_range:,}",
        f"the range overlaps the [min_ts, max_ts] of {plural(needed, 'segment')}",
        f"{med(opened['range_page']):,.0f}",
        key="range_page",
    )
    ms_row(
        "1% time range, the same query again on that reader",
        f"{in_range:,}",
        "what the reader learnt about the segments during the first query is kept",
        f"{med(opened['range_again']):,.0f}",
        key="range_again",
    )
    ms_row(
        "checkpoint() signed with Ed25519",
        f"{n:,}",
        f"{CHECKPOINTS_PER_REP} per repetition; sync + sign + append + fsync",
        key="checkpoint",
    )
    verify_rates = [n / x for x in samples["verify"]]
    rows.append(
        [
            "verify(public_keys=[key]) of the whole store",
            f"{n:,}",
            f"{med(samples['verify']):,.2f}",
            "s",
            f"{min(samples['verify']):,.2f} to {max(samples['verify']):,.2f}",
            "",
            f"{med(verify_rates):,.0f} records/s; every record re-hashed, "
            f"{med(checkpoints_seen):,.0f} signed checkpoints checked",
        ]
    )
    per_cp = [x / c * 1e6 for x, c in zip(samples["signatures"], checkpoints_seen, strict=True)]
    ms_row(
        "checkpoint chain alone: parse + check every signature",
        f"{med(checkpoints_seen):,.0f} checkpoints",
        f"{med(per_cp):,.0f} µs per checkpoint",
        key="signatures",
    )
    retention_ms = [x * 1000 for x in retention_s] or [float("nan")]
    rows.append(
        [
            f"apply_retention(): {RETAIN_SEGMENTS} segments removed",
            f"{n:,}",
            f"{med(retention_ms):,.3f}",
            "ms",
            f"{min(retention_ms):,.3f} to {max(retention_ms):,.3f}" if len(retention_ms) > 1 else "",
            "",
            f"$sys record + signed checkpoint + unlinks; each repetition removes the next {RETAIN_SEGMENTS} "
            f"oldest ({len(retention_s)} repetitions, {removed_total} segments in all); "
            f"verify afterwards: {'ok' if after.ok else 'FAILED'}",
        ]
    )

    goals: list[dict[str, Any]] = []

    def goal(
        name: str, value: float, shown: str, threshold: float, ok: bool, rule: str, note: str = ""
    ) -> None:
        goals.append({"goal": name, "value": value, "threshold": threshold, "pass": ok, "rule": rule})
        verdict = f"**{'PASS' if ok else 'FAIL'}** ({rule}){'; ' + note if note else ''}"
        rows.append([f"**goal**: {name}", "", shown, "", "", "", verdict])

    pf = med(samples["page_first"]) * 1000
    at = "" if n >= 1_000_000 else f"measured at {n:,} records, the goal is at 1,000,000"
    goal(
        f"newest-first page of {PAGE}, no filter",
        pf,
        f"{pf:.3f} ms",
        GOAL_PAGE_MS,
        pf < GOAL_PAGE_MS,
        f"< {GOAL_PAGE_MS:g} ms",
        "; ".join(x for x in ("on a reader opened just before", at) if x),
    )
    extra = max(opened["range_page"]) - needed
    goal(
        "1% time range: segments opened beyond those needed",
        extra,
        f"{extra}",
        GOAL_EXTRA_SEGMENTS,
        extra <= GOAL_EXTRA_SEGMENTS,
        f"≤ {GOAL_EXTRA_SEGMENTS}",
        f"opened {max(opened['range_page'])}, needed {needed} (worst of the repetitions), on a reader "
        f"opened just before; on that reader again: {max(opened['range_again'])}",
    )

    total_s = _perf() - started
    print("## quipu_logging read-side benchmark (`bench/read.py`)")
    print()
    for k, v in info.items():
        print(f"- {k}: {v}")
    print(f"- settings: records={n:,}, repeat={reps}, segments of {SEGMENT}{', quick' if args.quick else ''}")
    print(
        f"- store: {len(segs)} segments, {seg_bytes / 1024**2:,.0f} MiB, built in {build_s:.1f} s "
        f"(append_batch({BUILD_BATCH:,}), sync=os, checkpoint signed at every seal); {len(ACTORS)} actors "
        f"round-robin; ts from {span_lo} to {span_hi} µs ({STEP / 1e6:g} s apart, ±{JITTER / 1e6:g} s jitter)"
    )
    print(
        f"- 1% range: since={since}, until={until}: {in_range:,} records; one actor: {actor!r}; "
        "segments opened = the reader's segments_opened counter during the timed query"
    )
    print(f"- medians of {reps} repetitions, round-robin; caches warm; readers take no lock")
    print(f"- load average at end: {load_average()}; total benchmark time: {total_s:.0f} s")
    print()
    print_table(header, rows, right={1, 2, 5})

    if args.json:
        out = {
            "machine": info,
            "settings": {"records": n, "repeat": reps, "segment": SEGMENT, "quick": args.quick},
            "store": {"segments": len(segs), "bytes": seg_bytes, "build_s": build_s, "needed_1pct": needed},
            "samples_s": samples,
            "segments_opened": opened,
            "retention_s": retention_s,
            "goals": goals,
            "total_s": total_s,
        }
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(out, f, indent=2)
            f.write("\n")
    failed = [g["goal"] for g in goals if not g["pass"]]
    if failed:
        log(f"goals failed: {', '.join(failed)}")
    return 1 if failed and args.check else 0


if __name__ == "__main__":
    sys.exit(main())
