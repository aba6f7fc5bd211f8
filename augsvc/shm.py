"""POSIX shared-memory segments: created (and unlinked) by one process, attached by others.

This module owns the names. Every segment augsvc creates is
``augsvc_<creator pid>_<owner>_<random>_<tag>``, where ``<owner>`` is
``<start time>.<pid namespace>`` in hex: the creator's start (clock ticks after boot, from
/proc/<pid>/stat) and the inode of its pid namespace. A pid and its start time name one process,
even after the pid is used again, and the namespace says whose pids these are when containers
share /dev/shm. The creator registers each segment with multiprocessing's resource tracker,
which unlinks it if the creator dies without `release_segment(..., unlink=True)`; when the whole
process group is killed (an OOM kill, a supervisor's SIGKILL) the tracker dies too, and the next
server to start removes what is left (`sweep_stale_segments`; also the untagged names of
earlier versions whose creator is gone and which no process maps). Readers attach without registering
(see `attach_segment`) and never unlink. A client on the server's host may create
``augsvc_client_<pid>_<owner>_<random>_<tag>`` segments for the server to write replies into
(StreamBatchesRequest.shm_segments); names without ``<owner>`` (older clients) are still accepted.
"""

from __future__ import annotations

import contextlib
import hmac
import logging
import os
import re
import secrets
import stat
import sys
import threading
import warnings
from collections.abc import Sized
from multiprocessing import resource_tracker
from multiprocessing.shared_memory import SharedMemory
from typing import cast

import numpy as np

from .errors import LimitExceededError
from .procfs import alive, mapped_files, pid_namespace, start_time

__all__ = ["CLIENT_HEADER_BYTES", "CLIENT_SEGMENT_FORM", "CLIENT_SEGMENT_PREFIX", "CLIENT_TOKEN_BYTES",
           "SEGMENT_PREFIX", "SHM_DIR", "attach_segment", "client_pixels", "create_client_segment", "create_segment",
           "is_client_segment", "is_unlinked", "release_segment", "segments_of", "shm_free_bytes",
           "sweep_stale_segments", "unlink_segments_of", "usable_client_segment"]

log = logging.getLogger("augsvc.shm")

#: Every segment augsvc creates is named ``augsvc_<creator pid>_<owner>_<random>_<tag>``.
SEGMENT_PREFIX = "augsvc_"
#: Segments a client creates for the shared-memory reply path; a server writes into no others.
CLIENT_SEGMENT_PREFIX = SEGMENT_PREFIX + "client_"
#: The form of a client segment's name, for messages.
CLIENT_SEGMENT_FORM = CLIENT_SEGMENT_PREFIX + "<pid>_<start time>.<pid namespace>_<8 hex digits>_<tag>"
SHM_DIR = "/dev/shm"
_OWNER = r"(?P<start>[0-9a-f]{1,16})\.(?P<ns>[0-9a-f]{1,16})"
_CLIENT_NAME = re.compile(re.escape(CLIENT_SEGMENT_PREFIX)
                          + rf"[0-9]{{1,10}}_(?:{_OWNER}_)?[0-9a-f]{{8}}_[a-z]{{1,16}}")
_OWNED_NAME = re.compile(re.escape(SEGMENT_PREFIX) + rf"(?:client_)?(?P<pid>[0-9]{{1,10}})_{_OWNER}_[0-9a-f]{{8}}_\w+")
#: The names augsvc gave its segments before they carried an owner: the creator's pid only.
_UNTAGGED_NAME = re.compile(re.escape(SEGMENT_PREFIX) + r"(?:client_)?(?P<pid>[0-9]{1,10})_[0-9a-f]{8}_\w+")


def is_client_segment(name: str) -> bool:
    """True for names `create_segment(..., client=True)` makes (never a server's own segment)."""
    return _CLIENT_NAME.fullmatch(name) is not None


_owner_tags: dict[int, str] = {}


def _owner_tag() -> str:
    """``_<start time>.<pid namespace>`` of this process ('' where /proc cannot tell)."""
    pid = os.getpid()
    if pid not in _owner_tags:
        started, ns = start_time(pid), pid_namespace()
        _owner_tags[pid] = "" if started is None or ns is None else f"_{started:x}.{ns:x}"
    return _owner_tags[pid]


def segments_of(pid: int) -> set[str]:
    """Names of the segments in /dev/shm that process `pid` created (a server's, not a client's)."""
    prefix = f"{SEGMENT_PREFIX}{pid}_"
    return {name for name in os.listdir(SHM_DIR) if name.startswith(prefix)}


def unlink_segments_of(pid: int) -> None:
    """Unlink the segments process `pid` created; for its parent once it is gone (killed with
    its resource tracker)."""
    for name in segments_of(pid):
        with contextlib.suppress(OSError):
            os.unlink(os.path.join(SHM_DIR, name))


def sweep_stale_segments(shm_dir: str = SHM_DIR) -> list[str]:
    """Unlink the segments whose creator no longer exists: its pid is gone, or now belongs to a
    process that started at another time. Only segments of this pid namespace are judged (another
    namespace's pids mean nothing here). A name without an owner tag (made before names carried
    one) is removed when no process has its pid and none that this one can see has it mapped.
    Returns the names removed (and logs them)."""
    own_ns, freed = pid_namespace(), 0
    removed: list[str] = []
    if own_ns is None:
        return removed
    try:
        names = os.listdir(shm_dir)
    except OSError:
        return removed
    stale: list[str] = []
    untagged: list[str] = []
    for name in names:
        m = _OWNED_NAME.fullmatch(name)
        if m is not None:
            pid = int(m["pid"])
            if int(m["ns"], 16) == own_ns and not (alive(pid) and start_time(pid) == int(m["start"], 16)):
                stale.append(name)
            continue
        m = _UNTAGGED_NAME.fullmatch(name)
        if m is not None and not alive(int(m["pid"])):
            untagged.append(name)
    if untagged:  # read every process's maps only when there is such a name to judge
        in_use = mapped_files(shm_dir)
        stale += [name for name in untagged if name not in in_use]
    for name in stale:
        path = os.path.join(shm_dir, name)
        try:
            size = os.stat(path).st_size
            os.unlink(path)
        except OSError:  # gone already, or not ours to remove
            continue
        removed.append(name)
        freed += size
    if removed:
        log.warning("removed %d shared-memory segments (%.1f MB) that augsvc processes which no longer exist "
                    "left in %s: %s", len(removed), freed / 1e6, shm_dir, ", ".join(sorted(removed)[:10]))
    return removed


def shm_free_bytes() -> int | None:
    """The bytes /dev/shm can still hold (None where it cannot be asked)."""
    try:
        st = os.statvfs(SHM_DIR)
    except OSError:
        return None
    return st.f_bavail * st.f_frsize


def create_segment(size: int, tag: str, *, reserve: bool, client: bool = False) -> SharedMemory:
    """A new segment named after this process, registered with the resource tracker so that it
    is unlinked even if the creator dies. ``reserve``: fail now (instead of SIGBUS on a later
    write) when /dev/shm cannot hold it; otherwise only warn, since slots are rarely full."""
    size = max(int(size), 1)
    free = shm_free_bytes()
    if free is not None and size > free:
        msg = (f"shared memory: {size} bytes needed for {tag!r} but /dev/shm has {free} free; "
               "give the container more (docker --shm-size, a k8s emptyDir with medium Memory)")
        if reserve:
            raise LimitExceededError(msg)
        warnings.warn(msg, ResourceWarning, stacklevel=2)
    while True:
        prefix = CLIENT_SEGMENT_PREFIX if client else SEGMENT_PREFIX
        name = f"{prefix}{os.getpid()}{_owner_tag()}_{secrets.token_hex(4)}_{tag}"
        try:
            shm = SharedMemory(name=name, create=True, size=size)
        except FileExistsError:
            continue
        if client:
            _allocate(shm)
        return shm


def _allocate(shm: SharedMemory) -> None:
    """Give a client segment its pages now: a server's worker writes into it, and a page that
    tmpfs cannot supply would kill that worker with SIGBUS instead of failing here."""
    fallocate = getattr(os, "posix_fallocate", None)
    if fallocate is None:  # not Linux: no shared-memory reply path
        release_segment(shm, unlink=True)
        raise LimitExceededError("shared memory: posix_fallocate is not available on this platform")
    try:
        fallocate(shm._fd, 0, shm.size)  # type: ignore[attr-defined]
    except OSError as exc:
        release_segment(shm, unlink=True)
        raise LimitExceededError(f"shared memory: /dev/shm cannot hold a {shm.size}-byte segment ({exc})") from exc


#: A client segment starts with this many header bytes (its token first); pixels follow.
CLIENT_HEADER_BYTES = 64
CLIENT_TOKEN_BYTES = 16


def create_client_segment(nbytes: int) -> tuple[SharedMemory, bytes]:
    """A segment for `nbytes` of batch pixels that a server on this host may write into, and its
    token: random bytes written into the header, which the server must be told to use it."""
    shm = create_segment(CLIENT_HEADER_BYTES + nbytes, "batch", reserve=True, client=True)
    token = secrets.token_bytes(CLIENT_TOKEN_BYTES)
    cast(memoryview, shm.buf)[:CLIENT_TOKEN_BYTES] = token
    return shm, token


def client_pixels(shm: SharedMemory, shape: tuple[int, ...]) -> np.ndarray:
    """The uint8 pixels of `shape` in a client segment (after its header)."""
    return np.ndarray(shape, np.uint8, buffer=shm.buf, offset=CLIENT_HEADER_BYTES)


def usable_client_segment(shm: SharedMemory, token: bytes, nbytes: int) -> bool:
    """True when a worker may write `nbytes` of pixels into an attached client segment: still
    linked (its client has not let go of it), a plain file with exactly one name, big enough and
    with its pages allocated (a write past them would be a SIGBUS), and holding `token` — which
    only someone able to read the segment can know."""
    need = CLIENT_HEADER_BYTES + nbytes
    try:
        st = os.fstat(shm._fd)  # type: ignore[attr-defined]
    except (OSError, AttributeError):
        return False
    if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1 or min(st.st_size, shm.size) < need \
            or st.st_blocks * 512 < need or len(token) != CLIENT_TOKEN_BYTES:
        return False
    return hmac.compare_digest(bytes(cast(memoryview, shm.buf)[:CLIENT_TOKEN_BYTES]), token)


def is_unlinked(shm: SharedMemory) -> bool:
    """True when the segment's name is gone (its creator unlinked it): only mappings keep it."""
    try:
        return os.fstat(shm._fd).st_nlink == 0  # type: ignore[attr-defined]
    except (OSError, AttributeError):
        return True


_register_lock = threading.Lock()


def attach_segment(name: str) -> SharedMemory:
    """Attach to an existing segment without registering it with the resource tracker.

    Python < 3.13 registers every attachment. Forkserver children share the creator's tracker,
    which keeps a *set* of names: unregistering after attach would erase the creator's entry
    (and its later unlink then makes the tracker print a KeyError). So the registration of this
    one name is skipped instead; 3.13+ has ``track=False`` for exactly this.
    """
    if sys.version_info >= (3, 13):
        return SharedMemory(name=name, track=False)  # type: ignore[call-arg,unused-ignore]
    target = "/" + name.lstrip("/")
    with _register_lock:
        original = resource_tracker.register

        def register(name: Sized, rtype: str) -> None:
            if not (rtype == "shared_memory" and name == target):
                original(name, rtype)

        resource_tracker.register = register
        try:
            return SharedMemory(name=name)
        finally:
            resource_tracker.register = original


def release_segment(shm: SharedMemory, unlink: bool) -> None:
    """Close this process's mapping and, for the creator, unlink the name; safe to repeat."""
    try:
        shm.close()
    except BufferError:  # a view is still alive somewhere; the mapping goes with the process
        pass
    if unlink:
        try:
            shm.unlink()
        except FileNotFoundError:
            pass
