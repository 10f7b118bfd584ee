"""One writer per run folder: `runs/<recipe>/.alignpipe.lock` holds the pid of the run writing it.

The lock is an `flock` on that file, so the kernel drops it when its process dies, however it dies
(SIGKILL, OOM, a closed laptop): a lock file left behind by a dead process is simply taken over.
The pid inside is for the message a second run prints, not for deciding who holds the lock, so a
reused pid can never keep a folder locked. With several processes (`torchrun`, `accelerate launch`)
only rank 0 takes it: the others are the same run.
"""

from __future__ import annotations

import fcntl
import os
import socket
import sys
import time
from pathlib import Path

from alignpipe.errors import RunError

LOCK_NAME = ".alignpipe.lock"
LOCK_PARENT_ENV = "ALIGNPIPE_LOCK_PARENT"  # set by a run for the stage processes it starts (stage_processes)


class RunLock:
    """`with RunLock(run_root):` holds the run folder's lock, or raises RunError naming the holder."""

    def __init__(self, run_root: Path) -> None:
        self.path = Path(run_root) / LOCK_NAME
        self.fd: int | None = None

    def acquire(self) -> None:
        if int(os.environ.get("RANK", "0")) != 0:
            return
        while True:
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)  # not inherited by subprocesses
            except OSError as err:
                raise RunError(f"cannot write the run folder's lock file ({err.strerror})", where=str(self.path),
                               key="runs_dir", fix="set runs_dir to a writable folder") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _read(fd)
                os.close(fd)
                if _held_by_parent(holder):  # a stage process started by the run that holds it
                    return
                raise RunError(f"another alignpipe run is writing this run folder ({holder or 'pid unknown'})",
                               where=str(self.path.parent), fix="wait for it to finish or stop it; two runs of "
                               "the same recipe would overwrite each other's checkpoints") from None
            # The previous holder may have released and unlinked the file between our open and our
            # flock: then we locked an orphan inode and must start again on the path's new file.
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        stale = _read(fd)
        if stale:  # a lock file whose process died without releasing it
            print(f"[alignpipe] taking over a stale lock ({stale}, no longer running)", file=sys.stderr, flush=True)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%H:%M:%S')}\n".encode(), 0)
        self.fd = fd

    def release(self) -> None:
        if self.fd is None:
            return
        # unlink while still holding the lock, so nobody can lock the old file after we let go
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass
        os.close(self.fd)
        self.fd = None

    def __enter__(self) -> "RunLock":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def _held_by_parent(holder: str) -> bool:
    """True in a stage process that its parent run started (stage_processes) while that parent holds the lock:
    the parent's pid is in the environment and is the pid the lock file names."""
    parent = os.environ.get(LOCK_PARENT_ENV, "")
    return bool(parent) and parent == str(os.getppid()) and holder.startswith(f"pid {parent} ")


def _read(fd: int) -> str:
    return os.pread(fd, 200, 0).decode(errors="replace").strip()
