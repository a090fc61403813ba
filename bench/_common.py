"""Helpers shared by the benchmarks in bench/: machine information, percentiles, the table.

Not a public module; ``bench/emit.py`` and ``bench/read.py`` import it from their own
directory (Python puts a script's directory first on ``sys.path``).
"""

from __future__ import annotations

import datetime
import math
import os
import platform
import subprocess
import sys
from collections.abc import Sequence

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def import_package() -> None:
    """Makes ``quipu_logging`` importable: the installed package, PYTHONPATH, or this checkout."""
    try:
        import quipu_logging  # noqa: F401
    except ImportError:  # running from a bare checkout
        sys.path.insert(0, _REPO)


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def percentile(values: Sequence[float], q: float, *, presorted: bool = False) -> float:
    """The nearest-rank ``q`` quantile (0 < q <= 1) of ``values``."""
    ordered = values if presorted else sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


def filesystem_of(path: str) -> str:
    try:
        out = subprocess.run(
            ["df", "-T", path], capture_output=True, text=True, timeout=10, check=True
        ).stdout.splitlines()
        cols = out[-1].split()
        if len(cols) >= 7:
            return f"{cols[1]} (device {cols[0]}, mounted on {cols[-1]}, {int(cols[4]) // 1024**2} GiB free)"
    except (OSError, subprocess.SubprocessError, ValueError, IndexError):
        pass
    return "unknown"


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def load_average() -> str:
    try:
        return ", ".join(f"{x:.2f}" for x in os.getloadavg()) + " (1, 5, 15 min)"
    except OSError:
        return "unknown"


def machine_info(work_dir: str, extra: dict[str, str] | None = None) -> dict[str, str]:
    import quipu_logging

    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count() or 0
    info = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "platform": platform.platform(),
        "cpu": f"{cpu_model()}; {os.cpu_count()} CPUs ({usable} usable)",
        "filesystem": f"{work_dir}: {filesystem_of(work_dir)}",
        "quipu_logging": f"{getattr(quipu_logging, '__version__', '?')} from "
        f"{os.path.dirname(os.path.abspath(quipu_logging.__file__))}",
        "switch interval": f"{sys.getswitchinterval() * 1000:g} ms",
    }
    info.update(extra or {})
    info["load average at start"] = load_average()
    return info


def print_table(header: list[str], rows: list[list[str]], right: set[int]) -> None:
    """One markdown table, columns padded so the source reads as well as the rendering."""
    widths = [max(len(header[i]), *(len(r[i]) for r in rows)) for i in range(len(header))]

    def line(cells: list[str]) -> str:
        return (
            "| "
            + " | ".join(
                c.rjust(widths[i]) if i in right else c.ljust(widths[i]) for i, c in enumerate(cells)
            )
            + " |"
        )

    print(line(header))
    print(
        "|"
        + "|".join(("-" * (w + 1) + ":") if i in right else ("-" * (w + 2)) for i, w in enumerate(widths))
        + "|"
    )
    for r in rows:
        print(line(r))
    sys.stdout.flush()
