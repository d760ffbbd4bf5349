"""CPU time and memory of a process and its descendants, read from /proc (Linux only)."""

from __future__ import annotations

import os
from pathlib import Path

_PROC = Path("/proc")
_TICKS = os.sysconf("SC_CLK_TCK")
_KIB = 1024


def tree(pid: int) -> list[int]:
    """`pid` and every live descendant (forked workers, nginx workers)."""
    found, queue = [], [pid]
    while queue:
        current = queue.pop()
        found.append(current)
        try:
            tasks = list((_PROC / str(current) / "task").iterdir())
        except OSError:
            continue
        for task in tasks:
            try:
                children = (task / "children").read_text()
            except OSError:
                continue
            queue.extend(int(child) for child in children.split())
    return found


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds consumed so far by `pid` and its descendants."""
    ticks = 0
    for member in tree(pid):
        try:
            stat = (_PROC / str(member) / "stat").read_text()
        except OSError:
            continue
        # The command name (field 2) may contain spaces; fields after it are fixed.
        fields = stat.rsplit(")", 1)[1].split()
        ticks += int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15)
    return ticks / _TICKS


def _status(pid: int, field: str) -> int:
    try:
        lines = (_PROC / str(pid) / "status").read_text().splitlines()
    except OSError:
        return 0
    for line in lines:
        if line.startswith(field + ":"):
            return int(line.split()[1]) * _KIB
    return 0


def rss_bytes(pid: int) -> int:
    """Resident set size of `pid` and its descendants (shared pages counted per process)."""
    return sum(_status(member, "VmRSS") for member in tree(pid))


def peak_rss_bytes(pid: int) -> int:
    """High-water resident set size (VmHWM) summed over `pid` and its descendants."""
    return sum(_status(member, "VmHWM") for member in tree(pid))


def reset_peak_rss(pid: int) -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0, clear_refs 5); False when not allowed."""
    done = True
    for member in tree(pid):
        try:
            (_PROC / str(member) / "clear_refs").write_text("5")
        except OSError:
            done = False
    return done
