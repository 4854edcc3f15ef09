"""Waking a run's live view when its folder changes, rather than on a timer.

A page that polls its run folder four times a second wakes the server four times a second, and on a machine whose
cores a training run keeps busy every wake-up takes one of its threads off a core for a moment: the run slows by
more than the server's own CPU time (benchmarks/README.md, issue 16). On Linux the stream instead waits on inotify
for the folder (and its `samples/` and `samples/process/`) to change: a new metrics.jsonl line, a picture, a lock,
an evaluation; so the server wakes when there is something to send, at once, and otherwise only every
`server.LIVE_SECONDS` for what no file tells (a process that died holding its lock; a folder on a network file
system written from another machine, which inotify does not see). Elsewhere, or when inotify is out of instances
or watches, the stream polls as before.

inotify is three libc calls (`ctypes`): watchfiles, the library uvicorn's reloader uses, looks for changes every
50 ms in a thread of its own, which is the polling this replaces.
"""

import ctypes
import ctypes.util
import os
import struct
import sys
from pathlib import Path

import anyio

# <sys/inotify.h>: a file closed after writing, its metadata changed, moved out or in, created, deleted. Not every
# write (IN_MODIFY): the trainer opens, writes and closes metrics.jsonl for each line (one event a line, not two),
# and a file a process keeps open and writes to (a launched run's output, ten times a second) wakes nothing; what
# such a file says (the lock's holder) shows at the next look, within LIVE_SECONDS.
MASK = 0x4 | 0x8 | 0x40 | 0x80 | 0x100 | 0x200
WATCHED = ("", "samples", "samples/process")  # the run folder, and where its pictures go
EVENT = struct.Struct("iIII")  # struct inotify_event: wd, mask, cookie, len; then `len` bytes of name


def _inotify():
    """libc with inotify (Linux), else None."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        libc.inotify_init1, libc.inotify_add_watch  # noqa: B018 - (present, or AttributeError)
        return libc
    except (OSError, AttributeError):
        return None


class FolderChanges:
    """`await wait(timeout)` returns once a file in the run folder `folder` (or its picture folders) changed, or after
    `timeout` seconds, whichever comes first. Changes since the last `arm()` count: arm, then read the folder, then
    wait, and nothing written in between is missed. Files named in `ignore` wake nothing (the output of a run the
    page launched, which its progress bar writes to ten times a second). `close()` when done."""

    def __init__(self, folder: Path, ignore: set[str] = frozenset()):
        self.paths, self.ignore = [folder / sub for sub in WATCHED], {os.fsencode(name) for name in ignore}
        self.libc = _inotify()
        self.fd = self.libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC) if self.libc else -1  # (inotify's flags)

    @property
    def live(self) -> bool:
        """Whether changes wake `wait` (inotify), or only its timeout does."""
        return self.fd >= 0

    def arm(self) -> None:
        """Watch the folders that exist now (again: one that was removed and made anew is another inode; watching
        one already watched changes nothing), and forget the changes seen so far."""
        if not self.live:
            return
        for path in self.paths:
            if path.is_dir() and self.libc.inotify_add_watch(self.fd, os.fsencode(path), MASK) < 0:
                self.close()  # (out of watches: poll instead)
                return
        self._changed()

    async def wait(self, timeout: float) -> None:
        if not self.live:
            await anyio.sleep(timeout)
            return
        with anyio.move_on_after(timeout):
            while True:
                await anyio.wait_readable(self.fd)
                if self._changed():
                    return

    def _changed(self) -> bool:
        """Read the changes queued so far: whether one of them is to a file not ignored (or to a folder itself)."""
        names = []
        try:
            while data := os.read(self.fd, 65536):
                offset = 0
                while offset < len(data):
                    _, _, _, length = EVENT.unpack_from(data, offset)
                    offset += EVENT.size + length
                    names.append(data[offset - length:offset].rstrip(b"\0"))
        except BlockingIOError:  # nothing (more) to read
            pass
        return any(name not in self.ignore for name in names)

    def close(self) -> None:
        if self.live:
            os.close(self.fd)
            self.fd = -1
