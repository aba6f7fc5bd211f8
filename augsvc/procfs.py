"""Processes as Linux's /proc shows them: liveness, parent, descendants, start time, pid namespace,
CPU time and memory (the shared-memory segments a process created: `augsvc.shm.segments_of`).

A process that is gone (or a zombie, which has exited and only waits to be reaped) reads as not
alive, with no parent, no start time and no CPU time, so callers can poll without racing its exit.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

__all__ = ["alive", "cpu_seconds", "descendants", "mapped_files", "parent_of", "peak_rss_mb", "pid_namespace",
           "reset_peak_rss", "rss_mb", "start_time", "status_kb"]

#: Indices into the fields of /proc/<pid>/stat that follow the command name (field 3 is index 0).
_STATE, _PPID, _UTIME, _STIME, _STARTTIME = 0, 1, 11, 12, 19


def _stat_fields(pid: int) -> list[str] | None:
    """The fields of /proc/<pid>/stat after the command name; None when the process is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat[stat.rindex(")") + 2:].split()  # the command name may hold spaces and ')'


def _live_stat_fields(pid: int) -> list[str] | None:
    """As `_stat_fields`, with a zombie counted as gone."""
    fields = _stat_fields(pid)
    return fields if fields and fields[_STATE] != "Z" else None


def alive(pid: int) -> bool:
    """Whether `pid` is a live process (not gone, not a zombie)."""
    return _live_stat_fields(pid) is not None


def parent_of(pid: int) -> int | None:
    """The parent of a live process; None when it is gone or a zombie."""
    fields = _live_stat_fields(pid)
    return int(fields[_PPID]) if fields else None


def start_time(pid: int) -> int | None:
    """When a live process started, in clock ticks after boot (/proc/<pid>/stat field 22); None when
    it is gone or a zombie. A pid and its start time name one process: a pid used again later
    belongs to a process with another start time."""
    fields = _live_stat_fields(pid)
    return int(fields[_STARTTIME]) if fields else None


def mapped_files(folder: str) -> set[str]:
    """Names of the files in `folder` that some process this one can see has mapped
    (/proc/<pid>/maps; processes it may not read are skipped)."""
    prefix, names = folder.rstrip("/") + "/", set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/maps") as f:
                for line in f:
                    at = line.find(prefix)
                    if at >= 0:
                        names.add(line[at + len(prefix):].rstrip("\n").removesuffix(" (deleted)"))
        except OSError:
            continue
    return names


def pid_namespace() -> int | None:
    """The inode of this process's pid namespace (/proc/self/ns/pid); None where /proc cannot tell.
    Pids are only comparable between processes of one namespace."""
    try:
        return os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        return None


def descendants(pid: int) -> set[int]:
    """Live processes below `pid` (children, their children, ...), from one scan of /proc."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            parent = parent_of(int(entry))
            if parent is not None:
                children.setdefault(parent, []).append(int(entry))
    found: set[int] = set()
    todo = [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def cpu_seconds(pids: Iterable[int]) -> float:
    """User + system CPU time that the processes `pids` have used so far (not their children's;
    a process that is gone counts 0)."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for pid in pids:
        fields = _stat_fields(pid)
        if fields:
            total += (int(fields[_UTIME]) + int(fields[_STIME])) / tick
    return total


def status_kb(pid: int, key: str) -> int:
    """A numeric field of /proc/<pid>/status (VmRSS, VmHWM, RssShmem, Threads, ...); OSError when the
    process is gone, KeyError when the field is not there."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(f"{key} not in /proc/{pid}/status")


def rss_mb(pid: int) -> float:
    """Resident memory of a process, in MiB."""
    return status_kb(pid, "VmRSS") / 1024


def peak_rss_mb(pid: int) -> float:
    """Peak resident memory of a process since it started (or since `reset_peak_rss`), in MiB."""
    return status_kb(pid, "VmHWM") / 1024


def reset_peak_rss(pid: int) -> bool:
    """Reset a process's peak resident memory to its current one (Linux >= 4.0, for processes this
    user may write to); False where that is not possible."""
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
        return True
    except OSError:
        return False

