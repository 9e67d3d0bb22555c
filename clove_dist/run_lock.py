"""One run per run directory: rank 0 holds an exclusive lock on RUN_DIR/run.lock for the life of the run.

Two runs on one directory (a job submitted twice, a debug run left in another terminal) would write the same
checkpoint tags, `latest` and metrics.jsonl, and each would resume from the other's half-written state. The lock is
a POSIX record lock (fcntl.lockf): held by the process, not by the data-loader workers it forks, and dropped by the
kernel when the process ends in any way (kill -9, a node's time limit), so a crashed or requeued run never finds a
stale one; NFS carries it to other machines. A file system without locks gets a warning, not a refusal.

    lock = RunLock.acquire(run_dir)      # UserError naming the holder when another run has it
    ...
    lock.release()
"""
from __future__ import annotations

import errno
import fcntl
import os
import socket
from pathlib import Path

from .errors import UserError
from .log import log

LOCK_NAME = "run.lock"


def _holder_text() -> str:
    job = os.environ.get("SLURM_JOB_ID")
    return f"pid {os.getpid()} on {socket.gethostname()}" + (f", SLURM job {job}" if job else "")


class RunLock:
    def __init__(self, fd: int | None) -> None:
        self.fd = fd

    @classmethod
    def acquire(cls, run_dir: Path) -> "RunLock":
        run_dir.mkdir(parents=True, exist_ok=True)
        path = run_dir / LOCK_NAME
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "unknown process"
                os.close(fd)
                raise UserError(f"run directory {run_dir} is in use by another run ({holder}); wait for it to "
                                f"end, or give this one another run.name") from None
            os.close(fd)
            log(f"WARNING: cannot lock {path} ({e.strerror}): make sure no other run uses {run_dir}")
            return cls(None)
        os.ftruncate(fd, 0)
        os.pwrite(fd, (_holder_text() + "\n").encode(), 0)
        return cls(fd)

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # the process's last descriptor of the file: the lock goes with it
            self.fd = None
